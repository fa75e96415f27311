"""Importance matrices from calibration text, computed with the torch reference.

For every matrix, the mean square of each input column's activation over the calibration
tokens (what llama.cpp's imatrix tool collects and its quantizer weights errors by), saved as
an .npz keyed by GGUF tensor name. The tied output (token_embd.weight) gets the final norm's
output, which is what multiplies it when it produces the logits.

A latent-layout file (absorbed MLA) stores kv_b as per-head 3D tensors, for which llama.cpp
wants one slice of ne0 values per head: attn_v_b multiplies the normed latent (kv_b's input, the
same for every head), attn_k_b multiplies each head's q_nope (the query before RoPE).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from plm_gguf.reference import Linear, PLMForCausalLM, WeightSource
from plm_gguf.schema import tensor_table


def compute_imatrix(weights: PLMForCausalLM | WeightSource, tokens: list[int], out: Path, *, n_ctx: int = 512,
                    latent: bool = False) -> dict[str, int]:
    """Run the calibration tokens through the model and write the .npz; returns tokens seen per
    tensor. `weights` is a WeightSource (the pass runs layer by layer, one layer's weights
    resident: what plm-gguf does) or a model already in memory (the same sums, chunk by chunk).
    latent: also the entries of the latent layout's attn_k_b / attn_v_b."""
    if isinstance(weights, PLMForCausalLM):
        model = weights

        def run(chunks: list[torch.Tensor]) -> None:
            for chunk in chunks:
                model(chunk)
    else:
        model = PLMForCausalLM.skeleton(weights.config)

        def run(chunks: list[torch.Tensor]) -> None:
            model.stream(weights, chunks, logits=False)  # the hooks are all it needs
    gguf_names = {spec.hf_name.removesuffix(".weight"): spec.gguf_name for spec in tensor_table(model.config)}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(name: str):
        def hook(_module, inputs, output=None):
            x = (inputs[0] if output is None else output).detach().double()
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, Linear):
            handles.append(module.register_forward_pre_hook(collect(gguf_names[module_name])))
    handles.append(model.model.norm.register_forward_hook(collect("token_embd.weight")))
    c = model.config
    if latent:  # q_nope per head: [..., T, h*(nope+rope)] -> [N, h, nope], one sum per head and dim
        def collect_q_nope(name: str):
            def hook(_module, _inputs, output):
                q = output.detach().double().reshape(-1, c.n_head, c.qk_nope_head_dim + c.qk_rope_head_dim)
                sums[name] = sums.get(name, 0) + q[..., : c.qk_nope_head_dim].square().sum(0).reshape(-1)
                counts[name] = counts.get(name, 0) + q.shape[0]
            return hook

        for i, layer in enumerate(model.model.layers):
            handles.append(layer.self_attn.q_proj.register_forward_hook(collect_q_nope(f"blk.{i}.attn_k_b.weight")))
    chunks = [torch.tensor(tokens[start : start + n_ctx]) for start in range(0, len(tokens) - 1, n_ctx)]
    try:
        run([chunk for chunk in chunks if len(chunk) > 1])
    finally:
        for handle in handles:
            handle.remove()
    means = {name: (sums[name] / counts[name]).float().numpy() for name in sums}
    if latent:  # attn_v_b's input is attn_kv_b's (the normed latent), once per head
        for i in range(c.num_hidden_layers):
            kv_b = f"blk.{i}.attn_kv_b.weight"
            means[f"blk.{i}.attn_v_b.weight"] = np.tile(means.pop(kv_b), c.n_head)
            counts[f"blk.{i}.attn_v_b.weight"] = counts.pop(kv_b)
    np.savez(out, **means)
    return counts
