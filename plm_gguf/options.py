"""Checks of command-line values that several commands share (made once at each entry), and of values read from files."""

from __future__ import annotations

import os

from plm_gguf.errors import UsageError

MAX_THREADS = 512


def check_threads(threads: int | None) -> None:
    """--threads: absent (all cores) or from 1 to MAX_THREADS."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads {threads} is out of range: it must be from 1 to {MAX_THREADS}",
                         f"this machine has {os.cpu_count() or 1} cores; leave --threads out to use them all")


def is_int(value: object) -> bool:
    """An integer that is not a bool (a JSON or GGUF value: True is not a size)."""
    return isinstance(value, int) and not isinstance(value, bool)
