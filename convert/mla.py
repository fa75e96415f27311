"""The latent ("absorbed MLA") GGUF layout for PLM: what llama.cpp's deepseek2 does, for `plm`.

Stock PLM GGUFs store `blk.N.attn_kv_b.weight` and llama.cpp expands the MLA latent to full
per-head K (n_head x 192) and V (n_head x 128) in its KV cache. The latent layout stores kv_b
split in two, exactly as llama.cpp's convert_hf_to_gguf.py does for DeepseekV2
(conversion/deepseek.py, `modify_tensors`):

  attn_k_b  per head k_nope rows, transposed: torch [n_head, kv_lora_rank, qk_nope]
            (GGUF ne {qk_nope, kv_lora_rank, n_head})
  attn_v_b  per head v rows:                  torch [n_head, v_head, kv_lora_rank]
            (GGUF ne {kv_lora_rank, v_head, n_head})

and describes attention as MQA over the latent (again as deepseek2 does): head_count_kv 1,
key_length = kv_lora_rank + qk_rope, value_length = kv_lora_rank, plus key_length_mla =
qk_nope + qk_rope and value_length_mla = v_head (the per-head sizes after decompression).
llama.cpp patched with patches/llama.cpp/ then caches latent + rope key only (576 values per
token per layer for PLM-1.8B instead of 16*192 + 16*128).

Refusal by a stock llama.cpp (the marker): the layout itself is the marker. The stock `plm`
loader reads key_length (now kv_lora_rank + rope) as the per-head Q/K size, so the first
tensor it checks, blk.0.attn_q.weight, has the wrong shape and loading stops with
`check_tensor_dims: tensor 'blk.0.attn_q.weight' has wrong shape; expected ..., got ...`;
and even with the metadata ignored, the stock loader requires blk.N.attn_kv_b.weight, which a
latent file does not carry (`missing tensor 'blk.0.attn_kv_b.weight'`). Either way a stock
llama.cpp cannot load the file, so it cannot run it wrongly. `STOCK_REFUSAL` is the text it
prints (see tests/test_mla.py, which checks it on the installed llama-cpp-python).

Everything here is numpy only; `rewrite_to_latent` turns a stock-layout GGUF (F32/F16/BF16
tensors for attn_kv_b) into the latent layout without the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCH = "plm"

# What llama.cpp (unpatched) prints when it is given a latent-layout file.
STOCK_REFUSAL = "tensor 'blk.0.attn_q.weight' has wrong shape"

KV_B = "blk.{bid}.attn_kv_b.weight"
K_B = "blk.{bid}.attn_k_b.weight"
V_B = "blk.{bid}.attn_v_b.weight"


@dataclass(frozen=True)
class MlaSizes:
    """The sizes the split needs (from a PLMConfig or from a GGUF's plm.* keys)."""

    n_head: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @classmethod
    def from_config(cls, config) -> "MlaSizes":
        return cls(config.num_attention_heads, config.kv_lora_rank, config.qk_nope_head_dim,
                   config.qk_rope_head_dim, config.v_head_dim)

    @property
    def cache_values_per_token_layer(self) -> int:
        """K cache width of the latent layout (there is no V cache)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def stock_values_per_token_layer(self) -> int:
        return self.n_head * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


def split_kv_b(kv_b: np.ndarray, sizes: MlaSizes) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [n_head*(nope+v), lora] (PyTorch [out, in]; each head [k_nope | v]) ->
    (attn_k_b [n_head, lora, nope], attn_v_b [n_head, v, lora]), both C-contiguous.

    The numpy shapes are GGUF's ne reversed, as GGUFWriter.add_tensor expects. Only a
    re-layout: any element type (including raw uint16 views of f16/bf16) splits exactly.
    """
    s = sizes
    per_head = s.qk_nope_head_dim + s.v_head_dim
    if kv_b.ndim != 2 or kv_b.shape != (s.n_head * per_head, s.kv_lora_rank):
        raise ValueError(f"kv_b has shape {tuple(kv_b.shape)}, expected "
                         f"({s.n_head * per_head}, {s.kv_lora_rank}) = (n_head*(qk_nope+v), kv_lora_rank)")
    kv = kv_b.reshape(s.n_head, per_head, s.kv_lora_rank)
    k_b = np.ascontiguousarray(kv[:, : s.qk_nope_head_dim, :].transpose(0, 2, 1))
    v_b = np.ascontiguousarray(kv[:, s.qk_nope_head_dim:, :])
    return k_b, v_b


def merge_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """The inverse of split_kv_b (for tests and for reading latent files back)."""
    n_head, lora, _ = k_b.shape
    kv = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
    return np.ascontiguousarray(kv.reshape(n_head * kv.shape[1], lora))


def latent_tensors(name: str, data: np.ndarray, sizes: MlaSizes) -> list[tuple[str, np.ndarray]]:
    """The GGUF tensors to write for one stock GGUF tensor: attn_kv_b becomes attn_k_b and
    attn_v_b (in that order, as convert_hf_to_gguf.py writes them); anything else passes."""
    if name.endswith(".attn_kv_b.weight"):
        prefix = name[: -len("attn_kv_b.weight")]
        k_b, v_b = split_kv_b(data, sizes)
        return [(prefix + "attn_k_b.weight", k_b), (prefix + "attn_v_b.weight", v_b)]
    return [(name, data)]


def mla_metadata(sizes: MlaSizes, arch: str = ARCH) -> dict[str, int]:
    """The plm.* keys of the latent layout (uint32 each). head_count_kv, key_length and
    value_length REPLACE the stock values; key_length_mla and value_length_mla are new."""
    s = sizes
    return {
        f"{arch}.attention.head_count_kv": 1,
        f"{arch}.attention.key_length": s.kv_lora_rank + s.qk_rope_head_dim,
        f"{arch}.attention.value_length": s.kv_lora_rank,
        f"{arch}.attention.key_length_mla": s.qk_nope_head_dim + s.qk_rope_head_dim,
        f"{arch}.attention.value_length_mla": s.v_head_dim,
    }


def is_latent(path: str | os.PathLike[str]) -> bool:
    """Whether a PLM GGUF is in the latent layout (carries key_length_mla); any other file is a
    UsageError naming it."""
    from plm_gguf.ggufinfo import read_plm_gguf

    return "plm.attention.key_length_mla" in read_plm_gguf(path).fields


def sizes_from_gguf(reader) -> MlaSizes:
    """MlaSizes from a stock-layout PLM GGUF's keys."""
    f = reader.fields

    def get(key: str) -> int:
        if f"{ARCH}.{key}" not in f:
            raise ValueError(f"the GGUF lacks {ARCH}.{key}")
        return int(f[f"{ARCH}.{key}"].contents())

    if f"{ARCH}.attention.key_length_mla" in f:
        raise ValueError("the GGUF is already in the latent (absorbed MLA) layout")
    rope = get("rope.dimension_count")
    return MlaSizes(n_head=get("attention.head_count"), kv_lora_rank=get("attention.kv_lora_rank"),
                    qk_nope_head_dim=get("attention.key_length") - rope, qk_rope_head_dim=rope,
                    v_head_dim=get("attention.value_length"))


def _element_view(t) -> np.ndarray:
    """A reader tensor's elements in GGUF's reversed-ne numpy shape, as a plain dtype that
    keeps the bits (F32 as float32, F16/BF16 as uint16)."""
    import gguf

    T = gguf.GGMLQuantizationType
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == T.F32:
        return np.asarray(t.data).view(np.float32).reshape(shape)
    if t.tensor_type in (T.F16, T.BF16):
        return np.asarray(t.data).view(np.uint16).reshape(shape)
    raise ValueError(f"{t.name} is {t.tensor_type.name}; the latent layout is rewritten from an "
                     "F32, F16 or BF16 file (quantize the latent file afterwards)")


def rewrite_to_latent(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Rewrite a stock-layout PLM GGUF into the latent layout (tensor data is re-laid out
    exactly, never recomputed); written to dst.partial and renamed, so dst is whole or absent."""
    import gguf

    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    if arch != ARCH:
        raise ValueError(f"{src} is a {arch!r} GGUF, not {ARCH!r}")
    sizes = sizes_from_gguf(reader)
    overrides = mla_metadata(sizes)

    partial = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture" or name in overrides:
                continue
            if name == "general.alignment":
                writer.data_alignment = int(field.contents())
            vtype = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        for name, value in overrides.items():
            writer.add_uint32(name, value)

        T = gguf.GGMLQuantizationType
        for t in reader.tensors:
            if t.name.endswith(".attn_kv_b.weight"):
                for new_name, data in latent_tensors(t.name, _element_view(t), sizes):
                    raw = np.ascontiguousarray(data).view(np.uint8)
                    writer.add_tensor(new_name, raw, raw_shape=raw.shape, raw_dtype=T(t.tensor_type))
            else:
                raw = np.asarray(t.data).view(np.uint8)
                byte_shape = gguf.quant_shape_to_byte_shape(tuple(int(d) for d in reversed(t.shape)), T(t.tensor_type))
                writer.add_tensor(t.name, raw.reshape(byte_shape), raw_shape=byte_shape, raw_dtype=T(t.tensor_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, dst)
    return dst
