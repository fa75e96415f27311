"""The trained test model: the training code (fast, tiny config) and the committed fixture
tests/data/trained-plm that the quantization sweep's tests use."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from plm_gguf.checkpoint import Checkpoint
from plm_gguf.fixtures.checkpoint import tiny_config
from plm_gguf.fixtures import train as tr
from plm_gguf.reference import PLMForCausalLM

FIXTURE = Path(__file__).parent / "data" / "trained-plm"

# Written for this test, so it is in no training set; used where no held-out stdlib file exists.
FALLBACK_SNIPPET = '''
def merge_intervals(intervals):
    """Return the union of the given (start, end) intervals, sorted by start.

    Overlapping or touching intervals are merged into one.
    """
    result = []
    for start, end in sorted(intervals):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


class Counter:
    """Count how many times each key has been seen."""

    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        """Add n to the count of key."""
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]

    def most_common(self, n=None):
        """Return the n most common keys and their counts, most common first."""
        items = sorted(self.counts.items(), key=lambda item: item[1], reverse=True)
        if n is None:
            return items
        return items[:n]
'''


def test_train_small_config_learns_and_saves_a_loadable_checkpoint(tmp_path):
    config = tiny_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, vocab_size=320)
    settings = tr.TrainSettings(minutes=1.0, max_steps=30, seq_len=32, batch_size=8, lr=1e-2, warmup_steps=3,
                                max_train_chars=100_000, max_val_chars=20_000, eval_every_s=1e9,
                                eval_windows=4, final_eval_windows=8, seed=1)
    out = tmp_path / "tiny-trained"
    record = tr.train(out, config=config, settings=settings, log=lambda line: None)

    assert record["steps"] == 30
    # Starts near the uniform loss ln(320) = 5.77; held-out loss after 30 steps must be well below it.
    assert record["first_train_loss"] > math.log(config.vocab_size) - 0.5, record["first_train_loss"]
    assert record["val_loss"] < record["first_train_loss"] - 0.7, (record["first_train_loss"], record["val_loss"])

    ckpt = Checkpoint(out)  # validates every name and shape against config.json
    assert ckpt.config.hidden_size == 32 and ckpt.config.vocab_size == 320
    assert ckpt.source_dtype == "BF16"
    assert "lm_head.weight" not in ckpt.refs
    body = json.loads((out / "config.json").read_text())
    assert body["torch_dtype"] == "bfloat16"
    assert body["architectures"] == ["PLMForCausalLM"] and body["model_type"] == "plm"
    saved = json.loads((out / "training.json").read_text())
    assert saved["steps"] == 30 and saved["seed"] == 1 and saved["val_loss"] == record["val_loss"]

    # The saved weights are the ones that were measured: reload and re-evaluate the same windows.
    tokenizer = tr.load_tokenizer(out)
    eos = record["tokenizer_tokens"] - 3
    corpus = tr.build_corpus(tokenizer, eos, max_train_chars=settings.max_train_chars,
                             max_val_chars=settings.max_val_chars)
    windows = tr.eval_windows(corpus.val_tokens, settings.final_eval_windows, settings.seq_len)
    reloaded, _ = tr.evaluate(PLMForCausalLM.from_checkpoint(ckpt), windows)
    assert reloaded == pytest.approx(record["val_loss"], abs=2e-3)


def _held_out_texts(record: dict) -> list[str]:
    """Validation files of the split recorded at training time that this Python has too."""
    root = tr.stdlib_root()
    texts = []
    for rel in record["corpus"]["val_file_list"]:
        assert tr.is_validation(rel), f"{rel} is recorded as held out but the split function disagrees"
        if (root / rel).is_file():
            texts.append(tr.read_source(root, rel))
        if len(texts) == 3:
            break
    return texts or [FALLBACK_SNIPPET]


def test_committed_fixture_is_a_trained_plm():
    ckpt = Checkpoint(FIXTURE)
    c = ckpt.config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (256, 4, 4096)
    assert ckpt.source_dtype == "BF16"
    # every matrix row is a whole number of 256-blocks, so K-quants apply to each one
    for spec in ckpt.specs:
        if not spec.is_norm:
            assert spec.shape[1] % 256 == 0, spec
    tokenizer = tr.load_tokenizer(FIXTURE)
    assert tokenizer.get_vocab_size() < c.vocab_size  # the last ids are padding, as in PLM-1.8B
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 12 * 2**20

    record = json.loads((FIXTURE / "training.json").read_text())
    assert record["config"]["hidden_size"] == c.hidden_size
    # far below the uniform distribution's perplexity (= vocab size; an untrained model is near it)
    assert record["val_perplexity"] < c.vocab_size / 100, record["val_perplexity"]

    # next-token top-1 accuracy on held-out stdlib source, against the best constant guess
    model = PLMForCausalLM.from_checkpoint(ckpt)
    correct = total = best_constant = 0
    for text in _held_out_texts(record):
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:257]
        tokens = torch.tensor(ids)
        predicted = model(tokens[:-1]).argmax(-1)
        targets = tokens[1:]
        correct += (predicted == targets).sum().item()
        total += targets.numel()
        best_constant += Counter(targets.tolist()).most_common(1)[0][1]
    accuracy, baseline = correct / total, best_constant / total
    assert total >= 200
    # chance is 1/4096; always guessing the snippet's own most frequent token scores ~0.05
    assert accuracy > baseline + 0.2, (accuracy, baseline)
    assert accuracy > 200 / c.vocab_size, accuracy
