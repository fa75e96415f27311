"""A readable torch reference of PLM's forward pass (PLM_FACTS section 2), independent of
llama.cpp. Submodule names equal checkpoint keys, so `load_state_dict` checks every name and
shape; weights stay in their storage dtype and are upcast per matmul, so a full-size model
needs about its checkpoint's size in memory.

    h = embed(tokens)
    for each layer:
        h = h + o_proj(MLA(input_layernorm(h)))
        h = h + down(relu(up(post_attention_layernorm(h)))^2)
    logits = norm(h) @ embed^T
"""

from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from torch import nn

from plm_gguf.checkpoint import Checkpoint, check_finite
from plm_gguf.errors import CheckpointError
from plm_gguf.ggufinfo import read_gguf_info
from plm_gguf.latent import merge_kv_b
from plm_gguf.schema import PLMConfig, tensor_table


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype != torch.float64 else x
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(normed.dtype) * normed).to(x.dtype)  # weight * x/rms, not (1 + weight)


def round_to(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """x rounded to `dtype` and back: a matmul input held at a lower precision."""
    return x if dtype is None else x.to(dtype).to(x.dtype)


class Linear(nn.Module):
    """y = x W^T with W kept in its storage dtype and upcast to x's dtype per call.

    `input_dtype` rounds x first, as bf16/f16 inference does: llama.cpp's CPU backend converts a
    matmul's activations to the weight type (ggml's vec_dot_type) and accumulates in f32."""

    input_dtype: torch.dtype | None = None

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(round_to(x, self.input_dtype), self.weight.to(x.dtype))


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on interleaved pairs (dims 0,1 / 2,3 / ...): llama.cpp's NORM rope type.
    x: [..., T, d_rope], positions: [T]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # [d/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]  # [..., T, d/2] each
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [..., T, d/2, 2]
    return out.flatten(-2)


class MLAttention(nn.Module):
    """Multi-head Latent Attention as PLM computes it (no query compression)."""

    def __init__(self, c: PLMConfig) -> None:
        super().__init__()
        self.c = c
        h = c.n_head
        self.q_proj = Linear(c.hidden_size, h * c.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        # transformers' PLM uses a fixed 1e-6 here; llama.cpp uses rms_norm_eps (equal for PLM-1.8B)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = Linear(h * c.v_head_dim, c.hidden_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [..., T, d] -> [..., T, d]; any leading batch dims."""
        c, batch, T = self.c, x.shape[:-2], x.shape[-2]
        h, nope, rope, dv = c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim

        q = self.q_proj(x).view(*batch, T, h, nope + rope).transpose(-3, -2)  # [..., h, T, nope+rope]
        q_nope, q_pe = q.split([nope, rope], dim=-1)

        kv_a = self.kv_a_proj_with_mqa(x)  # [..., T, lora + rope]
        latent, k_pe = kv_a.split([c.kv_lora_rank, rope], dim=-1)  # [..., T, lora], [..., T, rope]
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # [..., T, h*(nope+dv)]
        kv = kv.view(*batch, T, h, nope + dv).transpose(-3, -2)  # [..., h, T, nope+dv]
        k_nope, v = kv.split([nope, dv], dim=-1)  # [..., h, T, nope], [..., h, T, dv]

        q_pe = rope_interleaved(q_pe, positions, c.rope_theta)
        k_pe = rope_interleaved(k_pe, positions, c.rope_theta).unsqueeze(-3)  # [..., 1, T, rope]: shared
        k_pe = k_pe.expand(*batch, h, T, rope)

        query = torch.cat([q_nope, q_pe], dim=-1)  # [..., h, T, nope+rope]
        key = torch.cat([k_nope, k_pe], dim=-1)  # [..., h, T, nope+rope]
        scores = query @ key.transpose(-1, -2) / math.sqrt(nope + rope)  # [..., h, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = scores.softmax(dim=-1) @ v  # [..., h, T, dv]
        return self.o_proj(out.transpose(-3, -2).reshape(*batch, T, h * dv))


class MLP(nn.Module):
    def __init__(self, c: PLMConfig) -> None:
        super().__init__()
        self.up_proj = Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())  # squared ReLU, no gate


class DecoderLayer(nn.Module):
    def __init__(self, c: PLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MLAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class PLMModel(nn.Module):
    def __init__(self, c: PLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class PLMForCausalLM(nn.Module):
    """Logits for a sequence of token ids. No lm_head: the output reuses embed_tokens."""

    def __init__(self, config: PLMConfig, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.matmul_input_dtype: torch.dtype | None = None
        self.model = PLMModel(config)

    def set_matmul_input_dtype(self, dtype: torch.dtype | None) -> None:
        """Hold every matmul's activations at `dtype` (None: full compute precision)."""
        self.matmul_input_dtype = dtype
        for module in self.modules():
            if isinstance(module, Linear):
                module.input_dtype = dtype

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [..., T] int64 -> logits [..., T, vocab] in float32."""
        return self.logits(tokens)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The forward pass without inference mode, for training (tokens [..., T])."""
        embed = self.model.embed_tokens.weight
        x = embed[tokens].to(self.compute_dtype)  # [..., T, d]
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        for layer in self.model.layers:
            x = layer(x, positions)
        x = self.model.norm(x)
        x = round_to(x, self.matmul_input_dtype)
        return F.linear(x, embed.to(self.compute_dtype)).float()  # [T, vocab], tied

    @classmethod
    def from_gguf(cls, path, config: PLMConfig, compute_dtype: torch.dtype = torch.float32) -> "PLMForCausalLM":
        """The same model with the weights a GGUF file holds (decoded by gguf-py), so the file's
        content can be compared with its checkpoint in exact arithmetic, apart from any runtime."""
        info = read_gguf_info(path)
        state = {}
        for spec in tensor_table(config):
            if spec.gguf_name not in info.tensors and spec.gguf_name.endswith("attn_kv_b.weight"):
                # the latent layout stores kv_b split in two
                prefix = spec.gguf_name.removesuffix("attn_kv_b.weight")
                k_b, v_b = (info.values(prefix + part) for part in ("attn_k_b.weight", "attn_v_b.weight"))
                state[spec.hf_name] = torch.from_numpy(merge_kv_b(k_b, v_b).astype(np.float32))
                continue
            t = info.tensors[spec.gguf_name]
            if t.qtype == QT.BF16:  # keep 16-bit weights 16-bit: a full-size model stays ~3.6 GB
                values = torch.from_numpy(np.array(info.data(spec.gguf_name)).view(np.uint16)).view(torch.bfloat16)
            elif t.qtype == QT.F16:
                values = torch.from_numpy(np.array(info.data(spec.gguf_name)).view(np.float16))
            else:
                values = torch.from_numpy(np.array(info.values(spec.gguf_name), dtype=np.float32))
            state[spec.hf_name] = values.reshape(spec.shape)
        with torch.device("meta"):
            model = cls(config, compute_dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, compute_dtype: torch.dtype = torch.float32) -> "PLMForCausalLM":
        """Build the model and load every tensor, one at a time, in its storage dtype."""
        with torch.device("meta"):
            model = cls(ckpt.config, compute_dtype)
        state = {}
        for spec in ckpt.specs:
            ref = ckpt.tensor(spec)
            values = torch.from_numpy(ref.raw().copy())
            ref.release()  # the copy is ours; drop the mapped pages
            if ref.dtype == "BF16":
                values = values.view(torch.bfloat16)
            check_finite(spec.hf_name, values)
            state[spec.hf_name] = values
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # names or shapes disagree with the module tree
            raise CheckpointError(f"reference model cannot load the checkpoint: {exc}".splitlines()[0],
                                  "the checkpoint does not follow PLM's layout") from exc
        return model.eval()
