"""The layer-by-layer torch reference (PLMForCausalLM.stream over memory-mapped weights) computes
what the whole model in memory computes, for logits and for the importance matrix, and holds
one layer's weights at a time."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from plm_gguf import reference as R
from plm_gguf.checkpoint import Checkpoint
from plm_gguf.convert.writer import convert
from plm_gguf.fixtures.checkpoint import write_tiny_checkpoint
from plm_gguf.quant_eval.imatrix import compute_imatrix
from plm_gguf.reference import CheckpointWeights, GgufWeights, PLMForCausalLM

from .conftest import ODD_CONFIG

SEQS = [[5, 17, 300, 42, 9, 250, 11, 3], [77, 123, 64, 1, 600, 2, 31, 8, 99, 4, 650]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return Checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("stream") / "PLM-odd", ODD_CONFIG, seed=5))


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_bytes", [R.OUTPUT_BLOCK_BYTES, 1000])  # whole vocabulary, or rows of a few
def test_streamed_logits_equal_the_whole_model(ckpt, monkeypatch, block_bytes):
    monkeypatch.setattr(R, "OUTPUT_BLOCK_BYTES", block_bytes)
    whole = PLMForCausalLM.from_checkpoint(ckpt)
    inputs = [torch.tensor(s) for s in SEQS]
    expected = {None: [whole(x) for x in inputs]}
    whole.set_matmul_input_dtype(torch.bfloat16)
    expected[torch.bfloat16] = [whole(x) for x in inputs]
    got = PLMForCausalLM.skeleton(ckpt.config).stream(CheckpointWeights(ckpt), inputs, variants=(None, torch.bfloat16))
    _close(got[None], expected[None])
    _close(got[torch.bfloat16], expected[torch.bfloat16])
    assert not torch.equal(got[None][0], got[torch.bfloat16][0])  # the variants really differ


@pytest.mark.parametrize("outtype,layout", [("bf16", "full"), ("f32", "latent"), ("q8_0", "full")])
def test_streamed_gguf_equals_the_whole_file(ckpt, tmp_path, outtype, layout):
    path = convert(ckpt.folder, tmp_path / "m.gguf", outtype, kv_cache=layout).outfile
    inputs = [torch.tensor(s) for s in SEQS]
    expected = [PLMForCausalLM.from_gguf(path, ckpt.config)(x) for x in inputs]
    got = PLMForCausalLM.skeleton(ckpt.config).stream(GgufWeights(path, ckpt.config), inputs)[None]
    _close(got, expected)


@pytest.mark.parametrize("latent", [False, True])
def test_streamed_importance_matrix_equals_the_whole_model(ckpt, tmp_path, latent):
    tokens = list(np.random.default_rng(0).integers(0, ODD_CONFIG.vocab_size, 300))
    counts_a = compute_imatrix(PLMForCausalLM.from_checkpoint(ckpt), tokens, tmp_path / "a.npz", n_ctx=64, latent=latent)
    counts_b = compute_imatrix(CheckpointWeights(ckpt), tokens, tmp_path / "b.npz", n_ctx=64, latent=latent)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert counts_a == counts_b and sorted(a.files) == sorted(b.files) and len(a.files) >= 6 * ODD_CONFIG.num_hidden_layers + 1
    for name in a.files:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, err_msg=name)


def test_one_layer_of_weights_is_alive_at_a_time(ckpt):
    """Every tensor the source hands out is tracked; when the next one is asked for, the ones
    still alive are the current layer's only: nothing of the layers before it."""
    source = CheckpointWeights(ckpt)
    alive: list[weakref.ref] = []
    most = 0
    real = source.tensor

    def tracked(name):
        nonlocal most
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        most = max(most, len(alive))
        t = real(name)
        alive.append(weakref.ref(t))
        return t

    source.tensor = tracked
    PLMForCausalLM.skeleton(ckpt.config).stream(source, [torch.tensor(SEQS[0])])
    per_layer = sum(1 for n in source.names() if n.startswith("model.layers.0."))
    # asking for a layer's last tensor finds its other 8 alive; one more would be a leftover
    assert per_layer == 9 and most == per_layer - 1, most


def test_verify_reports_its_peak_memory(ckpt, tmp_path):
    from plm_gguf.convert.verify import verify

    from .conftest import run_cli

    path = convert(ckpt.folder, tmp_path / "m.gguf", "bf16").outfile
    result = verify(ckpt.folder, path)
    assert result.passed and result.peak_rss_bytes > 100 << 20 and result.llama_peak_rss_bytes > 10 << 20
    cli = run_cli("verify", ckpt.folder, path)
    assert cli.code == 0 and "peak memory:" in cli.stdout and "MiB (plm-gguf" in cli.stdout, cli.stdout
