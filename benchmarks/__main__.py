"""plm-gguf against llama.cpp's own pipeline on a full-size PLM-1.8B replica.

    python -m benchmarks [--repeat 3] [--only convert-f16,eval ...] [--no-drop-caches]
    python -m benchmarks --only eval-reference      (the evaluation's reference passes, cached)

Sets up (once, under benchmarks/work/) the llama.cpp tools from the source the installed
llama-cpp-python vendors, then times each pair of jobs, alternating plm-gguf (A) and the other
tool (B), and writes benchmarks/results/latest.{md,json}. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks import pairs as P
from benchmarks import report
from benchmarks.measure import drop_caches, loadavg
from benchmarks.replica import DEFAULT as REPLICA
from benchmarks.replica import ensure_replica
from benchmarks.toolchain import WORK, ensure_toolchain

RESULTS = Path(__file__).parent / "results"
PAIRS = ("copy", "convert-bf16", "convert-f16", "convert-q8_0", "q4_k_m", "eval-reference", "eval")


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def wait_for_replica(timeout_s: float = 3600) -> Path:
    """Another process may be writing the replica into its .partial folder: wait for the rename."""
    partial = REPLICA.with_name(REPLICA.name + ".partial")
    start = time.monotonic()
    while partial.exists() and not (REPLICA / "config.json").exists():
        newest = max((p.stat().st_mtime for p in partial.iterdir()), default=partial.stat().st_mtime)
        if time.time() - newest > 600:
            raise SystemExit(f"{partial} has not changed for 10 minutes: remove it and run again")
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"gave up waiting for {partial}")
        log(f"waiting for {partial} (written by another process)")
        time.sleep(15)
    return ensure_replica()


def wait_for_quiet(max_load: float, until: datetime.datetime | None) -> None:
    while loadavg()[0] > max_load:
        now = datetime.datetime.now(datetime.timezone.utc)
        if until is None or now >= until:
            log(f"load {loadavg()[0]:.2f} > {max_load}: running anyway (the load is recorded)")
            return
        log(f"load {loadavg()[0]:.2f} > {max_load}: waiting (until {until:%H:%M} UTC at most)")
        time.sleep(20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each job (default 3)")
    ap.add_argument("--repeat-q4", type=int, default=None, help="runs of the q4_k_m pair, the slowest (default --repeat)")
    ap.add_argument("--repeat-eval", type=int, default=None, help="runs of the eval pair (default --repeat)")
    ap.add_argument("--only", default=",".join(PAIRS),
                    help=f"comma-separated pairs, run in the order given, of: {', '.join(PAIRS)}")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs")
    ap.add_argument("--max-load", type=float, default=0.5, help="wait for the 1-minute load to fall below this")
    ap.add_argument("--wait-until", default=None, help="HH:MM UTC: stop waiting for a quiet machine then")
    ap.add_argument("--setup-only", action="store_true", help="build the tools and the replica, time nothing")
    ap.add_argument("--fresh-reference", action="store_true",
                    help="redo the evaluation's reference passes even if cached for the same base file and text")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (latest.md, latest.json)")
    ap.add_argument("--model", type=Path, default=None,
                    help="a bf16 checkpoint folder instead of the replica (to try the harness on a small model)")
    a = ap.parse_args(argv)
    only = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = set(only) - set(PAIRS)
    if unknown:
        ap.error(f"unknown pairs {sorted(unknown)}; choose from {', '.join(PAIRS)}")

    tools = ensure_toolchain(log)
    replica = a.model.resolve() if a.model else wait_for_replica()
    if a.setup_only:
        log("set up: " + json.dumps(tools.describe()))
        return 0
    drop = not a.no_drop_caches
    if drop:
        drop_caches()  # fails early without root
    until = None
    if a.wait_until:
        h, m = map(int, a.wait_until.split(":"))
        until = datetime.datetime.now(datetime.timezone.utc).replace(hour=h, minute=m, second=0, microsecond=0)

    stamp = datetime.datetime.now(datetime.timezone.utc)
    logs = WORK / "logs" / f"{stamp:%Y%m%dT%H%M%S}"
    logs.mkdir(parents=True)
    eval_dir = WORK / "eval" / replica.name  # the kept bf16 and q4_k_m files, per model
    eval_dir.mkdir(parents=True, exist_ok=True)
    files = P.EvalFiles(eval_dir, eval_dir / "plm-BF16.gguf", eval_dir / "plm-Q4_K_M.gguf", P.corpus_path())
    results = {"command": "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "started": f"{stamp:%Y-%m-%d %H:%M}", "finished": None, "machine": report.machine(),
               "versions": report.versions(), "toolchain": tools.describe(),
               "input": {"path": _shown(replica),
                         "bytes": (replica / "model.safetensors").stat().st_size},
               "settings": {"repeat": a.repeat, "repeat_q4": a.repeat_q4 or a.repeat,
                            "repeat_eval": a.repeat_eval or a.repeat, "drop_caches": drop,
                            "threads": P.THREADS, "ctx": P.CTX, "logs": str(logs.relative_to(report.REPO))},
               "pairs": [], "notes": list(tools.notes), "load_samples": [], "others_cpu": []}

    def on_sample(pair: P.Pair, job: P.Job, i: int, s) -> None:
        results["load_samples"] += [s.load_before[0], s.load_after[0]]
        results["others_cpu"].append(s.others_cpu)
        log(f"{pair.key} / {job.name} run {i + 1}/{pair.repeat}: {s.wall_s:.1f} s, "
            f"peak RSS {s.peak_rss_bytes / 1e9:.2f} GB, load {s.load_before[0]:.2f}->{s.load_after[0]:.2f}, "
            f"other jobs {100 * s.others_cpu:.0f} % of the cores")

    def save(pair: P.Pair | None = None) -> None:
        if pair is not None:
            results["pairs"].append(report.pair_json(pair))
        loads = results["load_samples"] or [loadavg()[0]]
        others = results["others_cpu"] or [0.0]
        results["load"] = {"min": min(loads), "max": max(loads), "median": statistics.median(loads),
                           "others_cpu_max": max(others), "others_cpu_median": statistics.median(others)}
        results["finished"] = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
        results["goals"] = report.goals(results)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "latest.json").write_text(json.dumps(results, indent=1))
        (a.out / "latest.md").write_text(report.markdown(results))

    def timed(pair: P.Pair) -> None:
        if "load_at_start" not in results:  # once, before the first: the load average lags our own runs
            wait_for_quiet(a.max_load, until)
            results["load_at_start"] = loadavg()
        log(f"pair {pair.key}: {pair.title}")
        P.run_pair(pair, logs, drop=drop, on_sample=on_sample)
        save(pair)

    convert = {p.key: p for p in P.convert_pairs(tools, replica, a.repeat, files.base)}

    def run_eval(with_compare: bool) -> None:
        _ensure_eval_inputs(replica, files)
        cached = None if a.fresh_reference else P.cached_reference(files)
        if cached:
            log(f"reusing the reference passes made {cached['made']} (timed then, not now)")
            results["pairs"].append(cached["pair"] | {"notes": [
                f"reference passes made {cached['made']} UTC, before this run's timed window, and reused: "
                "their times are from then (load at the time in the row's others' CPU column)"]})
        else:
            P.prepare_tokens(files, logs)
            ref = P.reference_pair(tools, files)
            timed(ref)
            shutil.copyfile(logs / f"{ref.key}--{P._slug(ref.b.name)}.log", eval_dir / "llama-perplexity-reference.log")
            (eval_dir / "reference.json").write_text(json.dumps(
                {"key": P.reference_key(files), "made": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
                 "pair": results["pairs"][-1]}, indent=1))
        if with_compare:
            pair = P.eval_pair(tools, files, a.repeat_eval or a.repeat)
            timed(pair)
            results["eval_check"] = eval_check(files, logs / f"{pair.key}--{P._slug(pair.b.name)}.log",
                                               eval_dir / "llama-perplexity-reference.log", results["pairs"][-1])
        save()

    for key in only:  # in the order asked for
        if key in convert:
            timed(convert[key])
        elif key == "q4_k_m":
            timed(P.q4_pair(tools, replica, a.repeat_q4 or a.repeat, files.quant))
        elif key == "eval":
            run_eval(True)
        elif key == "eval-reference" and "eval" not in only:
            run_eval(False)
    log(f"wrote {a.out / 'latest.md'}")
    return 0


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(report.REPO))
    except ValueError:
        return str(path)


def _ensure_eval_inputs(replica: Path, files: P.EvalFiles) -> None:
    """The bf16 and q4_k_m files come from the timed convert pairs; made here (untimed) if those were skipped."""
    from plm_gguf.convert.writer import convert

    for path, outtype in ((files.base, "bf16"), (files.quant, "q4_k_m")):
        if not path.exists():
            log(f"making {path.name} for the evaluation (untimed)")
            convert(replica, path, outtype, threads=P.THREADS)


def _last_run(log_file: Path) -> str:
    text = log_file.read_text(errors="replace")
    return text[text.rfind("\n$ ") + 1:]


def eval_check(files: P.EvalFiles, lp_log: Path, lp_ref_log: Path, pair_json: dict) -> dict:
    plm = json.loads((files.folder / "plm-score.json").read_text())
    plm_ref = json.loads((files.folder / "plm-reference-score.json").read_text())
    lp = P.parse_perplexity_log(_last_run(lp_log))
    lp_ref = P.parse_perplexity_log(_last_run(lp_ref_log))
    m = re.search(r"Final estimate: PPL = ([\d.]+)", _last_run(lp_ref_log))
    lp_ref_ppl = float(m[1]) if m else None
    n_ctx, n_chunk, lp_tokens = P.kld_tokens(files.kld_base)
    ours = json.loads(files.tokens.read_text())
    equal = lp_tokens == ours[: n_ctx * n_chunk]
    first_diff = next((i for i, (x, y) in enumerate(zip(lp_tokens, ours)) if x != y), None)
    kl_a, kl_b = plm["kl_mean"], lp["kl_mean"]
    agree = kl_b is not None and f"{kl_a:.3g}" == f"{kl_b:.3g}"
    rel = abs(kl_a - kl_b) / kl_b if kl_b else float("nan")
    jobs = pair_json["jobs"]
    wall_a = jobs["plm-gguf"]["summary"]["wall_median_s"]
    wall_b = jobs["llama-perplexity --kl-divergence"]["summary"]["wall_median_s"]
    n_eval = plm["n_chunks"] * P.CTX
    lp_prompt_s = (lp["seconds_per_pass"] or float("nan")) * lp.get("passes", 1)
    table = [
        ("text tokens (llama.cpp tokenizer)", f"{len(ours)}", f"{n_ctx * n_chunk} stored in the .kld file ({n_chunk} chunks of {n_ctx})"),
        ("chunks x n_ctx evaluated", f"{plm['n_chunks']} x {P.CTX}", f"{lp.get('n_chunks')} x {lp.get('n_ctx')} (n_seq {lp.get('n_seq')}, batch {lp.get('batch_size')})"),
        ("mean KL", f"{kl_a:.6f}", f"{kl_b:.6f}"),
        ("median KL", f"{plm['kl_median']:.6f}", f"{lp['kl_median']:.6f}"),
        ("99th percentile KL", f"{plm['kl_p99']:.6f}", f"{lp['kl_p99']:.6f}"),
        ("max KL", f"{plm['kl_max']:.6f}", f"{lp['kl_max']:.6f}"),
        ("same top-1", f"{100 * plm['top1']:.3f} %", f"{lp['top1_percent']:.3f} %"),
        ("PPL (q4_k_m)", f"{math.exp(plm['nll_mean']):.4f}", f"{lp['ppl']:.4f}"),
        ("PPL (bf16 reference)", f"{math.exp(plm_ref['nll_mean']):.4f}", f"{lp['ppl_base']:.4f} (reference run: {lp_ref_ppl})"),
        ("wall, median (s)", f"{wall_a:.1f}", f"{wall_b:.1f}"),
        ("throughput by wall (tokens/s)", f"{n_eval / wall_a:.1f}", f"{n_eval / wall_b:.1f}"),
        ("prompt evaluation only (s)", f"{plm['prompt_seconds']:.1f} (+ load {plm['load_seconds']:.1f}, "
                                       f"+ {plm['gen_tokens']}-token generation test {plm['gen_seconds']:.1f})",
         f"{lp_prompt_s:.1f} ('seconds per pass' x {lp.get('passes')} pass(es) of {lp.get('n_seq')} chunks)"),
        ("threads", f"{P.THREADS}", f"{lp.get('n_threads')} (batch {lp.get('n_threads_batch')})"),
    ]
    notes = ["Both evaluate the same files: plm-gguf's q4_k_m against plm-gguf's bf16 conversion of the replica.",
             "Reference passes (bf16 file) are timed once each and reported in row eval-reference, outside the ratio.",
             "llama-perplexity stores the reference log-probabilities quantized to uint16; plm-gguf stores float32: "
             "small differences in KL are expected from that alone."]
    return {"plm": plm, "plm_reference": plm_ref, "llama_perplexity": lp, "llama_perplexity_reference": lp_ref,
            "llama_perplexity_reference_ppl": lp_ref_ppl, "kl_mean_3g": f"{kl_a:.3g} vs {kl_b:.3g}",
            "kl_agree_3g": agree, "kl_rel_diff": rel,
            "kl_note": f"relative difference {rel:.2e}",
            "tokens_equal": equal,
            "tokens_note": f"{n_chunk} x {n_ctx} tokens in llama-perplexity's .kld file vs plm-gguf's tokens.json"
                           + ("" if equal else f": first difference at {first_diff}"),
            "table": table, "notes": notes}


if __name__ == "__main__":
    sys.exit(main())
