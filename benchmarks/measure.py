"""One timed run of a command as a child process: wall time, peak RSS, peak disk use.

Interference from other jobs is measured, not guessed: the CPU time of the whole machine
(/proc/stat) minus the job's own (rusage), as a share of all cores over the run.

Peak RSS is each job's own. A child forked from this process would not do: Linux starts a
process's ru_maxrss at the resident size of the process it was forked from (exec records the old
address space's high-water mark), so after the harness has grown to gigabytes every job, `cp`
included, would report gigabytes. Each command is therefore started by a small launcher (a bare
`python -S`, about 10 MB), which forks the command from itself and reports the command's
os.wait4 rusage (Linux reports the largest single process of the tree, not a sum). Peak disk use is the
allocated size of the output folder, polled every 50 ms while the command runs, so an
intermediate file counts even if the command deletes it before it ends.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Sample:
    wall_s: float
    peak_rss_bytes: int
    peak_disk_bytes: int | None
    final_disk_bytes: int | None
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    cpu_s: float  # CPU seconds (user + system) of the job's own processes
    others_cpu: float  # share of all cores busy with anything else during the run (0..1)

    def to_json(self) -> dict:
        return asdict(self)


class CommandFailed(RuntimeError):
    pass


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache (root only), so every run reads cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def loadavg() -> tuple[float, float, float]:
    a, b, c = Path("/proc/loadavg").read_text().split()[:3]
    return float(a), float(b), float(c)


def cpu_times() -> tuple[float, float]:
    """(busy, total) seconds of all cores since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def disk_bytes(folder: Path) -> int:
    """Allocated bytes of the regular files directly under `folder`, hidden ones included."""
    total = 0
    with os.scandir(folder) as it:
        for entry in it:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:  # renamed or removed between listing and stat
                pass
    return total


class _DiskWatch:
    def __init__(self, folder: Path, interval: float = 0.05):
        self.folder, self.interval, self.peak = folder, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_bytes(self.folder))
            self._stop.wait(self.interval)

    def __enter__(self) -> "_DiskWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_bytes(self.folder))


# Forks the command (argv[2:]) from this small process, waits, and writes the command's exit code,
# ru_maxrss (KiB) and CPU seconds to the file argv[1].
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
"""


def run_command(cmd: list[str], log: Path, *, watch: Path | None = None, env: dict | None = None,
                cwd: Path | None = None) -> tuple[float, int, float]:
    """Run `cmd`, its stdout and stderr to `log`; return (wall seconds, its own peak RSS bytes,
    CPU seconds)."""
    with open(log, "ab") as out, tempfile.TemporaryDirectory(prefix="measure-") as folder:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        report = Path(folder) / "rusage"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(report), *cmd], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd)
        wall = time.perf_counter() - start
        if not report.exists():
            raise CommandFailed(f"the launcher of {shlex.join(cmd)} exited with {proc.returncode}; see {log}")
        code, maxrss_kib, cpu = report.read_text().split()
    if int(code) != 0:
        raise CommandFailed(f"{shlex.join(cmd)} exited with {code}; see {log}")
    return wall, int(maxrss_kib) * 1024, float(cpu)


def measure(steps: list[list[str]], log: Path, *, watch: Path | None = None, drop: bool = True,
            env: dict | None = None) -> Sample:
    """Time a job of one or more commands run one after the other (a pipeline of tools):
    wall times add up, peak RSS is the largest of the steps, disk is watched throughout."""
    if drop:
        drop_caches()
    before, (busy0, total0) = loadavg(), cpu_times()
    wall, rss, cpu = 0.0, 0, 0.0
    with _DiskWatch(watch) if watch is not None else contextlib.nullcontext() as disk:
        for cmd in steps:
            w, r, c = run_command(cmd, log, env=env)
            wall, rss, cpu = wall + w, max(rss, r), cpu + c
    busy1, total1 = cpu_times()
    others = max(0.0, (busy1 - busy0) - cpu) / max(total1 - total0, 1e-9)
    peak, final = (disk.peak, disk_bytes(watch)) if watch is not None else (None, None)
    return Sample(wall, rss, peak, final, before, loadavg(), cpu, others)
