"""llama.cpp's file and tensor types as plm-gguf names them: which a user can ask for, which
the converter writes itself, which need an importance matrix."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from plm_gguf.errors import UsageError

# Types the converter writes itself (no llama.cpp): file type -> tensor type of the weight matrices.
DIRECT_TYPES = {"f32": (FT.ALL_F32, QT.F32), "f16": (FT.MOSTLY_F16, QT.F16),
                "bf16": (FT.MOSTLY_BF16, QT.BF16), "q8_0": (FT.MOSTLY_Q8_0, QT.Q8_0)}
# Types that llama.cpp refuses to make without an importance matrix.
NEEDS_IMATRIX = {"iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "q2_k_s"}
_NOT_FILE_TYPES = {"guessed", "mxfp4_moe", "tq1_0", "tq2_0", "nvfp4", "q1_0"}


def llama_file_types() -> dict[str, FT]:
    """Every llama.cpp file type a user can ask for, by its lower-case name (q4_k_m, iq4_nl, ...)."""
    names = {ft.name.lower().removeprefix("mostly_").removeprefix("all_"): ft for ft in FT}
    return {n: ft for n, ft in names.items() if n not in _NOT_FILE_TYPES}


def parse_outtype(outtype: str, source_dtype: str | None = None) -> str:
    """Normalise a user's --outtype; `auto` keeps 16-bit sources as they are (f32 -> f16, as llama.cpp)."""
    name = outtype.lower().replace("-", "_")
    if name == "auto":
        if source_dtype is None:
            return "auto"
        return "bf16" if source_dtype == "BF16" else "f16"
    if name not in llama_file_types():
        raise UsageError(f"unknown output type {outtype!r}",
                         f"choose auto or one of {', '.join(sorted(llama_file_types()))}")
    return name


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) to float32, exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)
