"""How `plm-gguf deploy` shows an upload: a progress bar on a terminal, a plain line now and then in a log.

``UploadMeter(console)`` is the ``meter`` deploy() takes: ``meter(name, size, offset)`` is a context
manager around one upload that yields the ``report(bytes_sent)`` the transports call (None for a small
file, which shows nothing beyond deploy's ``put`` line).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .transports import Report

QUIET_BELOW = 1 << 20  # bytes: a smaller file gets no bar and no lines
LINE_STEP = 0.10  # in a log: a line each time this fraction of the file more was sent ...
LINE_EVERY = 30.0  # ... or this many seconds passed since the last line, whichever comes first


class UploadMeter:
    """deploy's meter: a rich progress bar per upload where the console is a terminal, plain lines elsewhere."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.clock = clock

    @contextmanager
    def __call__(self, name: str, size: int, offset: int = 0) -> Iterator[Report | None]:
        if size < QUIET_BELOW:
            yield None
        elif self.console.is_terminal:
            with Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                          DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
                          console=self.console) as bar:
                task = bar.add_task(name, total=size, completed=offset)
                yield lambda sent: bar.update(task, completed=sent)
        else:
            lines = _Lines(self.console, name, size, offset, self.clock)
            yield lines.report
            lines.done()


class _Lines:
    """Progress as log lines: one per LINE_STEP of the file or LINE_EVERY s, and a last one with the average rate."""

    def __init__(self, console: Console, name: str, size: int, offset: int, clock: Callable[[], float]) -> None:
        self.console, self.name, self.size, self.offset, self.clock = console, name, size, offset, clock
        self.began = self.line_at = clock()
        self.sent = self.line_sent = offset

    def _rate(self, now: float) -> float:
        return (self.sent - self.offset) / max(now - self.began, 1e-6)

    def _print(self, event: str, text: str) -> None:
        self.console.print(f"{event:>6} {self.name}  {text}", markup=False, highlight=False, soft_wrap=True)

    def report(self, sent: int) -> None:
        now, self.sent = self.clock(), sent
        if sent >= self.size or (sent - self.line_sent < LINE_STEP * self.size and now - self.line_at < LINE_EVERY):
            return
        self.line_at, self.line_sent = now, sent
        rate = self._rate(now)
        left = f"  {duration((self.size - sent) / rate)} left" if rate > 0 else ""
        self._print("put", f"{size(sent)} of {size(self.size)} ({sent * 100 // self.size}%)  {size(rate)}/s{left}")

    def done(self) -> None:
        now = self.clock()
        resumed = f", resumed at {size(self.offset)}" if self.offset else ""
        self._print("sent", f"{size(self.sent - self.offset)} in {duration(now - self.began)} "
                            f"({size(self._rate(now))}/s{resumed})")


def size(n: float) -> str:
    """Bytes as a person reads them: 512.0 MiB, 1.1 GiB."""
    units = ("B", "KiB", "MiB", "GiB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


def duration(seconds: float) -> str:
    """0.4 s, 50 s, 2 min 5 s, 1 h 3 min."""
    whole = round(seconds)
    if whole < 10:
        return f"{max(seconds, 0):.1f} s"
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"
