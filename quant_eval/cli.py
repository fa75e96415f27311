"""`plm-gguf quantize`: one file, or a sweep of recipes measured side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from plm_gguf.errors import UsageError

console = Console(highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(quantize)


def quantize(
    source: str = typer.Argument(..., help="A PLM checkpoint (folder or repo id) or an unquantized PLM GGUF."),
    type_: Optional[str] = typer.Option(None, "--type", help="One llama.cpp type to write (q4_k_m, iq4_nl, ...)."),
    outfile: Optional[Path] = typer.Option(None, "--outfile", help="Output file for --type."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --outfile; with --sweep, replace "
                               "the results in --out made from another model, text or --ctx."),
    sweep: bool = typer.Option(False, "--sweep", help="Measure many recipes side by side."),
    auto: bool = typer.Option(False, "--auto", help="Search per-tensor-group types from measured sensitivities: "
                              "the most accurate mix for --budget-mb or --device; with --sweep, also a mix at the "
                              "size of each stock type measured. The mixes found go to OUT/auto-recipes.toml."),
    types: Optional[str] = typer.Option(None, "--types", help="Comma-separated stock types to sweep instead of the default recipes."),
    recipes: Optional[Path] = typer.Option(None, "--recipes", help="A TOML file of \\[\\[recipe]] tables."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluation (and calibration) text; default: a built-in bilingual corpus."),
    ctx: int = typer.Option(512, "--ctx", help="Evaluation chunk length, and the context memory is counted at "
                            "for --budget-mb (--device counts it at the profile's ctx, as deploy does)."),
    budget_mb: Optional[float] = typer.Option(None, "--budget-mb", help="Memory budget for the recommendation (MiB)."),
    device: Optional[str] = typer.Option(None, "--device", help="Recommend for a device profile as deploy checks it: "
                                         "probed MemAvailable minus headroom, the KV cache at the profile's ctx."),
    profile_file: Optional[Path] = typer.Option(None, "--profile", help="A profile TOML file (instead of --device)."),
    address: str = typer.Option("", "--address", help="ssh \\[user@]host\\[:port] or adb serial, overriding the "
                                "profile's (with --device or --profile)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder (resumable); default sweep-<model>."),
    threads: int = typer.Option(os.cpu_count() or 1, "--threads"),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="full or latent: the KV-cache layout to quantize "
                                           "(default: the source's; a checkpoint converts to full)."),
) -> None:
    """Quantize to one type, or sweep recipes: KL, top-1, perplexity, size, memory, speed."""
    from plm_gguf.memory import parse_layout
    from plm_gguf.options import check_threads

    if auto and type_:
        raise UsageError("--auto does nothing with --type", "--auto chooses the types itself: leave out --type")
    if (sweep or auto) == bool(type_):
        raise UsageError("give either --type TYPE or --sweep", "plm-gguf quantize MODEL --sweep, or --type q4_k_m")
    if auto and not sweep:
        for name, value in (("--types", types), ("--recipes", recipes)):
            if value is not None:
                raise UsageError(f"{name} does nothing with --auto alone", f"add --sweep to measure {name} beside "
                                 "the search's mixes")
        if budget_mb is None and not (device or profile_file):
            raise UsageError("--auto needs a budget", "give --budget-mb N (MiB) or --device PROFILE, or add --sweep "
                             "for mixes at the stock types' sizes")
    _check_mode_options(sweep or auto, {"--types": types, "--recipes": recipes, "--budget-mb": budget_mb, "--device": device,
                                "--profile": profile_file, "--address": address or None, "--out": out,
                                "--outfile": outfile})
    layout = parse_layout(kv_cache)  # the one place quantize reads --kv-cache
    check_threads(threads)
    corpus, corpus_name = _read_text(text)
    if type_:
        from plm_gguf.quant_eval.single import quantize_one

        result = quantize_one(source, type_, outfile, force=force, text=corpus, threads=threads, kv_cache=layout)
        console.print(f"[green]wrote[/] {result['outfile']} ({type_}, {result['file_bytes'] / 2**20:,.1f} MiB, "
                      f"{result['bpw']:.2f} bits/weight{', with an importance matrix' if result['imatrix'] else ''})")
        return
    sweep_and_print(source, types=types, recipes_file=recipes, corpus=corpus, corpus_name=corpus_name, ctx=ctx,
                    budget_mb=budget_mb, device=(device, profile_file, address), out=out, threads=threads,
                    kv_cache=layout, replace=force, auto=_auto_options(auto, sweep, budget_mb, device, profile_file))


def _auto_options(auto: bool, sweep: bool, budget_mb, device, profile_file):
    from plm_gguf.quant_eval.sweep import AutoOptions

    if not auto:
        return None
    name = ""
    if device or profile_file:
        name = "auto-" + (device or profile_file.stem)
    return AutoOptions(at_stock=sweep, budget=budget_mb is not None or bool(device or profile_file), name=name)


_SWEEP_ONLY = ("--types", "--recipes", "--budget-mb", "--device", "--profile", "--address", "--out")
_TYPE_ONLY = ("--outfile",)


def _check_mode_options(sweep: bool, given: dict[str, object]) -> None:
    """Refuse an option the chosen mode would ignore, and a budget given twice."""
    mode, other, theirs = ("--sweep", "--type", _TYPE_ONLY) if sweep else ("--type", "--sweep", _SWEEP_ONLY)
    unused = [name for name in theirs if given[name] is not None]
    if unused:
        raise UsageError(f"{unused[0]} does nothing with {mode}", f"{unused[0]} belongs to {other}; leave it out")
    if given["--budget-mb"] is not None and (given["--device"] or given["--profile"]):
        raise UsageError("give --budget-mb or --device, not both", "--device takes the budget from the device's memory")
    if given["--address"] and not (given["--device"] or given["--profile"]):
        raise UsageError("--address needs --device or --profile", "--address overrides the device profile's address")


def _read_text(text: Path | None) -> tuple[str, str]:
    """The evaluation text and its name: the built-in corpus, or a regular UTF-8 file with text in it."""
    from plm_gguf.quant_eval.sweep import default_corpus

    if text is None:
        return default_corpus(), "built-in corpus"
    hint = "pass a UTF-8 text file: a few pages of the kind of text the model will see"
    if not text.is_file():
        what = "does not exist" if not text.exists() else "is a folder" if text.is_dir() else "is not a regular file"
        raise UsageError(f"--text {text} {what}", hint)
    try:
        raw = text.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --text {text} ({exc.strerror})", hint) from exc
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text {text} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})",
                         hint) from exc
    if "\0" in content:
        raise UsageError(f"--text {text} holds NUL bytes: it is not a text file", hint)
    if not content.strip():
        raise UsageError(f"--text {text} is empty", hint)
    return content, str(text)


def _device_target(name: str | None, profile_file: Path | None = None, address: str = ""):
    """The device's side of deploy's memory plan (plm_gguf.memory.MemoryTarget): the profile's
    headroom and ctx (what deploy runs at without --ctx) and the probed MemAvailable, or for a
    profile that offloads to a GPU, that GPU's free VRAM. With a GPU on this machine, also the
    speed measurement there: (target, speed or None, where speed measures)."""
    from plm_gguf.devices.checks import offload_gpu
    from plm_gguf.devices.deploy import probe, resolve_profile, speed_here
    from plm_gguf.memory import MemoryTarget

    profile = resolve_profile(name or "host", str(profile_file) if profile_file else None, address)
    facts = probe(profile)
    label = name or str(profile_file)
    gpu = offload_gpu(profile.gpu_layers, facts, label)
    available, what = (gpu.mem_free, f"MiB free VRAM on the {gpu.name}") if gpu else (facts.mem_available,
                                                                                      "MiB available")
    target = MemoryTarget(available=available, headroom_mib=profile.headroom_mib, ctx=profile.ctx,
                          source=f"{label}: {available / 2**20:,.0f} {what} - {profile.headroom_mib} MiB headroom",
                          gpu=gpu.name if gpu else "")
    if gpu is None or profile.transport.kind != "local":
        return target, None, ""
    speed = speed_here(profile, log=lambda line: console.print(f"[dim]build[/] {escape(line)}"))
    return target, speed, f"{gpu.name} (llama-bench, -ngl {profile.gpu_layers})"


def sweep_and_print(source, *, types: str | None = None, recipes_file: Path | None = None, corpus: str,
                    corpus_name: str, ctx: int = 512, budget_mb: float | None = None,
                    device: tuple = (None, None, ""), out: Path | None = None, threads: int = os.cpu_count() or 1,
                    kv_cache=None, replace: bool = False, auto=None) -> None:
    """`quantize --sweep` after parsing: run the sweep, print its progress, table and recommendation
    (the demo calls this too). device: (profile name, profile file, address) or Nones."""
    from plm_gguf.quant_eval import report as rep
    from plm_gguf.quant_eval.recipes import load_recipes, stock_recipes
    from plm_gguf.quant_eval.sweep import INPUT_NAMES, SweepOptions, check_sweep, run_sweep

    if types is not None and recipes_file:
        raise UsageError("give --types or --recipes, not both", "--types makes one stock recipe per type")
    if auto and not auto.at_stock:
        recipes = []  # --auto alone: only the search's mix
    else:
        recipes = stock_recipes(types.split(",")) if types is not None else load_recipes(recipes_file)
    out = out or Path(f"sweep-{Path(str(source)).stem.split('/')[-1]}")
    options = SweepOptions(out=out, recipes=recipes, text=corpus, text_source=corpus_name, ctx=ctx, threads=threads,
                           budget_mib=budget_mb, budget_source=f"--budget-mb {budget_mb:g}" if budget_mb else "",
                           kv_cache=kv_cache, replace=replace, auto=auto)
    origin = check_sweep(source, options)  # before the device is probed: a bad option costs nothing
    if any(device[:2]):
        options.target, options.speed, options.speed_on = _device_target(*device)
        options.budget_mib, options.budget_source = options.target.budget_mib, options.target.source
    done = [0]

    def on_event(kind: str, data: dict) -> None:
        if kind == "reference":
            console.print("measuring the unquantized reference ...")
        elif kind == "imatrix":
            console.print("computing the importance matrix from the text ...")
        elif kind == "stale":
            inputs = " and ".join(INPUT_NAMES[part] for part in data["changed"])
            console.print(f"[yellow]note[/] {escape(str(out))}/ held results of another {inputs}: "
                          "removed, measuring again")
        elif kind == "skip":
            done[0] += 1
            console.print(f"[dim]{data['recipe']}: already measured, kept[/]")
        elif kind == "unmatched":
            console.print(f"[yellow]warning[/] {data['recipe']}: override {', '.join(map(repr, data['patterns']))} "
                          "names no tensor of the base file: it changes nothing there")
        elif kind == "auto-probe":
            console.print(f"[dim]search: probe {data['i']}/{data['n']}: {escape(data['group'])}[/]")
        elif kind == "auto-none":
            console.print(f"[yellow]note[/] the search made no mix for {escape(data.get('what', ''))}"
                          if "what" in data else "[yellow]note[/] --sweep --auto sizes its mixes after the stock "
                          f"types {', '.join(data['types'])}; the sweep measured none of them")
        elif kind == "start" and data.get("auto"):
            console.print(f"[auto] {data['recipe']} ({escape(data['auto'])}) ...", end=" ")
        elif kind == "start":
            console.print(f"[{done[0] + 1}/{len(recipes)}] {data['recipe']} ...", end=" ")
        elif kind == "row":
            done[0] += 1
            if data["status"] == "ok":
                console.print(f"KL {data['kl_mean']:.4f}, top-1 {data['top1']:.1%}, {data['file_bytes'] / 2**20:,.1f} MiB")
            else:
                console.print(f"[red]failed[/]: {data['reason']}")

    result = run_sweep(source, options, on_event, origin)
    report = result.report
    console.print(rep.table(report, console.width))
    if options.speed_on:
        console.print(f"pp and tg t/s measured on the {escape(options.speed_on)}")
    for m in report.get("mixes_vs_stock", []):
        line = f"{m['recipe']}: {m['file_bytes'] / 2**20:,.1f} MiB, KL {m['kl_mean']:.4f}"
        if m["stock_base"]:
            b = m["stock_base"]
            line += f"; its stock base {b['recipe']}: {b['file_bytes'] / 2**20:,.1f} MiB, KL {b['kl_mean']:.4f}"
        s = m["same_size_stock"]
        if s:
            verdict = "[green]beats[/]" if m["beats_same_size_stock"] else "[yellow]does not beat[/]"
            line += f"; {verdict} {s['recipe']} ({s['file_bytes'] / 2**20:,.1f} MiB, KL {s['kl_mean']:.4f})"
        console.print(line)
    peaks = report.get("peak_rss_bytes", {})
    if peaks:
        console.print(f"peak memory: {peaks['plm_gguf'] / 2**20:,.0f} MiB plm-gguf (torch reference and importance "
                      f"matrix: {peaks['reference_and_imatrix'] / 2**20:,.0f} MiB), "
                      f"{peaks['llama_cpp'] / 2**20:,.0f} MiB the largest llama.cpp worker")
    found = report.get("auto_search")
    if found:
        console.print(f"search: {found['groups']} tensor groups, {found['probes']} probes, {found['seconds']:,.0f} s; "
                      f"mixes found: {escape(report.get('auto_recipes', '-'))} (use again with --recipes)")
        for r in (r for r in report["rows"].values() if r.get("auto") and r.get("status") == "ok"):
            console.print(f"{r['recipe']}: {r['file_bytes'] / 2**20:,.2f} MiB, KL {r['kl_mean']:.4f} "
                          f"(predicted {r['auto']['predicted_kl']:.4f}), top-1 {r['top1']:.1%}")
    base = report["base_info"]
    if base.get("verified") is not None:
        console.print(f"base {Path(base['gguf']).name}: verified against the torch reference "
                      f"({'pass' if base['verified'] else 'FAIL'}, file KL {base['file_vs_checkpoint_kl']:.2g})")
    rec = report["recommendation"]
    if rec:
        if rec["recipe"]:
            console.print(f"[bold]recommended[/] for {rec['budget_mib']:,.0f} MiB ({rec['budget_source']}): "
                          f"[bold green]{rec['recipe']}[/] — {rec['memory_mib']:,.0f} MiB ({rec['basis']}); "
                          f"{rec['reason']}")
        else:
            console.print(f"[bold red]no recipe fits[/] {rec['budget_mib']:,.0f} MiB ({rec['basis']}): {rec['reason']}")
    console.print(f"★ recommended, ◆ Pareto frontier, ✗ failed; report.json, report.csv and pareto.png in {out}/")
