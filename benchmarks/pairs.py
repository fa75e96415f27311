"""The jobs compared: plm-gguf (A) against the tool a user would pick instead (B).

Each job runs in its own empty folder under work/out/, so the disk watch sees only its files.
Runs alternate A, B, A, B, ...; every run starts with a dropped page cache (or none does).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.measure import Sample, measure, run_command
from benchmarks.toolchain import WORK, Toolchain

THREADS = 2
CTX = 512
PY = sys.executable


@dataclass
class Job:
    name: str
    steps: list[list[str]]
    out: Path  # the job's own folder, emptied before each run
    product: str | None = None  # the file a run must leave behind (name inside `out`)
    inspect: Callable[[Path], str] | None = None  # a note about the last run's product


@dataclass
class Pair:
    key: str
    title: str
    a: Job
    b: Job | None = None
    repeat: int = 3
    keep: dict[str, Path] = field(default_factory=dict)  # job name -> where its last product goes
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    listings: dict[str, list[list[str]]] = field(default_factory=dict)  # files left after each run
    notes: list[str] = field(default_factory=list)

    def jobs(self) -> list[Job]:
        return [self.a] + ([self.b] if self.b else [])


def run_pair(pair: Pair, logs: Path, *, drop: bool, on_sample: Callable[[Pair, Job, int, Sample], None]) -> None:
    for i in range(pair.repeat):
        for job in pair.jobs():
            _empty(job.out)
            sample = measure(job.steps, logs / f"{pair.key}--{_slug(job.name)}.log", watch=job.out, drop=drop)
            left = sorted(p.name for p in job.out.iterdir())
            if job.product and job.product not in left:
                raise RuntimeError(f"{pair.key}: {job.name} left {left}, not {job.product}")
            pair.samples.setdefault(job.name, []).append(sample)
            pair.listings.setdefault(job.name, []).append(left)
            on_sample(pair, job, i, sample)
            if i == pair.repeat - 1 and job.inspect:
                pair.notes.append(job.inspect(job.out / job.product))
            if i == pair.repeat - 1 and job.name in pair.keep:
                pair.keep[job.name].parent.mkdir(parents=True, exist_ok=True)
                shutil.move(job.out / job.product, pair.keep[job.name])
            _empty(job.out)


def _empty(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def plm_convert(replica: Path, outtype: str, out: Path) -> Job:
    product = f"plm-{outtype.upper()}.gguf"
    cmd = [PY, "-m", "plm_gguf.cli", "convert", str(replica), "--outtype", outtype, "--outfile", str(out / product)]
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        cmd += ["--threads", str(THREADS)]
    return Job("plm-gguf", [cmd], out, product)


def hf_convert(tools: Toolchain, replica: Path, outtype: str, out: Path, product: str | None = None) -> list[str]:
    product = product or f"hf-{outtype.upper()}.gguf"
    return [str(tools.python), str(tools.convert_script), str(replica), "--outtype", outtype,
            "--outfile", str(out / product)]


def convert_pairs(tools: Toolchain, replica: Path, repeat: int, keep_base: Path) -> list[Pair]:
    out = WORK / "out"
    pairs = [Pair("copy", "`cp` of the input safetensors (the floor)",
                  Job("cp", [["cp", str(replica / "model.safetensors"), str(out / "copy" / "model.safetensors")]],
                      out / "copy", "model.safetensors"), repeat=repeat)]
    for t in ("bf16", "f16", "q8_0"):
        a = plm_convert(replica, t, out / f"{t}-plm")
        b = Job("convert_hf_to_gguf.py", [hf_convert(tools, replica, t, out / f"{t}-hf")], out / f"{t}-hf",
                f"hf-{t.upper()}.gguf")
        pair = Pair(f"convert-{t}", f"convert to {t}", a, b, repeat)
        if t == "bf16":
            if not keep_base.exists():  # the evaluation's base, made once (its reference passes are cached)
                pair.keep = {"plm-gguf": keep_base}
            b.inspect = _pre_tokenizer_note
        pairs.append(pair)
    return pairs


def q4_pair(tools: Toolchain, replica: Path, repeat: int, keep_quant: Path) -> Pair:
    out = WORK / "out"
    a = plm_convert(replica, "q4_k_m", out / "q4-plm")
    b_out = out / "q4-hf"
    # the source is bf16, so the lossless intermediate is bf16, as plm-gguf's own
    b = Job("convert_hf_to_gguf.py + llama-quantize",
            [hf_convert(tools, replica, "bf16", b_out),
             [str(tools.quantize), str(b_out / "hf-BF16.gguf"), str(b_out / "hf-Q4_K_M.gguf"), "Q4_K_M", str(THREADS)]],
            b_out, "hf-Q4_K_M.gguf")
    return Pair("q4_k_m", "convert to q4_k_m (plm-gguf: one command; llama.cpp: convert to bf16, then llama-quantize)",
                a, b, repeat, keep={"plm-gguf": keep_quant})


def gguf_string(path: Path, key: str) -> str | None:
    """One string value from a GGUF's metadata, read without gguf-py (whose reader builds an
    object per vocabulary entry and takes seconds on a 151k-token vocabulary)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as fh:
        magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", fh.read(24))
        if magic != b"GGUF":
            return None

        def string() -> bytes:
            (n,) = struct.unpack("<Q", fh.read(8))
            return fh.read(n)

        def skip(vtype: int) -> None:
            if vtype == 8:
                string()
            elif vtype == 9:
                item, count = struct.unpack("<IQ", fh.read(12))
                if item == 8:
                    for _ in range(count):
                        (n,) = struct.unpack("<Q", fh.read(8))
                        fh.seek(n, 1)
                else:
                    fh.seek(sizes[item] * count, 1)
            else:
                fh.seek(sizes[vtype], 1)

        for _ in range(n_kv):
            name = string().decode()
            (vtype,) = struct.unpack("<I", fh.read(4))
            if name == key and vtype == 8:
                return string().decode()
            skip(vtype)
    return None


def _pre_tokenizer_note(product: Path) -> str:
    pre = gguf_string(product, "tokenizer.ggml.pre")
    return (f"convert_hf_to_gguf.py's vocab step recognised the replica's tokenizer: tokenizer.ggml.pre = {pre!r} "
            "(its pre-tokenizer hash is the one listed for Qwen1.5); no workaround was needed")


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalFiles:
    folder: Path
    base: Path  # the unquantized GGUF (plm-gguf's bf16)
    quant: Path  # the file evaluated (plm-gguf's q4_k_m)
    corpus: Path

    @property
    def tokens(self) -> Path:
        return self.folder / "tokens.json"

    @property
    def plm_reference(self) -> Path:
        return self.folder / "plm-reference-logprobs.npy"

    @property
    def kld_base(self) -> Path:
        return self.folder / "llama-perplexity-base.kld"


def corpus_path() -> Path:
    return Path(str(resources.files("plm_gguf.quant_eval").joinpath("corpus/default.txt")))


def plm_score(files: EvalFiles, model: Path, mode: str, out: Path) -> list[str]:
    return [PY, "-m", "plm_gguf.llama.worker", "score", str(model), "--tokens", str(files.tokens), "--ctx", str(CTX),
            "--reference", str(files.plm_reference), "--mode", mode, "--out", str(out / "score.json"),
            "--threads", str(THREADS)]


def perplexity_cmd(tools: Toolchain, files: EvalFiles, model: Path, mode: str) -> list[str]:
    cmd = [str(tools.perplexity), "-m", str(model), "-c", str(CTX), "-fa", "off", "-t", str(THREADS)]
    if mode == "reference":
        return cmd + ["-f", str(files.corpus), "--kl-divergence-base", str(files.kld_base)]
    return cmd + ["--kl-divergence-base", str(files.kld_base), "--kl-divergence"]


def tokenize_cmd(files: EvalFiles) -> list[str]:
    return [PY, "-m", "plm_gguf.llama.worker", "tokenize", str(files.base), "--texts", str(files.folder / "text.json"),
            "--out", str(files.tokens)]


def prepare_tokens(files: EvalFiles, logs: Path) -> None:
    """llama.cpp's tokenization of the corpus, as plm-gguf's sweep makes it (not timed)."""
    (files.folder / "text.json").write_text(json.dumps([files.corpus.read_text(encoding="utf-8")]))
    run_command(tokenize_cmd(files), logs / "eval-tokenize.log")  # (wall, rss, cpu) not needed
    files.tokens.write_text(json.dumps(json.loads(files.tokens.read_text())[0]))


def reference_pair(tools: Toolchain, files: EvalFiles) -> Pair:
    """Each tool's reference pass on the unquantized file: timed once, reported apart."""
    out = WORK / "out"
    a = Job("plm-gguf", [plm_score(files, files.base, "reference", out / "ref-plm")], out / "ref-plm", "score.json")
    b = Job("llama-perplexity", [perplexity_cmd(tools, files, files.base, "reference")], out / "ref-lp")
    return Pair("eval-reference", "evaluation: reference pass on the bf16 file (once, not in the ratio)", a, b, 1,
                keep={"plm-gguf": files.folder / "plm-reference-score.json"})


def reference_key(files: EvalFiles) -> dict:
    """What the reference passes depend on: the base file, the text, the context."""
    st = files.base.stat()
    return {"base": files.base.name, "base_size": st.st_size, "base_mtime_ns": st.st_mtime_ns,
            "corpus_sha256": hashlib.sha256(files.corpus.read_bytes()).hexdigest(), "ctx": CTX, "threads": THREADS}


def cached_reference(files: EvalFiles) -> dict | None:
    """The reference passes' record if they were made for this very base, text and context."""
    path = files.folder / "reference.json"
    needed = [files.tokens, files.plm_reference, files.kld_base, files.folder / "plm-reference-score.json",
              files.folder / "llama-perplexity-reference.log"]
    if not path.exists() or not all(p.exists() for p in needed):
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == reference_key(files) else None


def eval_pair(tools: Toolchain, files: EvalFiles, repeat: int) -> Pair:
    out = WORK / "out"
    a = Job("plm-gguf", [plm_score(files, files.quant, "compare", out / "eval-plm")], out / "eval-plm", "score.json")
    b = Job("llama-perplexity --kl-divergence", [perplexity_cmd(tools, files, files.quant, "compare")], out / "eval-lp")
    return Pair("eval", "evaluation of the q4_k_m file: KL etc. against the bf16 file", a, b, repeat,
                keep={"plm-gguf": files.folder / "plm-score.json"})


def kld_tokens(path: Path) -> tuple[int, int, list[int]]:
    """n_ctx, n_chunk and the evaluated tokens stored in a --kl-divergence-base file."""
    with open(path, "rb") as fh:
        head = fh.read(8 + 4 + 4 + 4)
        magic, n_ctx, _n_vocab, n_chunk = head[:8], *struct.unpack("<Iii", head[8:])
        if magic != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity log-probability file")
        tokens = np.fromfile(fh, dtype=np.int32, count=n_ctx * n_chunk)
    return n_ctx, n_chunk, tokens.tolist()


def parse_perplexity_log(text: str) -> dict:
    """The numbers of llama-perplexity's --kl-divergence summary."""
    def num(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m[1]) if m else None

    out = {"kl_mean": num(r"Mean\s+KLD:\s+([-\d.eE+]+)"), "kl_median": num(r"Median\s+KLD:\s+([-\d.eE+]+)"),
           "kl_p99": num(r"99\.0%\s+KLD:\s+([-\d.eE+]+)"), "kl_max": num(r"Maximum KLD:\s+([-\d.eE+]+)"),
           "top1_percent": num(r"Same top p:\s+([-\d.eE+]+)"), "ppl": num(r"Mean PPL\(Q\)\s+:\s+([-\d.eE+]+)"),
           "ppl_base": num(r"Mean PPL\(base\)\s+:\s+([-\d.eE+]+)"),
           "seconds_per_pass": num(r"([\d.]+) seconds per pass")}
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", text)
    if m:
        out.update(n_chunks=int(m[1]), n_ctx=int(m[2]), batch_size=int(m[3]), n_seq=int(m[4]))
        out["passes"] = -(-out["n_chunks"] // out["n_seq"])
    m = re.search(r"n_threads = (\d+) \(n_threads_batch = (\d+)\)", text)
    if m:
        out.update(n_threads=int(m[1]), n_threads_batch=int(m[2]))
    return out
