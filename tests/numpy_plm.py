"""A second, independent PLM forward pass for the tests: numpy, float64, reading only the GGUF
file (its metadata and dequantized tensors through gguf-py). It shares no code with
plm_gguf.reference, so agreement between the two checks the file, not one implementation."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


class GgufPLM:
    def __init__(self, path: Path) -> None:
        reader = gguf.GGUFReader(path)
        meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.")}
        self.n_layer = meta["plm.block_count"]
        self.n_head = meta["plm.attention.head_count"]
        self.d_k = meta["plm.attention.key_length"]
        self.d_v = meta["plm.attention.value_length"]
        self.d_rope = meta["plm.rope.dimension_count"]
        self.lora = meta["plm.attention.kv_lora_rank"]
        self.eps = meta["plm.attention.layer_norm_rms_epsilon"]
        self.theta = meta["plm.rope.freq_base"]
        self.w = {}
        for t in reader.tensors:
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            self.w[t.name] = values.reshape([int(n) for n in reversed(t.shape.tolist())])

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return self.w[name] * x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps)

    def _rope(self, x: np.ndarray) -> np.ndarray:  # x [..., T, d_rope], pairs (0,1), (2,3), ...
        T, d = x.shape[-2], x.shape[-1]
        freq = self.theta ** (-np.arange(0, d, 2) / d)
        ang = np.arange(T)[:, None] * freq[None, :]
        c, s = np.cos(ang), np.sin(ang)
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    def logits(self, tokens: list[int]) -> np.ndarray:
        w, H, T = self.w, self.n_head, len(tokens)
        nope = self.d_k - self.d_rope
        x = w["token_embd.weight"][tokens]
        mask = np.triu(np.full((T, T), -np.inf), 1)
        for i in range(self.n_layer):
            b = f"blk.{i}."
            h = self._norm(x, b + "attn_norm.weight")
            q = (h @ w[b + "attn_q.weight"].T).reshape(T, H, self.d_k).transpose(1, 0, 2)
            ckv = h @ w[b + "attn_kv_a_mqa.weight"].T
            c = self._norm(ckv[:, : self.lora], b + "attn_kv_a_norm.weight")
            k_pe = self._rope(ckv[:, self.lora :])
            kv = (c @ w[b + "attn_kv_b.weight"].T).reshape(T, H, nope + self.d_v).transpose(1, 0, 2)
            k = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe, (H, T, self.d_rope))], -1)
            q = np.concatenate([q[..., :nope], self._rope(q[..., nope:])], -1)
            att = q @ k.transpose(0, 2, 1) / np.sqrt(self.d_k) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = (att @ kv[..., nope:]).transpose(1, 0, 2).reshape(T, H * self.d_v)
            x = x + o @ w[b + "attn_output.weight"].T
            h = self._norm(x, b + "ffn_norm.weight")
            x = x + np.maximum(h @ w[b + "ffn_up.weight"].T, 0) ** 2 @ w[b + "ffn_down.weight"].T
        return self._norm(x, "output_norm.weight") @ w["token_embd.weight"].T
