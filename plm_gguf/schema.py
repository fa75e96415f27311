"""PLM's configuration and tensor table: one place that the converter, the reference model,
the fixtures and the tests all read.

HF names map to GGUF names through gguf-py's own `TensorNameMap` for `MODEL_ARCH.PLM`; this
module adds only what gguf-py does not know: the shapes each tensor must have for a config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import gguf

from plm_gguf.errors import CheckpointError
from plm_gguf.options import is_int

PLM_ARCHITECTURE = "PLMForCausalLM"

# config.json keys that must be present; everything else has a documented default.
_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "vocab_size",
)


@dataclass(frozen=True)
class PLMConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    vocab_size: int
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100000.0
    hidden_act: str = "relu2"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # Keys that were absent from config.json and took a default (reported, never silent).
    defaulted: tuple[str, ...] = field(default=(), compare=False)

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_hf_dict(self) -> dict:
        """A config.json body with the real checkpoint's keys."""
        body = {k: v for k, v in asdict(self).items() if k != "defaulted"}
        body["num_key_value_heads"] = self.num_key_value_heads or self.num_attention_heads
        body.update(
            architectures=[PLM_ARCHITECTURE],
            model_type="plm",
            q_lora_rank=None,
            rope_scaling=None,
            attention_bias=False,
        )
        return body

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "PLMConfig":
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source} holds a JSON {type(raw).__name__}, not an object",
                                  "restore the original config.json")
        archs = raw.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs) \
                or not isinstance(raw.get("model_type", ""), str):
            raise CheckpointError(f"{source}: architectures must be a list of names and model_type a name",
                                  "restore the original config.json")
        if PLM_ARCHITECTURE not in archs and raw.get("model_type") != "plm":
            found = ", ".join(archs) or raw.get("model_type") or "nothing"
            raise CheckpointError(
                f"{source} describes {found}, not a PLM model ({PLM_ARCHITECTURE})",
                "plm-gguf converts PLM checkpoints only; use llama.cpp's convert_hf_to_gguf.py for others",
            )
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise CheckpointError(
                f"{source} lacks {', '.join(missing)}",
                "a PLM config.json carries every MLA size; copy it from the original checkpoint",
            )
        _check_types(raw, source)
        if raw.get("q_lora_rank"):
            raise CheckpointError(
                f"{source} has q_lora_rank={raw['q_lora_rank']}; PLM has a plain q_proj",
                "compressed queries are DeepSeek-V2 style: convert with llama.cpp's deepseek2 path",
            )
        if raw.get("rope_scaling"):
            raise CheckpointError(
                f"{source} sets rope_scaling={raw['rope_scaling']!r}, which llama.cpp's plm graph ignores",
                "remove rope_scaling or convert with a tool that supports it",
            )
        act = raw.get("hidden_act", "relu2")
        if act != "relu2":
            raise CheckpointError(
                f"{source} has hidden_act={act!r}; PLM's MLP is squared ReLU ('relu2')",
                "llama.cpp's plm graph computes relu(x)^2 only",
            )
        kv_heads = raw.get("num_key_value_heads")
        if kv_heads not in (None, raw["num_attention_heads"]):
            raise CheckpointError(
                f"{source} has num_key_value_heads={kv_heads} != num_attention_heads={raw['num_attention_heads']}",
                "PLM expands K/V per head; grouped K/V heads are not a PLM layout",
            )
        known = {f for f in cls.__dataclass_fields__ if f != "defaulted"}
        values = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(values.get(key), list):  # some configs list several eos ids
                values[key] = values[key][0]
        defaulted = tuple(
            k for k in ("rms_norm_eps", "rope_theta", "max_position_embeddings") if k not in raw
        )
        return cls(**values, defaulted=defaulted)

    @classmethod
    def load(cls, path: Path) -> "PLMConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(
                f"no config.json in {path}",
                "point plm-gguf at the checkpoint folder that holds config.json and the weights",
            )
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file} is not valid JSON ({exc})", "restore the original config.json") from exc
        return cls.from_dict(raw, source=str(file))


# Every config.json key plm-gguf reads: its type and the range a PLM-like model can have. Sizes
# are checked before anything is sized by them (the tensor table, the reference model).
_INT_RANGES = {
    "hidden_size": (1, 65536), "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024), "intermediate_size": (1, 1 << 20), "kv_lora_rank": (1, 65536),
    "qk_nope_head_dim": (1, 4096), "qk_rope_head_dim": (2, 4096), "v_head_dim": (1, 4096),
    "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 24), "q_lora_rank": (0, 65536),
}
_FLOAT_RANGES = {"rms_norm_eps": (0.0, 1.0), "rope_theta": (0.0, 1e12)}  # exclusive bounds
_STR_KEYS = ("hidden_act", "torch_dtype")


def _check_types(raw: dict, source: str) -> None:
    """Raise on the first key of the wrong type or out of range (None means absent)."""
    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key} is {raw[key]!r}; it must be {want}",
                               "restore the original config.json; these sizes must match the weights")

    for key, (low, high) in _INT_RANGES.items():
        value = raw.get(key)
        if value is not None and not (is_int(value) and low <= value <= high):
            raise bad(key, f"an integer from {low} to {high:,}")
    if raw["qk_rope_head_dim"] % 2:
        raise bad("qk_rope_head_dim", "even (rotary embeddings turn pairs of dimensions)")
    for key, (low, high) in _FLOAT_RANGES.items():
        value = raw.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and low < value < high):
            raise bad(key, f"a number between {low:g} and {high:g}")
    for key in _STR_KEYS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise bad(key, "a string")
    if not isinstance(raw.get("tie_word_embeddings", True), bool):
        raise bad("tie_word_embeddings", "true or false")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = raw.get(key)
        ids = value if isinstance(value, list) and value else [value]
        if value is not None and not all(is_int(i) and 0 <= i < raw["vocab_size"] for i in ids):
            raise bad(key, f"a token id from 0 to {raw['vocab_size'] - 1} (or a list of them)")


def config_from_gguf(path: Path) -> PLMConfig:
    """The PLMConfig a PLM GGUF file describes (its plm.* metadata), every key type-checked and
    range-checked as config.json is."""
    from plm_gguf.errors import InputError
    from plm_gguf.ggufinfo import GGUFFormatError, read_plm_gguf

    from plm_gguf.memory import KVLayout, layout_of

    info = read_plm_gguf(path)
    latent = layout_of(info) is KVLayout.LATENT  # absorbed MLA: per-head sizes in the *_mla keys
    try:
        i = lambda key: info.typed(f"plm.{key}", int)  # noqa: E731
        rope, key_length = i("rope.dimension_count"), i("attention.key_length_mla" if latent else "attention.key_length")
        embd = info.tensors.get("token_embd.weight")
        if embd is None:
            raise GGUFFormatError("tensor token_embd.weight is missing")
        raw = {
            "model_type": "plm", "hidden_size": i("embedding_length"), "num_hidden_layers": i("block_count"),
            "num_attention_heads": i("attention.head_count"), "intermediate_size": i("feed_forward_length"),
            "kv_lora_rank": i("attention.kv_lora_rank"), "qk_nope_head_dim": key_length - rope,
            "qk_rope_head_dim": rope, "v_head_dim": i("attention.value_length_mla" if latent else "attention.value_length"),
            "vocab_size": embd.shape[0], "max_position_embeddings": i("context_length"),
            "rms_norm_eps": info.typed("plm.attention.layer_norm_rms_epsilon", float),
            "rope_theta": info.typed("plm.rope.freq_base", float),
        }
        config = PLMConfig.from_dict(raw, source=str(path))
    except (GGUFFormatError, CheckpointError) as exc:
        raise InputError(f"{path} has broken PLM metadata: {getattr(exc, 'message', exc)}",
                         "convert the checkpoint again with plm-gguf convert") from exc
    return replace(config, num_key_value_heads=config.num_attention_heads, defaulted=())


@dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    gguf_name: str
    kind: gguf.MODEL_TENSOR
    shape: tuple[int, ...]  # PyTorch order, [out, in]

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def _layer_shapes(c: PLMConfig) -> dict[str, tuple[int, ...]]:
    d, h = c.hidden_size, c.n_head
    return {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (h * c.qk_head_dim, d),
        "self_attn.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, d),
        "self_attn.kv_a_layernorm.weight": (c.kv_lora_rank,),
        "self_attn.kv_b_proj.weight": (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        "self_attn.o_proj.weight": (d, h * c.v_head_dim),
        "post_attention_layernorm.weight": (d,),
        "mlp.up_proj.weight": (c.intermediate_size, d),
        "mlp.down_proj.weight": (d, c.intermediate_size),
    }


def tensor_table(config: PLMConfig) -> list[TensorSpec]:
    """Every tensor a PLM checkpoint must hold, in GGUF write order."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PLM, config.num_hidden_layers)

    def spec(hf_name: str, shape: tuple[int, ...]) -> TensorSpec:
        kind, gguf_name = name_map.get_type_and_name(hf_name, try_suffixes=(".weight",))
        return TensorSpec(hf_name, gguf_name, kind, shape)

    specs = [spec("model.embed_tokens.weight", (config.vocab_size, config.hidden_size))]
    for i in range(config.num_hidden_layers):
        specs += [spec(f"model.layers.{i}.{name}", shape) for name, shape in _layer_shapes(config).items()]
    specs.append(spec("model.norm.weight", (config.hidden_size,)))
    return specs


# Stored by some exports of tied models; accepted only when equal to the embeddings.
TIED_OUTPUT = "lm_head.weight"


def parameter_count(config: PLMConfig) -> int:
    return sum(s.n_elements for s in tensor_table(config))


def size_label(n_params: int) -> str:
    """llama.cpp's style of size label: 1.8B, 35M, ..."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= scale:
            value = n_params / scale
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(n_params)


# The published PLM-1.8B configuration (PLM_FACTS section 1), for the replica and the demo.
PLM_1_8B = PLMConfig(
    hidden_size=2048,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=8192,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    vocab_size=151936,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=100000.0,
    bos_token_id=151643,
    eos_token_id=151643,
)
