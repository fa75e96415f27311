"""Importance matrices from calibration text, computed with the torch reference.

For every matrix, the mean square of each input column's activation over the calibration
tokens (what llama.cpp's imatrix tool collects and its quantizer weights errors by), saved as
an .npz keyed by GGUF tensor name. The tied output (token_embd.weight) gets the final norm's
output, which is what multiplies it when it produces the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from plm_gguf.reference import Linear, PLMForCausalLM
from plm_gguf.schema import tensor_table


def compute_imatrix(model: PLMForCausalLM, tokens: list[int], out: Path, *, n_ctx: int = 512) -> dict[str, int]:
    """Run the calibration tokens through `model` and write the .npz; returns tokens seen per tensor."""
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
    try:
        for start in range(0, len(tokens) - 1, n_ctx):
            chunk = tokens[start : start + n_ctx]
            if len(chunk) > 1:
                model(torch.tensor(chunk))
    finally:
        for handle in handles:
            handle.remove()
    np.savez(out, **{name: (sums[name] / counts[name]).float().numpy() for name in sums})
    return counts
