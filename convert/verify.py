"""Prove a GGUF computes what its checkpoint computes, in two parts.

1. The file equals the checkpoint: the torch reference (plm_gguf.reference) runs once with the
   checkpoint's weights and once with the weights decoded from the GGUF, in f32; their
   next-token distributions must agree (f32 and bf16 files: mean KL <= 1e-9, f16: <= 1e-6).
2. llama.cpp runs the file as the reference does: llama.cpp (a child process, flash attention
   off, f32 KV cache) on the same token ids. For f32 files the same threshold holds. For bf16 and
   f16 files llama.cpp's CPU backend rounds every matmul's activations to the weight type; the
   comparison is made with a reference that does the same, and reported: a single activation
   that rounds the other way (the two sum in different orders) moves every later position, so
   agreement there is bounded by the runtime, not by the file. A gross disagreement (mean KL
   above 0.1 or top-1 below 90%: a broken graph) still fails.

Separately, the checkpoint's tokenizer (the `tokenizers` library) and llama.cpp's tokenizer
encode a built-in multilingual sample; every difference is listed, naming those caused only by
NFC normalisation.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from plm_gguf.checkpoint import Checkpoint, resolve_model
from plm_gguf.errors import TokenizerError, UsageError
from plm_gguf.ggufinfo import read_plm_gguf
from plm_gguf.llama.runtime import run_worker
from plm_gguf.reference import CheckpointWeights, GgufWeights, PLMForCausalLM
from plm_gguf.schema import PLMConfig, config_from_gguf

# Pass thresholds on mean KL by the GGUF's file type; other types are reported, not failed.
THRESHOLDS = {gguf.LlamaFileType.ALL_F32: 1e-9, gguf.LlamaFileType.MOSTLY_BF16: 1e-9,
              gguf.LlamaFileType.MOSTLY_F16: 1e-6}

PROMPTS = (
    "The quick brown fox jumps over the lazy dog. Peripheral language models run on small devices, "
    "where memory and bandwidth decide what fits.",
    "边缘设备上的语言模型需要在有限的内存中高效运行。多头潜在注意力压缩了键值缓存。",
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "3.14159 + 2.71828 = 5.85987; 1234567890 * 42 = 51851851380. Café, naïve, Zürich, São Paulo 🚀🔥",
)

TOKENIZER_SAMPLE = {
    "english": "Hello world! It's a lovely day, isn't it? We'll see.",
    "chinese": "我们今天去公园散步，然后吃了一顿丰盛的晚餐。",
    "code": "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "digits": "Pi is 3.14159265358979 and 2^64 = 18446744073709551616.",
    "emoji": "Launch 🚀 at 10:00 👩‍💻 with ❤️ and 🇯🇵",
    "accented": "Crème brûlée, façade, jalapeño, Ångström, Dvořák.",
    "decomposed": unicodedata.normalize("NFD", "Crème brûlée, façade, jalapeño, Ångström, Dvořák."),
    "whitespace": "  leading spaces\n\n\ttabs and\r\nnewlines   ",
}


@dataclass
class LogitStats:
    mean_kl: float
    max_kl: float
    top1: float
    max_abs_diff: float
    n_tokens: int


@dataclass
class TokenDiff:
    name: str
    text: str
    hf_ids: list[int]
    llama_ids: list[int]
    nfc_only: bool


# For bf16/f16 files, llama.cpp's own rounding of activations to 8 (bf16) or 11 (f16) bits moves
# the distributions by about what 8-bit activation quantization does (PLM_FACTS: KL ~4e-2 for
# Q8_0 on PLM-1.8B), so only a gross disagreement fails: a broken graph, not runtime precision.
# The exact check of llama.cpp's graph is the f32 file's, at the lossless threshold.
RUNTIME_GROSS_KL = 0.1
RUNTIME_MIN_TOP1 = 0.9

# The precision llama.cpp's CPU backend holds matmul activations at, for files of these types.
MATMUL_INPUT_DTYPES = {gguf.LlamaFileType.MOSTLY_BF16: torch.bfloat16, gguf.LlamaFileType.MOSTLY_F16: torch.float16}


@dataclass
class VerifyResult:
    gguf_path: Path
    file_type: str
    stats: LogitStats  # llama.cpp against the reference at the file's matmul precision
    threshold: float | None
    exact: LogitStats  # llama.cpp against the all-f32 reference (runtime precision included)
    file_stats: LogitStats | None = None  # the file's weights against the checkpoint's, both in f32
    matched_dtype: str | None = None
    token_diffs: list[TokenDiff] = field(default_factory=list)
    n_samples: int = len(TOKENIZER_SAMPLE)
    peak_rss_bytes: int = 0  # this process (the torch reference), over its life so far
    llama_peak_rss_bytes: int = 0  # the largest llama.cpp worker it ran

    @property
    def file_passed(self) -> bool:
        s = self.file_stats
        return self.threshold is None or (s is not None and s.mean_kl <= self.threshold and s.top1 == 1.0)

    @property
    def runtime_passed(self) -> bool:
        if self.threshold is None:
            return True
        if self.matched_dtype is None:  # f32: llama.cpp computes exactly what the reference does
            return self.stats.mean_kl <= self.threshold and self.stats.top1 == 1.0
        return self.stats.mean_kl <= RUNTIME_GROSS_KL and self.stats.top1 >= RUNTIME_MIN_TOP1

    @property
    def passed(self) -> bool:
        return self.file_passed and self.runtime_passed


def compare_logits(reference: list[np.ndarray], candidate: list[np.ndarray]) -> LogitStats:
    """KL(reference || candidate) of next-token distributions, per position, in float64."""
    kls, agree, max_diff = [], 0, 0.0
    for ref, cand in zip(reference, candidate):
        ref, cand = ref.astype(np.float64), cand.astype(np.float64)
        log_p = ref - _logsumexp(ref)
        log_q = cand - _logsumexp(cand)
        kls.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(ref - cand).max()))
    kl = np.concatenate(kls).clip(min=0.0)
    return LogitStats(float(kl.mean()), float(kl.max()), agree / kl.size, max_diff, int(kl.size))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _hf_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"no tokenizer.json in {folder}", "verify needs the checkpoint's tokenizer files")
    return Tokenizer.from_file(str(file))


def verify(model: str | os.PathLike[str], gguf_path: str | os.PathLike[str], *,
           prompts: tuple[str, ...] = PROMPTS, max_tokens: int = 96, threads: int | None = None) -> VerifyResult:
    """Run the reference and llama.cpp on the same prompts and compare them."""
    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise UsageError(f"{gguf_path} does not exist", "convert the checkpoint first: plm-gguf convert MODEL")
    if not gguf_path.is_file():
        raise UsageError(f"{gguf_path} is not a regular file", "pass the .gguf file plm-gguf convert wrote")
    file_type = gguf.LlamaFileType(_read_file_type(gguf_path))
    folder = resolve_model(model)
    ckpt = Checkpoint(folder)
    _check_same_model(ckpt.config, config_from_gguf(gguf_path), gguf_path)
    tokenizer = _hf_tokenizer(folder)
    limit = min(max_tokens, ckpt.config.max_position_embeddings)
    sequences = [tokenizer.encode(p, add_special_tokens=False).ids[:limit] for p in prompts]
    sequences = [s for s in sequences if len(s) >= 2]
    threads = threads or os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="plm-gguf-verify-") as tmp:
        tmp = Path(tmp)
        (tmp / "tokens.json").write_text(json.dumps(sequences))
        run_worker(["logits", str(gguf_path), "--tokens", str(tmp / "tokens.json"), "--out", str(tmp),
                    "--threads", str(threads), "--f32-cache"])
        llama_logits = [np.load(tmp / f"logits_{i}.npy") for i in range(len(sequences))]

        texts = list(TOKENIZER_SAMPLE.values())
        (tmp / "texts.json").write_text(json.dumps(texts + [unicodedata.normalize("NFC", t) for t in texts]))
        run_worker(["tokenize", str(gguf_path), "--texts", str(tmp / "texts.json"), "--out", str(tmp / "ids.json")])
        llama_ids = json.loads((tmp / "ids.json").read_text())

    # the torch reference, layer by layer over the memory-mapped checkpoint (one layer resident),
    # exact and with llama.cpp's matmul input rounding in the same pass
    matched = MATMUL_INPUT_DTYPES.get(file_type)
    inputs = [torch.tensor(s) for s in sequences]
    reference = PLMForCausalLM.skeleton(ckpt.config).stream(CheckpointWeights(ckpt), inputs,
                                                            variants=(None,) if matched is None else (None, matched))
    ref_logits = [x.numpy() for x in reference[None]]
    exact = stats = compare_logits(ref_logits, llama_logits)
    if matched is not None:
        stats = compare_logits([x.numpy() for x in reference[matched]], llama_logits)
    del reference
    file_stats = None
    if file_type in THRESHOLDS:  # lossless and 16-bit files: is the content the checkpoint's?
        from_file = PLMForCausalLM.skeleton(ckpt.config).stream(GgufWeights(gguf_path, ckpt.config), inputs)
        file_stats = compare_logits(ref_logits, [x.numpy() for x in from_file[None]])
        del from_file

    diffs = []
    for i, (name, text) in enumerate(TOKENIZER_SAMPLE.items()):
        hf_ids = tokenizer.encode(text, add_special_tokens=False).ids
        if hf_ids != llama_ids[i]:
            diffs.append(TokenDiff(name, text, hf_ids, llama_ids[i], nfc_only=llama_ids[len(texts) + i] == hf_ids))
    return VerifyResult(gguf_path, file_type.name, stats, THRESHOLDS.get(file_type), exact, file_stats,
                        str(matched).removeprefix("torch.") if matched else None, diffs,
                        peak_rss_bytes=peak_rss(), llama_peak_rss_bytes=peak_rss(children=True))


def peak_rss(children: bool = False) -> int:
    """Peak resident memory in bytes of this process, or of its largest waited-for child."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "kv_lora_rank",
          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size")


def _check_same_model(config: PLMConfig, in_file: PLMConfig, path: Path) -> None:
    """The GGUF must have the checkpoint's sizes, or comparing them means nothing."""
    differ = [f"{k} {getattr(in_file, k)} in the file, {getattr(config, k)} in config.json"
              for k in _SIZES if getattr(in_file, k) != getattr(config, k)]
    if differ:
        raise UsageError(f"{path.name} is not a conversion of this checkpoint: {'; '.join(differ[:2])}",
                         "pass the checkpoint the file was converted from")


def _read_file_type(path: Path) -> int:
    return int(read_plm_gguf(path).get("general.file_type", gguf.LlamaFileType.GUESSED))
