"""How long the recipe search takes against a 10-recipe sweep, on the full-size replica.

    python -m benchmarks.auto [--only sweep|auto] [--budget-mb 1500] [--out benchmarks/results/auto.json]

Both jobs start from the replica checkpoint in folders of their own, so each pays the same
preparation (the lossless base, its verification, the reference log-probs, the importance
matrix); `sweep` then measures ten stock types, `auto` probes every tensor group and measures
the one mix it chooses for --budget-mb. Goal (issue 16): auto <= 2 x sweep. The wall times of
the two are taken by benchmarks.measure.run_command (its own process tree, peak RSS too) and
saved as they finish, so the jobs can be run one at a time (--only) on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from benchmarks.measure import run_command
from benchmarks.replica import ensure_replica

WORK = Path(__file__).parent / "work" / "auto"
TYPES = "q8_0,q6_k,q5_k_m,q5_k_s,q4_k_m,q4_k_s,q4_0,iq4_nl,q3_k_m,q2_k"


STOCK = ("q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


def table(folder: Path) -> str:
    """Issue 16's table from a `--sweep --auto --recipes benchmarks/recipes/stock-imatrix.toml` folder:
    each stock type (and with an imatrix) against the --auto mix made at its size."""
    report = json.loads((folder / "report.json").read_text())
    rows = report["rows"]
    lines = ["| stock type | stock: size, mean KL, top-1 | stock with imatrix: KL, top-1 | --auto mix: size (vs stock), "
             "mean KL (predicted), top-1 | lower KL |", "|---|---|---|---|---|"]
    for name in STOCK:
        stock = rows[name]
        imat = rows.get(f"{name}-imatrix", stock)
        mix = next(r for r in rows.values() if r.get("auto") and r["auto"]["most_bytes"] == stock["file_bytes"])
        lower = mix["kl_mean"] < min(stock["kl_mean"], imat["kl_mean"])
        lines.append(f"| {name} | {stock['file_bytes']:,} B, {stock['kl_mean']:.4f}, {stock['top1']:.1%} | "
                     f"{imat['kl_mean']:.4f}, {imat['top1']:.1%} | {mix['file_bytes']:,} B "
                     f"({mix['file_bytes'] / stock['file_bytes'] - 1:+.2%}), {mix['kl_mean']:.4f} "
                     f"({mix['auto']['predicted_kl']:.4f}), {mix['top1']:.1%} | {'yes' if lower else 'NO'} |")
    search = report["auto_search"]
    lines.append(f"\nsearch: {search['groups']} tensor groups, {search['probes']} probes, {search['seconds']:,.1f} s "
                 f"(probes and weight errors); reference perplexity on the text {report['reference']['ppl']:,.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["sweep", "auto"])
    parser.add_argument("--budget-mb", type=float, default=1500.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "auto.json")
    parser.add_argument("--sweep-time-log", type=Path, help="record the sweep from a `/usr/bin/time -v` log of the "
                        "same command run by hand (its folder given as --sweep-folder) instead of running it")
    parser.add_argument("--sweep-folder", type=Path)
    parser.add_argument("--table", type=Path, help="only print issue 16's table from this sweep folder")
    a = parser.parse_args(argv)
    if a.table:
        print(table(a.table))
        return 0
    replica = ensure_replica()
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    plm = [sys.executable, "-m", "plm_gguf.cli", "quantize", str(replica)]
    jobs = {"sweep": plm + ["--sweep", "--types", TYPES, "--out", str(WORK / "sweep")],
            "auto": plm + ["--auto", "--budget-mb", f"{a.budget_mb:g}", "--out", str(WORK / "search")]}
    if a.sweep_time_log:
        text = a.sweep_time_log.read_text()
        clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)[1]
        seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) * 1024
        report = json.loads((a.sweep_folder / "report.json").read_text())
        command = re.search(r'Command being timed: "(.*)"', text)[1]
        results["sweep"] = {"command": command, "seconds": round(seconds, 1), "peak_rss_bytes": rss,
                            "rows": len(report["rows"]), "measured_by": "/usr/bin/time -v, run by hand"}
        a.only = a.only or "auto"
    for name, command in jobs.items():
        if a.only and name != a.only:
            continue
        folder = Path(command[-1])
        shutil.rmtree(folder, ignore_errors=True)
        print(f"{name}: {' '.join(command)}", flush=True)
        WORK.mkdir(parents=True, exist_ok=True)
        wall, peak_rss, cpu = run_command(command, log=WORK / f"{name}.log")
        report = json.loads((folder / "report.json").read_text())
        results[name] = {"command": " ".join(command[2:]), "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                         "peak_rss_bytes": peak_rss, "rows": len(report["rows"]), "search": report.get("auto_search")}
        a.out.write_text(json.dumps(results, indent=1))
        print(f"{name}: {wall:,.1f} s", flush=True)
    if {"sweep", "auto"} <= set(results):
        ratio = results["auto"]["seconds"] / results["sweep"]["seconds"]
        results["ratio"] = round(ratio, 3)
        a.out.write_text(json.dumps(results, indent=1))
        print(f"auto / sweep = {ratio:.2f} (goal <= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
