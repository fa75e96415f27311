"""A sweep's outputs besides report.json: report.csv, the Pareto plot, and the rich table."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.table import Table


CSV_COLUMNS = ("recipe", "status", "base", "imatrix", "bpw", "file_bytes", "kl_mean", "kl_median", "kl_p99", "kl_max",
               "top1", "ppl", "ppl_ratio", "kv_mib", "kv_mib_expected", "compute_mib", "memory_mib", "peak_rss_bytes",
               "prompt_tps", "gen_tps", "quantize_seconds", "types", "reason")


def write_csv(report: dict, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in report["rows"].values():
            flat = dict(row)
            flat["types"] = "; ".join(f"{g}={'/'.join(t)}" for g, t in row.get("types", {}).items())
            writer.writerow(flat)


def write_plot(report: dict, path: Path) -> None:
    """File size against mean KL (log scale), the Pareto frontier joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"].values() if r.get("status") == "ok"]
    front = set(pareto_front(rows))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in rows:
        on = r["recipe"] in front
        marker = "^" if r.get("auto") else "s" if r["overrides"] else "o"
        color = "tab:red" if on else "tab:green" if r.get("auto") else "tab:blue"
        ax.scatter(r["file_bytes"] / 2**20, r["kl_mean"], marker=marker, s=40 if on else 24, color=color, zorder=3)
        ax.annotate(r["recipe"], (r["file_bytes"] / 2**20, r["kl_mean"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    frontier = sorted((r for r in rows if r["recipe"] in front), key=lambda r: r["file_bytes"])
    ax.plot([r["file_bytes"] / 2**20 for r in frontier], [r["kl_mean"] for r in frontier], color="tab:red",
            lw=1, zorder=2, label="Pareto frontier")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence from the unquantized model")
    ax.set_yscale("log")
    ax.set_title(f"{Path(report['source']).name}: size against accuracy (circles: stock types, squares: "
                 "recipes' mixes, triangles: --auto mixes)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(report: dict, width: int = 200) -> Table:
    """The sweep's rows for a terminal. Below 110 columns bits/weight, p99 KL and the imatrix
    column (all in report.csv) are left out so the rest reads whole at 80; a failed recipe's
    reason is printed under the table."""
    from rich import box
    from rich.markup import escape

    wide = width >= 110
    cols = ["recipe"] + (["bpw"] if wide else []) + ["MiB", "KL mean"] + (["KL p99"] if wide else [])
    cols += ["top-1", "PPL ×", "mem MiB", "pp t/s", "tg t/s"] + (["imat"] if wide else [])
    rows = list(report["rows"].values())
    front = set(pareto_front(rows))
    best = (report.get("recommendation") or {}).get("recipe")
    names = {r["recipe"]: r["recipe"] + (" ★" if r["recipe"] == best else "") + (" ◆" if r["recipe"] in front else "")
             + (" ✗" if r.get("status") != "ok" else "") for r in rows}
    failures = [f"{escape(r['recipe'])} [red]failed[/]: {escape(r.get('reason', ''))}"
                for r in rows if r.get("status") != "ok"]
    t = Table(title=f"quantization sweep of {Path(report['source']).name} (ctx {report['ctx']}, {report['text']})",
              box=box.SIMPLE_HEAD, pad_edge=False, caption="\n".join(failures) or None, caption_justify="left")
    for col in cols:
        t.add_column(col, justify="left" if col == "recipe" else "right", no_wrap=True,
                     min_width=max(map(len, names.values()), default=6) if col == "recipe" else None)
    for r in rows:
        if r.get("status") != "ok":
            t.add_row(escape(names[r["recipe"]]), *["-"] * (len(cols) - 1))
            continue
        cells = {"recipe": escape(names[r["recipe"]]), "bpw": f"{r['bpw']:.2f}", "MiB": f"{r['file_bytes'] / 2**20:,.1f}",
                 "KL mean": f"{r['kl_mean']:.4f}", "KL p99": f"{r['kl_p99']:.3f}", "top-1": f"{r['top1']:.1%}",
                 "PPL ×": f"{r['ppl_ratio']:.3f}", "mem MiB": f"{r['memory_mib']:,.0f}",
                 "pp t/s": f"{r['prompt_tps']:,.0f}", "tg t/s": f"{r['gen_tps']:,.1f}",
                 "imat": "yes" if r["imatrix"] else ""}
        t.add_row(*(cells[c] for c in cols))
    return t


def pareto_front(rows: list[dict]) -> list[str]:
    """Recipes no other recipe beats on both file size and mean KL."""
    ok = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: (r["file_bytes"], r["kl_mean"]))
    front, best = [], float("inf")
    for r in ok:
        if r["kl_mean"] < best:
            front.append(r["recipe"])
            best = r["kl_mean"]
    return front
