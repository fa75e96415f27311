"""What a PLM model needs in memory under llama.cpp, one answer for every command.

- :class:`KVLayout`: the KV-cache layout of a GGUF (stock ``full`` per-head K and V, or the
  absorbed-MLA ``latent`` one), parsed from ``--kv-cache`` by :func:`parse_layout` and read from
  a file by :func:`layout_of` (the only place that looks for ``key_length_mla``).
- :func:`kv_cache_bytes`: llama.cpp's PLM KV cache for a model's shape, layout and n_ctx.
- :func:`compute_bytes`: an estimate of llama.cpp's CPU compute buffer.
- :func:`plan`: weights + KV cache + compute + headroom against the memory available: the
  :class:`MemoryPlan` that deploy checks and that `quantize --device` recommends by
  (:class:`MemoryTarget` holds a device's side of it: memory, headroom, ctx, flash attention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

from plm_gguf.errors import UsageError
from plm_gguf.ggufinfo import read_plm_gguf

MIB = 1024 * 1024
UBATCH = 512  # llama.cpp's default micro-batch: sets the size of the compute buffer
CACHE_BYTES = 2  # f16 K and V, as llama.cpp runs by default
# bytes per cached value of each KV-cache type llama.cpp takes (-ctk/-ctv): blocks of 32 values
CACHE_TYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
               "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
FLOAT_CACHE_TYPES = ("f32", "f16", "bf16")
MLA_KEY = "attention.key_length_mla"  # written only in the latent layout


class KVLayout(str, Enum):
    """The KV-cache layout of a PLM GGUF. A str: ``KVLayout.LATENT == "latent"``."""

    FULL = "full"  # stock llama.cpp: full per-head K (nope + rope) and V
    LATENT = "latent"  # absorbed MLA (patched llama.cpp): a K-only cache of the latent + rope key

    def __str__(self) -> str:
        return self.value


def parse_layout(value: str | KVLayout | None) -> KVLayout | None:
    """A --kv-cache value as a KVLayout (None stays None: the source's own layout)."""
    if value is None or isinstance(value, KVLayout):
        return value
    try:
        return KVLayout(value)
    except ValueError:
        raise UsageError(f"--kv-cache {value!r} is not a layout",
                         "use full (stock llama.cpp) or latent (absorbed MLA)") from None


def layout_of(source: Any) -> KVLayout:
    """The layout of a PLM GGUF: a path (read without its tensors; a file that is not a PLM GGUF
    is a UsageError naming it), or anything already read with a ``fields`` mapping (GGUFInfo,
    gguf.GGUFReader). A latent file carries ``<arch>.attention.key_length_mla``."""
    if isinstance(source, (str, os.PathLike)):
        source = read_plm_gguf(source)
    fields = source.fields
    arch = fields.get("general.architecture")
    arch = arch if isinstance(arch, str) else "plm"  # (a GGUFReader holds a field object there)
    return KVLayout.LATENT if f"{arch}.{MLA_KEY}" in fields or f"plm.{MLA_KEY}" in fields else KVLayout.FULL


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a model's KV cache and compute buffer. key_length / value_length are the
    full per-head sizes (nope + rope, and v) whatever the file's layout."""

    n_layer: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_embd: int = 0
    n_ff: int = 0
    n_vocab: int = 0
    n_ctx_train: int = 0
    kv_lora_rank: int = 0  # MLA's latent width (0: not an MLA model)
    rope_dim: int = 0

    @classmethod
    def of_config(cls, config) -> ModelShape:
        """The shape of a PLMConfig (schema.PLMConfig)."""
        return cls(n_layer=config.num_hidden_layers, n_head=config.n_head,
                   n_head_kv=config.num_key_value_heads or config.n_head,
                   key_length=config.qk_nope_head_dim + config.qk_rope_head_dim, value_length=config.v_head_dim,
                   n_embd=config.hidden_size, n_ff=config.intermediate_size, n_vocab=config.vocab_size,
                   n_ctx_train=config.max_position_embeddings, kv_lora_rank=config.kv_lora_rank,
                   rope_dim=config.qk_rope_head_dim)

    def cached_key_length(self, layout: KVLayout) -> int:
        """The width of one cached K row: a head's key, or (latent) the latent + rope key."""
        return self.kv_lora_rank + self.rope_dim if layout is KVLayout.LATENT else self.key_length


def kv_values_per_token_layer(shape: ModelShape, layout: KVLayout) -> int:
    """Stock layout: full per-head K and V (16 * (192 + 128) = 5120 for PLM-1.8B). Latent layout:
    K only, the latent and the shared rope key (512 + 64 = 576): 8.9x smaller."""
    if KVLayout(layout) is KVLayout.LATENT:
        return shape.kv_lora_rank + shape.rope_dim
    return shape.n_head_kv * (shape.key_length + shape.value_length)


def kv_cache_bytes(shape: ModelShape, layout: KVLayout, n_ctx: int, bytes_per_value: float = CACHE_BYTES) -> int:
    """llama.cpp's PLM KV cache in bytes (bytes_per_value: 2 for f16, 4 for f32, ...)."""
    return int(shape.n_layer * n_ctx * kv_values_per_token_layer(shape, layout) * bytes_per_value)


def compute_bytes(shape: ModelShape, layout: KVLayout, ctx: int, flash_attn: bool = False, gpu: bool = False) -> int:
    """An estimate of llama.cpp's compute buffer (f32 activations): the CPU's, or with every layer
    offloaded (gpu=True) the GPU's.

    Without flash attention the KQ score matrix [ctx, ubatch, n_head] dominates at long contexts
    (flash attention works in tiles and keeps none); the rest is a few activations of width
    n_embd / n_ff / cached key length per token of the micro-batch, plus logits. On CUDA the
    graph is reserved with logits for the whole micro-batch ([n_vocab, ubatch]: 297 MiB for
    PLM's 151,936 tokens), which the allocator does not hold at the same time as the attention
    scores: the buffer is the larger of the two (measured on an H200: 300.8 MiB for PLM-1.8B at
    ctx 4096, either layout).
    """
    scores = 0 if flash_attn else ctx * UBATCH * shape.n_head * 4
    key = shape.cached_key_length(KVLayout(layout))
    activations = UBATCH * 4 * (4 * shape.n_embd + 2 * shape.n_ff + 3 * shape.n_head * key)
    attention = scores + expanded_attention_bytes(shape, layout, ctx)
    if gpu:
        return max(attention + activations, shape.n_vocab * UBATCH * 4) + 16 * MIB
    logits = shape.n_vocab * 4 * 2
    return attention + activations + logits + 16 * MIB


def expanded_attention_bytes(shape: ModelShape, layout: KVLayout, ctx: int) -> int:
    """A latent file's prompt batches attend in the expanded form (llama.cpp patch 0004): the
    cached latent (f32) and the per-head K and V decompressed from it (f32, then f16 for the
    attention) are compute-buffer tensors, per cached token 4 * kv_lora_rank + 6 * n_head *
    (key + value) bytes: 32 KiB for PLM-1.8B. Measured through llama.cpp's compute-buffer report
    (full-size replica, Q4_K_M, flash attention, ctx 16384): 520.01 MiB against 304.75 MiB with
    every batch absorbed. 0 for the stock layout."""
    if KVLayout(layout) is not KVLayout.LATENT:
        return 0
    return ctx * (4 * shape.kv_lora_rank + 6 * shape.n_head * (shape.key_length + shape.value_length))


def flash_attn_auto(layout: KVLayout, mla_patch: bool = True) -> bool:
    """--flash-attn auto: on for a latent file on the patched build, off for a stock-layout one."""
    return KVLayout(layout) is KVLayout.LATENT and mla_patch


def default_ctx(profile_ctx: int, n_ctx_train: int) -> int:
    """The context a device runs at: its profile's, no longer than the model was trained for."""
    return min(profile_ctx, n_ctx_train) if n_ctx_train else profile_ctx


@dataclass(frozen=True)
class MemoryPlan:
    ctx: int
    weights: int
    kv_cache: int
    compute: int
    headroom: int
    available: int
    flash_attn: bool = False  # llama.cpp runs with flash attention (no KQ score matrix in the compute buffer)
    budget: str = "MemAvailable"  # what `available` is: the device's MemAvailable, or a GPU's free VRAM
    cache_type: str = "f16"  # the KV cache's type (-ctk and -ctv)

    @property
    def needed(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.headroom

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    def describe(self) -> str:
        cache = "" if self.cache_type == "f16" else f" ({self.cache_type})"
        return (f"weights {_mib(self.weights)} MiB + KV cache{cache} {_mib(self.kv_cache)} MiB at ctx {self.ctx} "
                f"+ compute {_mib(self.compute)} MiB{' (flash attention)' if self.flash_attn else ''} "
                f"+ headroom {_mib(self.headroom)} MiB "
                f"= {_mib(self.needed)} MiB vs {self.budget} {_mib(self.available)} MiB")


def _mib(n: int) -> str:
    """Whole MiB, with one decimal below 10 MiB (a small model's KV cache would read 0 or 1)."""
    return f"{n / MIB:.1f}" if n < 10 * MIB else f"{n / MIB:.0f}"


def plan(shape: ModelShape, layout: KVLayout, weights: int, ctx: int, available: int, headroom_mib: int,
         flash_attn: bool = False, budget: str = "MemAvailable", gpu: bool = False, cache_type: str = "f16"
         ) -> MemoryPlan:
    """The memory llama.cpp needs for a file of WEIGHTS bytes at CTX, against AVAILABLE bytes (of
    BUDGET). gpu=True: every layer offloaded, so weights, KV cache and the GPU's compute buffer
    are all in the GPU's memory (BUDGET names it)."""
    return MemoryPlan(ctx, weights, kv_cache_bytes(shape, layout, ctx, CACHE_TYPES[cache_type]),
                      compute_bytes(shape, layout, ctx, flash_attn, gpu), headroom_mib * MIB, available, flash_attn,
                      budget, cache_type)


@dataclass(frozen=True)
class MemoryTarget:
    """A device's side of the plan, as deploy runs there: its MemAvailable, the profile's headroom
    and ctx (capped at the model's training context), flash attention as --flash-attn auto."""

    available: int  # bytes
    headroom_mib: int
    ctx: int  # the profile's
    source: str = ""  # where the numbers come from, for the report
    mla_patch: bool = True
    gpu: str = ""  # every layer on this GPU: `available` is its free VRAM

    @property
    def budget_mib(self) -> float:
        return self.available / MIB - self.headroom_mib

    def plan(self, shape: ModelShape, layout: KVLayout, weights: int) -> MemoryPlan:
        return plan(shape, layout, weights, default_ctx(self.ctx, shape.n_ctx_train), self.available,
                    self.headroom_mib, flash_attn_auto(layout, self.mla_patch),
                    f"free VRAM of the {self.gpu}" if self.gpu else "MemAvailable", gpu=bool(self.gpu))
