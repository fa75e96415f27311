"""Chunked evaluation of a model inside the llama.cpp child process (the worker's `score`).

The text is cut into chunks of n_ctx tokens, each evaluated from an empty cache; positions
n_ctx/2 .. n_ctx-2 of each chunk are scored, as llama-perplexity does, so the numbers can be
checked against it. The reference run writes its log-probabilities for the scored positions to
a float32 memmap on disk; a candidate run reads them back one chunk at a time, so full-vocabulary
logits for the whole text are never held in memory.

The math lives here, in the core, because the worker runs it; the quantization stage
(plm_gguf.quant_eval) imports the constants it plans with (MIN_CTX, scored_range) from here.
"""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

import numpy as np

ROW_BLOCK = 32
GEN_PROMPT, GEN_TOKENS = 16, 32  # the generation-speed run: a prompt, then tokens decoded one at a time
# The shortest chunk worth scoring: the speed run fits in it, and 31 positions of each chunk are scored.
MIN_CTX = 64
_KV = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB .*K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_COMPUTE = re.compile(r"(\w+) compute buffer size = +([\d.]+) MiB")


def scored_range(n_ctx: int) -> tuple[int, int]:
    """Positions whose next-token distribution is scored in each chunk."""
    return n_ctx // 2, n_ctx - 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def parse_llama_log(text: str) -> dict:
    """KV-cache and compute-buffer sizes as llama.cpp reports them, in MiB."""
    out: dict = {}
    kv = _KV.search(text)
    if kv:
        out.update(kv_mib=float(kv[1]), k_type=kv[2], k_mib=float(kv[3]), v_type=kv[4], v_mib=float(kv[5]))
    buffers = {name: float(mib) for name, mib in _COMPUTE.findall(text)}
    if buffers:
        out["compute_mib"] = sum(buffers.values())
    return out


def score(llm, tokens: list[int], n_ctx: int, reference: Path, mode: str, gen_tokens: int = GEN_TOKENS) -> dict:
    """mode 'reference': write log-probs to `reference`; 'compare': KL etc. against it."""
    first, last = scored_range(n_ctx)
    n_chunks = len(tokens) // n_ctx
    per_chunk = last - first
    n_vocab = llm.n_vocab()
    shape = (n_chunks * per_chunk, n_vocab)
    ref = np.lib.format.open_memmap(reference, mode="w+" if mode == "reference" else "r", dtype=np.float32,
                                    shape=shape if mode == "reference" else None)
    if mode == "compare" and ref.shape != shape:
        raise SystemExit(f"error: reference log-probs have shape {ref.shape}, expected {shape}")
    kl, agree, nll = [], [], []
    eval_seconds = 0.0
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
        llm.reset()  # eval() then drops the cache from position 0 on
        start = time.perf_counter()
        llm.eval(chunk)
        eval_seconds += time.perf_counter() - start
        # blocks of positions keep float64 temporaries small (151,936-wide rows are 1.2 MB each)
        for b in range(first, last, ROW_BLOCK):
            e = min(last, b + ROW_BLOCK)
            logp = log_softmax(np.asarray(llm.scores[b:e]))
            targets = np.asarray(chunk[b + 1 : e + 1])
            rows = slice(c * per_chunk + b - first, c * per_chunk + e - first)
            nll.append(-logp[np.arange(e - b), targets])
            if mode == "reference":
                ref[rows] = logp
                continue
            ref_logp = ref[rows].astype(np.float64)
            kl.append((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).clip(min=0.0))
            agree.append(ref_logp.argmax(-1) == logp.argmax(-1))
        if mode == "reference":
            ref.flush()  # written pages leave the resident set once on disk
    if mode == "reference":
        ref.flush()
    result = {"n_chunks": n_chunks, "n_positions": n_chunks * per_chunk, "prompt_tokens": n_chunks * n_ctx,
              "prompt_seconds": eval_seconds, "nll_mean": float(np.concatenate(nll).mean())}
    if kl:
        k = np.concatenate(kl)
        result.update(kl_mean=float(k.mean()), kl_median=float(np.median(k)), kl_p99=float(np.percentile(k, 99)),
                      kl_max=float(k.max()), top1=float(np.concatenate(agree).mean()))
    if gen_tokens:  # 0: KL only (the recipe search's probes)
        result.update(_generation_speed(llm, tokens[:GEN_PROMPT], gen_tokens))
    return result


def _generation_speed(llm, prompt: list[int], n: int) -> dict:
    """Greedy decoding of n tokens, one at a time, after a short prompt."""
    llm.reset()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[len(prompt) - 1]))
    start = time.perf_counter()
    for _ in range(n):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return {"gen_tokens": n, "gen_seconds": time.perf_counter() - start}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
