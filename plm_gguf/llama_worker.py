"""llama.cpp (through llama-cpp-python) in a child process.

A GGML_ASSERT inside llama.cpp aborts the whole process (PLM_FACTS section 4: flash attention
does on PLM), so every call into it runs here, in `python -m plm_gguf.llama_worker`, and the
parent turns a crash into an error message. Requests and results travel as files.

Every context is made with flash attention off; verify asks for an f32 KV cache.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from plm_gguf.errors import LlamaCppError

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1


# ---------------------------------------------------------------- parent side

def env_for(model: str | os.PathLike | None = None) -> dict:  # noqa: ARG001 - one library for every file
    """The environment a child needs: llama-cpp-python pointed at the host build (patched,
    self-checked; built on first use), which runs both KV-cache layouts."""
    from plm_gguf.llama_lib import lib_env

    return lib_env()


def run_worker(args: list[str], *, timeout: float | None = None,
               on_line: Callable[[str], None] | None = None, env: dict | None = None) -> None:
    """Run one worker command on the host build; raise LlamaCppError naming what llama.cpp said."""
    if env is None:
        env = env_for()
    cmd = [sys.executable, "-m", "plm_gguf.llama_worker", *args]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=env)
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


# ---------------------------------------------------------------- child side

_LOG: list[str] = []


def _quiet_llama(verbose: bool) -> None:
    """Keep llama.cpp's log (parsed for sizes); print it only when asked, but always print
    errors, warnings and quantize progress."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def log(level, text, user_data):  # noqa: ARG001
        message = text.decode("utf-8", errors="replace")
        _LOG.append(message)
        if verbose or level <= 2 or re.search(r"\[\s*\d+/\s*\d+\]", message):  # ERROR/WARN, progress
            sys.stderr.write(message)
            sys.stderr.flush()

    _quiet_llama.keep = log  # keep the callback alive
    llama_cpp.llama_log_set(log, None)


def _open(model: str, n_ctx: int, threads: int, f32_cache: bool, logits_all: bool = True):
    from llama_cpp import Llama

    cache_type = GGML_TYPE_F32 if f32_cache else GGML_TYPE_F16
    return Llama(model_path=model, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                 n_threads=threads, n_threads_batch=threads, logits_all=logits_all, flash_attn=False,
                 type_k=cache_type, type_v=cache_type, verbose=False, seed=0)


def cmd_logits(a: argparse.Namespace) -> None:
    """Full-vocabulary logits for each token sequence: one float32 .npy [T, vocab] per sequence."""
    import numpy as np

    sequences = json.loads(Path(a.tokens).read_text())
    n_ctx = max(len(s) for s in sequences)
    llm = _open(a.model, max(n_ctx, 16), a.threads, a.f32_cache)
    out = Path(a.out)
    for i, tokens in enumerate(sequences):
        llm.reset()  # eval() then drops the cache from position 0 on
        llm.eval(tokens)
        np.save(out / f"logits_{i}.npy", np.array(llm.scores[: len(tokens)], dtype=np.float32))


def cmd_tokenize(a: argparse.Namespace) -> None:
    """llama.cpp's tokenization of each text (no BOS, special tokens parsed as text)."""
    llm = _open(a.model, 64, 1, False, logits_all=False)
    texts = json.loads(Path(a.texts).read_text())
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    Path(a.out).write_text(json.dumps(ids))


def cmd_quantize(a: argparse.Namespace) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = a.ftype
    params.nthread = a.threads
    keep: list = []
    if a.overrides:  # {"regex": ggml_type, ...}: per-tensor types, first match wins
        items = list(json.loads(Path(a.overrides).read_text()).items())
        arr = (llama_cpp.llama_model_tensor_override * (len(items) + 1))()
        for i, (pattern, qtype) in enumerate(items):
            encoded = pattern.encode()
            keep.append(encoded)
            arr[i].pattern, arr[i].type = encoded, int(qtype)
        arr[len(items)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(arr)
    if a.imatrix:  # an .npz of tensor name -> float32 vector of column importances
        import numpy as np

        data = np.load(a.imatrix)
        arr = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()
        for i, name in enumerate(data.files):
            values = np.ascontiguousarray(data[name], dtype=np.float32)
            keep += [values, name.encode()]
            arr[i].name = keep[-1]
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[len(data.files)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    rc = llama_cpp.llama_model_quantize(a.src.encode(), a.dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.stderr.write(f"error: llama_model_quantize returned {rc}\n")
        sys.exit(1)


def cmd_score(a: argparse.Namespace) -> None:
    from plm_gguf.quant_eval import scoring

    scoring.run(a, _open, lambda: "".join(_LOG))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plm_gguf.llama_worker")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits")
    p.add_argument("model"), p.add_argument("--tokens", required=True), p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--f32-cache", action="store_true")
    p.set_defaults(fn=cmd_logits)
    p = sub.add_parser("tokenize")
    p.add_argument("model"), p.add_argument("--texts", required=True), p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_tokenize)
    p = sub.add_parser("quantize")
    p.add_argument("src"), p.add_argument("dst"), p.add_argument("ftype", type=int)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--overrides"), p.add_argument("--imatrix")
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("score")
    p.add_argument("model"), p.add_argument("--tokens", required=True), p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--reference", required=True), p.add_argument("--mode", choices=["reference", "compare"], required=True)
    p.add_argument("--out", required=True), p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.set_defaults(fn=cmd_score)
    a = parser.parse_args(argv)
    _quiet_llama(bool(os.environ.get("PLM_GGUF_DEBUG")))
    a.fn(a)


if __name__ == "__main__":
    main()
