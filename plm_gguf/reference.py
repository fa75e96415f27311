"""A readable torch reference of PLM's forward pass (PLM_FACTS section 2), independent of
llama.cpp. Submodule names equal checkpoint keys, so `load_state_dict` checks every name and
shape; weights stay in their storage dtype and are upcast per matmul.

Two ways to run it: the whole model in memory (`from_checkpoint`, `from_gguf`: about the
checkpoint's size, for tests and training), or layer by layer (`stream` over a WeightSource:
`CheckpointWeights` or `GgufWeights`, memory-mapped), where only one layer's weights are resident
at a time, the activations of every sequence are kept between layers, and the tied output runs
over blocks of the embedding's rows: what verify and the importance matrix use, so a 1.8B model
is checked in well under 2 GB.

    h = embed(tokens)
    for each layer:
        h = h + o_proj(MLA(input_layernorm(h)))
        h = h + down(relu(up(post_attention_layernorm(h)))^2)
    logits = norm(h) @ embed^T
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from torch import nn

from plm_gguf.checkpoint import Checkpoint, check_finite, row_blocks
from plm_gguf.errors import CheckpointError
from plm_gguf.ggufinfo import read_gguf_info
from plm_gguf.latent import merge_kv_b
from plm_gguf.schema import PLMConfig, tensor_table

EMBED = "model.embed_tokens.weight"
# Rows of the tied output upcast at a time (PLM-1.8B: 151,936 x 2,048 would be 1.2 GB in f32).
OUTPUT_BLOCK_BYTES = 64 * 2**20


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
    def skeleton(cls, config: PLMConfig, compute_dtype: torch.dtype = torch.float32) -> "PLMForCausalLM":
        """The module tree with no weights (on the meta device), for `stream`."""
        with torch.device("meta"):
            model = cls(config, compute_dtype)
        return model.eval()

    @torch.inference_mode()
    def stream(self, source: "WeightSource", sequences: list[torch.Tensor],
               variants: tuple[torch.dtype | None, ...] = (None,),
               logits: bool = True) -> dict[torch.dtype | None, list[torch.Tensor]]:
        """Logits of each sequence, computed one layer at a time from `source`: a layer's weights
        are loaded into this (skeleton) model, every sequence goes through it, and they are
        dropped. `variants` are matmul input dtypes (set_matmul_input_dtype) computed in the same
        pass, each with its own activations. The same operations on the same shapes as `forward`,
        one sequence at a time, except the tied output, taken over blocks of vocabulary rows.
        Forward hooks on this model's modules see what they would see in `forward`. logits=False
        stops after the final norm (for hooks only: an importance matrix needs no logits, which for
        a few 512-token windows of a 152k vocabulary are gigabytes) and returns nothing."""
        try:
            embedded = [source.embedding_rows(s).to(self.compute_dtype) for s in sequences]
            acts = {v: list(embedded) for v in variants}
            del embedded
            for i, layer in enumerate(self.model.layers):
                prefix = f"model.layers.{i}."
                _load(layer, {n.removeprefix(prefix): source.tensor(n) for n in source.names() if n.startswith(prefix)})
                for v in variants:
                    self.set_matmul_input_dtype(v)
                    acts[v] = [layer(x, torch.arange(x.shape[-2])) for x in acts[v]]
                layer.to("meta")  # this layer's weights go
            _load(self.model.norm, {"weight": source.tensor("model.norm.weight")})
            for v in variants:
                self.set_matmul_input_dtype(v)
                acts[v] = [round_to(self.model.norm(x), v) for x in acts[v]]
            self.model.norm.to("meta")
        finally:
            self.set_matmul_input_dtype(None)
        if not logits:
            return {}
        vocab = self.config.vocab_size
        out = {v: [torch.empty(*x.shape[:-1], vocab) for x in acts[v]] for v in variants}  # filled in place
        done = 0
        for block in source.embedding_blocks(OUTPUT_BLOCK_BYTES):
            w = block.to(self.compute_dtype)
            for v in variants:
                for k, x in enumerate(acts[v]):
                    out[v][k][..., done : done + w.shape[0]] = F.linear(x, w)
            done += w.shape[0]
        if done != vocab:  # a bug in the source, not a user error
            raise AssertionError(f"the embedding gave {done} rows, expected {vocab}")
        return out

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


def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # names or shapes disagree with the module tree
        raise CheckpointError(f"reference model cannot load the weights: {exc}".splitlines()[0],
                              "the checkpoint does not follow PLM's layout") from exc


class WeightSource:
    """Where `PLMForCausalLM.stream` reads weights from, by checkpoint (HF) name, in their storage
    dtype (bf16/f16 stay 16-bit; other GGUF types are dequantized to f32), one tensor at a time."""

    config: PLMConfig

    def names(self) -> list[str]:
        return [spec.hf_name for spec in tensor_table(self.config)]

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def embedding_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding rows of `tokens` ([..., T] -> [..., T, d]), nothing else read."""
        raise NotImplementedError

    def embedding_blocks(self, max_bytes: int):
        """The embedding as consecutive blocks of whole rows (for the tied output)."""
        raise NotImplementedError


def _torch_from(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values (bf16 as uint16 bits) as a torch tensor of their own dtype; a copy."""
    values = torch.from_numpy(np.array(raw))
    return values.view(torch.bfloat16) if dtype == "BF16" else values


class CheckpointWeights(WeightSource):
    """A checkpoint's tensors, read from its memory-mapped files and released after each copy."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.config = ckpt, ckpt.config

    def tensor(self, name: str) -> torch.Tensor:
        ref = self.ckpt.refs[name]
        values = _torch_from(ref.raw(), ref.dtype)
        ref.release()
        check_finite(name, values)
        return values

    def embedding_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        ref = self.ckpt.refs[EMBED]
        rows = _torch_from(ref.raw()[tokens.numpy()], ref.dtype)
        check_finite(EMBED, rows)
        return rows

    def embedding_blocks(self, max_bytes: int):
        ref, done = self.ckpt.refs[EMBED], 0
        for block in row_blocks(ref.raw(), max_bytes):
            values = _torch_from(block, ref.dtype)
            check_finite(EMBED, values)
            yield values
            done += block.nbytes
            ref.release(done)
        ref.release()


class GgufWeights(WeightSource):
    """A GGUF file's tensors by checkpoint name (the latent layout's attn_k_b/attn_v_b merged back
    into kv_b), memory-mapped; 16-bit types stay 16-bit, anything else is dequantized to f32."""

    def __init__(self, path, config: PLMConfig) -> None:
        self.info, self.config = read_gguf_info(path), config
        self.gguf_names = {spec.hf_name: spec.gguf_name for spec in tensor_table(config)}
        self.shapes = {spec.hf_name: spec.shape for spec in tensor_table(config)}

    def _decode(self, gguf_name: str, rows=None) -> torch.Tensor:
        t = self.info.tensors[gguf_name]
        raw = self.info.data(gguf_name)  # [rows, bytes per row], mapped
        if rows is not None:
            raw = raw[rows]
        if t.qtype == QT.BF16:
            return _torch_from(raw.view(np.uint16), "BF16")
        if t.qtype == QT.F16:
            return _torch_from(raw.view(np.float16), "F16")
        if t.qtype == QT.F32:
            return _torch_from(raw.view(np.float32), "F32")
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(np.asarray(raw), t.qtype), np.float32))

    def tensor(self, name: str) -> torch.Tensor:
        gguf_name = self.gguf_names[name]
        if gguf_name not in self.info.tensors and gguf_name.endswith("attn_kv_b.weight"):
            prefix = gguf_name.removesuffix("attn_kv_b.weight")
            k_b, v_b = (self.info.values(prefix + part) for part in ("attn_k_b.weight", "attn_v_b.weight"))
            return torch.from_numpy(merge_kv_b(k_b, v_b).astype(np.float32))
        return self._decode(gguf_name).reshape(self.shapes[name])

    def embedding_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = self._decode(self.gguf_names[EMBED], tokens.reshape(-1).numpy())
        return flat.reshape(*tokens.shape, self.config.hidden_size)

    def embedding_blocks(self, max_bytes: int):
        n_rows = self.config.vocab_size
        step = max(1, max_bytes // max(1, self.info.tensors[self.gguf_names[EMBED]].n_bytes // n_rows))
        for start in range(0, n_rows, step):
            yield self._decode(self.gguf_names[EMBED], slice(start, start + step))
