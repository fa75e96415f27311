"""Running a CMake build of llama.cpp with visible progress, and the cache entry discipline.

Every llama.cpp build plm-gguf makes (the host build, device cross builds) goes through
`cmake_build`: configure, then build the named targets with Ninja, the whole log kept in a
file, and progress reported as it goes ("host build: 57/190 steps, 1:42") instead of minutes of
silence. `BuildProgress` prints to stderr: one line rewritten in place on a terminal, a line
every 10% or 30 s in a log (CI).

`cached_entry` is the cache discipline shared by those builds: one file lock per key, a staging
folder beside the entry renamed into place only when complete, stale staging folders of killed
builds removed, nothing left half-built.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from plm_gguf.errors import LlamaCppError

Log = Callable[[str], None]
_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class BuildProgress:
    """Turns Ninja's `[n/N] ...` lines into progress reports for a person."""

    def __init__(self, label: str, log: Log | None = None, stream=None):
        self.label = label
        self.started = time.monotonic()
        self.stream = stream or sys.stderr
        self.log = log
        self.tty = log is None and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_decile = -1
        self.last_time = 0.0
        self.steps = (0, 0)

    def _emit(self, text: str, final: bool = False) -> None:
        if self.log is not None:
            self.log(text)
        elif self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.stream.flush()
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def phase(self, what: str) -> None:
        self._emit(f"{self.label}: {what} ({_fmt(time.monotonic() - self.started)})")

    def line(self, text: str) -> None:
        match = _STEP.match(text)
        if not match:
            return
        done, total = int(match.group(1)), int(match.group(2))
        self.steps = (done, total)
        now = time.monotonic()
        decile = 10 * done // max(total, 1)
        if self.tty or decile > self.last_decile or now - self.last_time >= 30:
            self.last_decile, self.last_time = decile, now
            self._emit(f"{self.label}: {done}/{total} steps, {_fmt(now - self.started)}")

    def done(self) -> None:
        self._emit(f"{self.label}: built in {_fmt(time.monotonic() - self.started)}", final=True)


def tool(module: str, attr: str, exe: str, hint: str) -> str:
    """A build tool from its PyPI package (cmake, ninja) or from PATH."""
    try:
        mod = __import__(module)
        candidate = Path(getattr(mod, attr)) / exe
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(exe)
    if not found:
        raise LlamaCppError(f"{exe} is not installed", hint)
    return found


def cmake_build(tree: Path, build_dir: Path, configure_args: list[str], targets: list[str], *, log_file: Path,
                progress: BuildProgress, env: dict | None = None, jobs: int | None = None,
                error: type[Exception] = LlamaCppError) -> None:
    """Configure and build `targets`; raise `error` with the first error line and the log's path."""
    hint = "pip install cmake ninja (the devices extra of plm-gguf), or the system's packages"
    cmake = tool("cmake", "CMAKE_BIN_DIR", "cmake", hint)
    ninja = tool("ninja", "BIN_DIR", "ninja", hint)
    jobs = jobs or os.cpu_count() or 2
    # ggml compiles through ccache where it is installed; paths relative to the staging folder
    # let a rebuild in another staging folder (a fallback, llama-server added) reuse the objects
    env = {**(env or os.environ), "CCACHE_BASEDIR": str(tree.parent), "CCACHE_NOHASHDIR": "1"}
    steps = [
        ("configuring", [cmake, "-S", str(tree), "-B", str(build_dir), "-G", "Ninja",
                         f"-DCMAKE_MAKE_PROGRAM={ninja}", *configure_args]),
        ("compiling", [cmake, "--build", str(build_dir), "--parallel", str(jobs), "--target", *targets]),
    ]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        for what, cmd in steps:
            progress.phase(what)
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", env=env)
            assert proc.stdout is not None
            tail: deque[str] = deque(maxlen=30)
            try:
                for line in proc.stdout:
                    out.write(line)
                    tail.append(line.rstrip())
                    progress.line(line)
                code = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            if code != 0:
                said = next((l for l in tail if re.search(r"\berror\b", l, re.I)), tail[-1] if tail else "no output")
                raise error(f"{progress.label} failed while {what}: {said.strip()[:300]}",
                            f"see the build log {log_file}")
    progress.done()


@contextmanager
def cached_entry(entry: Path, complete: Callable[[Path], bool]) -> Iterator[Path | None]:
    """Yield None when `entry` is complete; else a fresh staging folder that becomes the entry
    when the block ends without an error. One build per entry at a time (a file lock)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if complete(entry):
            yield None
            return
        for stale in entry.parent.glob(f".{entry.name}.partial-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
        try:
            yield staging
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
