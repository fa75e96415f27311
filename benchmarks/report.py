"""The machine, the summary statistics, the goals, and results/latest.{md,json}."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
from pathlib import Path

from benchmarks.measure import Sample
from benchmarks.pairs import Pair

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30

# Goals of the issue, as ratios plm-gguf / other (lower is better).
GOALS = {
    "bf16_vs_copy": 1.5,  # bf16 convert wall time / cp wall time
    "convert_wall": 0.6,  # f16 and q8_0 wall / convert_hf_to_gguf.py's
    "convert_rss": 0.3,  # peak RSS / convert_hf_to_gguf.py's (f16, q8_0; bf16 reported too)
    "q4_wall": 0.5,  # one command / convert + llama-quantize
    "q4_rss_bytes": 600e6,  # the one command's peak RSS
    "q4_disk_vs_output": 1.0,  # its output folder's peak disk use / the output's size
    "eval_wall": 1.2,  # evaluation wall / llama-perplexity's (throughput within 1.2x)
}


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next(int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines()
               if l.startswith("MemTotal"))
    work = REPO / "benchmarks" / "work"
    st = os.statvfs(work)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "disk": _disk(work),
            "disk_free_bytes": st.f_bavail * st.f_frsize, "disk_size_bytes": st.f_blocks * st.f_frsize}


def _disk(path: Path) -> str:
    try:
        src = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True).stdout
        dev, fstype = src.splitlines()[1].split()
        name = Path(dev).name
        rot = Path(f"/sys/block/{name}/queue/rotational")
        kind = ("rotational" if rot.read_text().strip() == "1" else "non-rotational") if rot.exists() else "?"
        return f"{dev} ({fstype}, {kind})"
    except (OSError, IndexError, ValueError):
        return "unknown"


def versions() -> dict:
    out = {}
    for pkg in ("plm-gguf", "llama-cpp-python", "torch", "numpy", "gguf", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    out["plm-gguf_git"] = git.stdout.strip() or "unknown"
    return out


def summary(samples: list[Sample]) -> dict:
    walls = [s.wall_s for s in samples]
    others = [s.others_cpu for s in samples]
    rss = [s.peak_rss_bytes for s in samples]
    out = {"n": len(samples), "wall_median_s": statistics.median(walls), "wall_min_s": min(walls),
           "wall_max_s": max(walls), "rss_median_bytes": statistics.median(rss), "rss_min_bytes": min(rss),
           "rss_max_bytes": max(rss), "cpu_median_s": statistics.median(s.cpu_s for s in samples),
           "others_cpu_max": max(others)}
    disks = [s.peak_disk_bytes for s in samples if s.peak_disk_bytes is not None]
    if disks:
        out["peak_disk_max_bytes"] = max(disks)
        out["final_disk_bytes"] = samples[-1].final_disk_bytes
    return out


def pair_ratios(pair: Pair) -> dict | None:
    """Per-repeat ratios A/B (run i of A against run i of B), and the ratio of medians."""
    if pair.b is None:
        return None
    a, b = pair.samples[pair.a.name], pair.samples[pair.b.name]
    wall = [x.wall_s / y.wall_s for x, y in zip(a, b)]
    rss = [x.peak_rss_bytes / y.peak_rss_bytes for x, y in zip(a, b)]
    sa, sb = summary(a), summary(b)
    return {"wall_per_pair": wall, "rss_per_pair": rss,
            "wall": sa["wall_median_s"] / sb["wall_median_s"], "rss": sa["rss_median_bytes"] / sb["rss_median_bytes"]}


def pair_json(pair: Pair) -> dict:
    jobs = {}
    for job in pair.jobs():
        jobs[job.name] = {"commands": [_shell(c) for c in job.steps],
                          "samples": [s.to_json() for s in pair.samples.get(job.name, [])],
                          "files_left": pair.listings.get(job.name, [])}
        if pair.samples.get(job.name):
            jobs[job.name]["summary"] = summary(pair.samples[job.name])
    return {"key": pair.key, "title": pair.title, "a": pair.a.name, "b": pair.b.name if pair.b else None,
            "jobs": jobs, "ratios": pair_ratios(pair) if pair.samples else None, "notes": pair.notes}


def _shell(cmd: list[str]) -> str:
    """A command as one shell line, with paths shown relative to the repository."""
    root = str(REPO) + "/"
    return shlex.join(c.replace(root, "") for c in cmd)


def goals(results: dict) -> list[dict]:
    """Each goal with the measured ratio and whether it is met."""
    pairs = {p["key"]: p for p in results["pairs"]}
    rows = []

    def med(key: str, job: str, what: str = "wall_median_s") -> float | None:
        p = pairs.get(key)
        return p["jobs"][job]["summary"][what] if p and "summary" in p["jobs"][job] else None

    def add(goal: str, value: float | None, limit: float, extra: str = "") -> None:
        if value is not None:
            rows.append({"goal": goal, "measured": value, "limit": limit, "met": value <= limit, "note": extra})

    copy = med("copy", "cp")
    bf16 = med("convert-bf16", "plm-gguf")
    if copy and bf16:
        add("bf16 convert wall / cp wall", bf16 / copy, GOALS["bf16_vs_copy"])
    for t in ("bf16", "f16", "q8_0"):
        r = pairs.get(f"convert-{t}", {}).get("ratios")
        if r:
            if t != "bf16":
                add(f"{t} convert wall / convert_hf_to_gguf.py", r["wall"], GOALS["convert_wall"])
            add(f"{t} convert peak RSS / convert_hf_to_gguf.py", r["rss"], GOALS["convert_rss"],
                "" if t != "bf16" else "bf16 is not named in the goal; reported against the same limit")
    r = pairs.get("q4_k_m", {}).get("ratios")
    if r:
        left = pairs["q4_k_m"]["jobs"]["plm-gguf"]["files_left"]
        only_product = all(l == ["plm-Q4_K_M.gguf"] for l in left)
        add("q4_k_m one command wall / two steps", r["wall"], GOALS["q4_wall"])
        job = pairs["q4_k_m"]["jobs"]["plm-gguf"]["summary"]
        add("q4_k_m one command peak RSS (MB)", job["rss_median_bytes"] / 1e6, GOALS["q4_rss_bytes"] / 1e6)
        if job.get("peak_disk_max_bytes") and job.get("final_disk_bytes"):
            add("q4_k_m peak disk / output size", job["peak_disk_max_bytes"] / job["final_disk_bytes"],
                GOALS["q4_disk_vs_output"] * 1.01, "within 1%: the folder's allocation granularity")
        rows.append({"goal": "q4_k_m: no full-size intermediate left on disk", "measured": only_product, "limit": True,
                     "met": only_product, "note": f"files left after each run: {left[0] if left else '-'}"})
    r = pairs.get("eval", {}).get("ratios")
    if r:
        add("evaluation wall / llama-perplexity (throughput within 1.2x)", r["wall"], GOALS["eval_wall"])
    check = results.get("eval_check")
    if check:
        rows.append({"goal": "same mean KL to 3 significant digits", "measured": check["kl_mean_3g"],
                     "limit": "equal", "met": check["kl_agree_3g"], "note": check["kl_note"]})
        rows.append({"goal": "same evaluated tokens", "measured": check["tokens_equal"], "limit": True,
                     "met": check["tokens_equal"], "note": check["tokens_note"]})
    return rows


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _s(x: float) -> str:
    return f"{x:.1f}"


def markdown(results: dict) -> str:
    m, v, t = results["machine"], results["versions"], results["toolchain"]
    lines = ["# plm-gguf against llama.cpp's own tools", "",
             f"Run {results['started']} - {results['finished']} UTC with `{results['command']}`.", "",
             f"**Machine**: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / GiB:.1f} GiB RAM, disk {m['disk']}, "
             f"Linux {m['kernel']}, Python {m['python']}.  ",
             f"**plm-gguf** {v['plm-gguf']} (git {v['plm-gguf_git']}), torch {v['torch']}, numpy {v['numpy']}, "
             f"gguf {v['gguf']}, llama-cpp-python {v['llama-cpp-python']}.  ",
             f"**llama.cpp** commit {t['llama_cpp_commit']} (vendored by llama-cpp-python {t['llama_cpp_python']}; "
             f"`{t['llama_cpp_build']}`), tools built with `cmake {' '.join(t['cmake_flags'])}`; "
             f"convert_hf_to_gguf.py's venv: " + ", ".join(f"{k} {x}" for k, x in t["convert_venv"].items()) + ".  ",
             f"**Input**: {results['input']['path']} ({results['input']['bytes'] / 1e9:.2f} GB safetensors, bf16).  ",
             f"**Settings**: {results['settings']['repeat']} runs per job unless noted, A and B alternating; "
             f"page cache dropped before every run: {'yes' if results['settings']['drop_caches'] else 'no'}; "
             f"{results['settings']['threads']} threads wherever a tool takes a thread count.  ",
             f"**Load**: 1-minute load average {results.get('load_at_start', ['-'])[0]} when the timed runs began; "
             f"seen at the starts and ends of the runs (the benchmark's own jobs included): "
             f"{results['load']['min']:.2f} - {results['load']['max']:.2f} (median {results['load']['median']:.2f}); "
             f"CPU used by other processes during the runs: median {100 * results['load']['others_cpu_median']:.0f} %, "
             f"max {100 * results['load']['others_cpu_max']:.0f} % of the {m['cores']} cores.",
             "", "| job | tool | runs | wall median (min-max) | peak RSS median (min-max) | peak disk | CPU s | others' CPU (max) | ratio A/B wall (per pair) | ratio A/B RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in results["pairs"]:
        r = p["ratios"]
        for i, (name, job) in enumerate(p["jobs"].items()):
            s = job.get("summary")
            if not s:
                continue
            ratio = rss = ""
            if r and i == 0:
                ratio = f"**{r['wall']:.2f}** ({', '.join(f'{x:.2f}' for x in r['wall_per_pair'])})"
                rss = f"**{r['rss']:.2f}**"
            lines.append(f"| {p['key'] if i == 0 else ''} | {name} | {s['n']} | {_s(s['wall_median_s'])} s "
                         f"({_s(s['wall_min_s'])}-{_s(s['wall_max_s'])}) | {_gb(s['rss_median_bytes'])} "
                         f"({_gb(s['rss_min_bytes'])}-{_gb(s['rss_max_bytes'])}) | {_gb(s.get('peak_disk_max_bytes'))} "
                         f"| {s['cpu_median_s']:.0f} | {100 * s['others_cpu_max']:.0f} % | {ratio} | {rss} |")
    lines += ["", "Ratios are plm-gguf (A) over the other tool (B): below 1 is faster or lighter. Peak RSS is "
              "the largest single process of the job's tree (os.wait4); peak disk is the job's output folder, "
              "polled every 50 ms. CPU s: user + system seconds of the job's processes (median). Others' CPU: the "
              "share of all cores busy with anything but the job during its runs (kernel writeback of the job's "
              "own output included).", "", "## Goals", "", "| goal | measured | limit | met |", "|---|---|---|---|"]
    for g in results["goals"]:
        val = g["measured"]
        shown = f"{val:.2f}" if isinstance(val, float) else str(val)
        lines.append(f"| {g['goal']} | {shown} | {g['limit']} | {'yes' if g['met'] else '**no**'} |"
                     + (f" {g['note']}" if g.get("note") else ""))
    check = results.get("eval_check")
    if check:
        lines += ["", "## Evaluation check (same q4_k_m file, same bf16 reference file, same text, -c 512)", "",
                  "| | plm-gguf | llama-perplexity |", "|---|---|---|"]
        for label, a, b in check["table"]:
            lines.append(f"| {label} | {a} | {b} |")
        lines += [""] + [f"- {n}" for n in check["notes"]]
    notes = results.get("notes", []) + [n for p in results["pairs"] for n in p.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Commands", ""]
    for p in results["pairs"]:
        for name, job in p["jobs"].items():
            for c in job["commands"]:
                lines.append(f"- {p['key']} / {name}: `{c}`")
    return "\n".join(lines) + "\n"
