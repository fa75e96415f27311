"""llama.cpp for plm-gguf: the pinned source, the patch set, and the builds made from them.

- `plm_gguf.llama.patches`: the patch set (absorbed MLA) and applying it.
- `plm_gguf.llama.isa`: which instruction-set extensions the host build may use (probed).
- `plm_gguf.llama.build`: CMake builds with progress, and the cache entry discipline.
- `plm_gguf.llama.host`: the host build (shared libraries for llama-cpp-python and the tools,
  from one CMake tree) and its self-check.
- `plm_gguf.llama.runtime`: the parent side of running llama.cpp (lib_env, run_worker, probe,
  run_logits, the op test).
- `plm_gguf.llama.worker`: the child process, `python -m plm_gguf.llama.worker` (the one place a
  llama_cpp.Llama is made: `open_model`).
- `plm_gguf.llama.scoring`: the chunked evaluation the worker's `score` runs.
"""

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the version plm-gguf pins; its vendor/llama.cpp is the source
