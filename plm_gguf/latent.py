"""The latent ("absorbed MLA") GGUF layout's format: how kv_b is stored split, and its keys.

A latent-layout PLM GGUF stores `blk.N.attn_kv_b.weight` as two tensors, as llama.cpp's
convert_hf_to_gguf.py does for DeepseekV2:

  attn_k_b  per head k_nope rows, transposed: torch [n_head, kv_lora_rank, qk_nope]
  attn_v_b  per head v rows:                  torch [n_head, v_head, kv_lora_rank]

and describes attention as MQA over the latent (`mla_metadata`). The core needs this to read
latent files back (plm_gguf.reference); writing and rewriting files is the convert stage's
(plm_gguf.convert.mla, which imports these). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARCH = "plm"

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
