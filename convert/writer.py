"""Checkpoint -> GGUF in one streaming pass, for every llama.cpp file type.

Each tensor is read in blocks of rows, encoded and written at its place in the file: a type the
source already has (bf16 from bf16) as its stored bits, every other type with ggml's own
`ggml_quantize_chunk` (plm_gguf.convert.ggmlq) on all cores; f16 and q8_0 fall back to numpy when
there is no host build yet, so that they never wait for one. No temporary file is written.
Which type each tensor gets is llama.cpp's decision, not a copy of its rules: a dry run of
`llama_model_quantize` on a data-less skeleton of the file (a memfd: header and tensor index,
the data a hole) returns them, so a file is interchangeable with llama-quantize's, tensor for
tensor and byte for byte. The target appears only by a rename at the end: on any failure,
Ctrl-C included, no partial file is left behind.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from plm_gguf.checkpoint import Checkpoint, resolve_model, row_blocks
from plm_gguf.convert import ggmlq
from plm_gguf.convert.mla import MlaSizes, mla_metadata, split_kv_b
from plm_gguf.errors import CheckpointError, UsageError
from plm_gguf.llama.runtime import run_worker
from plm_gguf.memory import KVLayout, parse_layout
from plm_gguf.outputs import check_target, claimed, partial_path
from plm_gguf.qtypes import DIRECT_TYPES, NEEDS_IMATRIX, bf16_to_f32, llama_file_types, parse_outtype
from plm_gguf.schema import TensorSpec, parameter_count, size_label
from plm_gguf.vocab import Vocab, load_vocab


class _GGUFWriter(gguf.GGUFWriter):
    """gguf-py's writer, packing long arrays (the vocabulary: 151,936 tokens, as many merges and
    token types for PLM-1.8B) in one pass instead of item by item (4 s -> about 0.3 s), byte for
    byte what gguf-py writes (tests/test_convert.py). Everything else is gguf-py's."""

    _NUMERIC = {gguf.GGUFValueType.INT32: "<i4", gguf.GGUFValueType.UINT32: "<u4",
                gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.UINT8: "<u1"}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if (vtype != gguf.GGUFValueType.ARRAY or not isinstance(val, (list, tuple)) or len(val) < 256
                or self.endianess != gguf.GGUFEndian.LITTLE):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
        if ltype == gguf.GGUFValueType.STRING and all(isinstance(v, (str, bytes)) for v in val):
            encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            lengths = np.fromiter(map(len, encoded), dtype="<u8", count=len(encoded)).tobytes()
            body = b"".join(lengths[8 * i : 8 * i + 8] + e for i, e in enumerate(encoded))
        elif ltype in self._NUMERIC:
            if sub_type is None and any(gguf.GGUFValueType.get_type(v) is not ltype for v in val):
                return super()._pack_val(val, vtype, add_vtype, sub_type)  # mixed types: gguf-py's error
            body = np.asarray(val).astype(self._NUMERIC[ltype]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", ltype) + self._pack("Q", len(val))
        return head + body


@dataclass
class TensorPlan:
    spec: TensorSpec
    qtype: QT
    fallback_from: QT | None = None  # set when the wanted type's block does not fit the row

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.spec.shape, self.qtype)))


def plan_tensor(spec: TensorSpec, wanted: QT) -> TensorPlan:
    """Norms stay f32; a matrix whose row length is not a multiple of the block falls back to f16."""
    if spec.is_norm:
        return TensorPlan(spec, QT.F32)
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if spec.shape[-1] % block:
        return TensorPlan(spec, QT.F16, fallback_from=wanted)
    return TensorPlan(spec, wanted)


@dataclass
class ConvertResult:
    outfile: Path
    outtype: str
    nbytes: int
    seconds: float
    source_bytes: int
    tensor_types: dict[str, int]  # tensor type name -> count, as written
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)  # name, wanted, written
    notes: list[str] = field(default_factory=list)


def default_outfile(folder: Path, model: str, outtype: str) -> Path:
    stem = folder.name if Path(model).expanduser().exists() else str(model).split("/")[-1]
    return Path.cwd() / f"{stem}-{outtype.upper()}.gguf"


def convert(
    model: str | os.PathLike[str],
    outfile: str | os.PathLike[str] | None = None,
    outtype: str = "auto",
    *,
    force: bool = False,
    pre_tokenizer: str | None = None,
    progress: bool = False,
    threads: int | None = None,
    kv_cache: KVLayout | str = KVLayout.FULL,
    imatrix: dict[str, np.ndarray] | None = None,
) -> ConvertResult:
    """Convert a PLM checkpoint (folder or Hugging Face repo id) to GGUF. Everything is checked
    (config, tensor names and shapes, dtypes, tokenizer, output path) before a byte is written.
    `imatrix` maps GGUF tensor names to column importances (as the sweep computes them)."""
    outtype = parse_outtype(outtype)  # fail fast on a typo, before any download
    kv_cache = parse_layout(kv_cache)  # a KVLayout from the CLI; a str from a Python caller is checked here
    if outtype in NEEDS_IMATRIX and not imatrix:
        raise UsageError(f"{outtype} needs an importance matrix, which convert does not compute",
                         "use `plm-gguf quantize MODEL --type " + outtype + "`, which computes one")
    folder = resolve_model(model)
    ckpt = Checkpoint(folder)
    _prefetch(ckpt.input_files())
    vocab = load_vocab(folder, ckpt.config.vocab_size, pre_tokenizer)
    outtype = parse_outtype(outtype, ckpt.source_dtype)
    target = Path(outfile) if outfile else default_outfile(folder, str(model), outtype)
    check_target(target, force, inputs=ckpt.input_files())

    start = time.perf_counter()
    with claimed(target), partial_path(target, ".partial") as tmp:
        check_target(target, force, inputs=ckpt.input_files())  # again, now that the target is ours
        types = None
        if outtype not in DIRECT_TYPES:
            types = llama_tensor_types(ckpt, vocab, outtype, model_name=str(model), kv_cache=kv_cache,
                                       imatrix=imatrix)
        plans = write_gguf(ckpt, vocab, tmp, outtype, progress=progress, model_name=str(model), kv_cache=kv_cache,
                           types=types, imatrix=imatrix, threads=threads)
        os.replace(tmp, target)
    seconds = time.perf_counter() - start
    return summarize(target, outtype, seconds, ckpt.nbytes, plans, types is not None, vocab)


def _prefetch(files: list[Path]) -> None:
    """Start the kernel reading the weights (posix_fadvise WILLNEED, on a thread: the call can wait
    on the disk queue) while the tokenizer and header are prepared, when they fit in half the
    available memory; a cold checkpoint then streams from the page cache."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
        if sum(f.stat().st_size for f in files) > available // 2:
            return
    except (OSError, KeyError, ValueError):
        return

    def advise() -> None:
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)

    threading.Thread(target=advise, daemon=True).start()


def summarize(target: Path, outtype: str, seconds: float, source_bytes: int,
              plans: list[TensorPlan], llama_chose: bool, vocab: Vocab | None = None) -> ConvertResult:
    """What was written: the plans the file was written from (its size read from the disk)."""
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    result = ConvertResult(target, outtype, target.stat().st_size, seconds, source_bytes, counts)
    if not llama_chose:
        result.fallbacks = [(p.spec.gguf_name, p.fallback_from.name, p.qtype.name) for p in plans if p.fallback_from]
    else:  # llama.cpp chose per-tensor types; report matrices whose rows its block size did not fit
        main = _main_tensor_type(outtype)
        if main is not None:
            block = gguf.GGML_QUANT_SIZES[main][0]
            result.fallbacks = [(p.spec.gguf_name, main.name, p.qtype.name) for p in plans
                                if len(p.spec.shape) > 1 and p.spec.shape[-1] % block]
    if vocab is not None and vocab.nfc:
        result.notes.append("tokenizer.json applies NFC normalisation, llama.cpp does not: "
                            "decomposed accented input tokenizes differently (plm-gguf verify lists it)")
    return result


def _main_tensor_type(outtype: str) -> QT | None:
    base = outtype.split("_")[0] + ("_k" if "_k" in outtype else "")
    name = {"q2_k": "Q2_K", "q3_k": "Q3_K", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}.get(base)
    if name is None:
        name = outtype.upper() if outtype.upper() in QT.__members__ else None
    return QT[name] if name else None


def add_model_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, model_name: str, file_type: FT,
                       kv_cache: str = "full") -> None:
    """general.* (through gguf-py's Metadata heuristics) and every plm.* key llama.cpp reads."""
    c = ckpt.config
    n_params = parameter_count(c)
    name = None if Path(model_name).expanduser().exists() else model_name.split("/")[-1]
    meta = gguf.Metadata.load(None, ckpt.folder, name, n_params)
    meta.size_label = meta.size_label or size_label(n_params)
    for key, value in vars(meta).items():  # a non-UTF-8 folder name: GGUF strings are UTF-8
        if isinstance(value, str):
            setattr(meta, key, os.fsencode(value).decode("utf-8", "replace"))
    if name and not meta.source_repo_url:  # a Hugging Face repo id
        meta.source_repo_url = meta.source_url = f"https://huggingface.co/{model_name}"
    meta.set_gguf_meta_model(writer)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    if kv_cache == "full":
        writer.add_head_count_kv(c.num_key_value_heads or c.n_head)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    if kv_cache == "full":
        writer.add_key_length(c.qk_head_dim)
        writer.add_value_length(c.v_head_dim)
    else:  # absorbed MLA: attention over the latent, as llama.cpp's deepseek2 describes it
        for key, value in mla_metadata(MlaSizes.from_config(c)).items():
            writer.add_uint32(key, value)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    writer.add_file_type(file_type)
    if file_type not in (FT.ALL_F32, FT.MOSTLY_F16, FT.MOSTLY_BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# Tensors are converted in blocks of rows of about CHUNK_BYTES source bytes, on a thread pool
# (numpy and ggml release the GIL), with at most `2 x threads` blocks held at once: peak memory
# is a few blocks, not one tensor (PLM-1.8B's embedding alone is 622 MB in bf16, 1.2 GB in f32).
# The direct types are memory-bound numpy passes (DIRECT_THREADS at most); quantized types use
# every core. Blocks shrink as threads grow, so that what is in flight stays near 128 MB.
CHUNK_BYTES = 16 * 2**20
DIRECT_THREADS = min(4, os.cpu_count() or 1)
IN_FLIGHT_BYTES = 128 * 2**20
_NUMPY_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0)


# Exponent bits of each storage type: all ones is Inf or NaN.
_EXPONENT = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000)}


def _nonfinite(raw: np.ndarray, dtype: str) -> int:
    """How many Inf/NaN values stored bits hold: one masked pass and a max; counted only if any."""
    bits, mask = _EXPONENT[dtype]
    exponent = np.bitwise_and(raw.view(bits), mask)
    if exponent.size == 0 or exponent.max() != mask:
        return 0
    return int(np.count_nonzero(exponent == mask))


def _encode(plan: TensorPlan, raw: np.ndarray, dtype: str, row0: int = 0,
            imatrix: np.ndarray | None = None, use_ggml: bool = False) -> tuple[np.ndarray, int]:
    """One block of rows (starting at row `row0` of the tensor) in the planned type, and how many
    NaN/Inf values it held. A type the source already has is its stored bits; f16 and q8_0 go
    through ggml's C functions when `use_ggml` (the host build is there), numpy otherwise (the
    same bytes: tests/test_convert_quantize.py)."""
    bad = _nonfinite(raw, dtype)
    if plan.qtype.name == dtype:  # bf16 -> bf16, f16 -> f16, f32 -> f32: the stored bits
        return raw, bad
    values = bf16_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32, copy=False)
    if plan.qtype == QT.F32:
        return np.ascontiguousarray(values, dtype=np.float32), bad
    if bad:  # nothing to encode: the tensor is refused once the count is known
        return np.empty(0, np.uint8), bad
    rows = values.reshape(-1, plan.spec.shape[-1])
    if plan.qtype == QT.F16:
        out = ggmlq.quantize_rows(rows, QT.F16).view(np.float16) if use_ggml else values.astype(np.float16)
        if _nonfinite(out, "F16"):
            raise CheckpointError(f"{plan.spec.hf_name} has values beyond f16's range (max |x| = {np.abs(values).max():.3g})",
                                  "convert to bf16 or f32 instead")
        return out, bad
    if plan.qtype in _NUMPY_TYPES and not use_ggml:
        return gguf.quants.quantize(values, plan.qtype), bad
    if imatrix is None or len(plan.spec.shape) < 3:
        return ggmlq.quantize_rows(rows, plan.qtype, imatrix), bad
    # a 3-D tensor (attn_k_b, attn_v_b) has one importance vector per matrix, as llama.cpp's experts
    per, n = plan.spec.shape[-2], plan.spec.shape[-1]
    parts, r = [], 0
    while r < rows.shape[0]:
        which = (row0 + r) // per
        take = min(rows.shape[0] - r, (which + 1) * per - (row0 + r))
        parts.append(ggmlq.quantize_rows(rows[r : r + take], plan.qtype, imatrix[which * n : (which + 1) * n]))
        r += take
    return np.concatenate(parts), bad


def _bounded_map(pool: ThreadPoolExecutor, fn, items, window: int):
    """pool.map that keeps at most `window` results in flight (Executor.map submits everything)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks(sources: list[tuple[TensorPlan, object]], chunk_bytes: int):
    """Every block of rows of every tensor, in file order: (tensor index, first row, rows)."""
    for k, (_, ref) in enumerate(sources):
        row = 0
        for rows in ref.row_chunks(chunk_bytes):
            yield k, row, rows
            row += rows.shape[0] if rows.ndim > 1 else 1


class _TensorSink:
    """Writes the encoded blocks of one tensor after another at their aligned offsets, and checks
    each tensor when its last block is in: NaN/Inf refused, the planned size written."""

    def __init__(self, fout, writer: gguf.GGUFWriter, sources, advance) -> None:
        self.fout, self.writer, self.sources, self.advance = fout, writer, sources, advance
        self.k = -1

    def _start(self, k: int) -> None:
        self.k, self.written, self.read, self.bad = k, 0, 0, 0
        self.writer.write_padding(self.fout, self.fout.tell())

    def finish(self) -> None:
        if self.k < 0:
            return
        plan, ref = self.sources[self.k]
        ref.release()
        if self.bad:
            raise CheckpointError(f"{plan.spec.hf_name} holds {self.bad:,} NaN/Inf value(s)",
                                  "the checkpoint is corrupt or diverged in training; use an earlier save")
        if self.written != plan.nbytes:  # a bug, not a user error
            raise AssertionError(f"{plan.spec.gguf_name}: wrote {self.written} bytes, planned {plan.nbytes}")
        self.writer.write_padding(self.fout, self.written)

    def put(self, k: int, rows: np.ndarray, out: np.ndarray, n_bad: int) -> None:
        if k != self.k:
            self.finish()
            self._start(k)
        self.bad += n_bad
        if not self.bad:
            self.fout.write(out.reshape(-1).view(np.uint8).data)
        self.written += out.nbytes
        self.read += rows.nbytes
        self.sources[k][1].release(self.read)  # blocks come in order: everything before `read` is done
        self.advance(rows.nbytes)


class _KvBPart:
    """attn_k_b or attn_v_b of the latent layout, cut from the checkpoint's kv_b_proj on the fly
    (a re-layout of the stored values, exact for any dtype)."""

    def __init__(self, ref, sizes, index: int) -> None:
        self.ref, self.sizes, self.index, self.dtype = ref, sizes, index, ref.dtype

    def raw(self) -> np.ndarray:
        return split_kv_b(self.ref.raw(), self.sizes)[self.index]

    def row_chunks(self, max_bytes: int):
        return row_blocks(self.raw(), max_bytes)

    def release(self, upto: int | None = None) -> None:
        if self.index == 1 and upto is None:
            self.ref.release()


def _sources(ckpt: Checkpoint, kv_cache: str) -> list[tuple[TensorSpec, object]]:
    """Every tensor of the file, in order, with where its rows come from: the checkpoint's own
    tensors, or for the latent layout attn_k_b/attn_v_b cut from kv_b_proj."""
    if kv_cache != "latent":
        return [(spec, ckpt.tensor(spec)) for spec in ckpt.specs]
    c, sizes = ckpt.config, MlaSizes.from_config(ckpt.config)
    out = []
    for spec in ckpt.specs:
        ref = ckpt.tensor(spec)
        if spec.kind != gguf.MODEL_TENSOR.ATTN_KV_B:
            out.append((spec, ref))
            continue
        prefix = spec.gguf_name.removesuffix("attn_kv_b.weight")
        k_b = TensorSpec(spec.hf_name + "[k_b]", prefix + "attn_k_b.weight", gguf.MODEL_TENSOR.ATTN_K_B,
                         (c.n_head, c.kv_lora_rank, c.qk_nope_head_dim))
        v_b = TensorSpec(spec.hf_name + "[v_b]", prefix + "attn_v_b.weight", gguf.MODEL_TENSOR.ATTN_V_B,
                         (c.n_head, c.v_head_dim, c.kv_lora_rank))
        out += [(k_b, _KvBPart(ref, sizes, 0)), (v_b, _KvBPart(ref, sizes, 1))]
    return out


def write_gguf(ckpt: Checkpoint, vocab: Vocab, path: Path, outtype: str, *,
               progress: bool = False, model_name: str = "", kv_cache: str = "full",
               types: dict[str, QT] | None = None, imatrix: dict[str, np.ndarray] | None = None,
               threads: int | None = None, data: bool = True) -> list[TensorPlan]:
    """Write one GGUF, streaming block by block. A direct type (f32, f16, bf16, q8_0) plans its
    own tensor types; any other llama.cpp file type takes them from `types` (llama_tensor_types).
    gguf-py writes the header, metadata and tensor index; the tensor data is written here in
    blocks (gguf-py's write_tensor_data takes whole tensors only). With data=False only the
    header and index are written and the file is extended to its full size as a hole."""
    if outtype in DIRECT_TYPES:
        file_type, wanted = DIRECT_TYPES[outtype]
        sources = [(plan_tensor(spec, wanted), ref) for spec, ref in _sources(ckpt, kv_cache)]
    else:
        file_type = llama_file_types()[outtype]
        if types is None:
            raise AssertionError(f"{outtype}: the tensor types come from llama_tensor_types()")
        sources = [(TensorPlan(spec, types[spec.gguf_name]), ref) for spec, ref in _sources(ckpt, kv_cache)]
    plans = [p for p, _ in sources]
    writer = _GGUFWriter(path, "plm")
    add_model_metadata(writer, ckpt, model_name or ckpt.folder.name, file_type, kv_cache)
    vocab.add_to_gguf(writer)
    for p in plans:
        byte_shape = gguf.quant_shape_to_byte_shape(p.spec.shape, p.qtype)
        writer.add_tensor_info(p.spec.gguf_name, byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        if not data:
            pad = writer.data_alignment
            fout.truncate(writer.ggml_pad(fout.tell(), pad) + sum(writer.ggml_pad(p.nbytes, pad) for p in plans))
            return plans
        quantized = [p.qtype for p in plans if p.qtype not in _NUMPY_TYPES]
        use_ggml = bool(quantized) or ggmlq.available()
        for qtype in {p.qtype for p in plans} if use_ggml else ():
            ggmlq.prepare(qtype)
        n_threads = (threads or os.cpu_count() or 1) if quantized else min(threads or DIRECT_THREADS, DIRECT_THREADS)
        importances = [_imatrix_for(p, imatrix) if p.qtype not in _NUMPY_TYPES else None for p in plans]
        window = 2 * n_threads  # blocks in flight, across tensor boundaries: no thread idles at a tensor's end
        chunk_bytes = max(2**20, min(CHUNK_BYTES, IN_FLIGHT_BYTES // window))

        def encode(item):
            k, row0, rows = item
            return k, rows, _encode(plans[k], rows, sources[k][1].dtype, row0, importances[k], use_ggml)

        with ThreadPoolExecutor(n_threads) as pool, _progress(progress, ckpt.nbytes, f"writing {outtype}") as advance:
            sink = _TensorSink(fout, writer, sources, advance)
            for k, rows, (out, n_bad) in _bounded_map(pool, encode, _chunks(sources, chunk_bytes), window):
                sink.put(k, rows, out, n_bad)
            sink.finish()
    finally:
        writer.close()
    return plans


def _imatrix_for(plan: TensorPlan, imatrix: dict[str, np.ndarray] | None) -> np.ndarray | None:
    """A tensor's importances as llama_model_quantize takes them: absent is allowed (quantized
    without), a wrong size is an error except for token_embd."""
    if not imatrix or plan.spec.gguf_name not in imatrix:
        return None
    values = np.asarray(imatrix[plan.spec.gguf_name], dtype=np.float32).reshape(-1)
    shape = plan.spec.shape
    expected = shape[-1] * (shape[0] if len(shape) == 3 else 1)
    if values.size != expected:
        if plan.spec.gguf_name == "token_embd.weight":
            return None
        raise UsageError(f"the importance matrix has {values.size} values for {plan.spec.gguf_name}, "
                         f"which needs {expected}", "compute it again for this model")
    if not np.isfinite(values).all():
        raise UsageError(f"the importance matrix for {plan.spec.gguf_name} holds non-finite values",
                         "compute it again")
    return values


@contextlib.contextmanager
def _scratch():
    """A path this process and a child can both open, whose disk use is only what is written:
    an anonymous memfd on Linux (nothing on disk at all), else a file in the system temp folder."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("plm-gguf-skeleton")
        try:
            yield f"/proc/self/fd/{fd}", (fd,)
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="plm-gguf-") as folder:
        yield str(Path(folder) / "skeleton.gguf"), ()


def llama_tensor_types(ckpt: Checkpoint, vocab: Vocab, outtype: str, *, model_name: str = "",
                       kv_cache: str = "full", imatrix: dict[str, np.ndarray] | None = None) -> dict[str, QT]:
    """llama.cpp's per-tensor types for file type `outtype`: llama_model_quantize (in the worker)
    runs as a dry run on a skeleton of the lossless file, which has every name, shape and key but
    no data (a hole), so its rules (per-layer choices, token_embd and attn_v rules, fallbacks for
    rows that do not fit a block) are applied by llama.cpp itself."""
    lossless = {"BF16": "bf16", "F16": "f16"}.get(ckpt.source_dtype, "f32")
    ftype = int(llama_file_types()[outtype])
    with _scratch() as (path, fds), tempfile.TemporaryDirectory(prefix="plm-gguf-") as folder:
        write_gguf(ckpt, vocab, Path(path), lossless, model_name=model_name, kv_cache=kv_cache, data=False)
        out = Path(folder) / "types.json"
        args = ["quantize", path, str(Path(folder) / "unused.gguf"), str(ftype), "--types-out", str(out)]
        if imatrix:  # llama.cpp's rules for some types depend on whether there is one
            np.savez(Path(folder) / "imatrix.npz", **{k: np.asarray(v, np.float32) for k, v in imatrix.items()})
            args += ["--imatrix", str(Path(folder) / "imatrix.npz")]
        run_worker(args, pass_fds=fds)
        found = json.loads(out.read_text())
    names = [spec.gguf_name for spec, _ in _sources(ckpt, kv_cache)]
    missing = [n for n in names if n not in found]
    if missing:  # the dry run's log format changed: a bug to report, not a user error
        raise AssertionError(f"llama.cpp's dry run named no type for {missing[:3]} ({len(missing)} tensors)")
    return {n: QT[found[n].upper()] for n in names}


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        yield lambda n: None
        return

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
