"""Where plm-gguf's time goes: py-spy's collapsed stacks summed per function.

    python -m benchmarks.profile STACKS.txt [--top 25] [--lines]   summarise a `py-spy record --format raw` file

py-spy comes with benchmarks/work/convert-venv (made by `python -m benchmarks`); record with e.g.

    benchmarks/work/convert-venv/bin/py-spy record --rate 50 --format raw --subprocesses -o STACKS.txt -- \\
        .venv/bin/python -m plm_gguf.cli convert MODEL --outtype f16 --outfile OUT.gguf
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>[^(]+) \((?P<file>[^:)]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str, lines: bool = False) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)` (or `file.py:12` with lines)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m['func'].strip()} ({file}" + (f":{m['line']})" if lines and m["line"] else ")")


def summarise(path: Path, lines: bool = False) -> tuple[int, collections.Counter, collections.Counter]:
    """Total samples, self samples per function, inclusive samples per function."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f, lines) for f in stack.split(";") if f]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]  # --subprocesses puts the process first
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        total += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl


def report(path: Path, top: int = 25, lines: bool = False) -> str:
    total, own, incl = summarise(path, lines)
    lines = [f"{path.name}: {total} samples", "", "self time (leaf frames):"]
    lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    ap.add_argument("stacks", type=Path, nargs="+")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lines", action="store_true", help="per source line rather than per function")
    a = ap.parse_args(argv)
    for p in a.stacks:
        print(report(p, a.top, a.lines))
        print()


if __name__ == "__main__":
    main()
