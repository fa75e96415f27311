"""ggml's own quantization, called in-process: `ggml_quantize_chunk` from the host build's
libggml-base through ctypes, the function llama_model_quantize calls for every tensor. Rows are
quantized independently of each other, so a block of rows gives the bytes llama.cpp writes for
those rows; ctypes releases the GIL during the call, so blocks quantize in parallel on threads.

Why ctypes rather than gguf-py's numpy quantizers: gguf-py has no k-quant or i-quant encoder
(only dequantizers), and llama-cpp-python binds llama.h, not ggml.h."""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from plm_gguf.errors import LlamaCppError

_LIB_NAMES = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}


@functools.cache
def _lib(folder: Path | None = None) -> ctypes.CDLL:
    if folder is None:
        from plm_gguf.llama.runtime import build

        folder = build()
    path = Path(folder) / _LIB_NAMES.get(sys.platform, "libggml-base.so")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise LlamaCppError(f"cannot load ggml's library {path}: {exc}",
                            "rebuild llama.cpp: `python -m plm_gguf.llama.worker build`") from None
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the host build is already there (nothing is built to find out)."""
    try:
        from plm_gguf.llama.host import find_host_build

        return find_host_build() is not None
    except Exception:  # noqa: BLE001 - no sdist cached yet, an unreadable manifest: not available
        return False


def prepare(qtype: QT) -> None:
    """Load the library and ggml's tables for `qtype` (the i-quants' grids) once, before threads use it."""
    _lib().ggml_quantize_init(int(qtype))


def requires_imatrix(qtype: QT) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(qtype)))


def quantize_rows(values: np.ndarray, qtype: QT, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 values (n_rows x n_per_row) in ggml type `qtype`, as bytes (uint8).
    `imatrix` holds one importance per column (n_per_row float32 values), or None."""
    lib = _lib()
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n_per_row = values.shape
    out = np.empty(n_rows * lib.ggml_row_size(int(qtype), n_per_row), dtype=np.uint8)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):  # a bug in the caller, not a user error
            raise AssertionError(f"imatrix of shape {imatrix.shape} for rows of {n_per_row}")
    written = lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
                                      None if imatrix is None else imatrix.ctypes.data)
    if written != out.nbytes:
        raise AssertionError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out
