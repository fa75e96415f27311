"""plm-gguf convert and verify on tiny PLM checkpoints with the real schema, checked three
ways: the torch reference (from the checkpoint), an independent numpy forward pass (from the
GGUF file alone) and llama.cpp itself (through llama-cpp-python)."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from plm_gguf.checkpoint import Checkpoint
from plm_gguf.convert.verify import compare_logits, verify
from plm_gguf.convert.writer import convert
from plm_gguf.fixtures.checkpoint import write_tiny_checkpoint
from plm_gguf.reference import PLMForCausalLM

from .conftest import BLOCK_CONFIG, ODD_CONFIG, run_cli
from .numpy_plm import GgufPLM

TOKENS = [5, 17, 300, 42, 9, 250, 11, 3, 77, 123, 64, 1, 600, 2, 31, 8]


def _tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_every_storage_format_gives_the_same_file(tmp_path, fmt, shards):
    ref = write_tiny_checkpoint(tmp_path / "ref", ODD_CONFIG, seed=7)
    other = write_tiny_checkpoint(tmp_path / "other", ODD_CONFIG, seed=7, fmt=fmt, shards=shards)
    a = convert(ref, tmp_path / "a.gguf", "f32").outfile
    b = convert(other, tmp_path / "b.gguf", "f32").outfile
    ta = {t.name: np.array(t.data) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: np.array(t.data) for t in gguf.GGUFReader(b).tensors}
    assert ta.keys() == tb.keys() and len(ta) == 9 * ODD_CONFIG.num_hidden_layers + 2
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


@pytest.mark.parametrize("source", ["safetensors", "bin"])
@pytest.mark.parametrize("outtype,threshold", [("f32", 1e-9), ("bf16", 1e-9), ("f16", 1e-6)])
def test_lossless_types_match_reference_and_llama_cpp(tmp_path, source, outtype, threshold):
    ckpt = write_tiny_checkpoint(tmp_path / "PLM-tiny", ODD_CONFIG, seed=11, fmt=source)
    out = convert(ckpt, tmp_path / f"m-{outtype}.gguf", outtype).outfile
    result = verify(ckpt, out)
    assert result.threshold == threshold and result.passed
    # the file's own weights compute what the checkpoint computes
    assert result.file_stats.mean_kl <= threshold and result.file_stats.top1 == 1.0, result.file_stats
    if outtype == "f32":  # llama.cpp computes exactly what the reference computes
        assert result.stats.mean_kl <= 1e-9 and result.stats.top1 == 1.0, result.stats
    else:  # llama.cpp rounds matmul inputs to the weight type; matched, it is far closer than unmatched
        assert result.stats.mean_kl < min(1e-4, result.exact.mean_kl), (result.stats, result.exact)
    # the independent numpy pass, reading only the GGUF, agrees with the torch reference
    model = PLMForCausalLM.from_checkpoint(Checkpoint(ckpt), compute_dtype=torch.float64)
    ours = model(torch.tensor(TOKENS)).double().numpy()
    theirs = GgufPLM(out).logits(TOKENS)
    stats = compare_logits([ours], [theirs])
    assert stats.mean_kl <= (1e-12 if outtype != "f16" else 1e-6), stats
    assert stats.top1 == 1.0


def test_quantized_types_load_and_are_reported_not_failed(tmp_path, block_checkpoint, odd_checkpoint):
    q8 = convert(block_checkpoint, tmp_path / "q8.gguf", "q8_0")
    assert q8.tensor_types == {"Q8_0": 13, "F32": 7} and not q8.fallbacks
    result = verify(block_checkpoint, q8.outfile)
    assert result.threshold is None and result.passed
    assert 0 < result.stats.mean_kl < 0.05 and result.stats.top1 >= 0.9

    # rows of 80 do not fit 32-blocks: those matrices fall back to f16, and the summary says so
    odd = convert(odd_checkpoint, tmp_path / "odd-q8.gguf", "q8_0")
    fell = {name for name, wanted, got in odd.fallbacks}
    assert "blk.0.attn_q.weight" in fell and all(w == "Q8_0" and g == "F16" for _, w, g in odd.fallbacks)
    assert _tensor_types(odd.outfile)["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96 fit
    assert verify(odd_checkpoint, odd.outfile).stats.top1 >= 0.9


def test_q4_k_m_in_one_command_leaves_no_intermediate(tmp_path, block_checkpoint):
    result = convert(block_checkpoint, tmp_path / "q4.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4.gguf"]
    types = _tensor_types(result.outfile)
    assert types["blk.0.attn_norm.weight"] == "F32"
    # rows of 96 are not multiples of 256: llama.cpp falls back, and the summary names each one
    assert result.fallbacks and all(wanted == "Q4_K" for _, wanted, _ in result.fallbacks)
    check = verify(block_checkpoint, result.outfile)
    assert check.threshold is None and check.stats.mean_kl > 0


def test_metadata_is_complete(tmp_path, block_checkpoint):
    out = convert(block_checkpoint, tmp_path / "m.gguf", "bf16").outfile
    fields = {f.name: f.contents() for f in gguf.GGUFReader(out).fields.values()}
    c = BLOCK_CONFIG
    expected = {
        "general.architecture": "plm", "plm.block_count": c.num_hidden_layers, "plm.embedding_length": c.hidden_size,
        "plm.feed_forward_length": c.intermediate_size, "plm.attention.head_count": c.n_head,
        "plm.attention.head_count_kv": c.n_head, "plm.attention.kv_lora_rank": c.kv_lora_rank,
        "plm.attention.key_length": c.qk_nope_head_dim + c.qk_rope_head_dim, "plm.attention.value_length": c.v_head_dim,
        "plm.rope.dimension_count": c.qk_rope_head_dim, "plm.vocab_size": c.vocab_size,
        "plm.context_length": c.max_position_embeddings, "general.file_type": int(gguf.LlamaFileType.MOSTLY_BF16),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["plm.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert fields["general.size_label"] and fields["general.name"]
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == c.vocab_size
    n_real = json.loads((block_checkpoint / "tokenizer.json").read_text())["added_tokens"][-1]["id"] + 1
    assert tokens[n_real] == f"[PAD{n_real}]" and types[n_real] == gguf.TokenType.UNUSED
    assert types[n_real - 1] == gguf.TokenType.CONTROL and tokens[n_real - 1] == "<|im_end|>"
    assert fields["tokenizer.ggml.eos_token_id"] == n_real - 3
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert len(fields["tokenizer.ggml.merges"]) > 0


def test_bf16_from_bf16_is_a_byte_copy(tmp_path, odd_checkpoint):
    out = convert(odd_checkpoint, tmp_path / "m.gguf", "auto")
    assert out.outtype == "bf16"
    ckpt = Checkpoint(odd_checkpoint)
    stored = {t.name: np.array(t.data).view(np.uint16).reshape(-1) for t in gguf.GGUFReader(out.outfile).tensors}
    for spec in ckpt.specs:
        if not spec.is_norm:
            np.testing.assert_array_equal(stored[spec.gguf_name], ckpt.tensor(spec).raw().reshape(-1))


def test_real_qwen_vocabulary_and_nfc_divergence_is_named(tmp_path, qwen_checkpoint):
    out = convert(qwen_checkpoint, tmp_path / "q.gguf", "f32")
    assert any("NFC" in n for n in out.notes)
    result = verify(qwen_checkpoint, out.outfile)
    assert result.passed and result.stats.mean_kl <= 1e-9
    by_name = {d.name: d for d in result.token_diffs}
    assert "decomposed" in by_name and by_name["decomposed"].nfc_only  # llama.cpp does not NFC
    assert not [d for d in result.token_diffs if not d.nfc_only], result.token_diffs


def test_pre_tokenizer_is_read_from_the_definition(tmp_path, block_checkpoint):
    ckpt = tmp_path / "ck"
    shutil.copytree(block_checkpoint, ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    result = run_cli("convert", ckpt, "--outfile", tmp_path / "x.gguf")
    assert result.code != 0 and "pre-tokenizer" in result.stderr and "--pre-tokenizer" in result.stderr
    assert not (tmp_path / "x.gguf").exists()
    ok = run_cli("convert", ckpt, "--outfile", tmp_path / "x.gguf", "--pre-tokenizer", "llama-bpe")
    assert ok.code == 0, ok.stderr
    fields = {f.name: f.contents() for f in gguf.GGUFReader(tmp_path / "x.gguf").fields.values()}
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"


def test_cli_convert_with_verify(tmp_path, odd_checkpoint):
    result = run_cli("convert", odd_checkpoint, "--outtype", "f16", "--outfile", tmp_path / "m.gguf", "--verify")
    assert result.code == 0, result.stderr
    assert "wrote" in result.stdout and "pass" in result.stdout


def test_hub_repo_id_resolves_from_the_cache_offline(tmp_path, odd_checkpoint):
    """A repo id goes through huggingface_hub's real cache; HF_HUB_OFFLINE is honoured."""
    cache = tmp_path / "hub"
    snap = cache / "models--PLM-Team--PLM-tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(odd_checkpoint, snap)
    (cache / "models--PLM-Team--PLM-tiny" / "refs").mkdir()
    (cache / "models--PLM-Team--PLM-tiny" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ok = run_cli("convert", "PLM-Team/PLM-tiny", "--outtype", "f32", cwd=tmp_path, env=env)
    assert ok.code == 0, ok.stderr
    out = tmp_path / "PLM-tiny-F32.gguf"
    fields = {f.name: f.contents() for f in gguf.GGUFReader(out).fields.values()}
    assert fields["general.source.repo_url"] == "https://huggingface.co/PLM-Team/PLM-tiny"
    missing = run_cli("convert", "PLM-Team/not-cached", cwd=tmp_path, env=env)
    assert missing.code != 0 and "HF_HUB_OFFLINE" in missing.stderr and "Traceback" not in missing.stderr


def test_the_fast_array_packing_writes_what_gguf_py_writes(tmp_path):
    from plm_gguf.convert.writer import _GGUFWriter

    tokens = [f"tok{i}" for i in range(300)] + ["é", "日本", ""] * 100
    kv = {"tokens": tokens, "types": [1, 2, 3] * 200, "scores": [0.5, -1.25] * 200, "short": ["a", "b"]}
    files = []
    for cls in (gguf.GGUFWriter, _GGUFWriter):
        path = tmp_path / f"{cls.__name__}.gguf"
        w = cls(path, "plm")
        for key, value in kv.items():
            w.add_array(f"test.{key}", value)
        w.add_tensor_info("t", (4, 8), np.dtype(np.float32), 128)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        files.append(path.read_bytes())
    assert files[0] == files[1] and len(files[0]) > 4000
