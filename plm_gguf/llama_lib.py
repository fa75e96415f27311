"""llama.cpp on this host, through llama-cpp-python, in child processes.

The library is the host build (plm_gguf.llama.host): the llama.cpp that llama-cpp-python
vendors, with plm-gguf's patches (the absorbed-MLA `plm` graph; stock-layout files run as
before), for this CPU's probed instruction set, self-checked, cached. llama-cpp-python loads it
from $LLAMA_CPP_LIB_PATH (read at import: `load_shared_library("llama", LLAMA_CPP_LIB_PATH)`
opens LIB_PATH/libllama.so, which finds libggml*.so next to it through its $ORIGIN runpath).
`lib_env()` gives an environment for a child process; the variable must be set before
llama_cpp is first imported.

Child-process entry points (llama.cpp may abort): `python -m plm_gguf.llama_lib build` prints
the library folder; `python -m plm_gguf.llama_lib probe MODEL` loads a GGUF and prints JSON
with what llama.cpp reports about its KV cache (or the load error); `... op-test` runs
llama.cpp's test-backend-ops on the patched CPU kernels against their reference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from plm_gguf.errors import LlamaCppError
from plm_gguf.llama import LLAMA_CPP_PYTHON_VERSION
from plm_gguf.llama.host import entry_dir, host_build, host_key  # noqa: F401
from plm_gguf.llama.patches import (FULL_CACHE_HINT, apply_patches, hash_patches, patch_files,  # noqa: F401
                                    patches_dir, source_dir)


def build_key(version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    """The host build's cache key (patched, this CPU)."""
    return host_key()


def build(*, log=None, jobs: int | None = None) -> Path:
    """The folder with the host build's libraries and tools (built first if needed)."""
    return host_build(log=log, jobs=jobs).bin


OP_TEST = "test-backend-ops"


def op_test_binary(*, log=None) -> Path:
    """llama.cpp's own op test (tests/test-backend-ops.cpp of the same source, unmodified), compiled
    against the host build's libraries and kept beside them. With `-b CPU` it compares the CPU
    backend's kernels with its reference implementation: the check for the ggml-cpu patch."""
    built = host_build(log=log)
    binary = built.path / "test" / OP_TEST
    if binary.is_file():
        return binary
    from filelock import FileLock

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


def lib_env(base: dict | None = None, lib: Path | None = None) -> dict:
    """An environment for a child process whose llama-cpp-python loads the host build."""
    env = dict(os.environ if base is None else base)
    env["LLAMA_CPP_LIB_PATH"] = str(lib or build())
    return env


# ---------------------------------------------------------------- what llama.cpp says

_KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB .*?K \((\w+)\):\s*([\d.]+) MiB(?:, V \((\w+)\):\s*([\d.]+) MiB)?")


def parse_kv_cache(log_text: str) -> dict | None:
    """llama.cpp's own report of its KV cache size, from its log."""
    match = _KV_LINE.search(log_text)
    if not match:
        return None
    total, k_type, k_mib, v_type, v_mib = match.groups()
    return {"total_mib": float(total), "k_type": k_type, "k_mib": float(k_mib),
            "v_type": v_type, "v_mib": float(v_mib) if v_mib is not None else 0.0}


def probe(model: str | os.PathLike[str], *, n_ctx: int = 4096, f32_cache: bool = False,
          cache_type: int | None = None, flash_attn: bool = False, env: dict | None = None,
          timeout: float = 600) -> dict:
    """Load MODEL in a child process (with env, e.g. lib_env()) and return llama.cpp's report:
    {"ok": bool, "kv_cache": {...} | None, "error": first error line | None, "lib": path}.
    The cache is f16 unless f32_cache or cache_type (a ggml type id: 8 = q8_0) says otherwise."""
    cmd = [sys.executable, "-m", "plm_gguf.llama_lib", "probe", str(model), "--n-ctx", str(n_ctx), "--lib-from-env"]
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


def _probe_child(model: str, n_ctx: int, f32_cache: bool, cache_type: int | None = None,
                 flash_attn: bool = False) -> None:
    import llama_cpp

    captured: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level, text, user_data):  # noqa: ARG001
        captured.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(log, None)
    if cache_type is None:
        cache_type = 0 if f32_cache else 1  # GGML_TYPE_F32 / GGML_TYPE_F16
    report = {"ok": False, "kv_cache": None, "error": None,
              "lib": os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(llama_cpp.__file__).parent / "lib")}
    try:
        llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                              flash_attn=flash_attn, type_k=cache_type, type_v=cache_type, verbose=True)
        report["ok"] = True
        del llm
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        report["error"] = str(exc)
    text = "".join(captured)
    report["kv_cache"] = parse_kv_cache(text)
    errors = [l.strip() for l in text.splitlines() if "error" in l.lower() or "failed" in l.lower()]
    if errors:
        report["error"] = errors[0]
    print(json.dumps(report), flush=True)


def _bench_child(model: str, n_ctx: int, n_gen: int, threads: int, cache_type: int, flash_attn: bool) -> None:
    """Prompt tok/s for n_ctx - n_gen random tokens, then generation tok/s for n_gen tokens at
    that depth (one token per decode, as llama-bench's tg): JSON on stdout."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn,
                type_k=cache_type, type_v=cache_type, verbose=False, seed=0)
    n_vocab = llm.n_vocab()
    tokens = np.random.default_rng(0).integers(100, min(n_vocab, 150000), n_ctx).tolist()
    n_prompt = n_ctx - n_gen
    start = time.perf_counter()
    llm.eval(tokens[:n_prompt])
    t_prompt = time.perf_counter() - start
    start = time.perf_counter()
    for tok in tokens[n_prompt:]:
        llm.eval([tok])
    t_gen = time.perf_counter() - start
    print(json.dumps({"model": model, "n_ctx": n_ctx, "threads": threads, "n_prompt": n_prompt,
                      "prompt_tok_s": round(n_prompt / t_prompt, 2), "n_gen": n_gen,
                      "gen_tok_s": round(n_gen / t_gen, 2), "flash_attn": flash_attn,
                      "lib": os.environ.get("LLAMA_CPP_LIB_PATH", "installed")}), flush=True)


def _run_child(model: str, tokens_file: str, out: str, cache_type: int, flash_attn: bool, greedy: int) -> None:
    """Logits (logits_i.npy) of each token sequence, with a chosen KV cache type and flash
    attention (which llama_worker always turns off), plus greedy continuations (greedy.json) and
    the logits of every position after them (all_logits_i.npy: the prompt's, then one decode each)."""
    import numpy as np
    from llama_cpp import Llama

    sequences = json.loads(Path(tokens_file).read_text())
    n_ctx = max(16, max(len(s) for s in sequences) + greedy)
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                logits_all=True, flash_attn=flash_attn, type_k=cache_type, type_v=cache_type, verbose=False, seed=0)
    continuations = []
    for i, tokens in enumerate(sequences):
        llm.reset()
        llm.eval(tokens)
        np.save(Path(out) / f"logits_{i}.npy", np.array(llm.scores[: len(tokens)], dtype=np.float32))
        generated = []
        for _ in range(greedy):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(nxt)
            llm.eval([nxt])
        continuations.append(generated)
        if greedy:
            np.save(Path(out) / f"all_logits_{i}.npy", np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
    (Path(out) / "greedy.json").write_text(json.dumps(continuations))


def run_logits(model: str | os.PathLike[str], sequences: list[list[int]], out: Path, *, env: dict | None = None,
               cache_type: int = 0, flash_attn: bool = False, greedy: int = 0, timeout: float = 600):
    """Run _run_child in a child process: (logits per sequence, greedy continuations)."""
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.json").write_text(json.dumps(sequences))
    cmd = [sys.executable, "-m", "plm_gguf.llama_lib", "run", str(model), "--lib-from-env", "--tokens", str(out / "tokens.json"),
           "--out", str(out), "--cache-type", str(cache_type), "--greedy", str(greedy)]
    if flash_attn:
        cmd.append("--flash-attn")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or lib_env(), timeout=timeout)
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlamaCppError(f"llama.cpp failed on {model} (exit {proc.returncode}): {said}",
                            "run `python -m plm_gguf.llama_lib probe MODEL` to see llama.cpp's log")
    logits = [np.load(out / f"logits_{i}.npy") for i in range(len(sequences))]
    return logits, json.loads((out / "greedy.json").read_text())


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="plm_gguf.llama_lib")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the host build; print its library folder")
    p = sub.add_parser("probe", help="load a GGUF (child process) and print llama.cpp's KV cache report")
    p.add_argument("model")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--f32-cache", action="store_true")
    p.add_argument("--cache-type", type=int, default=None, help="ggml type of the KV cache (1 = f16, 8 = q8_0)")
    p.add_argument("--flash-attn", action="store_true", help="(a quantized cache needs it)")
    q = sub.add_parser("bench", help="prompt and generation tok/s at a context size (child process)")
    q.add_argument("model")
    q.add_argument("--n-ctx", type=int, default=512)
    q.add_argument("--n-gen", type=int, default=32)
    q.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    q.add_argument("--cache-type", type=int, default=1, help="ggml type of the KV cache (1 = f16, 8 = q8_0)")
    q.add_argument("--flash-attn", action="store_true")
    o = sub.add_parser("op-test", help=f"llama.cpp's {OP_TEST} on the patched CPU kernels against the reference")
    o.add_argument("-o", "--ops", default="FLASH_ATTN_EXT")
    o.add_argument("-p", "--params", default=None, help="regex on the test cases' parameters")
    r = sub.add_parser("run", help="logits and greedy continuations (child process)")
    r.add_argument("model")
    r.add_argument("--tokens", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--cache-type", type=int, default=0)
    r.add_argument("--flash-attn", action="store_true")
    r.add_argument("--greedy", type=int, default=0)
    for child in (p, q, r):  # the parent set LLAMA_CPP_LIB_PATH; without it the child finds the host build
        child.add_argument("--lib-from-env", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.cmd in ("probe", "bench", "run") and not a.lib_from_env and "LLAMA_CPP_LIB_PATH" not in os.environ:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(build())  # set before llama_cpp is first imported
    if a.cmd == "build":
        import signal

        from plm_gguf.errors import PlmGgufError

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
    elif a.cmd == "op-test":
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
    elif a.cmd == "run":
        _run_child(a.model, a.tokens, a.out, a.cache_type, a.flash_attn, a.greedy)
    elif a.cmd == "bench":
        _bench_child(a.model, a.n_ctx, a.n_gen, a.threads, a.cache_type, a.flash_attn)
    else:
        _probe_child(a.model, a.n_ctx, a.f32_cache, a.cache_type, a.flash_attn)


if __name__ == "__main__":
    main()
