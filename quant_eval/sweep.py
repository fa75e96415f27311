"""The quantization sweep: many recipes measured side by side against the unquantized model.

    base GGUF (lossless, verified against the torch reference when the source is a checkpoint)
      -> evaluation tokens (llama.cpp's tokenizer) -> reference log-probs, once, on disk
      -> importance matrix (torch reference), if any recipe uses one
      -> per recipe: quantize, score (KL, top-1, perplexity, speed, memory), save the row

Every row is written to report.json as soon as it is measured, so an interrupted sweep picks
up where it stopped; a recipe that fails is recorded with its reason and the sweep goes on.

The folder is keyed by what made it (sweep-key.json): the model (its files' path, size and
modification time, and the KV-cache layout), the text (sha256), ctx and the importance matrix's
token count. A rerun with other inputs is refused, so no measurement is lost by mistake; with
`replace` (--force) it removes what the old inputs made and measures again. Either way one report
never mixes inputs, and a row is reused only for the same recipe definition (its key). Every file
the sweep writes or removes is named through `inside`, which refuses a path that leaves the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np

from plm_gguf.checkpoint import Checkpoint
from plm_gguf.convert.mla import rewrite_to_latent
from plm_gguf.convert.quantize import quantize_file
from plm_gguf.convert.verify import peak_rss, verify
from plm_gguf.convert.writer import convert
from plm_gguf.errors import LlamaCppError, OutputError, UsageError
from plm_gguf.ggufinfo import read_gguf_info, read_plm_gguf
from plm_gguf.llama.runtime import run_worker
from plm_gguf.memory import KVLayout, MemoryTarget, ModelShape, kv_cache_bytes, layout_of, parse_layout
from plm_gguf.options import check_threads
from plm_gguf.outputs import claimed, partial_path
from plm_gguf.quant_eval import auto as search
from plm_gguf.quant_eval import report as rep
from plm_gguf.quant_eval.imatrix import compute_imatrix
from plm_gguf.quant_eval.recipes import Recipe, check_name, check_unique
from plm_gguf.quant_eval.scoring import MIN_CTX, scored_range
from plm_gguf.reference import GgufWeights
from plm_gguf.schema import PLMConfig, config_from_gguf

REPORT_VERSION = 1
KEY_FILE, KEY_VERSION = "sweep-key.json", 1
_UNQUANTIZED = {gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16}
_INPUTS = ("model", "text", "ctx", "imatrix_tokens")  # the key's parts besides the recipes
INPUT_NAMES = {"model": "model", "text": "text", "ctx": "--ctx", "imatrix_tokens": "importance-matrix length"}
# The files the sweep caches at the top of its folder, and the parts of the key each is made
# from. A changed model also removes the base GGUF (*.gguf); any change, models/*.
_MADE_FROM = {
    "tokens.json": ("model", "text"),
    "reference-logprobs.npy": ("model", "text", "ctx"),
    "imatrix.npz": _INPUTS,
    "report.json": _INPUTS,
    "report.csv": _INPUTS,
    "pareto.png": _INPUTS,
    "auto-model.json": _INPUTS,
    "auto-recipes.toml": _INPUTS,
}


def default_corpus() -> str:
    return resources.files("plm_gguf.quant_eval").joinpath("corpus/default.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class AutoOptions:
    """The recipe search (quantize --auto): mixes chosen from measured sensitivities."""

    at_stock: bool = False  # a mix at the size of each stock type the sweep measured (--sweep --auto)
    budget: bool = False  # a mix for the memory budget (--budget-mb, or the device's plan)
    name: str = ""  # the budget mix's recipe name (default auto-<budget>mb)


@dataclass
class SweepOptions:
    out: Path
    recipes: list[Recipe]
    text: str
    text_source: str
    ctx: int = 512
    threads: int = os.cpu_count() or 1
    imatrix_tokens: int = 4096
    budget_mib: float | None = None
    budget_source: str = ""
    kv_cache: KVLayout | None = None  # the layout to quantize; None: the source's (a checkpoint: full)
    replace: bool = False  # replace results in `out` made from other inputs (--force); else refuse
    # a device (quantize --device): the recommendation is deploy's memory plan there, at its ctx
    target: MemoryTarget | None = None
    # speed measured there (a GPU profile): file -> (prompt tok/s, generation tok/s); None: this CPU
    speed: Callable[[Path], tuple[float, float]] | None = None
    speed_on: str = ""  # where `speed` measures, for the report ("" with speed None: this machine's CPU)
    auto: AutoOptions | None = None  # also search for mixes (quant_eval/auto.py)

    def __post_init__(self) -> None:
        self.kv_cache = parse_layout(self.kv_cache)  # (a str from a Python caller)


@dataclass(frozen=True)
class Source:
    """What a sweep starts from, checked before anything is written."""

    path: Path  # the unquantized PLM GGUF, or the checkpoint folder
    is_gguf: bool
    context_length: int
    identity: dict  # the resolved path, and each file's name, size and modification time


@dataclass
class Sweep:
    """The state of one sweep folder; `rows` is the report's table."""

    options: SweepOptions
    base: Path
    config: PLMConfig
    report: dict = field(default_factory=dict)
    on_event: Callable[[str, dict], None] = lambda kind, data: None
    tensor_names: list[str] = field(default_factory=list)  # the base file's, for the recipes' overrides

    @property
    def out(self) -> Path:
        return self.options.out

    def path(self, *parts: str) -> Path:
        return inside(self.out, *parts)

    def save(self) -> None:
        write_atomic(self.path("report.json"), json.dumps(self.report, indent=1))


def inside(out: Path, *parts: str) -> Path:
    """OUT/PARTS, refused unless it resolves inside OUT (a name with '..', a symbolic link
    pointing elsewhere): every file the sweep writes or removes is named through here."""
    path = out.joinpath(*parts)
    if not path.resolve().is_relative_to(out.resolve()):
        raise OutputError(f"{path} resolves to {path.resolve()}, outside the sweep folder {out}",
                          "the sweep writes only inside --out; remove the symbolic link, or rename the recipe")
    return path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A hidden path beside PATH (with its suffix) to write; renamed over PATH when the block
    ends, removed if it fails: PATH is whole, new or old, never half-written."""
    with partial_path(path, suffix=f".partial{path.suffix}") as tmp:  # keeps .npy: np.save would add it
        yield tmp
        os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_layout(path: Path, kv_cache: KVLayout | None) -> None:
    """Refuse to turn a latent-layout file back into the full one (that needs its checkpoint)."""
    if kv_cache is KVLayout.FULL and layout_of(path) is KVLayout.LATENT:
        raise UsageError(f"{path.name} has the latent KV-cache layout; --kv-cache full needs the stock one",
                         "leave out --kv-cache (quantize the file as it is), or start from the checkpoint")


def gguf_in_layout(path: Path, kv_cache: KVLayout | None, dest: Path) -> Path:
    """PATH itself, or PATH rewritten into the latent layout at DEST (kv_cache latent for a
    stock-layout file); a latent file cannot go back to full without its checkpoint."""
    check_layout(path, kv_cache)
    if kv_cache is KVLayout.LATENT and layout_of(path) is KVLayout.FULL:
        if not dest.exists():
            rewrite_to_latent(path, dest)
        return dest
    return path


def open_source(source: str, kv_cache: KVLayout | None) -> Source:
    """SOURCE as a sweep's starting point: an unquantized PLM GGUF or a checkpoint, checked
    (and a repo id downloaded) before anything is written."""
    path = Path(source).expanduser()
    if path.is_file():
        file_type = _file_type(path)
        if file_type not in {t.name for t in _UNQUANTIZED}:
            raise UsageError(f"{path.name} is already quantized ({file_type})",
                             "sweep from the checkpoint or from its f32/bf16/f16 GGUF")
        check_layout(path, kv_cache)
        context_length = config_from_gguf(path).max_position_embeddings  # every key checked
        return Source(path, True, context_length, _identity(path, [path]))

    ckpt = Checkpoint.open(source)
    files = sorted({*ckpt.files, *(p for p in ckpt.folder.iterdir() if p.is_file())})
    return Source(ckpt.folder, False, ckpt.config.max_position_embeddings, _identity(ckpt.folder, files))


def _file_type(path: Path) -> str:
    """The llama.cpp file type a PLM GGUF's header names."""
    value = read_plm_gguf(path).get("general.file_type", int(gguf.LlamaFileType.GUESSED))
    return gguf.LlamaFileType(value).name if value in {int(t) for t in gguf.LlamaFileType} else str(value)


def _identity(path: Path, files: list[Path]) -> dict:
    """What changes when the model does: the resolved path, each file's size and modification time."""
    stats = [(f, f.stat()) for f in files]
    return {"path": str(path.resolve()), "files": [[f.name, st.st_size, st.st_mtime_ns] for f, st in stats]}


def check_options(options: SweepOptions, source: Source) -> None:
    """Refuse options no sweep can run with, before anything is written."""
    if not options.recipes and not options.auto:
        raise UsageError("no recipes to sweep", "give --types, --recipes, or neither for the default set")
    for recipe in options.recipes:
        check_name(recipe.name, "the sweep")
    check_unique([r.name for r in options.recipes], "the sweep")
    if not MIN_CTX <= options.ctx <= source.context_length:
        raise UsageError(f"--ctx {options.ctx} is out of range: it must be from {MIN_CTX} (what scoring needs) "
                         f"to {source.context_length} (the model's context length)",
                         "--ctx is the evaluation chunk length in tokens; 512 suits most models")
    check_threads(options.threads)
    if options.imatrix_tokens < 1:
        raise UsageError(f"imatrix_tokens {options.imatrix_tokens} is not a positive token count",
                         "the importance matrix is computed from the first imatrix_tokens tokens of the text")
    budget = options.budget_mib
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UsageError(f"--budget-mb {budget:g} is not a positive amount of memory",
                         "give MiB, e.g. --budget-mb 3072")
    n_bytes = len(options.text.encode("utf-8"))
    if n_bytes < options.ctx:  # a token is at least one byte
        raise UsageError(f"the evaluation text ({options.text_source}) is {n_bytes} bytes: fewer than the "
                         f"{options.ctx} tokens one --ctx {options.ctx} chunk needs",
                         _short_text_hint(options.ctx, n_bytes))


def _short_text_hint(ctx: int, most: int) -> str:
    if most >= MIN_CTX:
        return f"give a longer --text, or a --ctx from {MIN_CTX} to {most}"
    return f"give a longer --text: at least {ctx} tokens (a few times that gives steadier numbers)"


def sweep_key(source: Source, options: SweepOptions) -> dict:
    """What the sweep's results are made from (sweep-key.json); text_name only names the text."""
    return {"version": KEY_VERSION, "model": {**source.identity, "kv_cache": options.kv_cache},
            "text": hashlib.sha256(options.text.encode("utf-8")).hexdigest(), "text_name": options.text_source,
            "ctx": options.ctx, "imatrix_tokens": options.imatrix_tokens,
            "recipes": {r.name: r.key for r in options.recipes}}


def read_key(out: Path) -> dict | None:
    """OUT's sweep key: None if it has none, {} if it is unreadable or from another version."""
    try:
        old = json.loads(inside(out, KEY_FILE).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return old if isinstance(old, dict) and old.get("version") == KEY_VERSION else {}


def check_folder(out: Path, key: dict, replace: bool) -> list[str]:
    """Refuse an --out that is a file, a folder of other things, or (unless REPLACE) the folder
    of a sweep of other inputs. Returns the parts of the key that differ from the folder's."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder",
                          "give --out a new folder, or the --out of an earlier sweep")
    if not out.is_dir():
        return []
    old = read_key(out)
    if old is None:
        lock = f".{KEY_FILE}.lock"  # another sweep's, starting there now
        if any(p.name != lock for p in out.iterdir()):
            raise OutputError(f"--out {out} holds other files and is not a sweep folder (it has no {KEY_FILE})",
                              "give --out a new or empty folder (remove a sweep folder made before sweep-key.json)")
        return []
    changed = [part for part in _INPUTS if old.get(part) != key[part]]
    if changed and not replace:
        raise OutputError(f"--out {out} holds the results of {_difference(old, key, changed)}",
                          "pass --force to replace them, or give another --out to keep them")
    return changed


def _difference(old: dict, key: dict, changed: list[str]) -> str:
    """How the folder's inputs differ from this run's, in words."""
    if not old:
        return f"a sweep whose {KEY_FILE} is unreadable or from another plm-gguf version"
    words = []
    for part in changed:
        then, now = _shown(old, part), _shown(key, part)
        words.append(f"another {INPUT_NAMES[part]} ({then}, not {now})" if then != now else
                     f"another {INPUT_NAMES[part]} ({now} has changed since)")
    return ", ".join(words)


def _shown(key: dict, part: str) -> str:
    """A key's part as a person knows it: the model's path, the text's name, a number."""
    value = key.get("text_name") if part == "text" else key.get(part)
    if part == "model" and isinstance(value, dict):
        return str(value.get("path")) + (f", --kv-cache {value['kv_cache']}" if value.get("kv_cache") else "")
    return str(value)


def claim_folder(out: Path, key: dict, source: Source, replace: bool) -> list[str]:
    """Make OUT the folder of the sweep KEY describes: check it again (now that it is locked),
    remove what other inputs made (never the source itself), write the key. Returns the parts
    of the key that changed."""
    changed = check_folder(out, key, replace)
    old = read_key(out) or {}
    stale = [name for name, parts in _MADE_FROM.items() if set(parts) & set(changed)]
    if "model" in changed:
        stale += [p.name for p in out.glob("*.gguf")]
    if changed:
        stale += [f"models/{p.name}" for p in out.glob("models/*.gguf")]
    keep = {source.path.resolve()} if source.is_gguf else set()
    for name in stale:
        path = inside(out, name)
        if path.resolve() not in keep:
            path.unlink(missing_ok=True)
    inside(out, "models").mkdir(exist_ok=True)
    kept = old.get("recipes") if not changed and isinstance(old.get("recipes"), dict) else {}
    write_atomic(inside(out, KEY_FILE), json.dumps(key | {"recipes": kept | key["recipes"]}, indent=1))
    return changed


def prepare_base(source: Source, out: Path, threads: int, kv_cache: KVLayout | None = None) -> tuple[Path, dict]:
    """The unquantized GGUF to quantize from and compare against (in the layout asked for), and
    how it was checked."""
    path = source.path
    if source.is_gguf:
        base = gguf_in_layout(path, kv_cache, inside(out, f"{path.stem}-latent.gguf"))
        return base, {"source": str(path), "file_type": _file_type(path), "verified": None,
                      **({"rewritten_to_latent_from": str(path)} if base != path else {})}

    dtype = Checkpoint(path).source_dtype
    outtype = "bf16" if dtype == "BF16" else "f32"  # lossless either way
    base = inside(out, f"base-{outtype.upper()}{'-latent' if kv_cache is KVLayout.LATENT else ''}.gguf")
    if not base.exists():
        convert(path, base, outtype, kv_cache=kv_cache or KVLayout.FULL)
    check = verify(path, base, threads=threads)
    stats = check.file_stats or check.stats
    info = {"source": str(path), "file_type": check.file_type, "verified": check.passed,
            "file_vs_checkpoint_kl": stats.mean_kl, "llama_cpp_vs_reference_kl": check.stats.mean_kl,
            "llama_cpp_vs_reference_top1": check.stats.top1}
    return base, info


def check_sweep(source: str, options: SweepOptions) -> Source:
    """Everything a sweep checks before it writes anything; the source it starts from."""
    origin = open_source(source, options.kv_cache)
    check_options(options, origin)
    check_folder(options.out, sweep_key(origin, options), options.replace)
    return origin


def run_sweep(source: str, options: SweepOptions, on_event: Callable[[str, dict], None] = lambda k, d: None,
              origin: Source | None = None) -> Sweep:
    """Measure OPTIONS.recipes against SOURCE in OPTIONS.out, reusing what an earlier run with
    the same inputs measured there (ORIGIN: check_sweep's answer, if the caller has it). A folder
    this run makes is removed again if the run ends before it has saved a report."""
    origin = origin or check_sweep(source, options)
    out = options.out
    created = _first_missing(out)
    out.mkdir(parents=True, exist_ok=True)
    with claimed(inside(out, KEY_FILE)):  # one sweep at a time in a folder; a second is refused at once
        try:
            changed = claim_folder(out, sweep_key(origin, options), origin, options.replace)
            if changed:
                on_event("stale", {"changed": changed})
            return _run(source, origin, options, on_event)
        except BaseException:
            if created and not (out / "report.json").exists():
                shutil.rmtree(created, ignore_errors=True)
            raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder on the way to PATH that does not exist yet (mkdir makes it)."""
    missing = None
    for folder in (path.absolute(), *path.absolute().parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _run(source: str, origin: Source, options: SweepOptions, on_event: Callable[[str, dict], None]) -> Sweep:
    """The sweep itself, in a claimed folder."""
    out = options.out
    previous = _load_previous(out)
    base_info = previous.get("base_info")
    if base_info and Path(base_info["gguf"]).is_file():
        base = Path(base_info["gguf"])
    else:
        base, base_info = prepare_base(origin, out, options.threads, options.kv_cache)
        base_info["gguf"] = str(base.resolve())
    config = config_from_gguf(base)
    sweep = Sweep(options, base, config, on_event=on_event, tensor_names=list(read_gguf_info(base).tensors))
    sweep.report = {
        "version": REPORT_VERSION, "source": str(source), "kv_cache": options.kv_cache, "ctx": options.ctx,
        "text": options.text_source, "text_sha256": hashlib.sha256(options.text.encode("utf-8")).hexdigest(),
        "threads": options.threads, "base_info": base_info, "reference": previous.get("reference"),
        "rows": previous.get("rows", {}), "recommendation": None,
    }
    tokens = _tokens(sweep)
    if sweep.report["reference"] is None:
        on_event("reference", {})
        sweep.report["reference"] = _reference(sweep, tokens)
        sweep.save()
    imatrix = _imatrix(sweep, tokens) if options.auto or any(r.uses_imatrix for r in options.recipes) else None
    sweep.report["peak_rss_bytes"] = {"reference_and_imatrix": peak_rss()}  # this process so far: torch passes
    for recipe in options.recipes:
        row = sweep.report["rows"].get(recipe.name)
        if row and row.get("key") == recipe.key and (row["status"] == "failed" or _model_file(sweep, recipe).exists()):
            if row["status"] == "ok" and row.get("speed_on", "") != options.speed_on:  # only the speed is new
                _device_speed(sweep, row, _model_file(sweep, recipe))
                sweep.save()
            on_event("skip", row)
            continue
        unmatched = unmatched_overrides(recipe, sweep.tensor_names)
        if unmatched:
            on_event("unmatched", {"recipe": recipe.name, "patterns": unmatched})
        on_event("start", {"recipe": recipe.name})
        row = _measure(sweep, recipe, tokens, imatrix, unmatched)
        sweep.report["rows"][recipe.name] = row
        sweep.save()
        on_event("row", row)
    if options.auto:
        _auto(sweep, tokens, imatrix)
    sweep.report["rows"] = {r.name: sweep.report["rows"][r.name] for r in options.recipes} | {
        k: v for k, v in sweep.report["rows"].items() if k not in {r.name for r in options.recipes}}
    rows = list(sweep.report["rows"].values())
    sweep.report["recommendation"] = recommend(rows, options.budget_mib, options.budget_source, options.target,
                                               ModelShape.of_config(config), layout_of(base), options.ctx)
    sweep.report["mixes_vs_stock"] = mixes_vs_stock(rows)
    sweep.report["peak_rss_bytes"] |= {"plm_gguf": peak_rss(), "llama_cpp": peak_rss(children=True)}
    sweep.save()

    with replacing(sweep.path("report.csv")) as tmp:
        rep.write_csv(sweep.report, tmp)
    with replacing(sweep.path("pareto.png")) as tmp:
        rep.write_plot(sweep.report, tmp)
    return sweep


def _load_previous(out: Path) -> dict:
    """The report of an earlier run with the same inputs (claim_folder removed any other), less
    its reference if the reference log-probs are gone."""
    try:
        old = json.loads(inside(out, "report.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(old, dict) or old.get("version") != REPORT_VERSION:
        return {}
    if not inside(out, "reference-logprobs.npy").exists():
        old["reference"] = None
    return old


def _model_file(sweep: Sweep, recipe: Recipe) -> Path:
    return sweep.path("models", f"{recipe.name}.gguf")


def _tokens(sweep: Sweep) -> list[int]:
    """llama.cpp's tokens of the text (tokens.json), refused when shorter than one chunk."""
    path = sweep.path("tokens.json")
    if not path.exists():
        with tempfile.TemporaryDirectory(prefix=".tokenize-", dir=sweep.out) as tmp:
            texts, ids = Path(tmp) / "text.json", Path(tmp) / "ids.json"
            texts.write_text(json.dumps([sweep.options.text]))
            run_worker(["tokenize", str(sweep.base), "--texts", str(texts), "--out", str(ids)])
            write_atomic(path, json.dumps(json.loads(ids.read_text())[0]))
    tokens = json.loads(path.read_text())
    ctx = sweep.options.ctx
    if len(tokens) < ctx:
        raise UsageError(f"the evaluation text ({sweep.options.text_source}) has {len(tokens)} tokens: "
                         f"one --ctx {ctx} chunk needs {ctx}", _short_text_hint(ctx, len(tokens)))
    return tokens


def _imatrix(sweep: Sweep, tokens: list[int]) -> Path:
    path = sweep.path("imatrix.npz")
    if not path.exists():
        sweep.on_event("imatrix", {})
        weights = GgufWeights(sweep.base, sweep.config)  # layer by layer: one layer's weights resident
        with replacing(path) as tmp:
            compute_imatrix(weights, tokens[: sweep.options.imatrix_tokens], tmp, n_ctx=sweep.options.ctx,
                            latent=layout_of(sweep.base) is KVLayout.LATENT)
    return path


def _reference(sweep: Sweep, tokens: list[int]) -> dict:
    """Score the base file; its log-probs go to reference-logprobs.npy, whole or not at all."""
    path = sweep.path("reference-logprobs.npy")
    first, last = scored_range(sweep.options.ctx)
    need = len(tokens) // sweep.options.ctx * (last - first) * sweep.config.vocab_size * 4
    free = shutil.disk_usage(sweep.out).free
    if need > free:
        raise OutputError(f"the reference log-probabilities of {len(tokens)} tokens need {need / 2**30:,.1f} GiB; "
                          f"the disk holding {sweep.out} has {free / 2**30:,.1f} GiB free",
                          "give a shorter --text, or a --out on a disk with more space")
    with replacing(path) as tmp:
        return _score(sweep, sweep.base, tokens, "reference", reference=tmp)


def _score(sweep: Sweep, model: Path, tokens: list[int], mode: str, reference: Path | None = None,
           speed: bool = True) -> dict:
    """Score MODEL over the tokens (llama/scoring.py, in a worker); speed=False: KL and
    perplexity only, no generation-speed run."""
    result_file = sweep.path(".score.json")
    run_worker(["score", str(model), "--tokens", str(sweep.path("tokens.json")), "--ctx", str(sweep.options.ctx),
                "--reference", str(reference or sweep.path("reference-logprobs.npy")), "--mode", mode,
                "--out", str(result_file), "--threads", str(sweep.options.threads)] + ([] if speed else
                                                                                        ["--gen-tokens", "0"]))
    result = json.loads(result_file.read_text())
    result_file.unlink()
    if not speed:
        return result
    expected = kv_cache_bytes(ModelShape.of_config(sweep.config), layout_of(model), sweep.options.ctx) / 2**20
    result.update(kv_mib_expected=round(expected, 2), ppl=math.exp(result["nll_mean"]),
                  prompt_tps=result["prompt_tokens"] / result["prompt_seconds"],
                  gen_tps=result["gen_tokens"] / result["gen_seconds"])
    return result


def _measure(sweep: Sweep, recipe: Recipe, tokens: list[int], imatrix: Path | None,
             unmatched: list[str] | None = None) -> dict:
    row = {"recipe": recipe.name, "key": recipe.key, "base": recipe.base, "overrides": recipe.overrides,
           "description": recipe.description, "imatrix": recipe.uses_imatrix, "file": f"models/{recipe.name}.gguf"}
    if unmatched:  # those overrides change nothing: the row says so
        row["unmatched_overrides"] = unmatched
    target = _model_file(sweep, recipe)
    start = time.perf_counter()
    try:
        with replacing(target) as tmp:
            quantize_file(sweep.base, tmp, recipe.base, threads=sweep.options.threads,
                          overrides=recipe.override_types() or None, imatrix=imatrix if recipe.uses_imatrix else None)
        row["quantize_seconds"] = time.perf_counter() - start
        row.update(file_facts(target))
        scored = _score(sweep, target, tokens, "compare")
    except LlamaCppError as exc:
        target.unlink(missing_ok=True)  # a file of this name is not this recipe's measured file
        return row | {"status": "failed", "reason": exc.message}
    ref = sweep.report["reference"]
    row.update(status="ok", **{k: scored[k] for k in ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "ppl",
                                                       "prompt_tps", "gen_tps", "peak_rss_bytes", "kv_mib",
                                                       "kv_mib_expected", "compute_mib") if k in scored})
    row["ppl_ratio"] = row["ppl"] / ref["ppl"]
    row["memory_mib"] = row["file_bytes"] / 2**20 + row.get("kv_mib", row["kv_mib_expected"]) + row.get("compute_mib", 0)
    row["speed_on"] = ""
    _device_speed(sweep, row, target)
    return row


def _auto(sweep: Sweep, tokens: list[int], imatrix: Path) -> None:
    """The recipe search (quant_eval/auto.py): its model of the KL from probes (auto-model.json,
    kept while the inputs stay), then one mix per target size, each measured as a row, and
    every mix found written to auto-recipes.toml."""
    options, auto = sweep.options, sweep.options.auto
    groups = search.tensor_groups(read_gguf_info(sweep.base).tensors, sweep.config.num_hidden_layers)
    if not groups:
        raise UsageError(f"{sweep.base.name} has no tensor the search can quantize", "use --sweep with --types")
    if auto.budget:  # refused before any probe: even the smallest types' bytes exceed the budget
        file_budget, what = _file_budget(sweep)
        search.check_budget(file_budget, groups, 0, what)
    model, overhead = _auto_model(sweep, groups, tokens, imatrix)
    targets = []  # (recipe name, most file bytes, what the size is, the stock type it is sized after)
    if auto.at_stock:
        stock = [r for r in sweep.report["rows"].values()
                 if r.get("status") == "ok" and not r["overrides"] and r["base"] in search.STOCK_TARGETS]
        if not stock:
            sweep.on_event("auto-none", {"types": search.STOCK_TARGETS})
        for r in sorted(stock, key=lambda r: r["file_bytes"]):
            if not any(t[1] == r["file_bytes"] for t in targets):  # with and without an imatrix: one size
                targets.append((f"auto-{r['recipe']}", r["file_bytes"], f"the size of {r['recipe']}", r["recipe"]))
    if auto.budget:
        name = auto.name or f"auto-{options.budget_mib:g}mb".replace(".", "_")
        search.check_budget(file_budget, groups, overhead, what)
        targets.append((name, file_budget, what, None))
    found = []
    for name, most, what, stock_name in targets:
        room = most - overhead
        for _ in range(3):  # the overhead is estimated from the top file: shrink if the file came out larger
            choice = search.choose(model, room)
            if choice is None:
                sweep.on_event("auto-none", {"recipe": name, "what": what})
                break
            size = overhead + search.choice_bytes(groups, choice)
            predicted = model.predict(choice)
            bpw = 8 * search.choice_bytes(groups, choice) / sum(g.n_elements for g in groups)
            recipe = Recipe(name=name, base=search.nearest_stock(bpw), overrides=search.overrides_for(groups, choice),
                            imatrix=True, description=f"plm-gguf --auto: {what}, predicted KL {predicted:.4g}")
            row = sweep.report["rows"].get(name)
            if not (row and row.get("key") == recipe.key and row["status"] == "ok" and _model_file(sweep, recipe).exists()):
                sweep.on_event("start", {"recipe": name, "auto": what})
                row = _measure(sweep, recipe, tokens, imatrix)
                row["auto"] = {"size_of": what, "stock": stock_name, "most_bytes": most, "predicted_bytes": size,
                               "predicted_kl": predicted, "types": choice}
                sweep.report["rows"][name] = row
                sweep.save()
                sweep.on_event("row", row)
            else:
                sweep.on_event("skip", row)
            if row["status"] != "ok" or row["file_bytes"] <= most:
                found.append(recipe)
                break
            room -= row["file_bytes"] - most
    if found:
        text = search.recipe_toml(found)
        path = sweep.path("auto-recipes.toml")
        write_atomic(path, text)
        sweep.report["auto_recipes"] = str(path)


def _auto_model(sweep: Sweep, groups: list, tokens: list[int], imatrix: Path):
    """The search's model of the KL (auto.Model) and the file bytes outside the groups: the top
    file and one probe per group measured against the reference log-probs on disk, each group's
    weight errors from sampled rows. Cached in auto-model.json per group layout."""
    path = sweep.path("auto-model.json")
    key = search.groups_key(groups)
    try:
        cached = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        cached = {}
    if cached.get("key") != key:
        cached = {"key": key, "probe_kl": {}}
    work = sweep.path(".probe.gguf")

    def score(name: str, overrides: dict[str, str]) -> tuple[float, int]:
        recipe = Recipe(name=name, base="q8_0", overrides=overrides, imatrix=True)
        start = time.perf_counter()
        try:
            quantize_file(sweep.base, work, "q8_0", threads=sweep.options.threads,
                          overrides=recipe.override_types(), imatrix=imatrix)
            size = work.stat().st_size
            result = _score(sweep, work, tokens, "compare", speed=False)
        finally:
            work.unlink(missing_ok=True)
        cached.setdefault("seconds", 0.0)
        cached["seconds"] += time.perf_counter() - start
        return result["kl_mean"], size

    top = {g.pattern: g.ladder[0] for g in groups}
    if "top_kl" not in cached:
        sweep.on_event("auto-probe", {"group": "every group at its top type", "i": 0, "n": len(groups)})
        cached["top_kl"], size = score("auto-top", top)
        cached["overhead"] = size - sum(g.nbytes(g.ladder[0]) for g in groups)
        write_atomic(path, json.dumps(cached, indent=1))
    for i, g in enumerate(groups, 1):
        if g.name in cached["probe_kl"]:
            continue
        sweep.on_event("auto-probe", {"group": f"{g.name} at {g.probe}", "i": i, "n": len(groups)})
        cached["probe_kl"][g.name], _ = score(f"auto-probe-{i}", top | {g.pattern: g.probe})
        write_atomic(path, json.dumps(cached, indent=1))
    if "errors" not in cached:
        start = time.perf_counter()
        with np.load(imatrix) as data:
            importances = {name: data[name] for name in data.files}
        cached["errors"] = search.weight_errors(sweep.base, groups, importances)
        cached["seconds"] = cached.get("seconds", 0.0) + time.perf_counter() - start
        write_atomic(path, json.dumps(cached, indent=1))
    model = search.Model(groups, cached["top_kl"], cached["probe_kl"], cached["errors"])
    sweep.report["auto_search"] = {"groups": len(groups), "probes": len(groups) + 1,
                                   "seconds": round(cached.get("seconds", 0.0), 1), "top_kl": cached["top_kl"],
                                   "sensitivity": {g.name: model.probe_kl[g.name] - model.top_kl for g in groups}}
    return model, int(cached["overhead"])


def _file_budget(sweep: Sweep) -> tuple[int, str]:
    """The most bytes the mix's file may have: the device's plan (KV cache and compute at its
    ctx, headroom) or --budget-mb less the KV cache and compute buffer measured at --ctx."""
    options = sweep.options
    if options.target is not None:
        shape = ModelShape.of_config(sweep.config)
        empty = options.target.plan(shape, layout_of(sweep.base), 0)
        return empty.available - empty.needed, f"{options.budget_source}, {empty.describe()}"
    ref = sweep.report["reference"]
    others = ref.get("kv_mib", ref.get("kv_mib_expected", 0)) + ref.get("compute_mib", 0)
    return int((options.budget_mib - others) * 2**20), (f"{options.budget_source} less {others:,.1f} MiB of KV cache "
                                                        f"and compute buffer at --ctx {options.ctx}")


def _device_speed(sweep: Sweep, row: dict, model: Path) -> None:
    """Replace the row's speed (this CPU's, from scoring) with the device's, where one is asked for."""
    if sweep.options.speed is None:
        return
    row["prompt_tps"], row["gen_tps"] = sweep.options.speed(model)
    row["speed_on"] = sweep.options.speed_on


def unmatched_overrides(recipe: Recipe, tensor_names: list[str]) -> list[str]:
    """The recipe's override patterns that name no tensor of the file (llama.cpp applies them
    with regex_search, first match wins)."""
    return [p for p in recipe.overrides if not any(re.search(p, name) for name in tensor_names)]


def file_facts(path: Path) -> dict:
    """Size, bits per weight and the tensor types used per tensor group, read from the file."""
    tensors = read_gguf_info(path).tensors.values()
    n_params = sum(t.n_elements for t in tensors)
    data_bytes = sum(t.n_bytes for t in tensors)
    groups: dict[str, set[str]] = {}
    for t in tensors:
        group = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.removesuffix(".weight")
        groups.setdefault(group, set()).add(t.qtype.name)
    return {"file_bytes": path.stat().st_size, "bpw": 8 * data_bytes / n_params,
            "types": {g: sorted(v) for g, v in sorted(groups.items())}}


def recommend(rows: list[dict], budget_mib: float | None, budget_source: str, target: MemoryTarget | None = None,
              shape: ModelShape | None = None, layout: KVLayout = KVLayout.FULL, ctx: int | None = None) -> dict | None:
    """The most accurate (lowest mean KL) recipe whose weights + KV cache + compute buffer fit.

    With a device TARGET (quantize --device) a recipe fits when deploy's memory plan there fits
    (plm_gguf.memory.plan: the file, the KV cache of SHAPE in LAYOUT at the profile's ctx, the
    compute estimate with flash attention as deploy's auto, the profile's headroom, against
    MemAvailable): the very check deploy refuses by. With --budget-mb: the memory measured at
    the sweep's --ctx (CTX) against BUDGET_MIB."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if target is not None:
        if shape is None:
            raise ValueError("a device recommendation needs the model's shape")
        plans = {r["recipe"]: target.plan(shape, layout, r["file_bytes"]) for r in ok}
        need = {name: (p.needed - p.headroom) / 2**20 for name, p in plans.items()}
        fitting = {name for name, p in plans.items() if p.fits}
        budget_mib, budget_source = target.budget_mib, target.source
        plan_ctx = next(iter(plans.values())).ctx if plans else None
        basis = (f"deploy's memory plan at the device profile's ctx {plan_ctx}: weights + KV cache + estimated "
                 f"compute buffer{' (flash attention)' if plans and next(iter(plans.values())).flash_attn else ''} "
                 f"+ {target.headroom_mib} MiB headroom vs MemAvailable")
    else:
        need = {r["recipe"]: r["memory_mib"] for r in ok}
        fitting = {name for name, mib in need.items() if budget_mib is not None and mib <= budget_mib}
        plans, plan_ctx = {}, ctx
        basis = f"memory measured at --ctx {ctx}" if ctx else "memory measured"
    if budget_mib is None or not ok:
        return None
    head = {"budget_mib": budget_mib, "budget_source": budget_source, "ctx": plan_ctx, "basis": basis}
    fits = [r for r in ok if r["recipe"] in fitting]
    if not fits:
        smallest = min(ok, key=lambda r: need[r["recipe"]])
        return {**head, "recipe": None,
                "reason": f"nothing fits: the smallest, {smallest['recipe']}, needs {need[smallest['recipe']]:.0f} MiB"}
    best = min(fits, key=lambda r: (r["kl_mean"], need[r["recipe"]]))
    out = {**head, "recipe": best["recipe"], "memory_mib": need[best["recipe"]], "kl_mean": best["kl_mean"],
           "reason": f"lowest mean KL among the {len(fits)} of {len(ok)} recipes that fit"}
    if best["recipe"] in plans:
        out["plan"] = plans[best["recipe"]].describe()
    return out


def mixes_vs_stock(rows: list[dict]) -> list[dict]:
    """For each recipe with overrides: its own stock base type, and the smallest stock type at
    least as large; the mix "beats stock" when it is more accurate than that same-size stock type."""
    ok = [r for r in rows if r.get("status") == "ok"]
    stock = [r for r in ok if not r["overrides"]]

    def brief(r: dict | None) -> dict | None:
        return r and {"recipe": r["recipe"], "file_bytes": r["file_bytes"], "kl_mean": r["kl_mean"], "top1": r["top1"]}

    out = []
    for mix in (r for r in ok if r["overrides"]):
        base = next((s for s in stock if s["base"] == mix["base"]), None)
        larger = min((s for s in stock if s["file_bytes"] >= mix["file_bytes"]), key=lambda s: s["file_bytes"], default=None)
        out.append({**brief(mix), "stock_base": brief(base), "same_size_stock": brief(larger),
                    "beats_same_size_stock": None if larger is None else mix["kl_mean"] < larger["kl_mean"]})
    return out
