"""The benchmark harness measures each job's own peak memory, not its own (benchmarks/measure.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from benchmarks.measure import CommandFailed, run_command


def test_a_copy_reports_a_small_peak_even_from_a_large_harness(tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:  # 64 MiB that cp streams through a small buffer
        f.write(os.urandom(1 << 20) * 64)
    ballast = np.ones(768 << 20, dtype=np.uint8)  # the harness holds 768 MiB, touched
    assert ballast.sum() == 768 << 20
    wall, rss, cpu = run_command(["cp", str(src), str(tmp_path / "copy.bin")], tmp_path / "log")
    assert (tmp_path / "copy.bin").stat().st_size == src.stat().st_size
    assert 0 < rss < 48 << 20, f"cp reported a peak of {rss / 2**20:.0f} MiB"
    assert wall > 0 and cpu >= 0


def test_a_job_that_uses_memory_reports_it(tmp_path):
    code = "import numpy as np; a = np.ones(300 << 20, dtype=np.uint8); print(a.sum())"
    _, rss, _ = run_command([sys.executable, "-c", code], tmp_path / "log")
    assert rss > 300 << 20


def test_a_failing_or_missing_command_is_reported(tmp_path):
    with pytest.raises(CommandFailed, match="exited with 3"):
        run_command(["sh", "-c", "exit 3"], tmp_path / "log")
    with pytest.raises(CommandFailed):
        run_command(["/nonexistent/tool"], tmp_path / "log")
