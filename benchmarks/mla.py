"""Absorbed MLA against the stock layout: KV cache and tokens/s of the same model in both layouts.

    python -m benchmarks.mla STOCK.gguf LATENT.gguf [STOCK2.gguf LATENT2.gguf ...]
                             [--ctx 512,4096] [--n-gen 32] [--threads 2] [--repeat 1]

For each context size and each pair (stock, latent), alternating within the pair: llama.cpp's
KV-cache report (`python -m plm_gguf.llama.worker probe`), then prompt and generation tokens/s
(`python -m plm_gguf.llama.worker bench`: a prompt of ctx - n_gen tokens in batches of 512, then
n_gen tokens one decode each at that depth), both on the patched host library, f16 KV cache,
flash attention off (with --flash-attn, the latent file once more with it on: stock PLM
aborts with flash attention). Writes benchmarks/results/mla.{md,json} with the load and the CPU share other
processes used during each run. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from benchmarks.measure import measure
from plm_gguf.llama import runtime
from plm_gguf.ggufinfo import read_plm_gguf
from plm_gguf.memory import KVLayout, layout_of

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "mla"


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def describe(path: Path) -> dict:
    info = read_plm_gguf(path)
    latent = layout_of(info) is KVLayout.LATENT
    return {"file": str(path), "name": path.name, "layout": "latent" if latent else "stock",
            "size_mib": round(path.stat().st_size / 2**20, 1), "file_type": info.fields.get("general.file_type")}


def bench_once(model: Path, ctx: int, n_gen: int, threads: int, env: dict, log_file: Path,
               flash_attn: bool = False) -> dict:
    cmd = [sys.executable, "-m", "plm_gguf.llama.worker", "bench", str(model), "--lib-from-env", "--n-ctx", str(ctx),
           "--n-gen", str(n_gen), "--threads", str(threads)] + (["--flash-attn"] if flash_attn else [])
    sample = measure([cmd], log_file, drop=False, env=env)
    said = [l for l in log_file.read_text().splitlines() if l.startswith('{"model"')]
    if not said:
        raise SystemExit(f"the bench printed no result; see {log_file}")
    result = json.loads(said[-1])
    return {**result, "wall_s": round(sample.wall_s, 1), "peak_rss_mib": round(sample.peak_rss_bytes / 2**20),
            "load_before": sample.load_before[0], "others_cpu": round(sample.others_cpu, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mla", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="pairs of GGUF files: stock layout, then latent")
    ap.add_argument("--ctx", default="512,4096", help="comma-separated context sizes")
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--flash-attn", action="store_true", help="also run each latent file with flash attention")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if len(a.files) % 2:
        ap.error("give the files in pairs: stock, latent")
    pairs = [(a.files[i], a.files[i + 1]) for i in range(0, len(a.files), 2)]
    for stock, latent in pairs:
        if describe(stock)["layout"] != "stock" or describe(latent)["layout"] != "latent":
            ap.error(f"{stock.name} must be stock-layout and {latent.name} latent-layout")
    env = runtime.lib_env()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for ctx in [int(c) for c in a.ctx.split(",")]:
        for stock, latent in pairs:
            group = [(stock, False), (latent, False)] + ([(latent, True)] if a.flash_attn else [])
            for model, fa in group:
                kv = runtime.probe(model, n_ctx=ctx, env=env)
                if not kv["ok"]:
                    raise SystemExit(f"{model.name} does not load: {kv['error']}")
                rows.append({**describe(model), "ctx": ctx, "kv_cache_mib": kv["kv_cache"]["total_mib"],
                             "flash_attn": fa, "runs": []})
            for rep in range(a.repeat):
                for row in rows[-len(group):]:  # stock, latent, stock, latent, ...
                    fa = row["flash_attn"]
                    log(f"ctx {ctx} {row['name']}{' flash attention' if fa else ''} run {rep + 1}/{a.repeat}")
                    run = bench_once(Path(row["file"]), ctx, a.n_gen, a.threads, env,
                                     WORK / f"{row['name']}-{ctx}{'-fa' if fa else ''}.log", fa)
                    log(f"  prompt {run['prompt_tok_s']} tok/s, generation {run['gen_tok_s']} tok/s, "
                        f"others used {run['others_cpu']:.0%} of the CPU")
                    row["runs"].append(run)
    for row in rows:
        row["prompt_tok_s"] = statistics.median(r["prompt_tok_s"] for r in row["runs"])
        row["gen_tok_s"] = statistics.median(r["gen_tok_s"] for r in row["runs"])
        row["others_cpu_max"] = max(r["others_cpu"] for r in row["runs"])
    command = "python -m benchmarks.mla " + " ".join(sys.argv[1:] if argv is None else argv)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (a.out / "mla.json").write_text(json.dumps({"command": command, "when": stamp, "rows": rows}, indent=2) + "\n")
    lines = [f"# Absorbed MLA vs stock layout ({stamp})", "", f"`{command}`", "",
             f"Patched host library, f16 KV cache, flash attention off unless the row says so, {a.threads} threads, median of "
             f"{a.repeat} run(s). Prompt: ctx - {a.n_gen} tokens in batches of 512; generation: {a.n_gen} "
             "tokens at that depth. `others` is the largest share of the CPU other processes used during a run.",
             "", "| file | layout | size MiB | ctx | KV cache MiB | prompt tok/s | gen tok/s | others |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layout = r["layout"] + (" + flash attn" if r["flash_attn"] else "")
        lines.append(f"| {r['name']} | {layout} | {r['size_mib']} | {r['ctx']} | {r['kv_cache_mib']:.2f} | "
                     f"{r['prompt_tok_s']:.2f} | {r['gen_tok_s']:.2f} | {r['others_cpu_max']:.0%} |")
    (a.out / "mla.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
