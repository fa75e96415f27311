"""Checkpoint -> GGUF in one streaming pass.

f32, f16, bf16 and q8_0 are written directly, tensor by tensor (bf16 from a bf16 source is a
byte copy). Every other llama.cpp file type goes through a lossless temporary GGUF beside the
target that llama.cpp's own quantizer (in a child process) turns into the requested type; the
temporary file is removed whatever happens. The target appears only by a rename at the end:
on any failure, Ctrl-C included, no partial file is left behind.
"""

from __future__ import annotations

import collections
import contextlib
import os
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
from plm_gguf.convert.mla import MlaSizes, mla_metadata, split_kv_b
from plm_gguf.convert.quantize import quantize_file
from plm_gguf.errors import CheckpointError, UsageError
from plm_gguf.ggufinfo import read_gguf_info
from plm_gguf.memory import KVLayout, parse_layout
from plm_gguf.outputs import check_target, claimed, partial_path
from plm_gguf.qtypes import DIRECT_TYPES, NEEDS_IMATRIX, bf16_to_f32, parse_outtype
from plm_gguf.schema import TensorSpec, parameter_count, size_label
from plm_gguf.vocab import Vocab, load_vocab


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
) -> ConvertResult:
    """Convert a PLM checkpoint (folder or Hugging Face repo id) to GGUF. Everything is checked
    (config, tensor names and shapes, dtypes, tokenizer, output path) before a byte is written."""
    outtype = parse_outtype(outtype)  # fail fast on a typo, before any download
    kv_cache = parse_layout(kv_cache)  # a KVLayout from the CLI; a str from a Python caller is checked here
    if outtype in NEEDS_IMATRIX:
        raise UsageError(f"{outtype} needs an importance matrix, which convert does not compute",
                         "use `plm-gguf quantize MODEL --type " + outtype + "`, which computes one")
    folder = resolve_model(model)
    ckpt = Checkpoint(folder)
    vocab = load_vocab(folder, ckpt.config.vocab_size, pre_tokenizer)
    outtype = parse_outtype(outtype, ckpt.source_dtype)
    target = Path(outfile) if outfile else default_outfile(folder, str(model), outtype)
    check_target(target, force, inputs=ckpt.input_files())

    start = time.perf_counter()
    with claimed(target), partial_path(target, ".partial") as tmp:
        check_target(target, force, inputs=ckpt.input_files())  # again, now that the target is ours
        if outtype in DIRECT_TYPES:
            plans = write_gguf(ckpt, vocab, tmp, outtype, progress=progress, model_name=str(model), kv_cache=kv_cache)
        else:
            lossless = {"BF16": "bf16", "F16": "f16"}.get(ckpt.source_dtype, "f32")
            with partial_path(target, ".src.partial") as src:
                write_gguf(ckpt, vocab, src, lossless, progress=progress, model_name=str(model), kv_cache=kv_cache)
                quantize_file(src, tmp, outtype, threads=threads, progress=progress)
            plans = None
        os.replace(tmp, target)
    seconds = time.perf_counter() - start
    return summarize(target, outtype, seconds, ckpt.nbytes, plans, vocab)


def summarize(target: Path, outtype: str, seconds: float, source_bytes: int,
              plans: list[TensorPlan] | None, vocab: Vocab | None = None) -> ConvertResult:
    """What was written, read back from the file itself."""
    tensors = read_gguf_info(target).tensors.values()
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    result = ConvertResult(target, outtype, target.stat().st_size, seconds, source_bytes, counts)
    if plans is not None:
        result.fallbacks = [(p.spec.gguf_name, p.fallback_from.name, p.qtype.name) for p in plans if p.fallback_from]
    else:  # llama.cpp chose per-tensor types; report matrices whose rows its block size did not fit
        main = _main_tensor_type(outtype)
        if main is not None:
            block = gguf.GGML_QUANT_SIZES[main][0]
            result.fallbacks = [(t.name, main.name, t.qtype.name) for t in tensors
                                if len(t.shape) > 1 and t.shape[-1] % block]
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


# Tensors are converted in blocks of rows of about this many source bytes, on CONVERT_THREADS
# threads (numpy releases the GIL), with at most IN_FLIGHT blocks held at once: peak memory is
# a few blocks, not one tensor (PLM-1.8B's embedding alone is 622 MB in bf16, 1.2 GB in f32).
CHUNK_BYTES = 16 * 2**20
CONVERT_THREADS = min(4, os.cpu_count() or 1)
IN_FLIGHT = 2 * CONVERT_THREADS


def _encode(plan: TensorPlan, raw: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """One block of rows in the planned type, and how many NaN/Inf values it held.
    bf16 -> bf16 is the stored bits themselves."""
    if plan.qtype == QT.BF16 and dtype == "BF16":
        bad = int(((raw & 0x7F80) == 0x7F80).sum())  # exponent all ones: Inf or NaN
        return raw, bad
    values = bf16_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32, copy=False)
    bad = int(values.size - np.isfinite(values).sum())
    if plan.qtype == QT.F32:
        return np.ascontiguousarray(values, dtype=np.float32), bad
    if plan.qtype == QT.F16:
        out = values.astype(np.float16)
        if not bad and not np.isfinite(out).all():
            raise CheckpointError(f"{plan.spec.hf_name} has values beyond f16's range (max |x| = {np.abs(values).max():.3g})",
                                  "convert to bf16 or f32 instead")
        return out, bad
    return gguf.quants.quantize(values, plan.qtype), bad


def _bounded_map(pool: ThreadPoolExecutor, fn, items, window: int):
    """pool.map that keeps at most `window` results in flight (Executor.map submits everything)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_tensor(fout, writer: gguf.GGUFWriter, pool: ThreadPoolExecutor, plan: TensorPlan, ref, advance) -> None:
    """Stream one tensor's bytes into the file at the next aligned offset."""
    writer.write_padding(fout, fout.tell())
    written = read = bad = 0
    for chunk, (out, n_bad) in _bounded_map(pool, lambda rows: (rows, _encode(plan, rows, ref.dtype)),
                                             ref.row_chunks(CHUNK_BYTES), IN_FLIGHT):
        bad += n_bad
        if not bad:
            fout.write(out.reshape(-1).view(np.uint8).data)
        written += out.nbytes
        read += chunk.nbytes
        ref.release(read)  # blocks are written in order: everything before `read` is done
        advance(chunk.nbytes)
    ref.release()
    if bad:
        raise CheckpointError(f"{plan.spec.hf_name} holds {bad:,} NaN/Inf value(s)",
                              "the checkpoint is corrupt or diverged in training; use an earlier save")
    if written != plan.nbytes:  # a bug, not a user error
        raise AssertionError(f"{plan.spec.gguf_name}: wrote {written} bytes, planned {plan.nbytes}")
    writer.write_padding(fout, written)


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


def _latent_plans(ckpt: Checkpoint, wanted: QT) -> list[tuple[TensorPlan, object]]:
    c, sizes = ckpt.config, MlaSizes.from_config(ckpt.config)
    out = []
    for spec in ckpt.specs:
        ref = ckpt.tensor(spec)
        if spec.kind != gguf.MODEL_TENSOR.ATTN_KV_B:
            out.append((plan_tensor(spec, wanted), ref))
            continue
        prefix = spec.gguf_name.removesuffix("attn_kv_b.weight")
        k_b = TensorSpec(spec.hf_name + "[k_b]", prefix + "attn_k_b.weight", gguf.MODEL_TENSOR.ATTN_K_B,
                         (c.n_head, c.kv_lora_rank, c.qk_nope_head_dim))
        v_b = TensorSpec(spec.hf_name + "[v_b]", prefix + "attn_v_b.weight", gguf.MODEL_TENSOR.ATTN_V_B,
                         (c.n_head, c.v_head_dim, c.kv_lora_rank))
        out += [(plan_tensor(k_b, wanted), _KvBPart(ref, sizes, 0)), (plan_tensor(v_b, wanted), _KvBPart(ref, sizes, 1))]
    return out


def write_gguf(ckpt: Checkpoint, vocab: Vocab, path: Path, outtype: str, *,
               progress: bool = False, model_name: str = "", kv_cache: str = "full") -> list[TensorPlan]:
    """Write one GGUF of a direct type, streaming block by block. gguf-py writes the header,
    metadata and tensor index; the tensor data is written here in blocks (gguf-py's
    write_tensor_data takes whole tensors only)."""
    file_type, wanted = DIRECT_TYPES[outtype]
    if kv_cache == "latent":
        sources = _latent_plans(ckpt, wanted)
    else:
        sources = [(plan_tensor(spec, wanted), ckpt.tensor(spec)) for spec in ckpt.specs]
    plans = [p for p, _ in sources]
    writer = gguf.GGUFWriter(path, "plm")
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
        with ThreadPoolExecutor(CONVERT_THREADS) as pool, _progress(progress, ckpt.nbytes, f"writing {outtype}") as advance:
            for p, ref in sources:
                _write_tensor(fout, writer, pool, p, ref, advance)
    finally:
        writer.close()
    return plans


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
