"""Peak memory of plm-gguf's verify and sweep on the full-size replica, before and after a change.

    python -m benchmarks.memory --label after [--before-tree DIR] --out benchmarks/results/memory.json -- JOB...

Each job (`verify` or `sweep`) runs as a child through benchmarks.measure.run_command (its own
peak RSS: the largest single process of its tree, from os.wait4) while a sampler reads
/proc/PID/status of every process of the tree every 100 ms, so the peak is also split by process:
plm-gguf's own (the torch reference, the importance matrix) and llama.cpp's workers, whose
resident set is mostly the memory-mapped model file (RssFile: page cache, reclaimable), apart
from their own buffers (RssAnon). `--before-tree` runs the jobs from another checkout of
plm-gguf (a git worktree), to measure the code before a change the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from benchmarks.measure import run_command
from benchmarks.replica import ensure_replica

WORK = Path(__file__).parent / "work" / "memory"


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


class Sampler:
    """Largest VmRSS and RssAnon seen per kind of process (plm-gguf / llama.cpp worker)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peaks = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in _tree(me)[1:]:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"plm_gguf" not in cmd and b"plm-gguf" not in cmd:
                    continue  # the launcher
                kind = "llama.cpp worker" if b"plm_gguf.llama.worker" in cmd else "plm-gguf"
                st = _status(pid)
                peak = self.peaks.setdefault(kind, {"rss": 0, "anon": 0, "file": 0})
                if st.get("VmRSS", 0) > peak["rss"]:
                    peak.update(rss=st["VmRSS"], file=st.get("RssFile", 0))
                peak["anon"] = max(peak["anon"], st.get("RssAnon", 0))
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def job_command(job: str, replica: Path, f16: Path, out: Path) -> list[str]:
    cli = [sys.executable, "-m", "plm_gguf.cli"]
    if job == "verify":
        return [*cli, "verify", str(replica), str(f16)]
    if job == "sweep":  # two recipes, one with an importance matrix; a short text keeps the scoring short
        return [*cli, "quantize", str(replica), "--sweep", "--types", "q8_0,q2_k", "--text", str(WORK / "text.txt"),
                "--out", str(out), "--force"]
    raise SystemExit(f"unknown job {job!r}: verify or sweep")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--before-tree", type=Path, default=None, help="a checkout of plm-gguf to run the jobs from")
    ap.add_argument("--f16", type=Path, required=True, help="the replica converted to f16 (what verify checks)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    ap.add_argument("jobs", nargs="+")
    a = ap.parse_args(argv)
    replica = ensure_replica()
    WORK.mkdir(parents=True, exist_ok=True)
    if not (WORK / "text.txt").exists():  # about 2,500 tokens of the built-in evaluation corpus
        corpus = Path(__file__).parent.parent / "quant_eval" / "corpus" / "default.txt"
        (WORK / "text.txt").write_text(corpus.read_text()[:12000])
    env = dict(os.environ)
    if a.before_tree:
        env["PYTHONPATH"] = str(a.before_tree.resolve())
    results = json.loads(a.out.read_text()) if a.out.exists() else []
    for job in a.jobs:
        cmd = job_command(job, replica, a.f16, WORK / f"sweep-{a.label}")
        log = WORK / f"{job}-{a.label}.log"
        log.unlink(missing_ok=True)
        with Sampler() as sampler:
            wall, rss, cpu = run_command(cmd, log, env=env, cwd=WORK)
        row = {"label": a.label, "job": job, "command": " ".join(cmd[1:]), "wall_s": round(wall, 1),
               "tree_peak_rss_bytes": rss, "cpu_s": round(cpu, 1), "by_process": sampler.peaks,
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        results.append(row)
        a.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
