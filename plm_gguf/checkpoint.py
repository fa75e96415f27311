"""Lazy access to a PLM checkpoint's tensors: safetensors (single or sharded) and
pytorch_model.bin (single or sharded), from a local folder or a Hugging Face repo id.

Nothing is loaded until asked for; each tensor is read when it is needed and can be dropped
right after, so peak memory is about one tensor. Safetensors files are memory-mapped and their
header is parsed here (the format is a length-prefixed JSON header, then raw little-endian data)
because the converter needs each tensor's raw byte range to pass bf16 through without a copy,
which safetensors' own API does not expose. Pickles are opened only with
`torch.load(weights_only=True, mmap=True)`: no code in a checkpoint is ever executed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from plm_gguf.errors import CheckpointError
from plm_gguf.qtypes import bf16_to_f32
from plm_gguf.options import is_int
from plm_gguf.schema import TIED_OUTPUT, PLMConfig, TensorSpec, tensor_table

# Storage dtypes we accept, by their safetensors names.
SUPPORTED_DTYPES = ("BF16", "F16", "F32")
_NUMPY_STORAGE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_TORCH_TO_ST = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "vocab.json",
    "merges.txt", "special_tokens_map.json", "README.md", "LICENSE*",
]


@dataclass
class TensorRef:
    """One stored tensor: where it is, what it is, and how to read it."""

    name: str
    dtype: str  # one of SUPPORTED_DTYPES, or the unsupported name as found
    shape: tuple[int, ...]
    file: Path
    _read: Callable[[], np.ndarray]
    _release: Callable[[int | None], None] = lambda upto=None: None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * {"BF16": 2, "F16": 2, "F32": 4}.get(self.dtype, 0)

    def raw(self) -> np.ndarray:
        """The tensor in its storage form (bf16 as uint16 bit patterns), shaped."""
        return self._read()

    def f32(self) -> np.ndarray:
        raw = self.raw()
        return bf16_to_f32(raw) if self.dtype == "BF16" else raw.astype(np.float32, copy=False)

    def row_chunks(self, max_bytes: int) -> Iterator[np.ndarray]:
        return row_blocks(self.raw(), max_bytes)

    def release(self, upto: int | None = None) -> None:
        """Drop this tensor's pages (its first `upto` bytes, or all) from the process's resident
        memory; they stay in the page cache."""
        self._release(upto)


def row_blocks(array: np.ndarray, max_bytes: int) -> Iterator[np.ndarray]:
    """An array as consecutive blocks of whole rows of about max_bytes (views, no copies)."""
    rows = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
    step = max(1, max_bytes // max(1, rows[0].nbytes))
    for start in range(0, rows.shape[0], step):
        yield rows[start : start + step]


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A local checkpoint folder, or a Hugging Face repo id fetched into the standard cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; a checkpoint is a folder",
                "pass the folder holding config.json and the weights",
            )
        return path
    text = str(model)
    if not _REPO_ID.match(text):
        raise CheckpointError(f"{text} is neither a local folder nor a Hugging Face repo id",
                              "pass a folder path or an id such as PLM-Team/PLM-1.8B-Instruct")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError("huggingface_hub is not installed", "pip install huggingface_hub") from exc
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"Hugging Face repo {text} was not found (or needs a login)",
                              "check the id, or run `huggingface-cli login` for gated repos") from exc
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"{text} is not in the local Hugging Face cache and the Hub cannot be reached",
                              "unset HF_HUB_OFFLINE or download it once with network access") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"downloading {text} failed: {exc}".splitlines()[0],
                              "retry, or download the repo and pass its local folder") from exc


# Bytes per element of every dtype the safetensors format defines (its own table), so that a
# header is checked whole even where plm-gguf later refuses the dtype.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
                "F8_E8M0": 1, "C64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _safetensors_header(file: Path) -> tuple[int, dict[str, dict]]:
    """The data start and the validated header of a safetensors file, checked as the format's
    own library checks it: a JSON object of unique names; every entry a known dtype, a shape of
    non-negative integers and [begin, end] offsets whose length is shape x dtype size; entries
    contiguous and non-overlapping, covering the data exactly to the end of the file."""
    size = file.stat().st_size

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{file.name} is not a valid safetensors file: {what}",
                               "download the file again; it may be truncated, corrupt or not safetensors")

    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file.name} is truncated (no header)", "download the file again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len < 2 or header_len > min(size - 8, _MAX_HEADER):
            raise bad(f"header length {header_len:,} for a file of {size:,} bytes")
        text = fh.read(header_len)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise bad(f"corrupt header ({exc})") from exc
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not an object of strings")
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_ITEMSIZE:
            raise CheckpointError(f"{file.name}: {name} is stored as {dtype!r}, a dtype plm-gguf does not know",
                                  "export the checkpoint in bf16, f16 or f32")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise bad(f"{name} has shape {shape!r}; a shape is a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            raise bad(f"{name} has data_offsets {offsets!r}; they are two integers [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"{name} has data_offsets {offsets}; begin must be >= 0 and <= end")
        if end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise bad(f"{name} spans {end - begin:,} bytes but its shape {shape} of {dtype} needs "
                      f"{math.prod(shape) * _ST_ITEMSIZE[dtype]:,}")
        spans.append((begin, end, name))
    data_start = 8 + header_len
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"{name} starts at {begin:,}, " + ("overlapping the tensor before it" if begin < position
                                                          else f"leaving a gap after byte {position:,}"))
        position = end
    if data_start + position != size:
        if data_start + position > size:
            raise CheckpointError(
                f"{file.name} is truncated: its header needs {data_start + position:,} bytes, the file has {size:,}",
                "download the file again")
        raise bad(f"{size - data_start - position:,} bytes after the last tensor")
    return data_start, header


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"name {duplicate!r} appears twice")
    return dict(pairs)


def _safetensors_refs(file: Path) -> Iterator[TensorRef]:
    data_start, header = _safetensors_header(file)
    mapped = _Mmap(file)
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        dtype, shape = info["dtype"], tuple(info["shape"])

        def read(begin=begin, stop=stop, dtype=dtype, shape=shape) -> np.ndarray:
            buf = mapped.view()[data_start + begin : data_start + stop]
            return np.frombuffer(buf, dtype=_NUMPY_STORAGE[dtype]).reshape(shape)

        def release(upto: int | None = None, begin=begin, stop=stop) -> None:
            end = stop if upto is None else min(stop, begin + upto)
            mapped.release(data_start + begin, data_start + end)

        yield TensorRef(name, dtype, shape, file, read, release)


class _Mmap:
    """A read-only map of a file, opened on first use. Pages a reader touched count towards its
    resident memory until released, so the converter releases each tensor once written."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._map: mmap.mmap | None = None

    def view(self) -> memoryview:
        if self._map is None:
            with open(self.file, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._map)

    def release(self, begin: int, stop: int) -> None:
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        start = begin - begin % mmap.PAGESIZE
        stop -= stop % mmap.PAGESIZE if stop < len(self._map) else 0  # whole pages only
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _torch_refs(file: Path) -> Iterator[TensorRef]:
    import torch

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # UnpicklingError (refused code), zipfile errors, EOFError, ...
        raise CheckpointError(f"{file.name} cannot be read safely as a PyTorch checkpoint: {exc}".splitlines()[0][:300],
                              "download the file again; plm-gguf never executes pickled code") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file.name} holds a {type(state).__name__}, not a state dict",
                              "save the model with model.state_dict()")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{file.name} holds {name!r}: {type(tensor).__name__}, not a tensor",
                                  "a PyTorch checkpoint for plm-gguf maps tensor names to tensors only")
        dtype = _TORCH_TO_ST.get(str(tensor.dtype), str(tensor.dtype).removeprefix("torch."))

        def read(t=tensor, dtype=dtype) -> np.ndarray:
            t = t.contiguous()
            if dtype == "BF16":
                return t.view(torch.int16).numpy().view(np.uint16)
            return t.numpy()

        yield TensorRef(name, dtype, tuple(tensor.shape), file, read)


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_name} is corrupt ({exc})", "restore it from the original checkpoint") from exc
            shards = weight_map.values() if isinstance(weight_map, dict) else [None]
            bad = next((f for f in shards if not isinstance(f, str) or Path(f).name != f or f in (".", "..")), False)
            if bad is not False:
                raise CheckpointError(f"{index_name} names shard {bad!r}, which is not a file name in {folder}",
                                      "shards are files beside the index; restore the index from the original checkpoint")
            files = sorted({folder / f for f in shards})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index_name} names shard(s) that are missing: {', '.join(missing[:3])}",
                                      "download every shard of the checkpoint")
            return files
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"no weights in {folder} (no *.safetensors, no pytorch_model*.bin)",
                          "the folder must hold the model weights next to config.json")


class Checkpoint:
    """A PLM checkpoint folder: its config and a lazy index of its tensors, checked against the
    config (names, shapes, dtypes, tied output) before anything is read."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config = PLMConfig.load(self.folder)
        self.files = _weight_files(self.folder)
        self.refs: dict[str, TensorRef] = {}
        for file in self.files:
            reader = _safetensors_refs if file.suffix == ".safetensors" else _torch_refs
            for ref in reader(file):
                if ref.name in self.refs:
                    raise CheckpointError(f"{ref.name} is stored twice ({self.refs[ref.name].file.name} and {file.name})",
                                          "remove the stray shard; each tensor belongs to one file")
                self.refs[ref.name] = ref
        self._check_layer_count()  # before the tensor table, whose size config.json decides
        self.specs = tensor_table(self.config)
        self._check_schema()

    @classmethod
    def open(cls, model: str | os.PathLike[str]) -> "Checkpoint":
        return cls(resolve_model(model))

    @property
    def source_dtype(self) -> str:
        """The storage dtype of the weight matrices (norms are sometimes kept in f32)."""
        dtypes = {self.refs[s.hf_name].dtype for s in self.specs if not s.is_norm}
        return dtypes.pop() if len(dtypes) == 1 else "F32"

    @property
    def nbytes(self) -> int:
        return sum(self.refs[s.hf_name].nbytes for s in self.specs)

    def input_files(self) -> list[Path]:
        """Every file of the checkpoint folder: an output may never be one of them."""
        return sorted({*self.files, *(p for p in self.folder.iterdir() if p.is_file())})

    def _check_layer_count(self) -> None:
        layers = {int(m.group(1)) for name in self.refs if (m := re.match(r"model\.layers\.(\d+)\.", name))}
        want = self.config.num_hidden_layers
        if layers != set(range(want)):
            found = f"layers 0..{max(layers)}" if layers == set(range(len(layers))) and layers else \
                f"{len(layers)} layer index(es)"
            raise CheckpointError(f"config.json has num_hidden_layers={want} but the weights hold {found}",
                                  "the weights do not match config.json (wrong num_hidden_layers?) or a shard is missing")

    def _check_schema(self) -> None:
        expected = {s.hf_name for s in self.specs}
        found = set(self.refs)
        missing = sorted(expected - found, key=_natural)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise CheckpointError(f"checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}",
                                  "the weights do not match config.json (wrong num_hidden_layers?) or a shard is missing")
        extra = sorted(found - expected - {TIED_OUTPUT}, key=_natural)
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            hint = ("PLM's MLP has no gate_proj (squared ReLU, no gate)" if any("gate_proj" in n for n in extra)
                    else "this is not the PLM tensor layout; remove extra tensors or check the model type")
            raise CheckpointError(f"checkpoint has unexpected tensor(s) {', '.join(extra[:3])}{more}", hint)
        for spec in self.specs:
            ref = self.refs[spec.hf_name]
            if ref.dtype not in SUPPORTED_DTYPES:
                raise CheckpointError(f"{spec.hf_name} is stored as {ref.dtype}; supported are bf16, f16 and f32",
                                      "export the checkpoint in bf16, f16 or f32 (pre-quantized checkpoints are not supported)")
            if ref.shape != spec.shape:
                raise CheckpointError(
                    f"{spec.hf_name} has shape {list(ref.shape)} but config.json implies {list(spec.shape)}",
                    "config.json does not describe these weights; use the config that came with them",
                )
        if TIED_OUTPUT in self.refs:
            head, embed = self.refs[TIED_OUTPUT], self.refs["model.embed_tokens.weight"]
            if head.shape != embed.shape or not np.array_equal(head.f32(), embed.f32()):
                raise CheckpointError(
                    "lm_head.weight differs from model.embed_tokens.weight, but PLM ties them",
                    "llama.cpp's plm graph reuses the embeddings as output; untied heads cannot be represented",
                )

    def tensor(self, spec: TensorSpec) -> TensorRef:
        return self.refs[spec.hf_name]


def check_finite(name: str, values) -> None:
    """Raise if a numpy array or torch tensor holds NaN or Inf."""
    finite = values.isfinite() if hasattr(values, "isfinite") else np.isfinite(values)
    if not finite.all():
        bad = int((~finite).sum())
        raise CheckpointError(f"{name} holds {bad:,} NaN/Inf value(s)",
                              "the checkpoint is corrupt or diverged in training; use an earlier save")


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
