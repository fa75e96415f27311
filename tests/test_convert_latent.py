"""`plm-gguf convert --kv-cache latent`: the absorbed-MLA layout written straight from the
checkpoint, checked against the torch reference through the patched llama.cpp."""

from __future__ import annotations

import pytest

from plm_gguf.convert.mla import is_latent
from plm_gguf.convert.verify import verify
from plm_gguf.convert.writer import convert
from plm_gguf.ggufinfo import read_gguf_info
from plm_gguf.memory import KVLayout, ModelShape, kv_cache_bytes
from plm_gguf.schema import config_from_gguf

from .conftest import ODD_CONFIG, run_cli


@pytest.mark.slow
def test_latent_layout_from_the_checkpoint(tmp_path, odd_checkpoint):
    out = convert(odd_checkpoint, tmp_path / "lat.gguf", "f32", kv_cache="latent").outfile
    info = read_gguf_info(out)
    c = ODD_CONFIG
    assert is_latent(out) and "blk.0.attn_kv_b.weight" not in info.tensors
    assert info.tensors["blk.0.attn_k_b.weight"].shape == (c.n_head, c.kv_lora_rank, c.qk_nope_head_dim)
    assert info.tensors["blk.0.attn_v_b.weight"].shape == (c.n_head, c.v_head_dim, c.kv_lora_rank)
    assert info.get("plm.attention.key_length") == c.kv_lora_rank + c.qk_rope_head_dim
    assert info.get("plm.attention.key_length_mla") == c.qk_nope_head_dim + c.qk_rope_head_dim
    back = config_from_gguf(out)  # the per-head sizes come back from the *_mla keys
    assert (back.qk_nope_head_dim, back.qk_rope_head_dim, back.v_head_dim, back.n_head, back.kv_lora_rank) == \
        (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.n_head, c.kv_lora_rank)
    # 576 vs 16*(192+128) values per token and layer for PLM-1.8B; here (24+6) vs 5*(18+20)
    shape = ModelShape.of_config(c)
    assert kv_cache_bytes(shape, KVLayout.LATENT, 4096) * 5 * 38 == kv_cache_bytes(shape, KVLayout.FULL, 4096) * 30
    result = verify(odd_checkpoint, out)  # runs on the patched llama.cpp (built and cached once)
    assert result.passed and result.file_stats.mean_kl == 0.0
    assert result.stats.mean_kl <= 1e-9 and result.stats.top1 == 1.0, result.stats


def test_bad_layout_name(tmp_path, odd_checkpoint):
    result = run_cli("convert", odd_checkpoint, "--outfile", tmp_path / "x.gguf", "--kv-cache", "compressed")
    assert result.code == 2 and "--kv-cache 'compressed' is not a layout" in result.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_cli_names_each_kind_of_fallback_once(tmp_path, odd_checkpoint):
    """attn_k_b rows are qk_nope wide (12 here, 128 in PLM-1.8B: too narrow for K-quants): one line
    for the tensor kind, not one per block."""
    result = run_cli("convert", odd_checkpoint, "--outfile", tmp_path / "q8.gguf", "--outtype", "q8_0",
                     "--kv-cache", "latent")
    assert result.code == 0, result.stderr
    lines = [l.strip() for l in result.stdout.splitlines() if l.startswith("fallback")]
    assert "fallback blk.*.attn_k_b.weight (3 tensors, one per block): rows do not fit Q8_0 blocks, written as F16" \
        in lines, result.stdout
    assert len(lines) == len(set(lines)) and not any(l.startswith("fallback blk.0.") for l in lines), lines
