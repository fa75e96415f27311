"""Absorbed MLA (the latent KV-cache layout): convert/mla.py, the llama.cpp patch set and the
patched host library (plm_gguf/llama/).

The slow tests build the patched library once per cache (minutes the first time; PLM_GGUF_CACHE
points at the cache) and run llama.cpp in child processes only.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from plm_gguf.checkpoint import Checkpoint
from plm_gguf.convert import mla
from plm_gguf.convert.verify import compare_logits
from plm_gguf.convert.writer import convert
from plm_gguf.errors import LlamaCppError
from plm_gguf.fixtures.checkpoint import tiny_config, write_tiny_checkpoint
from plm_gguf.llama import LLAMA_CPP_PYTHON_VERSION, runtime
from plm_gguf.llama.host import entry_dir
from plm_gguf.llama.patches import MLA_EXPAND_ENV, apply_patches, patch_files
from plm_gguf.llama.runtime import run_worker
from plm_gguf.llama.worker import parse_kv_cache
from plm_gguf.reference import PLMForCausalLM

# Odd sizes no code path assumes (5 heads, rope 6, nope 12 != v 20, lora 24).
MLA_CONFIG = tiny_config(hidden_size=80, num_hidden_layers=3, num_attention_heads=5, intermediate_size=96,
                         kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=20, vocab_size=700)
SIZES = mla.MlaSizes.from_config(MLA_CONFIG)
SEQUENCES = [[3, 17, 250, 9, 64, 301, 5, 88, 120, 7, 42, 199, 11, 2, 640, 33, 71, 500, 18, 260],
             list(range(100, 157)), [5, 5]]


# ---------------------------------------------------------------- pure functions (fast)

def test_split_matches_deepseek2_converter_layout():
    """attn_k_b is each head's k_nope rows transposed, attn_v_b each head's v rows, as
    convert_hf_to_gguf.py's DeepseekV2 modify_tensors writes them."""
    s = SIZES
    kv_b = np.random.default_rng(0).standard_normal((s.n_head * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank))
    k_b, v_b = mla.split_kv_b(kv_b, s)
    assert k_b.shape == (s.n_head, s.kv_lora_rank, s.qk_nope_head_dim)
    assert v_b.shape == (s.n_head, s.v_head_dim, s.kv_lora_rank)
    # the converter's torch code, verbatim in spirit
    t = torch.from_numpy(kv_b).view(s.n_head, s.v_head_dim + s.qk_nope_head_dim, s.kv_lora_rank)
    tk, tv = torch.split(t, [s.qk_nope_head_dim, s.v_head_dim], dim=1)
    np.testing.assert_array_equal(k_b, tk.transpose(1, 2).numpy())
    np.testing.assert_array_equal(v_b, tv.numpy())
    np.testing.assert_array_equal(mla.merge_kv_b(k_b, v_b), kv_b)
    with pytest.raises(ValueError, match="expected"):
        mla.split_kv_b(kv_b[:-1], s)


def test_absorbed_attention_equals_expanded():
    """q_nope . k_nope == (k_b q_nope) . c and attn @ v == v_b (attn @ c), per head."""
    s = SIZES
    rng = np.random.default_rng(1)
    kv_b = rng.standard_normal((s.n_head * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank))
    k_b, v_b = mla.split_kv_b(kv_b, s)
    c = rng.standard_normal((7, s.kv_lora_rank))  # latents of 7 cached tokens
    q_nope = rng.standard_normal((s.n_head, s.qk_nope_head_dim))
    kv = (c @ kv_b.T).reshape(7, s.n_head, -1)
    k_nope, v = kv[..., : s.qk_nope_head_dim], kv[..., s.qk_nope_head_dim:]
    scores = np.einsum("hd,thd->ht", q_nope, k_nope)
    q_abs = np.einsum("hld,hd->hl", k_b, q_nope)
    np.testing.assert_allclose(np.einsum("hl,tl->ht", q_abs, c), scores, rtol=1e-10, atol=1e-10)
    attn = rng.random((s.n_head, 7))
    np.testing.assert_allclose(np.einsum("hvl,hl->hv", v_b, attn @ c), np.einsum("ht,thv->hv", attn, v),
                               rtol=1e-10, atol=1e-10)


def test_metadata_is_deepseek2_style():
    meta = mla.mla_metadata(mla.MlaSizes(16, 512, 128, 64, 128))  # PLM-1.8B
    assert meta == {"plm.attention.head_count_kv": 1, "plm.attention.key_length": 576,
                    "plm.attention.value_length": 512, "plm.attention.key_length_mla": 192,
                    "plm.attention.value_length_mla": 128}


# ---------------------------------------------------------------- files

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mla")
    ckpt = write_tiny_checkpoint(root / "PLM-mla", MLA_CONFIG, seed=11)
    stock = convert(ckpt, root / "stock-f32.gguf", "f32").outfile
    latent = mla.rewrite_to_latent(stock, root / "latent-f32.gguf")
    (root / "tokens.json").write_text(json.dumps(SEQUENCES))
    return {"ckpt": ckpt, "stock": stock, "latent": latent, "root": root}


def test_rewrite_to_latent(files):
    stock, latent = gguf.GGUFReader(files["stock"]), gguf.GGUFReader(files["latent"])
    st = {t.name: t for t in stock.tensors}
    lt = {t.name: t for t in latent.tensors}
    assert not any(n.endswith("attn_kv_b.weight") for n in lt)
    assert len(lt) == len(st) + MLA_CONFIG.num_hidden_layers
    for name, t in st.items():
        if name.endswith("attn_kv_b.weight"):
            k_b, v_b = lt[name.replace("kv_b", "k_b")], lt[name.replace("kv_b", "v_b")]
            assert list(k_b.shape) == [SIZES.qk_nope_head_dim, SIZES.kv_lora_rank, SIZES.n_head]  # GGUF ne
            assert list(v_b.shape) == [SIZES.kv_lora_rank, SIZES.v_head_dim, SIZES.n_head]
            merged = mla.merge_kv_b(np.asarray(k_b.data), np.asarray(v_b.data))
            np.testing.assert_array_equal(merged, np.asarray(t.data))
        else:
            np.testing.assert_array_equal(np.asarray(lt[name].data), np.asarray(t.data))
    fields = latent.fields
    for key, value in mla.mla_metadata(SIZES).items():
        assert fields[key].contents() == value
    for key in stock.fields:  # everything else is carried over
        if not key.startswith("GGUF.") and key not in mla.mla_metadata(SIZES):
            assert fields[key].contents() == stock.fields[key].contents(), key
    assert mla.is_latent(files["latent"]) and not mla.is_latent(files["stock"])
    with pytest.raises(ValueError, match="already"):
        mla.rewrite_to_latent(files["latent"], files["root"] / "twice.gguf")
    assert not (files["root"] / "twice.gguf").exists() and not (files["root"] / "twice.gguf.partial").exists()


# ---------------------------------------------------------------- the patch set and the cache (fast)

def test_patch_that_does_not_apply_names_the_full_layout(tmp_path):
    tree = tmp_path / "llama.cpp"
    (tree / "src" / "models").mkdir(parents=True)
    (tree / "src" / "models" / "plm.cpp").write_text("// not the llama.cpp this patch targets\n")
    with pytest.raises(LlamaCppError) as err:
        apply_patches(tree)
    assert "does not apply" in err.value.message and "--kv-cache full" in err.value.hint


def test_build_key_follows_the_patches(tmp_path, monkeypatch):
    key = runtime.build_key()
    assert key.startswith(f"lcp{LLAMA_CPP_PYTHON_VERSION}-mla-")
    for patch in patch_files():
        shutil.copy(patch, tmp_path / patch.name)
    monkeypatch.setenv("PLM_GGUF_PATCHES", str(tmp_path))
    assert runtime.build_key() == key
    first = sorted(tmp_path.glob("*.patch"))[0]
    first.write_text("An edited commit message.\n" + first.read_text())  # builds the same
    assert runtime.build_key() == key
    first.write_text(first.read_text().replace("// note: MLA", "// note:  MLA", 1))
    assert runtime.build_key() != key
    monkeypatch.setenv("PLM_GGUF_CACHE", str(tmp_path / "cache"))
    assert entry_dir().parent == tmp_path / "cache" / "llama"


def test_kv_cache_report_is_parsed():
    line = ("llama_kv_cache: size =  144.00 MiB (  4096 cells,  32 layers,  1/1 seqs), "
            "K (f16):  144.00 MiB, V (f16):    0.00 MiB")
    assert parse_kv_cache(line) == {"total_mib": 144.0, "k_type": "f16", "k_mib": 144.0,
                                    "v_type": "f16", "v_mib": 0.0}


# ---------------------------------------------------------------- llama.cpp (slow)

@pytest.fixture(scope="session")
def patched_lib() -> Path:
    return runtime.build()


def _logits(model: Path, out: Path, tokens: Path, env: dict | None) -> list[np.ndarray]:
    out.mkdir(parents=True, exist_ok=True)
    run_worker(["logits", str(model), "--tokens", str(tokens), "--out", str(out), "--f32-cache"], env=env)
    return [np.load(out / f"logits_{i}.npy") for i in range(len(SEQUENCES))]


@pytest.fixture(scope="module")
def reference_logits(files) -> list[np.ndarray]:
    ref = PLMForCausalLM.from_checkpoint(Checkpoint(files["ckpt"]))
    with torch.no_grad():
        return [ref(torch.tensor(s)).numpy() for s in SEQUENCES]


@pytest.mark.slow
def test_patched_library_is_loaded(patched_lib, files):
    env = runtime.lib_env(lib=patched_lib)
    report = runtime.probe(files["latent"], n_ctx=64, env=env)
    assert report["ok"], report
    assert report["lib"] == str(patched_lib)
    assert json.loads((patched_lib.parent / "manifest.json").read_text())["key"] == patched_lib.parent.name


# LLAMA_PLM_MLA_EXPAND_MIN_TOKENS (patch 0004): the smallest batch that attends in the expanded form.
# 0: every batch absorbed; 4: the prompts (20, 57 and 8 tokens) expanded, [5, 5] and each decoded token
# absorbed (what a real prompt + generation does at the default); 1: every batch expanded, decode too.
EXPAND = {"absorbed": "0", "expanded-prompts": "4", "expanded-all": "1"}


@pytest.fixture(scope="module")
def greedy_stock(patched_lib, files) -> list[list[int]]:
    """The stock layout's greedy tokens (16 after the first 8 of each sequence, f32 cache), once."""
    prompts = [s[:8] for s in SEQUENCES]
    env = runtime.lib_env(lib=patched_lib)
    return runtime.run_logits(files["stock"], prompts, files["root"] / "greedy-stock", env=env, greedy=16)[1]


@pytest.mark.slow
@pytest.mark.parametrize("expand", EXPAND.values(), ids=EXPAND.keys())
def test_latent_layout_matches_reference(patched_lib, files, reference_logits, greedy_stock, expand):
    env = runtime.lib_env(lib=patched_lib) | {MLA_EXPAND_ENV: expand}
    latent = _logits(files["latent"], files["root"] / f"out-latent-{expand}", files["root"] / "tokens.json", env)
    stats = compare_logits(reference_logits, latent)
    assert stats.mean_kl <= 1e-9 and stats.top1 == 1.0, stats
    # greedy decoding (16 tokens after each prompt, f32 cache) gives the stock layout's tokens
    prompts = [s[:8] for s in SEQUENCES]
    _, greedy_latent = runtime.run_logits(files["latent"], prompts, files["root"] / f"greedy-latent-{expand}", env=env,
                                          greedy=16)
    assert greedy_latent == greedy_stock
    assert any(len(set(g)) > 1 for g in greedy_latent)  # not a degenerate repetition


@pytest.mark.slow
def test_stock_layout_unchanged_on_patched_library(patched_lib, files, reference_logits):
    env = runtime.lib_env(lib=patched_lib)
    patched = _logits(files["stock"], files["root"] / "out-stock-patched2", files["root"] / "tokens.json", env)
    stats = compare_logits(reference_logits, patched)
    assert stats.mean_kl <= 1e-9 and stats.top1 == 1.0, stats


@pytest.mark.slow
def test_kv_cache_holds_latent_only(patched_lib, files):
    env = runtime.lib_env(lib=patched_lib)
    n_ctx, n_layer = 256, MLA_CONFIG.num_hidden_layers
    latent = runtime.probe(files["latent"], n_ctx=n_ctx, f32_cache=True, env=env)
    stock = runtime.probe(files["stock"], n_ctx=n_ctx, f32_cache=True, env=env)
    assert latent["ok"] and stock["ok"], (latent, stock)
    from plm_gguf.memory import KVLayout, ModelShape, kv_cache_bytes

    shape = ModelShape.of_config(MLA_CONFIG)  # the one KV-cache size (plm_gguf.memory), against llama.cpp's
    mib = lambda layout: kv_cache_bytes(shape, layout, n_ctx, bytes_per_value=4) / 2**20  # noqa: E731
    assert mib(KVLayout.LATENT) == n_ctx * n_layer * (SIZES.kv_lora_rank + SIZES.qk_rope_head_dim) * 4 / 2**20
    assert math.isclose(latent["kv_cache"]["k_mib"], mib(KVLayout.LATENT), abs_tol=0.006)
    assert latent["kv_cache"]["v_mib"] == 0.0
    assert math.isclose(stock["kv_cache"]["total_mib"], mib(KVLayout.FULL), abs_tol=0.006)
    print(f"KV cache at n_ctx {n_ctx}, f32: latent {latent['kv_cache']['total_mib']} MiB, "
          f"stock {stock['kv_cache']['total_mib']} MiB")


# Sizes where the latent K row (lora + rope = 96) and V (lora = 64) fit q8_0's 32-blocks.
Q8_CONFIG = tiny_config(hidden_size=64, num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=32,
                        qk_rope_head_dim=32, v_head_dim=32, vocab_size=700)


@pytest.mark.slow
@pytest.mark.parametrize("expand", ["0", "4"], ids=["absorbed", "expanded-prompts"])
def test_latent_layout_with_flash_attention_and_q8_0_cache(patched_lib, tmp_path, expand):
    """The latent layout runs with flash attention (absorbed: K 96 / V 64 heads, where the stock
    layout's K 64 / V 32 aborts; expanded prompts: K 64 / V 32 from the decompressed latent) and
    with a q8_0 KV cache (which needs flash attention)."""
    ckpt = write_tiny_checkpoint(tmp_path / "PLM-q8", Q8_CONFIG, seed=8)
    latent = mla.rewrite_to_latent(convert(ckpt, tmp_path / "stock.gguf", "f32").outfile, tmp_path / "latent.gguf")
    ref = PLMForCausalLM.from_checkpoint(Checkpoint(ckpt))
    with torch.no_grad():
        reference = [ref(torch.tensor(s)).numpy() for s in SEQUENCES]
    env = runtime.lib_env(lib=patched_lib) | {MLA_EXPAND_ENV: expand}
    f16_fa, _ = runtime.run_logits(latent, SEQUENCES, tmp_path / "fa", env=env, cache_type=1, flash_attn=True)
    assert compare_logits(reference, f16_fa).mean_kl <= 1e-5
    q8_fa, _ = runtime.run_logits(latent, SEQUENCES, tmp_path / "q8", env=env, cache_type=8, flash_attn=True)
    stats = compare_logits(reference, q8_fa)
    assert stats.mean_kl <= 5e-3 and stats.top1 >= 0.95, stats
    print(f"latent layout, flash attention: f16 cache mean KL {compare_logits(reference, f16_fa).mean_kl:.2e}, "
          f"q8_0 cache mean KL {stats.mean_kl:.2e}")


# ---------------------------------------------------------------- the ggml-cpu patch (slow)

@pytest.mark.slow
def test_patched_flash_attention_kernels_match_ggml_reference(patched_lib):
    """llama.cpp's own test-backend-ops, unmodified, compares the patched CPU flash-attention
    kernels with ggml's reference implementation: every MLA case (K 576 / V 512, V a view of K),
    every one-query (decode) case, where the grouped-query path runs, and the f16 prefill cases
    of the tiled path."""
    passed, n_run, out = runtime.run_op_test("FLASH_ATTN_EXT", r"hsk=576|nb=1,|nb=75,.*type_K=f16")
    assert passed and n_run > 1500, out[-3000:]


def _decode_case(tmp_path: Path, config, seed: int, n_prompt: int = 560, n_gen: int = 12):
    """A latent f32 file, a prompt long enough that decoding reads >= 512 cached tokens (llama.cpp's
    split-KV decode path) and is prefilled in tiles, and the torch reference for prompt + greedy."""
    ckpt = write_tiny_checkpoint(tmp_path / f"PLM-{seed}", config, seed=seed)
    latent = mla.rewrite_to_latent(convert(ckpt, tmp_path / f"stock-{seed}.gguf", "f32").outfile,
                                   tmp_path / f"latent-{seed}.gguf")
    prompt = np.random.default_rng(seed).integers(0, config.vocab_size - 40, n_prompt).tolist()
    return latent, prompt, PLMForCausalLM.from_checkpoint(Checkpoint(ckpt))


def _decoded_kl(reference, prompt, greedy, all_logits, n_gen):
    with torch.no_grad():
        ref = reference(torch.tensor(prompt + greedy)).numpy()
    return compare_logits([ref[-n_gen:]], [all_logits[-n_gen:]])


@pytest.mark.slow
@pytest.mark.parametrize("cache_type", [1, 8], ids=["f16-cache", "q8_0-cache"])
def test_flash_attention_decode_over_a_long_cache_matches_reference(patched_lib, tmp_path, cache_type):
    """Decoding with flash attention over 560+ cached tokens (the patched grouped-query kernel: all
    query heads of the latent's one KV head per KV chunk) gives the torch reference's next-token
    distributions, with an f16 and with a q8_0 latent cache."""
    config = replace(Q8_CONFIG, max_position_embeddings=1024) if cache_type == 8 else \
        replace(MLA_CONFIG, max_position_embeddings=1024)
    n_gen = 12
    latent, prompt, reference = _decode_case(tmp_path, config, seed=20 + cache_type, n_gen=n_gen)
    env = runtime.lib_env(lib=patched_lib)
    out = tmp_path / "fa"
    _, greedy = runtime.run_logits(latent, [prompt], out, env=env, cache_type=cache_type, flash_attn=True,
                                     greedy=n_gen)
    all_logits = np.load(out / "all_logits_0.npy")
    assert all_logits.shape[0] == len(prompt) + n_gen
    stats = _decoded_kl(reference, prompt, greedy[0], all_logits, n_gen)
    limit = 1e-5 if cache_type == 1 else 5e-3
    assert stats.mean_kl <= limit and stats.top1 == 1.0, stats
    print(f"flash attention decode at {len(prompt)}+ cached tokens, cache type {cache_type}: "
          f"mean KL {stats.mean_kl:.2e}")
