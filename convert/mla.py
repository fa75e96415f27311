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
from pathlib import Path

import gguf
import numpy as np

from plm_gguf.latent import ARCH, K_B, KV_B, V_B, MlaSizes, merge_kv_b, mla_metadata, split_kv_b  # noqa: F401
from plm_gguf.memory import KVLayout, layout_of
from plm_gguf.schema import config_from_gguf

# What llama.cpp (unpatched) prints when it is given a latent-layout file.
STOCK_REFUSAL = "tensor 'blk.0.attn_q.weight' has wrong shape"

def latent_tensors(name: str, data: np.ndarray, sizes: MlaSizes) -> list[tuple[str, np.ndarray]]:
    """The GGUF tensors to write for one stock GGUF tensor: attn_kv_b becomes attn_k_b and
    attn_v_b (in that order, as convert_hf_to_gguf.py writes them); anything else passes."""
    if name.endswith(".attn_kv_b.weight"):
        prefix = name[: -len("attn_kv_b.weight")]
        k_b, v_b = split_kv_b(data, sizes)
        return [(prefix + "attn_k_b.weight", k_b), (prefix + "attn_v_b.weight", v_b)]
    return [(name, data)]


def is_latent(path: str | os.PathLike[str]) -> bool:
    """Whether a PLM GGUF is in the latent layout (plm_gguf.memory.layout_of); any other file is a
    UsageError naming it."""
    return layout_of(path) is KVLayout.LATENT


def _element_view(t) -> np.ndarray:
    """A reader tensor's elements in GGUF's reversed-ne numpy shape, as a plain dtype that
    keeps the bits (F32 as float32, F16/BF16 as uint16)."""
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
    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    if arch != ARCH:
        raise ValueError(f"{src} is a {arch!r} GGUF, not {ARCH!r}")
    if is_latent(src):
        raise ValueError("the GGUF is already in the latent (absorbed MLA) layout")
    sizes = MlaSizes.from_config(config_from_gguf(src))  # the one GGUF -> sizes reading, every key checked
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
