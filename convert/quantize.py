"""An unquantized GGUF -> any llama.cpp file type, by llama.cpp's own quantizer in a child
process (so its choice of per-tensor types is exactly llama-quantize's)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from plm_gguf.llama.runtime import run_worker
from plm_gguf.qtypes import llama_file_types

_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def quantize_file(src: Path, dst: Path, outtype: str, *, threads: int | None = None, progress: bool = False,
                  overrides: dict[str, int] | None = None, imatrix: Path | None = None) -> None:
    """Quantize `src` into `dst` as llama.cpp file type `outtype` (q4_k_m, iq4_nl, ...).
    `overrides` maps tensor-name regexes to ggml types; `imatrix` is an .npz of importances."""
    ftype = int(llama_file_types()[outtype])
    args = ["quantize", str(src), str(dst), str(ftype), "--threads", str(threads or os.cpu_count() or 1)]
    with contextlib.ExitStack() as stack:
        if overrides:
            fh = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".json", delete=False))
            stack.callback(os.unlink, fh.name)
            json.dump(overrides, fh)
            fh.close()
            args += ["--overrides", fh.name]
        if imatrix:
            args += ["--imatrix", str(imatrix)]
        with _tensor_progress(progress, f"quantizing to {outtype}") as on_line:
            run_worker(args, on_line=on_line)


@contextlib.contextmanager
def _tensor_progress(enabled: bool, label: str):
    if not enabled:
        yield None
        return

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None)

        def on_line(line: str) -> None:
            match = _PROGRESS.search(line)
            if match:
                bar.update(task, completed=int(match[1]), total=int(match[2]))

        yield on_line
