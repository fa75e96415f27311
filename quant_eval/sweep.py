"""The quantization sweep: many recipes measured side by side against the unquantized model.

    base GGUF (lossless, verified against the torch reference when the source is a checkpoint)
      -> evaluation tokens (llama.cpp's tokenizer) -> reference log-probs, once, on disk
      -> importance matrix (torch reference), if any recipe uses one
      -> per recipe: quantize, score (KL, top-1, perplexity, speed, memory), save the row

Every row is written to report.json as soon as it is measured, so an interrupted sweep picks
up where it stopped; a recipe that fails is recorded with its reason and the sweep goes on.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import gguf

from plm_gguf.errors import LlamaCppError, UsageError
from plm_gguf.ggufinfo import read_gguf_info
from plm_gguf.llama_worker import run_worker
from plm_gguf.quant_eval.recipes import Recipe
from plm_gguf.schema import PLMConfig, config_from_gguf, kv_cache_bytes

REPORT_VERSION = 1
_UNQUANTIZED = {gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16}


def default_corpus() -> str:
    return resources.files("plm_gguf.quant_eval").joinpath("corpus/default.txt").read_text(encoding="utf-8")


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
    kv_cache: str | None = None  # full | latent: the layout to quantize; None: the source's (a checkpoint: full)


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

    def save(self) -> None:
        tmp = self.out / "report.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=1))
        os.replace(tmp, self.out / "report.json")


def check_layout_request(kv_cache: str | None) -> None:
    """--kv-cache for quantize: a layout, or None for the source's own."""
    from plm_gguf.convert.writer import check_kv_layout

    if kv_cache is not None:
        check_kv_layout(kv_cache)


def gguf_in_layout(path: Path, kv_cache: str | None, dest: Path) -> Path:
    """PATH itself, or PATH rewritten into the latent layout at DEST (kv_cache "latent" for a
    stock-layout file); a latent file cannot go back to full without its checkpoint."""
    from plm_gguf.convert.mla import is_latent, rewrite_to_latent

    latent = is_latent(path)
    if kv_cache == "full" and latent:
        raise UsageError(f"{path.name} has the latent KV-cache layout; --kv-cache full needs the stock one",
                         "leave out --kv-cache (quantize the file as it is), or start from the checkpoint")
    if kv_cache == "latent" and not latent:
        if not dest.exists():
            rewrite_to_latent(path, dest)
        return dest
    return path


def prepare_base(source: str, out: Path, threads: int, kv_cache: str | None = None) -> tuple[Path, dict]:
    """The unquantized GGUF to quantize from and compare against (in the layout asked for), and
    how it was checked."""
    path = Path(source).expanduser()
    if path.is_file():
        file_type = gguf.LlamaFileType(int(read_gguf_info(path).get("general.file_type", 1024)))
        if file_type not in _UNQUANTIZED:
            raise UsageError(f"{path.name} is already quantized ({file_type.name})",
                             "sweep from the checkpoint or from its f32/bf16/f16 GGUF")
        base = gguf_in_layout(path, kv_cache, out / f"{path.stem}-latent.gguf")
        return base, {"source": str(path), "file_type": file_type.name, "verified": None,
                      **({"rewritten_to_latent_from": str(path)} if base != path else {})}
    from plm_gguf.checkpoint import Checkpoint, resolve_model
    from plm_gguf.convert.verify import verify
    from plm_gguf.convert.writer import convert

    folder = resolve_model(source)
    dtype = Checkpoint(folder).source_dtype
    outtype = "bf16" if dtype == "BF16" else "f32"  # lossless either way
    base = out / f"base-{outtype.upper()}{'-latent' if kv_cache == 'latent' else ''}.gguf"
    if not base.exists():
        convert(folder, base, outtype, kv_cache=kv_cache or "full")
    check = verify(folder, base, threads=threads)
    stats = check.file_stats or check.stats
    info = {"source": str(source), "file_type": check.file_type, "verified": check.passed,
            "file_vs_checkpoint_kl": stats.mean_kl, "llama_cpp_vs_reference_kl": check.stats.mean_kl,
            "llama_cpp_vs_reference_top1": check.stats.top1}
    return base, info


def run_sweep(source: str, options: SweepOptions, on_event: Callable[[str, dict], None] = lambda k, d: None) -> Sweep:
    check_layout_request(options.kv_cache)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    previous = _load_previous(out, source, options)
    if previous.get("base_info"):
        base_info = previous["base_info"]
        base = Path(base_info["gguf"])
    else:
        base, base_info = prepare_base(source, out, options.threads, options.kv_cache)
        base_info["gguf"] = str(base)
    config = config_from_gguf(base)
    sweep = Sweep(options, base, config, on_event=on_event, tensor_names=list(read_gguf_info(base).tensors))
    sweep.report = {
        "version": REPORT_VERSION, "source": str(source), "kv_cache": options.kv_cache, "ctx": options.ctx,
        "text": options.text_source,
        "threads": options.threads, "base_info": base_info, "reference": previous.get("reference"),
        "rows": previous.get("rows", {}), "recommendation": None,
    }
    tokens = _tokens(sweep)
    if sweep.report["reference"] is None:
        on_event("reference", {})
        sweep.report["reference"] = _score(sweep, base, tokens, "reference")
        sweep.save()
    imatrix = _imatrix(sweep, tokens) if any(r.uses_imatrix for r in options.recipes) else None
    for recipe in options.recipes:
        row = sweep.report["rows"].get(recipe.name)
        if row and row.get("key") == recipe.key and (row["status"] == "failed" or (out / row["file"]).exists()):
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
    sweep.report["rows"] = {r.name: sweep.report["rows"][r.name] for r in options.recipes} | {
        k: v for k, v in sweep.report["rows"].items() if k not in {r.name for r in options.recipes}}
    rows = list(sweep.report["rows"].values())
    sweep.report["recommendation"] = recommend(rows, options.budget_mib, options.budget_source)
    sweep.report["mixes_vs_stock"] = mixes_vs_stock(rows)
    sweep.save()
    from plm_gguf.quant_eval import report as rep

    rep.write_csv(sweep.report, out / "report.csv")
    rep.write_plot(sweep.report, out / "pareto.png")
    return sweep


def _load_previous(out: Path, source: str, options: SweepOptions) -> dict:
    """A report from an interrupted run of the same sweep (same source, text and context)."""
    path = out / "report.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    same = (old.get("version") == REPORT_VERSION and old.get("source") == str(source)
            and old.get("kv_cache") == options.kv_cache
            and old.get("ctx") == options.ctx and old.get("text") == options.text_source
            and (out / "tokens.json").exists() and (out / "reference-logprobs.npy").exists())
    return old if same else {}


def _tokens(sweep: Sweep) -> list[int]:
    path = sweep.out / "tokens.json"
    if not path.exists():
        (sweep.out / "text.json").write_text(json.dumps([sweep.options.text]))
        run_worker(["tokenize", str(sweep.base), "--texts", str(sweep.out / "text.json"), "--out", str(path)])
        path.write_text(json.dumps(json.loads(path.read_text())[0]))
    tokens = json.loads(path.read_text())
    if len(tokens) < sweep.options.ctx:
        raise UsageError(f"the evaluation text has {len(tokens)} tokens, fewer than one --ctx {sweep.options.ctx} chunk",
                         "give a longer --text or a smaller --ctx")
    return tokens


def _imatrix(sweep: Sweep, tokens: list[int]) -> Path:
    path = sweep.out / "imatrix.npz"
    if not path.exists():
        from plm_gguf.quant_eval.imatrix import compute_imatrix
        from plm_gguf.reference import PLMForCausalLM

        sweep.on_event("imatrix", {})
        model = PLMForCausalLM.from_gguf(sweep.base, sweep.config)
        from plm_gguf.convert.mla import is_latent

        compute_imatrix(model, tokens[: sweep.options.imatrix_tokens], path.with_suffix(".tmp.npz"),
                        n_ctx=sweep.options.ctx, latent=is_latent(sweep.base))
        os.replace(path.with_suffix(".tmp.npz"), path)
    return path


def _score(sweep: Sweep, model: Path, tokens: list[int], mode: str) -> dict:
    tokens_file = sweep.out / "tokens.json"
    result_file = sweep.out / f"score-{model.stem}.json"
    run_worker(["score", str(model), "--tokens", str(tokens_file), "--ctx", str(sweep.options.ctx),
                "--reference", str(sweep.out / "reference-logprobs.npy"), "--mode", mode,
                "--out", str(result_file), "--threads", str(sweep.options.threads)])
    result = json.loads(result_file.read_text())
    result_file.unlink()
    from plm_gguf.convert.mla import is_latent

    expected = kv_cache_bytes(sweep.config, sweep.options.ctx, latent=is_latent(model)) / 2**20
    result.update(kv_mib_expected=round(expected, 2), ppl=math.exp(result["nll_mean"]),
                  prompt_tps=result["prompt_tokens"] / result["prompt_seconds"],
                  gen_tps=result["gen_tokens"] / result["gen_seconds"])
    return result


def _measure(sweep: Sweep, recipe: Recipe, tokens: list[int], imatrix: Path | None,
             unmatched: list[str] | None = None) -> dict:
    from plm_gguf.convert.quantize import quantize_file

    row = {"recipe": recipe.name, "key": recipe.key, "base": recipe.base, "overrides": recipe.overrides,
           "description": recipe.description, "imatrix": recipe.uses_imatrix, "file": f"models/{recipe.name}.gguf"}
    if unmatched:  # those overrides change nothing: the row says so
        row["unmatched_overrides"] = unmatched
    target = sweep.out / row["file"]
    tmp = target.with_name(f".{target.name}.partial")
    start = time.perf_counter()
    try:
        quantize_file(sweep.base, tmp, recipe.base, threads=sweep.options.threads,
                      overrides=recipe.override_types() or None, imatrix=imatrix if recipe.uses_imatrix else None)
        os.replace(tmp, target)
        row["quantize_seconds"] = time.perf_counter() - start
        row.update(file_facts(target))
        scored = _score(sweep, target, tokens, "compare")
    except LlamaCppError as exc:
        tmp.unlink(missing_ok=True)
        return row | {"status": "failed", "reason": exc.message}
    ref = sweep.report["reference"]
    row.update(status="ok", **{k: scored[k] for k in ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "ppl",
                                                       "prompt_tps", "gen_tps", "peak_rss_bytes", "kv_mib",
                                                       "kv_mib_expected", "compute_mib") if k in scored})
    row["ppl_ratio"] = row["ppl"] / ref["ppl"]
    row["memory_mib"] = row["file_bytes"] / 2**20 + row.get("kv_mib", row["kv_mib_expected"]) + row.get("compute_mib", 0)
    return row


def unmatched_overrides(recipe: Recipe, tensor_names: list[str]) -> list[str]:
    """The recipe's override patterns that name no tensor of the file (llama.cpp applies them
    with regex_search, first match wins)."""
    import re

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


def recommend(rows: list[dict], budget_mib: float | None, budget_source: str) -> dict | None:
    """The most accurate (lowest mean KL) recipe whose weights + KV cache + compute buffer fit."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if budget_mib is None or not ok:
        return None
    fits = [r for r in ok if r["memory_mib"] <= budget_mib]
    if not fits:
        smallest = min(ok, key=lambda r: r["memory_mib"])
        return {"budget_mib": budget_mib, "budget_source": budget_source, "recipe": None,
                "reason": f"nothing fits: the smallest, {smallest['recipe']}, needs {smallest['memory_mib']:.0f} MiB"}
    best = min(fits, key=lambda r: (r["kl_mean"], r["memory_mib"]))
    return {"budget_mib": budget_mib, "budget_source": budget_source, "recipe": best["recipe"],
            "memory_mib": best["memory_mib"], "kl_mean": best["kl_mean"],
            "reason": f"lowest mean KL among the {len(fits)} of {len(ok)} recipes that fit"}


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


def pareto_front(rows: list[dict]) -> list[str]:
    """Recipes no other recipe beats on both file size and mean KL."""
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: (r["file_bytes"], r["kl_mean"]))
    front, best = [], float("inf")
    for r in ok:
        if r["kl_mean"] < best:
            front.append(r["recipe"])
            best = r["kl_mean"]
    return front
