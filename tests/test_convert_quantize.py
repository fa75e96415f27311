"""convert's one-pass quantization (ggml_quantize_chunk on streamed rows, types from llama.cpp's
dry run) against llama.cpp's own two-step path: the lossless file quantized by
llama_model_quantize. Same checkpoint, same tensor types, same bytes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from plm_gguf.convert import ggmlq
from plm_gguf.convert.quantize import quantize_file
from plm_gguf.convert.writer import convert
from plm_gguf.errors import CheckpointError, UsageError
from plm_gguf.fixtures.checkpoint import tiny_config, write_tiny_checkpoint

from .conftest import run_cli

# Rows that fit 256-blocks (hidden, intermediate, kv_lora_rank), with 64-wide heads that do not,
# so llama.cpp's k-quant rules and its fallbacks both apply; PLM's head-dims ratios.
K_CONFIG = tiny_config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                       kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=1024)
LOSSLESS = {"bf16": "bf16", "f16": "f16", "f32": "f32"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    return {dtype: write_tiny_checkpoint(root / f"PLM-k-{dtype}", K_CONFIG, seed=3, dtype=dtype)
            for dtype in ("bf16", "f32")}


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.array(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def _imatrix(path, seed: int = 0) -> dict[str, np.ndarray]:
    """Importances for every matrix of a file, one per column (per column and head for 3-D tensors)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        dims = [int(d) for d in t.shape]  # ggml order: row length first
        if len(dims) > 1 and dims[1] > 1:
            out[t.name] = (rng.random(dims[0] * (dims[2] if len(dims) > 2 else 1)) + 0.1).astype(np.float32)
    return out


@pytest.mark.parametrize("dtype,layout,outtype,with_imatrix", [
    ("bf16", "full", "q4_k_m", False), ("bf16", "full", "q5_k_m", False), ("bf16", "full", "q6_k", False),
    ("bf16", "full", "q4_0", False), ("bf16", "full", "iq4_nl", False), ("bf16", "full", "q3_k_m", True),
    ("bf16", "latent", "q4_k_m", False), ("bf16", "latent", "iq2_xxs", True), ("f32", "full", "q5_k_m", False),
    ("f32", "latent", "q3_k_m", True),
])
def test_one_pass_equals_llama_model_quantize(tmp_path, checkpoints, dtype, layout, outtype, with_imatrix):
    ckpt = checkpoints[dtype]
    lossless = convert(ckpt, tmp_path / "lossless.gguf", LOSSLESS[dtype], kv_cache=layout).outfile
    imatrix = _imatrix(lossless) if with_imatrix else None
    npz = None
    if imatrix:
        npz = tmp_path / "imatrix.npz"
        np.savez(npz, **imatrix)
    ours = convert(ckpt, tmp_path / "ours.gguf", outtype, kv_cache=layout, imatrix=imatrix).outfile
    theirs = tmp_path / "theirs.gguf"
    quantize_file(lossless, theirs, outtype, imatrix=npz)

    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b)  # llama.cpp writes non-layer tensors first; the order is free
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    differ = [n for n in a if a[n][1] != b[n][1]]
    assert not differ, f"{len(differ)} tensors differ from llama_model_quantize's, first {differ[:3]}"
    # the file really is quantized, by more than one type where llama.cpp mixes them
    kinds = {t for t, _ in a.values()}
    assert kinds - {"F32", "F16", "BF16"}, kinds
    fields = {f.name: f.contents() for f in gguf.GGUFReader(ours).fields.values()}
    assert fields["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"])
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION


def test_the_importance_matrix_changes_the_bytes(tmp_path, checkpoints):
    ckpt = checkpoints["bf16"]
    lossless = convert(ckpt, tmp_path / "lossless.gguf", "bf16").outfile
    plain = _tensors(convert(ckpt, tmp_path / "plain.gguf", "q3_k_m").outfile)
    weighted = _tensors(convert(ckpt, tmp_path / "weighted.gguf", "q3_k_m", imatrix=_imatrix(lossless)).outfile)
    assert plain["blk.0.ffn_up.weight"][0] == weighted["blk.0.ffn_up.weight"][0] == "Q3_K"
    assert plain["blk.0.ffn_up.weight"][1] != weighted["blk.0.ffn_up.weight"][1]
    assert plain["blk.0.attn_norm.weight"] == weighted["blk.0.attn_norm.weight"]  # norms are not quantized


def test_nothing_but_the_partial_target_is_written(tmp_path, checkpoints, monkeypatch):
    """While tensors are quantized, the target folder holds only the target's .partial (and the
    empty lock that claims the name), which never grows beyond the final size: no lossless
    temporary beside it."""
    out = tmp_path / "out"
    out.mkdir()
    seen: list[tuple[list[str], int]] = []
    real = ggmlq.quantize_rows

    def watched(values, qtype, imatrix=None):
        files = sorted(out.iterdir())
        seen.append(([p.name for p in files], sum(p.stat().st_size for p in files)))
        return real(values, qtype, imatrix)

    monkeypatch.setattr(ggmlq, "quantize_rows", watched)
    result = convert(checkpoints["bf16"], out / "m.gguf", "q4_k_m")
    data = [[n for n in names if not n.endswith(".lock")] for names, _ in seen]  # the claim, an empty file
    assert seen and all(len(d) == 1 and d[0].startswith(".m.gguf.") and d[0].endswith(".partial") for d in data), seen[:3]
    assert max(size for _, size in seen) <= result.nbytes
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf"]


def test_a_nan_in_a_quantized_tensor_is_refused_and_nothing_is_left(tmp_path):
    state = {}
    ckpt = write_tiny_checkpoint(tmp_path / "ok", K_CONFIG, seed=3)
    from safetensors.torch import load_file

    state = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].clone()
    state[name][3, 7] = torch.nan
    bad = write_tiny_checkpoint(tmp_path / "bad", K_CONFIG, seed=3, state=state)
    with pytest.raises(CheckpointError, match="up_proj.*NaN/Inf"):
        convert(bad, tmp_path / "m.gguf", "q4_k_m")
    assert not any(p.name.startswith("m.gguf") for p in tmp_path.iterdir())
    result = run_cli("convert", str(bad), "--outtype", "q4_k_m", "--outfile", str(tmp_path / "m.gguf"))
    assert result.code != 0 and "Traceback" not in result.stderr and "NaN/Inf" in result.stderr


def test_an_importance_matrix_of_the_wrong_size_is_a_usage_error(tmp_path, checkpoints):
    ckpt = checkpoints["bf16"]
    with pytest.raises(UsageError, match="blk.0.ffn_up.weight"):
        convert(ckpt, tmp_path / "m.gguf", "q3_k_m", imatrix={"blk.0.ffn_up.weight": np.ones(7, np.float32)})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_f16_and_q8_0_are_the_same_through_ggml_and_numpy(tmp_path, checkpoints, monkeypatch, outtype, dtype):
    """With a host build, f16 and q8_0 are encoded by ggml's C functions; without one, by numpy,
    so that these types never wait for a build. Both give the same bytes, and llama.cpp's."""
    ckpt = checkpoints[dtype]
    assert ggmlq.available()
    fast = _tensors(convert(ckpt, tmp_path / "ggml.gguf", outtype).outfile)
    monkeypatch.setattr(ggmlq, "available", lambda: False)
    monkeypatch.setattr(ggmlq, "quantize_rows", None)  # any use of ggml would fail
    plain = _tensors(convert(ckpt, tmp_path / "numpy.gguf", outtype).outfile)
    assert fast == plain
    monkeypatch.undo()
    lossless = convert(ckpt, tmp_path / "lossless.gguf", LOSSLESS[dtype]).outfile
    quantize_file(lossless, tmp_path / "theirs.gguf", outtype)
    assert fast == _tensors(tmp_path / "theirs.gguf")
