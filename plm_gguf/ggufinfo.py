"""A GGUF file's metadata and tensor index, read from its header only.

gguf-py's GGUFReader parses every metadata array into numpy views; for a PLM file with the
151,936-token vocabulary and 151,387 merges that takes about 27 s and 340 MB. Most of plm-gguf
only needs the scalars and the tensor index, so this reader skips arrays (unless asked for by
key) and is fast on any file. Tensor data is reachable through `TensorInfo.offset`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from plm_gguf.errors import UsageError
from plm_gguf.qtypes import bf16_to_f32
from plm_gguf.options import is_int

_SCALARS = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
            VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: [rows, row length]
    qtype: QT
    offset: int  # absolute, in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGUFInfo:
    path: Path
    fields: dict[str, Any]  # scalars and strings; arrays as their length, unless asked for
    tensors: dict[str, TensorInfo]

    @property
    def arch(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def typed(self, key: str, kind: type) -> Any:
        """A key that must be present with a value of KIND (int, float or str); a GGUFFormatError
        names the key otherwise. Integers are accepted where a float is asked for."""
        if key not in self.fields:
            raise GGUFFormatError(f"key {key} is missing")
        value = self.fields[key]
        ok = (is_int(value) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, kind))
        if not ok:
            raise GGUFFormatError(f"key {key} holds {value!r}, not {'an' if kind is int else 'a'} {kind.__name__}")
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def data(self, name: str) -> np.ndarray:
        """A tensor's stored bytes (memory-mapped), shaped [rows, bytes per row]."""
        t = self.tensors[name]
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))
        return raw.reshape(t.shape[0] if len(t.shape) > 1 else 1, -1)

    def values(self, name: str) -> np.ndarray:
        """A tensor as float32 in numpy order, dequantized where needed."""
        t = self.tensors[name]
        raw = self.data(name)
        if t.qtype == QT.F32:
            out = raw.view(np.float32)
        elif t.qtype == QT.F16:
            out = raw.view(np.float16).astype(np.float32)
        elif t.qtype == QT.BF16:
            out = bf16_to_f32(raw.view(np.uint16))
        else:
            out = gguf.quants.dequantize(np.asarray(raw), t.qtype)
        return out.reshape(t.shape)


def read_gguf_info(path: Path | str, arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """Parse the header of a GGUF file. Raises GGUFFormatError for anything that is not one."""
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # empty file
            raise GGUFFormatError("the file is empty") from exc
    try:
        return _parse(path, buf, set(arrays))
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise GGUFFormatError(str(exc) or type(exc).__name__) from exc
    finally:
        buf.close()


def _parse(path: Path, buf: mmap.mmap, wanted: set[str]) -> GGUFInfo:
    if buf[:4] != b"GGUF":
        raise GGUFFormatError("no GGUF magic at the start")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not one llama.cpp reads (2 or 3)")
    if n_kv > len(buf) // 13 or n_tensors > len(buf) // 29:  # the smallest entry of each kind
        raise GGUFFormatError(f"the header claims {n_kv:,} keys and {n_tensors:,} tensors, more than the file holds")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise GGUFFormatError(f"a string of {n:,} bytes at byte {pos:,} runs past the end of the file")
        pos += 8 + n
        return bytes(buf[pos - n : pos]).decode("utf-8")

    def value(kind: VT, keep: bool) -> Any:
        nonlocal pos
        if kind == VT.STRING:
            return string()
        if kind == VT.ARRAY:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            item = VT(item)
            if item in _SCALARS and not keep:
                pos += count * struct.calcsize(_SCALARS[item])
                return count
            items = [value(item, keep) for _ in range(count)]
            return items if keep else count
        fmt = _SCALARS[kind]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key in fields:
            raise GGUFFormatError(f"key {key} appears twice")
        fields[key] = value(VT(kind), key in wanted)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions (1 to 4 allowed)")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), QT(qtype), offset))
    align = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not is_int(align) or align <= 0 or align & (align - 1):
        raise GGUFFormatError(f"general.alignment is {align!r}, not a power of two")
    data_start = pos + (-pos) % align
    tensors = {}
    for name, shape, qtype, offset in infos:
        if name in tensors:
            raise GGUFFormatError(f"tensor {name} appears twice")
        if qtype not in gguf.GGML_QUANT_SIZES:
            raise GGUFFormatError(f"tensor {name} has type {qtype.name}, which has no block layout")
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise GGUFFormatError(f"tensor {name}: rows of {shape[-1]} do not fit {qtype.name} blocks of {block}")
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * size
        if offset % align or data_start + offset + n_bytes > len(buf):
            raise GGUFFormatError(f"tensor {name}'s data (offset {offset:,}, {n_bytes:,} bytes) is misaligned "
                                  f"or runs past the end of the file")
        tensors[name] = TensorInfo(name, shape, qtype, data_start + offset, n_bytes)
    return GGUFInfo(path, fields, tensors)


def read_plm_gguf(path: Path | str, arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """read_gguf_info for a file that must be a PLM GGUF: anything else is a UsageError."""
    try:
        info = read_gguf_info(path, arrays)
    except (GGUFFormatError, OSError) as exc:
        raise UsageError(f"{path} is not a readable GGUF file ({exc})", "pass a .gguf written by plm-gguf convert") from exc
    if info.arch != "plm":
        raise UsageError(f"{path} is not a PLM GGUF (architecture {info.arch or 'missing'})",
                         "plm-gguf works with PLM models only")
    return info
