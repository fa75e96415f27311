"""llama.cpp on this host, through llama-cpp-python, in child processes (the parent side).

The library is the host build (plm_gguf.llama.host): the llama.cpp that llama-cpp-python
vendors, with plm-gguf's patches (the absorbed-MLA `plm` graph; stock-layout files run as
before), for this CPU's probed instruction set, self-checked, cached. llama-cpp-python loads it
from $LLAMA_CPP_LIB_PATH (read at import: `load_shared_library("llama", LLAMA_CPP_LIB_PATH)`
opens LIB_PATH/libllama.so, which finds libggml*.so next to it through its $ORIGIN runpath).
`lib_env()` gives an environment for a child process; the variable must be set before
llama_cpp is first imported, so llama_cpp is only ever imported in the worker
(`python -m plm_gguf.llama.worker`, plm_gguf/llama/worker.py), never here.

- `run_worker(args)`: run one worker command; a crash or an error becomes a LlamaCppError
  naming what llama.cpp said (verify, quantize and the sweep talk to the worker this way);
- `probe(model)`: llama.cpp's KV-cache report for a model (or its load error), as a dict;
- `run_logits(model, sequences, out)`: logits and greedy continuations with a chosen KV cache
  type and flash attention;
- `build()`, `build_key()`, `run_op_test()`: the host build, its key, and llama.cpp's own
  test-backend-ops on the patched CPU kernels.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock

from plm_gguf.errors import LlamaCppError
from plm_gguf.llama import LLAMA_CPP_PYTHON_VERSION
from plm_gguf.llama.host import host_build, host_key
from plm_gguf.llama.patches import source_dir

WORKER = "plm_gguf.llama.worker"


def build_key(version: str = LLAMA_CPP_PYTHON_VERSION) -> str:  # noqa: ARG001
    """The host build's cache key (patched, this CPU)."""
    return host_key()


def build(*, log=None, jobs: int | None = None) -> Path:
    """The folder with the host build's libraries and tools (built first if needed)."""
    return host_build(log=log, jobs=jobs).bin


def lib_env(base: dict | None = None, lib: Path | None = None) -> dict:
    """An environment for a child process whose llama-cpp-python loads the host build."""
    env = dict(os.environ if base is None else base)
    env["LLAMA_CPP_LIB_PATH"] = str(lib or build())
    return env


# ---------------------------------------------------------------- the worker

def run_worker(args: list[str], *, timeout: float | None = None,
               on_line: Callable[[str], None] | None = None, env: dict | None = None,
               pass_fds: tuple[int, ...] = ()) -> None:
    """Run one worker command on the host build; raise LlamaCppError naming what llama.cpp said.
    `pass_fds` stay open in the child (under the same numbers)."""
    if env is None:
        env = lib_env()
    cmd = [sys.executable, "-m", WORKER, *args]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=env, pass_fds=pass_fds)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip()
            tail.append(line)
            if on_line:
                on_line(line)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        raise LlamaCppError(f"llama.cpp did not finish {args[0]} within {timeout:.0f} s", "retry with a smaller input") from exc
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise LlamaCppError(_failure_line(proc.returncode, list(tail), args[0]), _failure_hint(list(tail)))


def _failure_line(code: int, tail: list[str], what: str) -> str:
    said = next((l for l in reversed(tail) if "GGML_ASSERT" in l or "error" in l.lower() or "failed" in l.lower()), None)
    said = said or (tail[-1] if tail else "no output")
    if code < 0:
        return f"llama.cpp died with {signal.Signals(-code).name} during {what}: {said.strip()}"
    return f"llama.cpp failed during {what}: {said.strip()}"


def _failure_hint(tail: list[str]) -> str:
    text = "\n".join(tail)
    if "flash" in text.lower() or "ne[0] == v->ne[0]" in text:
        return "flash attention aborts on PLM (K head 192 vs V head 128); run llama.cpp with flash attention off"
    if "unknown model architecture" in text:
        return "the installed llama-cpp-python is too old for PLM; install the version plm-gguf pins"
    if "importance matrix" in text:
        return "this type needs an importance matrix: use `plm-gguf quantize`, which computes one"
    return "run with PLM_GGUF_DEBUG=1 to see llama.cpp's full log"


def probe(model: str | os.PathLike[str], *, n_ctx: int = 4096, f32_cache: bool = False,
          cache_type: int | None = None, flash_attn: bool = False, env: dict | None = None,
          timeout: float = 600) -> dict:
    """Load MODEL in the worker (with env, e.g. lib_env()) and return llama.cpp's report:
    {"ok": bool, "kv_cache": {...} | None, "error": first error line | None, "lib": path}.
    The cache is f16 unless f32_cache or cache_type (a ggml type id: 8 = q8_0) says otherwise.
    A worker that dies is a report too (ok False), not an exception."""
    cmd = [sys.executable, "-m", WORKER, "probe", str(model), "--n-ctx", str(n_ctx)]
    if f32_cache:
        cmd.append("--f32-cache")
    if cache_type is not None:
        cmd += ["--cache-type", str(cache_type)]
    if flash_attn:
        cmd.append("--flash-attn")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or lib_env(), timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "kv_cache": None, "error": f"the probe died (exit {proc.returncode}): {said}", "lib": None}


def run_logits(model: str | os.PathLike[str], sequences: list[list[int]], out: Path, *, env: dict | None = None,
               cache_type: int = 0, flash_attn: bool = False, greedy: int = 0, timeout: float = 600):
    """The worker's `logits` with a chosen KV cache type (default f32) and flash attention:
    (logits per sequence, greedy continuations); all_logits_i.npy in OUT when greedy."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.json").write_text(json.dumps(sequences))
    args = ["logits", str(model), "--tokens", str(out / "tokens.json"), "--out", str(out),
            "--cache-type", str(cache_type), "--greedy", str(greedy)]
    if flash_attn:
        args.append("--flash-attn")
    run_worker(args, env=env, timeout=timeout)
    logits = [np.load(out / f"logits_{i}.npy") for i in range(len(sequences))]
    return logits, json.loads((out / "greedy.json").read_text())


# ---------------------------------------------------------------- llama.cpp's op test

OP_TEST = "test-backend-ops"


def op_test_binary(*, log=None) -> Path:
    """llama.cpp's own op test (tests/test-backend-ops.cpp of the same source, unmodified), compiled
    against the host build's libraries and kept beside them. With `-b CPU` it compares the CPU
    backend's kernels with its reference implementation: the check for the ggml-cpu patch."""
    built = host_build(log=log)
    binary = built.path / "test" / OP_TEST
    if binary.is_file():
        return binary
    with FileLock(str(built.path) + ".lock"):
        if binary.is_file():
            return binary
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if not cxx:
            raise LlamaCppError(f"no C++ compiler to build llama.cpp's {OP_TEST}", "install g++")
        src = source_dir(LLAMA_CPP_PYTHON_VERSION)
        binary.parent.mkdir(exist_ok=True)
        partial = binary.with_name(f".{OP_TEST}.partial")
        cmd = [cxx, "-O2", "-std=c++17", "-pthread", f"-I{src / 'ggml' / 'include'}",
               str(src / "tests" / f"{OP_TEST}.cpp"), "-o", str(partial), f"-L{built.bin}", "-lggml", "-lggml-base",
               "-Wl,-rpath,$ORIGIN/../bin"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            said = next((l for l in proc.stderr.splitlines() if "error" in l), proc.stderr.strip()[-200:])
            raise LlamaCppError(f"building {OP_TEST} failed: {said}", "check the C++ compiler (C++17)")
        os.replace(partial, binary)
    return binary


def run_op_test(ops: str = "FLASH_ATTN_EXT", params: str | None = None, *, jobs: int | None = None,
                timeout: float = 3600) -> tuple[bool, int, str]:
    """`test-backend-ops -b CPU -o OPS [-p PARAMS]` on the patched libraries: (passed, number of
    cases run, output)."""
    cmd = [str(op_test_binary()), "-b", "CPU", "-o", ops, "-j", str(jobs or os.cpu_count() or 1)]
    if params:
        cmd += ["-p", params]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    counts = re.findall(r"(\d+)/(\d+) tests passed", out)
    n_run = int(counts[-1][1]) if counts else 0
    passed = proc.returncode == 0 and bool(counts) and counts[-1][0] == counts[-1][1]
    return passed, n_run, out
