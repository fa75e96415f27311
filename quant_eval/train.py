"""Train a small PLM on the Python standard library's own source, for the quantization tests.

Quantization error measured on random weights says little about a trained model: trained
weights have outliers, correlated rows and peaked next-token distributions that random ones
lack. This module trains a ~4.4M-parameter PLM (the real schema: MLA, squared-ReLU MLP, tied
embeddings, padded vocabulary) for a few minutes on CPU and saves it as a PLM checkpoint folder.

The corpus is available on every machine without network access: the ``*.py`` files of the
running interpreter's standard library (code and English docstrings). Files are split into
train/validation by a hash of their path relative to the stdlib root, so the split does not
depend on which other files exist or on the Python version.

    python -m plm_gguf.quant_eval.train --out tests/data/trained-plm [--minutes 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

# On a shared machine busy-waiting OpenMP threads stall each other: measured here under load,
# a 2-thread step took 12 s with the default wait policy and 1 s with a passive one. Only
# effective if torch is not imported yet (as under `python -m plm_gguf.quant_eval.train`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

from plm_gguf.fixtures.checkpoint import tiny_config, write_state_dict
from plm_gguf.fixtures.tokenizers import write_tiny_bpe_tokenizer
from plm_gguf.reference import PLMForCausalLM
from plm_gguf.schema import PLMConfig, parameter_count, tensor_table

# Every row length (hidden 256, kv_lora 256, heads*v 256, intermediate 1024) is a multiple of
# 256, so llama.cpp's K-quants apply to every matrix, as they do on PLM-1.8B.
TRAINED_CONFIG = tiny_config(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    kv_lora_rank=256,
    qk_nope_head_dim=48,
    qk_rope_head_dim=16,
    v_head_dim=64,
    vocab_size=4096,
    max_position_embeddings=512,
    rope_theta=100000.0,
)
# Like PLM-1.8B (151,646 tokens in a 151,936 embedding) the last ids are padding, never seen.
VOCAB_PADDING = 32

# Folders of the stdlib left out of the corpus: the test suites (huge, full of odd data), the
# codec tables of encodings/, and third-party or generated code.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
    "encodings", "turtledemo", "pydoc_data",
})
VAL_EVERY = 20  # about 1 file in 20 is held out for validation
MAX_FILE_CHARS = 200_000


@dataclass
class TrainSettings:
    minutes: float = 6.0  # training wall-clock budget (evaluation excluded)
    seed: int = 0
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_steps: int | None = None  # stop here too (tests); None: on time only
    max_train_chars: int = 6_000_000
    max_val_chars: int = 400_000
    eval_every_s: float = 30.0
    eval_windows: int = 16  # periodic validation: fixed windows of seq_len tokens
    final_eval_windows: int = 128
    threads: int = 2
    device: str = "cpu"  # "cuda" trains on a GPU; the saved checkpoint is the same format


@dataclass
class Corpus:
    train_files: list[str]
    val_files: list[str]
    train_chars: int
    val_chars: int
    train_tokens: np.ndarray = field(repr=False)
    val_tokens: np.ndarray = field(repr=False)

    def describe(self, root: Path) -> dict:
        return {
            "source": "Python standard library *.py files (sysconfig.get_paths()['stdlib'])",
            "stdlib": str(root),
            "python": platform.python_version(),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "max_file_chars": MAX_FILE_CHARS,
            "split": f"validation iff zlib.crc32(relative path) % {VAL_EVERY} == 0; files in sorted path order, "
                     "documents joined with <|endoftext|>",
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_chars": self.train_chars,
            "val_chars": self.val_chars,
            "train_tokens": int(self.train_tokens.size),
            "val_tokens": int(self.val_tokens.size),
            "val_file_list": self.val_files,
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relpath: str) -> bool:
    """The held-out split: a fixed hash of the path relative to the stdlib root."""
    return zlib.crc32(relpath.encode("utf-8")) % VAL_EVERY == 0


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the corpus files, sorted (deterministic for a given Python)."""
    root = root or stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file() and path.stat().st_size <= MAX_FILE_CHARS:
            found.append(rel.as_posix())
    return sorted(found)


def read_source(root: Path, rel: str) -> str:
    return (root / rel).read_text(encoding="utf-8", errors="replace")


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def build_corpus(tokenizer, eos_id: int, *, max_train_chars: int, max_val_chars: int,
                 root: Path | None = None) -> Corpus:
    root = root or stdlib_root()
    splits: dict[str, list[str]] = {"train": [], "val": []}
    texts: dict[str, list[str]] = {"train": [], "val": []}
    budget = {"train": max_train_chars, "val": max_val_chars}
    used = {"train": 0, "val": 0}
    for rel in stdlib_files(root):
        split = "val" if is_validation(rel) else "train"
        if used[split] >= budget[split]:
            continue
        text = read_source(root, rel)
        splits[split].append(rel)
        texts[split].append(text)
        used[split] += len(text)

    def encode(docs: list[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos_id)
        return np.asarray(ids, dtype=np.int64)

    return Corpus(splits["train"], splits["val"], used["train"], used["val"],
                  encode(texts["train"]), encode(texts["val"]))


def init_weights(model: PLMForCausalLM, seed: int) -> list[torch.nn.Parameter]:
    """GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, residual output projections
    (o_proj, down_proj) scaled by 1/sqrt(2 * layers), norms at 1. Returns the parameters."""
    gen = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    params = []
    for name, p in model.named_parameters():
        with torch.no_grad():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * n_layers)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        p.requires_grad_(True)
        params.append(p)
    return params


def lr_at(step: int, progress: float, s: TrainSettings) -> float:
    """Linear warmup over warmup_steps, then cosine to min_lr_ratio * lr over the budget
    (progress in [0, 1]: the larger of the time and step fractions used)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cos)


def eval_windows(tokens: np.ndarray, n: int, seq_len: int) -> torch.Tensor:
    """n evenly spaced, fixed windows of seq_len + 1 tokens: [n, seq_len + 1]."""
    n = max(1, min(n, (tokens.size - 1) // (seq_len + 1)))
    starts = np.linspace(0, tokens.size - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]))


@torch.no_grad()
def evaluate(model: PLMForCausalLM, windows: torch.Tensor, batch: int = 8) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats) and top-1 accuracy over the windows."""
    total, correct, count = 0.0, 0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        w = w.to(next(model.parameters()).device)
        logits = model.logits(w[:, :-1])
        target = w[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return total / count, correct / count


def bf16_state(model: PLMForCausalLM) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (tensor_table order, no lm_head) rounded to bf16."""
    params = dict(model.named_parameters())
    return {spec.hf_name: params[spec.hf_name].detach().to("cpu", torch.bfloat16).contiguous()
            for spec in tensor_table(model.config)}


def train(out: Path | str, *, config: PLMConfig = TRAINED_CONFIG, settings: TrainSettings | None = None,
          log: Callable[[str], None] = print, command: str | None = None) -> dict:
    """Train a PLM from scratch on the stdlib corpus and save it as a checkpoint folder in `out`.
    Returns the training record (also written to out/training.json)."""
    s = settings or TrainSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    wall_start = time.perf_counter()

    # Tokenizer: the first Qwen2 ranks + 3 specials; the embedding's last ids stay [PAD].
    n_tokens = write_tiny_bpe_tokenizer(out, config.vocab_size - VOCAB_PADDING)
    eos = n_tokens - 3  # <|endoftext|>
    config = replace(config, bos_token_id=eos, eos_token_id=eos)
    tokenizer = load_tokenizer(out)
    corpus = build_corpus(tokenizer, eos, max_train_chars=s.max_train_chars, max_val_chars=s.max_val_chars)
    log(f"corpus: {len(corpus.train_files)} train files ({corpus.train_tokens.size:,} tokens), "
        f"{len(corpus.val_files)} val files ({corpus.val_tokens.size:,} tokens)")

    model = PLMForCausalLM(config)
    params = init_weights(model, s.seed)
    model.to(s.device)  # moves the same Parameter objects
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=s.betas)
    log(f"model: {parameter_count(config):,} parameters; batch {s.batch_size} x {s.seq_len} tokens; "
        f"budget {s.minutes:g} min" + (f" / {s.max_steps} steps" if s.max_steps else ""))

    gen = np.random.default_rng(s.seed)
    val_small = eval_windows(corpus.val_tokens, s.eval_windows, s.seq_len)
    budget_s = s.minutes * 60.0
    history: list[dict] = []
    train_s, step, ema, first_loss = 0.0, 0, None, None
    last_eval = 0.0

    def record(tag: str) -> None:
        model.eval()
        val_loss, val_acc = evaluate(model, val_small)
        model.train()
        history.append({"step": step, "train_seconds": round(train_s, 1), "train_loss": round(ema, 4),
                        "val_loss": round(val_loss, 4), "lr": opt.param_groups[0]["lr"]})
        log(f"{tag} step {step:5d}  {train_s:6.1f}s  train {ema:.3f}  val {val_loss:.3f} "
            f"(ppl {math.exp(val_loss):.1f}, top-1 {val_acc:.3f})")

    model.train()
    while True:
        progress = train_s / budget_s if budget_s > 0 else 1.0
        if s.max_steps:
            progress = max(progress, step / s.max_steps)
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        lr = lr_at(step, progress, s)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = gen.integers(0, corpus.train_tokens.size - s.seq_len - 1, size=s.batch_size)
        batch = torch.from_numpy(np.stack([corpus.train_tokens[i:i + s.seq_len + 1] for i in starts])).to(s.device)
        logits = model.logits(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        step += 1
        train_s += time.perf_counter() - t0
        value = loss.item()
        if first_loss is None:
            first_loss = value
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if not math.isfinite(value):
            raise RuntimeError(f"training diverged at step {step} (loss {value})")
        if train_s - last_eval >= s.eval_every_s:
            last_eval = train_s
            record("     ")

    record("final")
    # The saved weights are bf16: measure those, on more validation windows.
    state = bf16_state(model)
    saved = PLMForCausalLM(config)
    saved.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    saved.eval()
    val_windows = eval_windows(corpus.val_tokens, s.final_eval_windows, s.seq_len)
    val_loss, val_acc = evaluate(saved, val_windows)
    log(f"saved bf16 weights: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}, top-1 {val_acc:.3f} "
        f"on {val_windows.shape[0]} x {s.seq_len} tokens (uniform would be {config.vocab_size})")

    write_state_dict(out, state)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    body = config.to_hf_dict() | {"torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(body, indent=2) + "\n")
    record_ = {
        "description": "A small PLM trained from scratch on Python stdlib source by plm_gguf.quant_eval.train",
        "command": command or f"plm_gguf.quant_eval.train.train({str(out)!r}, settings=TrainSettings(...))",
        "config": body,
        "parameters": parameter_count(config),
        "tokenizer_tokens": n_tokens,
        "seed": s.seed,
        "settings": asdict(s),
        "steps": step,
        "tokens_seen": step * s.batch_size * s.seq_len,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "first_train_loss": round(first_loss, 4),
        "final_train_loss": round(ema, 4),  # exponential moving average, factor 0.95
        "val_loss": round(val_loss, 4),  # of the saved bf16 weights
        "val_perplexity": round(math.exp(val_loss), 3),
        "val_top1": round(val_acc, 4),
        "val_tokens_evaluated": int(val_windows.shape[0] * s.seq_len),
        "history": history,
        "corpus": corpus.describe(stdlib_root()),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    (out / "training.json").write_text(json.dumps(record_, indent=2) + "\n")
    return record_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plm_gguf.quant_eval.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--minutes", type=float, default=TrainSettings.minutes, help="training wall-clock budget")
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--device", default=TrainSettings.device, help="cpu, or cuda to train on a GPU")
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--seq-len", type=int, default=TrainSettings.seq_len)
    parser.add_argument("--max-train-chars", type=int, default=TrainSettings.max_train_chars)
    args = parser.parse_args(argv)
    command = "python -m plm_gguf.quant_eval.train " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = TrainSettings(minutes=args.minutes, seed=args.seed, device=args.device, batch_size=args.batch_size,
                             seq_len=args.seq_len, max_train_chars=args.max_train_chars)
    result = train(args.out, settings=settings, command=command)
    print(f"wrote {args.out}: {result['steps']} steps in {result['train_seconds']} s, "
          f"val loss {result['val_loss']:.4f}, perplexity {result['val_perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
