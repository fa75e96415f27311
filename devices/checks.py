"""The checks made before anything is pushed: CPU features, libc, page size, memory and disk.

Each check is a pure function of the probed :class:`DeviceFacts`, the build manifest and the
model's GGUF metadata; a refusal raises DeviceError with the numbers and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from plm_gguf.errors import DeviceError, UsageError
from plm_gguf.ggufinfo import GGUFFormatError, read_gguf_info
from plm_gguf.memory import (  # noqa: F401
    CACHE_TYPES, FLOAT_CACHE_TYPES, MIB, UBATCH, KVLayout, MemoryPlan, ModelShape, flash_attn_auto, layout_of, plan)
from plm_gguf.schema import PLMConfig, config_from_gguf

from .facts import SPEED_FEATURES, DeviceFacts
from .gpu import GpuInfo
from .profiles import HOST_TOOLCHAINS

FLASH_ATTN_MODES = ("auto", "on", "off")
ARCH_ALIASES = {"aarch64": "aarch64", "arm64": "aarch64", "armv8l": "aarch64", "x86_64": "x86_64", "amd64": "x86_64"}


@dataclass(frozen=True)
class ModelInfo:
    """A GGUF's metadata as deploy needs it. n_head_kv, key_length and value_length are the full
    per-head sizes whatever the layout (a latent file's *_mla keys); `layout` says what is cached."""

    path: Path
    size: int
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    layout: KVLayout = KVLayout.FULL
    kv_lora_rank: int = 0  # MLA's latent width (0: not an MLA model)
    rope_dim: int = 0

    @property
    def latent(self) -> bool:
        return self.layout is KVLayout.LATENT

    @property
    def shape(self) -> ModelShape:
        return ModelShape(n_layer=self.n_layer, n_head=self.n_head, n_head_kv=self.n_head_kv,
                          key_length=self.key_length, value_length=self.value_length, n_embd=self.n_embd,
                          n_ff=self.n_ff, n_vocab=self.n_vocab, n_ctx_train=self.n_ctx_train,
                          kv_lora_rank=self.kv_lora_rank, rope_dim=self.rope_dim)

    def as_latent(self) -> ModelInfo | None:
        """This stock-layout MLA model as `convert --kv-cache latent` would write it (for its KV
        cache size); None for a latent file or a model without MLA metadata."""
        if self.latent or not self.kv_lora_rank or not self.rope_dim:
            return None
        return replace(self, layout=KVLayout.LATENT)


def read_model(path: Path) -> ModelInfo:
    """The GGUF metadata that sizes the KV cache (read without loading tensors)."""
    if not path.is_file():
        raise UsageError(f"model file not found: {path}", "pass the path to a .gguf file")
    try:
        info = read_gguf_info(path)
    except (GGUFFormatError, OSError) as exc:
        raise UsageError(f"{path} is not a readable GGUF file: {exc}", "convert the checkpoint with plm-gguf first") from None

    def value(key: str, default=None):
        found = info.get(key)
        if found is None:
            if default is None:
                raise UsageError(f"{path.name} has no {key}", "is this a PLM GGUF written by plm-gguf or llama.cpp?")
            return default
        return found

    arch = value("general.architecture")
    if arch == "plm":  # a PLM file's sizes come from the one reader of them, every key checked
        return _plm_model(path, config_from_gguf(path), layout_of(info))
    n_head = int(value(f"{arch}.attention.head_count"))
    vocab = info.get("tokenizer.ggml.tokens")  # the array's length
    layout = layout_of(info)
    mla = "_mla" if layout is KVLayout.LATENT else ""  # a latent file keeps the per-head sizes in the *_mla keys
    return ModelInfo(
        path=path, size=path.stat().st_size, arch=arch,
        n_layer=int(value(f"{arch}.block_count")), n_head=n_head,
        n_head_kv=n_head if mla else int(value(f"{arch}.attention.head_count_kv", n_head)),
        key_length=int(value(f"{arch}.attention.key_length{mla}", 0)) or int(value(f"{arch}.embedding_length")) // n_head,
        value_length=int(value(f"{arch}.attention.value_length{mla}", 0)) or int(value(f"{arch}.embedding_length")) // n_head,
        n_embd=int(value(f"{arch}.embedding_length")), n_ff=int(value(f"{arch}.feed_forward_length")),
        n_vocab=int(value(f"{arch}.vocab_size", 0)) or (vocab or 0),
        n_ctx_train=int(value(f"{arch}.context_length", 0)),
        layout=layout,
        kv_lora_rank=int(value(f"{arch}.attention.kv_lora_rank", 0)), rope_dim=int(value(f"{arch}.rope.dimension_count", 0)),
    )


def _plm_model(path: Path, c: PLMConfig, layout: KVLayout) -> ModelInfo:
    return ModelInfo(path=path, size=path.stat().st_size, arch="plm", n_layer=c.num_hidden_layers, n_head=c.n_head,
                     n_head_kv=c.n_head, key_length=c.qk_head_dim, value_length=c.v_head_dim, n_embd=c.hidden_size,
                     n_ff=c.intermediate_size, n_vocab=c.vocab_size, n_ctx_train=c.max_position_embeddings,
                     layout=layout, kv_lora_rank=c.kv_lora_rank, rope_dim=c.qk_rope_head_dim)


def plan_memory(model: ModelInfo, ctx: int, facts: DeviceFacts, headroom_mib: int,
                flash_attn: bool = False, gpu: GpuInfo | None = None, cache_type: str = "f16") -> MemoryPlan:
    """The core's memory plan (plm_gguf.memory.plan) for MODEL on the device FACTS describe: in its
    MemAvailable, or with every layer on GPU, in that GPU's free VRAM."""
    if gpu is not None:
        return plan(model.shape, model.layout, model.size, ctx, gpu.mem_free, headroom_mib, flash_attn,
                    f"free VRAM of the {gpu.name}", gpu=True, cache_type=cache_type)
    return plan(model.shape, model.layout, model.size, ctx, facts.mem_available, headroom_mib, flash_attn,
                cache_type=cache_type)


def offload_gpu(gpu_layers: int, facts: DeviceFacts, where: str) -> GpuInfo | None:
    """The GPU a profile offloading GPU_LAYERS runs on (the first nvidia-smi lists); none without offload."""
    if gpu_layers <= 0:
        return None
    if not facts.gpus:
        raise DeviceError(f"the profile offloads layers to an NVIDIA GPU, but nvidia-smi finds none on {where}",
                          "check the NVIDIA driver there (nvidia-smi), or use a CPU profile (gpu_layers = 0)")
    return facts.gpus[0]


def largest_fitting_ctx(model: ModelInfo, facts: DeviceFacts, headroom_mib: int, upto: int,
                        flash_attn: bool = False, gpu: GpuInfo | None = None, cache_type: str = "f16") -> int:
    ctx = upto
    while ctx >= 256:
        if plan_memory(model, ctx, facts, headroom_mib, flash_attn, gpu, cache_type).fits:
            return ctx
        ctx = ctx - 256 if ctx % 256 == 0 else ctx // 256 * 256
    return 0


def check_cache_type(model: ModelInfo, cache_type: str, flash_attn: bool) -> None:
    """-ctk/-ctv for the file: a type llama.cpp has; a quantized cache only with flash attention
    (llama.cpp quantizes V only there, and a latent file's V is a view of its K: both or neither)."""
    if cache_type not in CACHE_TYPES:
        raise UsageError(f"--cache-type {cache_type!r} is not a KV-cache type llama.cpp has",
                         f"use one of {', '.join(CACHE_TYPES)}")
    if cache_type in FLOAT_CACHE_TYPES:
        return
    key = model.shape.cached_key_length(model.layout)
    value = model.kv_lora_rank if model.latent else model.value_length
    odd = [f"{what} {n}" for what, n in (("key", key), ("value", value)) if n % 32]
    if odd:  # llama.cpp: "K cache type q8_0 with block size 32 does not divide n_embd_head_k"
        raise DeviceError(f"a {cache_type} KV cache stores blocks of 32 values, and this file's cached "
                          f"{' and '.join(odd)} values per head are not a multiple of 32", "keep --cache-type f16")
    if flash_attn:
        return
    if not model.latent:
        raise DeviceError(f"a {cache_type} KV cache needs flash attention, which llama.cpp cannot run on a "
                          "stock-layout PLM file (it aborts)",
                          "convert with --kv-cache latent (its cache is 8.9x smaller, and takes q8_0 with flash "
                          "attention), or keep --cache-type f16")
    raise DeviceError(f"a {cache_type} KV cache needs flash attention, and --flash-attn is off",
                      "use --flash-attn auto (on for latent files), or --cache-type f16")


def check_layout(model: ModelInfo, mla_patch: bool) -> None:
    """A latent-layout file needs the patched llama.cpp: stock llama.cpp refuses its tensor shapes."""
    if model.latent and not mla_patch:
        raise DeviceError(f"{model.path.name} has the latent KV-cache layout (--kv-cache latent), "
                          "which stock llama.cpp cannot load",
                          "deploy without --no-mla-patch, or convert with --kv-cache full")


def resolve_flash_attn(model: ModelInfo, mode: str, mla_patch: bool = True) -> bool:
    """Whether llama.cpp runs MODEL with flash attention, for --flash-attn auto|on|off.

    auto is on for a latent-layout file on the patched build: its K-only cache is read once per
    KV head by the patched decode kernel, the fastest way llama.cpp runs it. A stock-layout PLM
    file cannot use it (llama.cpp aborts: its K head is 192 wide and its V head 128, and the
    stock graph's V does not fit the flash-attention cache layout), so auto is off there and on
    is refused."""
    if mode not in FLASH_ATTN_MODES:
        raise UsageError(f"--flash-attn {mode!r} is not one of {', '.join(FLASH_ATTN_MODES)}",
                         "use --flash-attn auto (on for --kv-cache latent files, off for stock ones)")
    if mode == "off":
        return False
    if model.arch == "plm" and not model.latent:
        if mode == "on":
            raise DeviceError(f"flash attention aborts llama.cpp on {model.path.name}, a stock-layout PLM file",
                              "convert with --kv-cache latent (which runs with flash attention), "
                              "or use --flash-attn auto")
        return False
    return mode == "on" or flash_attn_auto(model.layout, mla_patch)


def check_memory(model: ModelInfo, ctx: int, facts: DeviceFacts, headroom_mib: int,
                 latent_runs: bool = True, flash_attn: bool = False, gpu: GpuInfo | None = None,
                 cache_type: str = "f16") -> MemoryPlan:
    """Refuse a plan that does not fit; the hint names the largest ctx that does and, for a stock
    file, what the latent layout would need (latent_runs: the build runs latent files, with
    flash attention as auto would choose)."""
    plan = plan_memory(model, ctx, facts, headroom_mib, flash_attn, gpu, cache_type)
    if plan.fits:
        return plan
    smaller = largest_fitting_ctx(model, facts, headroom_mib, ctx - 1, flash_attn, gpu, cache_type)
    hint = (f"use --ctx {smaller} (fits)" if smaller else
            "even ctx 256 does not fit: use a smaller quantization (e.g. Q4_0) or free memory on the device")
    latent = model.as_latent() if latent_runs else None
    if latent is not None:
        alt = plan_memory(latent, ctx, facts, headroom_mib, flash_attn=True, gpu=gpu)
        if alt.fits:
            hint = (f"convert with --kv-cache latent: its KV cache at ctx {ctx} is {alt.kv_cache / MIB:.0f} MiB "
                    f"instead of {plan.kv_cache / MIB:.0f} MiB, and it fits; or {hint}")
    raise DeviceError(f"the model does not fit in {'VRAM' if gpu else 'memory'}: {plan.describe()}", hint)


def check_arch(manifest: dict, facts: DeviceFacts, wrapped: bool) -> None:
    want = ARCH_ALIASES.get(manifest["arch"], manifest["arch"])
    have = ARCH_ALIASES.get(facts.machine, facts.machine)
    if want != have and not wrapped:
        raise DeviceError(f"the build is for {want} but the device is {have}",
                          "pick the device's profile, or set exec_wrapper (e.g. qemu-aarch64-static) to emulate")


def check_features(manifest: dict, facts: DeviceFacts) -> list[str]:
    """Refuse a build using CPU features the device lacks (SIGILL); return warnings for unused ones."""
    uses = set(manifest.get("uses", ()))
    missing = sorted(uses - facts.cpu.features)
    if missing:
        raise DeviceError(
            f"the build for {manifest['profile']} uses CPU features this device lacks: {', '.join(missing)} "
            f"({facts.cpu.summary}); it would die with SIGILL",
            "deploy with the profile that matches the CPU (e.g. rpi4 or linux-aarch64 for armv8-a)",
        )
    if manifest.get("toolchain") in HOST_TOOLCHAINS:
        return []
    unused = [f for f in SPEED_FEATURES if f in facts.cpu.features and f not in uses]
    if unused:
        return [f"the device has {', '.join(unused)} that the {manifest['profile']} build does not use "
                "(slower kernels, no Q4_0 repacking with dotprod/i8mm): a profile for this CPU would be faster"]
    return []


def check_libc(manifest: dict, facts: DeviceFacts) -> None:
    glibc = manifest.get("glibc")
    if not glibc:
        return
    need = tuple(int(x) for x in glibc.split("."))
    if not facts.glibc:
        raise DeviceError(f"the build links glibc {glibc} but the device has {facts.libc}",
                          "use the static musl build (no --glibc)")
    if facts.glibc < need:
        raise DeviceError(f"the build needs glibc {glibc} but the device has {facts.libc}",
                          f"rebuild with --glibc {facts.glibc[0]}.{facts.glibc[1]}, or use the static musl build")


def check_page_size(manifest: dict, facts: DeviceFacts) -> None:
    limit = int(manifest.get("max_page_size") or 4096)
    if manifest.get("toolchain") not in HOST_TOOLCHAINS and facts.page_size > limit:
        raise DeviceError(f"the device uses {facts.page_size}-byte pages; the build is aligned for {limit}",
                          "rebuild (the current recipe links with max-page-size=16384)")


def check_disk(need: int, facts: DeviceFacts, where: str) -> None:
    if facts.disk_free >= 0 and need > facts.disk_free:
        raise DeviceError(f"not enough disk at {where}: {need / MIB:.0f} MiB to send, "
                          f"{facts.disk_free / MIB:.0f} MiB free",
                          "free space on the device or change install_dir in the profile")


def default_threads(profile_threads: int, facts: DeviceFacts) -> int:
    """The profile's count, but never more than the big cores (big.LITTLE spill-over collapses speed)."""
    big = facts.big_cores
    return min(profile_threads, big) if profile_threads > 0 else big
