"""How the sweep scores a model: chunked evaluation in the llama.cpp child process.

The math runs in the worker (`python -m plm_gguf.llama.worker score`), so it lives in the
core, plm_gguf.llama.scoring; the stage plans with its constants from there.
"""

from plm_gguf.llama.scoring import MIN_CTX, scored_range

__all__ = ["MIN_CTX", "scored_range"]
