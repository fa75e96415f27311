"""Absorbed MLA against the stock layout: KV cache and tokens/s of the same model in both layouts.

    python -m benchmarks.mla STOCK.gguf LATENT.gguf [STOCK2.gguf LATENT2.gguf ...]
                             [--ctx 512,4096] [--n-gen 32] [--threads 2] [--repeat 1]
                             [--llama-bench] [--depths 0,4096] [--pp 512] [--tg 64]

Three rows per context size and pair, run alternately (stock, before, after, stock, ...) on the
patched host library with an f16 KV cache:
- stock: the stock-layout file, flash attention off (llama.cpp has no CPU path that runs PLM's
  stock layout with it);
- latent before: the latent file with every batch absorbed (LLAMA_PLM_MLA_EXPAND_MIN_TOKENS=0,
  the graph before patch 0004), flash attention on (plm-gguf's default for latent files);
- latent after: the latent file at patch 0004's default (prompt batches expanded, decode
  absorbed), flash attention on.
Each row: llama.cpp's KV-cache report (`python -m plm_gguf.llama.worker probe`), then prompt
and generation tokens/s (`python -m plm_gguf.llama.worker bench`: a prompt of ctx - n_gen
tokens in batches of 512, then n_gen tokens one decode each at that depth). With --llama-bench,
the same three rows once more through llama.cpp's own llama-bench from the host build
(pp/tg at each depth, -r 1). Writes benchmarks/results/mla.{md,json} with the CPU share other
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
from plm_gguf.errors import PlmGgufError
from plm_gguf.llama import runtime
from plm_gguf.llama.patches import MLA_EXPAND_ENV
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


# (label, latent file?, flash attention, LLAMA_PLM_MLA_EXPAND_MIN_TOKENS or None for the default)
VARIANTS = [("stock", False, False, None), ("latent before", True, True, "0"), ("latent after", True, True, None)]


def variant_env(env: dict, expand: str | None) -> dict:
    env = {k: v for k, v in env.items() if k != MLA_EXPAND_ENV}
    return env | ({MLA_EXPAND_ENV: expand} if expand is not None else {})


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


def llama_bench_once(model: Path, depth: int, pp: int, tg: int, threads: int, env: dict, log_file: Path,
                     flash_attn: bool) -> list[dict]:
    """llama.cpp's llama-bench (host build): pp and tg at one depth, one repetition, JSON rows."""
    binary = Path(env["LLAMA_CPP_LIB_PATH"]) / "llama-bench"
    cmd = [str(binary), "-m", str(model), "-p", str(pp), "-n", str(tg), "-d", str(depth), "-t", str(threads),
           "-fa", "1" if flash_attn else "0", "-r", "1", "-o", "jsonl"]
    sample = measure([cmd], log_file, drop=False, env=env)
    rows = [json.loads(l) for l in log_file.read_text().splitlines() if l.startswith("{")]
    if len(rows) != 2:
        raise SystemExit(f"llama-bench printed {len(rows)} result rows, not 2; see {log_file}")
    return [{"test": ("pp" if r["n_prompt"] else "tg") + str(r["n_prompt"] or r["n_gen"]), "depth": r["n_depth"],
             "tok_s": r["avg_ts"], "others_cpu": round(sample.others_cpu, 3)} for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mla", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="pairs of GGUF files: stock layout, then latent")
    ap.add_argument("--ctx", default="512,4096", help="comma-separated context sizes")
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--llama-bench", action="store_true", help="also run llama.cpp's llama-bench")
    ap.add_argument("--depths", default="0,4096", help="llama-bench depths")
    ap.add_argument("--pp", type=int, default=512, help="llama-bench prompt tokens")
    ap.add_argument("--tg", type=int, default=64, help="llama-bench generated tokens")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if len(a.files) % 2:
        ap.error("give the files in pairs: stock, latent")
    pairs = [(a.files[i], a.files[i + 1]) for i in range(0, len(a.files), 2)]
    for stock, latent in pairs:
        try:
            layouts = describe(stock)["layout"], describe(latent)["layout"]
        except PlmGgufError as err:
            ap.error(f"{err.message} ({err.hint})")
        if layouts != ("stock", "latent"):
            ap.error(f"{stock.name} must be stock-layout and {latent.name} latent-layout")
    base_env = runtime.lib_env()
    WORK.mkdir(parents=True, exist_ok=True)
    rows, bench_rows = [], []
    for ctx in [int(c) for c in a.ctx.split(",")]:
        for stock, latent in pairs:
            group = []
            for label, is_latent, fa, expand in VARIANTS:
                model = latent if is_latent else stock
                kv = runtime.probe(model, n_ctx=ctx, env=variant_env(base_env, expand))
                if not kv["ok"]:
                    raise SystemExit(f"{model.name} does not load: {kv['error']}")
                group.append({**describe(model), "variant": label, "ctx": ctx, "expand": expand,
                              "kv_cache_mib": kv["kv_cache"]["total_mib"], "flash_attn": fa, "runs": []})
            rows += group
            for rep in range(a.repeat):
                for row in group:  # stock, before, after, stock, ...
                    log(f"ctx {ctx} {row['name']} ({row['variant']}) run {rep + 1}/{a.repeat}")
                    run = bench_once(Path(row["file"]), ctx, a.n_gen, a.threads, variant_env(base_env, row["expand"]),
                                     WORK / f"{row['name']}-{ctx}-{row['variant'].replace(' ', '-')}.log",
                                     row["flash_attn"])
                    log(f"  prompt {run['prompt_tok_s']} tok/s, generation {run['gen_tok_s']} tok/s, "
                        f"others used {run['others_cpu']:.0%} of the CPU")
                    row["runs"].append(run)
    for row in rows:
        row["prompt_tok_s"] = statistics.median(r["prompt_tok_s"] for r in row["runs"])
        row["gen_tok_s"] = statistics.median(r["gen_tok_s"] for r in row["runs"])
        row["others_cpu_max"] = max(r["others_cpu"] for r in row["runs"])
    if a.llama_bench:
        for depth in [int(d) for d in a.depths.split(",")]:
            for stock, latent in pairs:
                for label, is_latent, fa, expand in VARIANTS:
                    model = latent if is_latent else stock
                    log(f"llama-bench depth {depth} {model.name} ({label})")
                    for r in llama_bench_once(model, depth, a.pp, a.tg, a.threads, variant_env(base_env, expand),
                                              WORK / f"llama-bench-{model.name}-{depth}-{label.replace(' ', '-')}.log",
                                              fa):
                        log(f"  {r['test']} @ d{depth}: {r['tok_s']:.2f} tok/s")
                        bench_rows.append({"name": model.name, "variant": label, "flash_attn": fa, **r})
    command = "python -m benchmarks.mla " + " ".join(sys.argv[1:] if argv is None else argv)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (a.out / "mla.json").write_text(json.dumps({"command": command, "when": stamp, "rows": rows,
                                                "llama_bench": bench_rows}, indent=2) + "\n")
    lines = [f"# Absorbed MLA vs stock layout ({stamp})", "", f"`{command}`", "",
             f"Patched host library, f16 KV cache, {a.threads} threads, median of {a.repeat} run(s). Prompt: ctx - "
             f"{a.n_gen} tokens in batches of 512; generation: {a.n_gen} tokens at that depth. stock: flash attention "
             "off; latent before: every batch absorbed (LLAMA_PLM_MLA_EXPAND_MIN_TOKENS=0), flash attention on; "
             "latent after: patch 0004's default (prompt batches expanded, decode absorbed), flash attention on. "
             "`x stock` is the row's speed over the stock row's; `others` is the largest share of the CPU other "
             "processes used during a run.",
             "", "| file | variant | size MiB | ctx | KV cache MiB | prompt tok/s | x stock | gen tok/s | x stock | others |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["ctx"] == r["ctx"] and b["variant"] == "stock")
        lines.append(f"| {r['name']} | {r['variant']} | {r['size_mib']} | {r['ctx']} | {r['kv_cache_mib']:.2f} | "
                     f"{r['prompt_tok_s']:.2f} | {r['prompt_tok_s'] / base['prompt_tok_s']:.2f} | "
                     f"{r['gen_tok_s']:.2f} | {r['gen_tok_s'] / base['gen_tok_s']:.2f} | {r['others_cpu_max']:.0%} |")
    if bench_rows:
        lines += ["", f"llama.cpp's llama-bench (host build, `-p {a.pp} -n {a.tg} -d DEPTH -t {a.threads} -r 1`, "
                  "-fa as above):", "", "| file | variant | test | depth | tok/s | x stock | others |",
                  "|---|---|---|---|---|---|---|"]
        for r in bench_rows:
            base = next(b for b in bench_rows if b["variant"] == "stock" and b["test"] == r["test"]
                        and b["depth"] == r["depth"])
            lines.append(f"| {r['name']} | {r['variant']} | {r['test']} | {r['depth']} | {r['tok_s']:.2f} | "
                         f"{r['tok_s'] / base['tok_s']:.2f} | {r['others_cpu']:.0%} |")
    (a.out / "mla.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
