"""llama.cpp (through llama-cpp-python) in a child process: `python -m plm_gguf.llama.worker`.

A GGML_ASSERT inside llama.cpp aborts the whole process (PLM_FACTS section 4: flash attention
does on PLM unless asked for on a latent file with the patched library), so every call into it
runs here and the parent (plm_gguf.llama.runtime) turns a crash into an error message. Requests
and results travel as files (or one JSON line on stdout).

Commands:
  build      build (or find) the host build; print its library folder (no llama_cpp import)
  op-test    llama.cpp's test-backend-ops on the patched CPU kernels (no llama_cpp import)
  probe      load a GGUF and print JSON with llama.cpp's KV-cache report (or the load error)
  bench      prompt and generation tok/s at a context size (JSON on stdout)
  logits     full-vocabulary logits per token sequence, optionally greedy continuations
  tokenize   llama.cpp's tokenization of texts
  quantize   llama_model_quantize with per-tensor overrides and an importance matrix
  score      chunked KL/perplexity evaluation against a reference (plm_gguf.llama.scoring)

Every model is opened by `open_model` (the one place a `Llama` is constructed): flash
attention off and an f16 KV cache unless the command asks otherwise (verify asks for f32).
llama-cpp-python reads LLAMA_CPP_LIB_PATH when llama_cpp is first imported: the parent sets it
(runtime.lib_env); a worker started without it finds the host build itself.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np

from plm_gguf.errors import LlamaCppError, PlmGgufError
from plm_gguf.llama import scoring
from plm_gguf.llama.runtime import OP_TEST, build, run_op_test

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1

_LOG: list[str] = []  # llama.cpp's log in this process (parsed for sizes)


def log_text() -> str:
    return "".join(_LOG)


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


def open_model(model: str | os.PathLike[str], n_ctx: int, *, threads: int | None = None,
               cache_type: int = GGML_TYPE_F16, flash_attn: bool = False, logits_all: bool = False,
               verbose: bool = False, gpu_layers: int = 0):
    """A llama_cpp.Llama on MODEL: the only place one is made. threads None leaves
    llama-cpp-python's defaults; cache_type is a ggml type id (0 f32, 1 f16, 8 q8_0); gpu_layers
    offloads that many layers where the library was built for a GPU (-1: all)."""
    from llama_cpp import Llama

    threading = {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}
    return Llama(model_path=str(model), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                 logits_all=logits_all, flash_attn=flash_attn, type_k=cache_type, type_v=cache_type,
                 verbose=verbose, seed=0, n_gpu_layers=gpu_layers, **threading)


def eval_logits(llm, tokens: list[int]):
    """The logits of every position of TOKENS, evaluated from an empty cache: float32 [T, vocab]."""
    llm.reset()  # eval() then drops the cache from position 0 on
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


# ---------------------------------------------------------------- what llama.cpp says

_KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB .*?K \((\w+)\):\s*([\d.]+) MiB(?:, V \((\w+)\):\s*([\d.]+) MiB)?")


def parse_kv_cache(log: str) -> dict | None:
    """llama.cpp's own report of its KV cache size, from its log."""
    match = _KV_LINE.search(log)
    if not match:
        return None
    total, k_type, k_mib, v_type, v_mib = match.groups()
    return {"total_mib": float(total), "k_type": k_type, "k_mib": float(k_mib),
            "v_type": v_type, "v_mib": float(v_mib) if v_mib is not None else 0.0}


# ---------------------------------------------------------------- commands

def cmd_probe(a: argparse.Namespace) -> None:
    """Load the model; print {"ok", "kv_cache", "error", "lib"} as one JSON line."""
    import llama_cpp

    cache_type = a.cache_type if a.cache_type is not None else (GGML_TYPE_F32 if a.f32_cache else GGML_TYPE_F16)
    report = {"ok": False, "kv_cache": None, "error": None,
              "lib": os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(llama_cpp.__file__).parent / "lib")}
    try:
        llm = open_model(a.model, a.n_ctx, cache_type=cache_type, flash_attn=a.flash_attn, verbose=True)
        report["ok"] = True
        del llm
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        report["error"] = str(exc)
    text = log_text()
    report["kv_cache"] = parse_kv_cache(text)
    errors = [l.strip() for l in text.splitlines() if "error" in l.lower() or "failed" in l.lower()]
    if errors:
        report["error"] = errors[0]
    print(json.dumps(report), flush=True)


def cmd_bench(a: argparse.Namespace) -> None:
    """Prompt tok/s for n_ctx - n_gen random tokens, then generation tok/s for n_gen tokens at
    that depth (one token per decode, as llama-bench's tg): JSON on stdout."""

    llm = open_model(a.model, a.n_ctx, threads=a.threads, cache_type=a.cache_type, flash_attn=a.flash_attn)
    n_vocab = llm.n_vocab()
    tokens = np.random.default_rng(0).integers(100, min(n_vocab, 150000), a.n_ctx).tolist()
    n_prompt = a.n_ctx - a.n_gen
    start = time.perf_counter()
    llm.eval(tokens[:n_prompt])
    t_prompt = time.perf_counter() - start
    start = time.perf_counter()
    for tok in tokens[n_prompt:]:
        llm.eval([tok])
    t_gen = time.perf_counter() - start
    print(json.dumps({"model": a.model, "n_ctx": a.n_ctx, "threads": a.threads, "n_prompt": n_prompt,
                      "prompt_tok_s": round(n_prompt / t_prompt, 2), "n_gen": a.n_gen,
                      "gen_tok_s": round(a.n_gen / t_gen, 2), "flash_attn": a.flash_attn,
                      "lib": os.environ.get("LLAMA_CPP_LIB_PATH", "installed")}), flush=True)


def cmd_logits(a: argparse.Namespace) -> None:
    """Full-vocabulary logits for each token sequence: logits_i.npy, float32 [T, vocab]. With
    --greedy N also N greedy tokens after each (greedy.json) and the logits of every position
    after them (all_logits_i.npy: the prompt's, then one decode each)."""
    sequences = json.loads(Path(a.tokens).read_text())
    cache_type = GGML_TYPE_F32 if a.f32_cache else a.cache_type
    llm = open_model(a.model, max(16, max(len(s) for s in sequences) + a.greedy), threads=a.threads,
                     cache_type=cache_type, flash_attn=a.flash_attn, logits_all=True, gpu_layers=a.gpu_layers)
    out = Path(a.out)
    continuations = []
    for i, tokens in enumerate(sequences):
        np.save(out / f"logits_{i}.npy", eval_logits(llm, tokens))
        generated = []
        for _ in range(a.greedy):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(nxt)
            llm.eval([nxt])
        continuations.append(generated)
        if a.greedy:
            np.save(out / f"all_logits_{i}.npy", np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
    (out / "greedy.json").write_text(json.dumps(continuations))


def cmd_tokenize(a: argparse.Namespace) -> None:
    """llama.cpp's tokenization of each text (no BOS, special tokens parsed as text)."""
    llm = open_model(a.model, 64, threads=1)
    texts = json.loads(Path(a.texts).read_text())
    ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    Path(a.out).write_text(json.dumps(ids))


def cmd_quantize(a: argparse.Namespace) -> None:
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
    if a.types_out:  # a dry run: llama.cpp's per-tensor type choices, nothing written
        params.dry_run = True
    rc = llama_cpp.llama_model_quantize(a.src.encode(), a.dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.stderr.write(f"error: llama_model_quantize returned {rc}\n")
        sys.exit(1)
    if a.types_out:
        Path(a.types_out).write_text(json.dumps(dry_run_types(log_text())))


# "[  12/ 291]  blk.0.attn_q.weight - [ 2048,  2048,  1,  1], type =    f16, size =  8.000 MiB -> 2.250 MiB (q4_K)"
# or "... type = f32, size = 0.008 MiB" when the tensor keeps its type
_DRY_RUN_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^\n(]*(?:\((\w+)\))?")


def dry_run_types(log: str) -> dict[str, str]:
    """Tensor name -> ggml type name, from llama_model_quantize's dry-run log."""
    return {m[1]: m[3] or m[2] for m in _DRY_RUN_LINE.finditer(log)}


def cmd_score(a: argparse.Namespace) -> None:
    """Chunked evaluation (plm_gguf.llama.scoring) with load time, peak RSS and llama.cpp's
    reported buffer sizes: JSON in --out."""
    tokens = json.loads(Path(a.tokens).read_text())
    start = time.perf_counter()
    llm = open_model(a.model, a.ctx, threads=a.threads, logits_all=True)
    load_seconds = time.perf_counter() - start
    result = scoring.score(llm, tokens, a.ctx, Path(a.reference), a.mode, gen_tokens=a.gen_tokens)
    result.update(load_seconds=load_seconds, peak_rss_bytes=scoring.peak_rss_bytes(),
                  **scoring.parse_llama_log(log_text()))
    Path(a.out).write_text(json.dumps(result, indent=1))


def cmd_build(a: argparse.Namespace) -> None:  # noqa: ARG001
    def stop(signum, frame):  # noqa: ARG001 - a killed build cleans up as an interrupted one does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        lib = build()
    except PlmGgufError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted: the partial build was removed", file=sys.stderr)
        sys.exit(130)
    print(lib)


def cmd_op_test(a: argparse.Namespace) -> None:

    try:
        passed, n_run, out = run_op_test(a.ops, a.params)
    except LlamaCppError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    failed = [l.strip() for l in out.splitlines() if "FAIL" in l and "(" in l]
    print("\n".join(failed[:20]))
    print(f"{OP_TEST} -b CPU -o {a.ops}{' -p ' + repr(a.params) if a.params else ''}: "
          f"{n_run} cases, {'all passed' if passed else 'FAILED'}")
    sys.exit(0 if passed else 1)


LOADS_LLAMA = ("probe", "bench", "logits", "tokenize", "quantize", "score")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plm_gguf.llama.worker")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the host build; print its library folder").set_defaults(fn=cmd_build)
    p = sub.add_parser("op-test", help="llama.cpp's test-backend-ops on the patched CPU kernels against the reference")
    p.add_argument("-o", "--ops", default="FLASH_ATTN_EXT")
    p.add_argument("-p", "--params", default=None, help="regex on the test cases' parameters")
    p.set_defaults(fn=cmd_op_test)
    loads = []
    p = sub.add_parser("probe", help="load a GGUF and print llama.cpp's KV cache report")
    p.add_argument("model"), p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--f32-cache", action="store_true")
    p.add_argument("--cache-type", type=int, default=None, help="ggml type of the KV cache (1 = f16, 8 = q8_0)")
    p.add_argument("--flash-attn", action="store_true", help="(a quantized cache needs it)")
    p.set_defaults(fn=cmd_probe)
    loads.append(p)
    p = sub.add_parser("bench", help="prompt and generation tok/s at a context size")
    p.add_argument("model"), p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--n-gen", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-type", type=int, default=GGML_TYPE_F16, help="ggml type of the KV cache (1 = f16, 8 = q8_0)")
    p.add_argument("--flash-attn", action="store_true")
    p.set_defaults(fn=cmd_bench)
    loads.append(p)
    p = sub.add_parser("logits", help="logits per token sequence, optionally greedy continuations")
    p.add_argument("model"), p.add_argument("--tokens", required=True), p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None, help="(default: llama-cpp-python's)")
    p.add_argument("--f32-cache", action="store_true")
    p.add_argument("--cache-type", type=int, default=GGML_TYPE_F16, help="ggml type of the KV cache (0 = f32, 8 = q8_0)")
    p.add_argument("--flash-attn", action="store_true")
    p.add_argument("--greedy", type=int, default=0)
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU build's GPU (-1: all)")
    p.set_defaults(fn=cmd_logits)
    loads.append(p)
    p = sub.add_parser("tokenize")
    p.add_argument("model"), p.add_argument("--texts", required=True), p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_tokenize)
    loads.append(p)
    p = sub.add_parser("quantize")
    p.add_argument("src"), p.add_argument("dst"), p.add_argument("ftype", type=int)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--overrides"), p.add_argument("--imatrix")
    p.add_argument("--types-out", help="dry run: write llama.cpp's per-tensor types (JSON) here, no output file")
    p.set_defaults(fn=cmd_quantize)
    loads.append(p)
    p = sub.add_parser("score")
    p.add_argument("model"), p.add_argument("--tokens", required=True), p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--reference", required=True), p.add_argument("--mode", choices=["reference", "compare"], required=True)
    p.add_argument("--out", required=True), p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gen-tokens", type=int, default=scoring.GEN_TOKENS, help="0: no generation-speed run")
    p.set_defaults(fn=cmd_score)
    loads.append(p)
    for child in loads:  # accepted for older command lines: the parent always sets LLAMA_CPP_LIB_PATH
        child.add_argument("--lib-from-env", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.cmd in LOADS_LLAMA:
        if "LLAMA_CPP_LIB_PATH" not in os.environ:
            os.environ["LLAMA_CPP_LIB_PATH"] = str(build())  # set before llama_cpp is first imported
        _quiet_llama(bool(os.environ.get("PLM_GGUF_DEBUG")))
    a.fn(a)


if __name__ == "__main__":
    main()
