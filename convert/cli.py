"""`plm-gguf convert` and `plm-gguf verify`: parse, call the stage, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from plm_gguf.errors import VerificationError
from plm_gguf.options import check_threads

console = Console(highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(verify)


def convert(
    model: str = typer.Argument(..., help="Checkpoint folder, or a Hugging Face repo id such as PLM-Team/PLM-1.8B-Instruct."),
    outtype: str = typer.Option("auto", "--outtype", help="auto, f32, f16, bf16, q8_0, or any llama.cpp type (q4_k_m, q6_k, iq4_nl, ...)."),
    outfile: Optional[Path] = typer.Option(None, "--outfile", help="Output .gguf path (default: ./<model>-<TYPE>.gguf)."),
    verify_: bool = typer.Option(False, "--verify/--no-verify", help="Compare the result with the torch reference."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    pre_tokenizer: Optional[str] = typer.Option(None, "--pre-tokenizer", help="llama.cpp pre-tokenizer name, overriding detection."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Threads for quantization and verification."),
    kv_cache: str = typer.Option("full", "--kv-cache", help="full: stock llama.cpp layout. latent: absorbed MLA, "
                                 "8.9x smaller KV cache; needs llama.cpp with patches/llama.cpp (plm-gguf builds it)."),
) -> None:
    """Convert a PLM checkpoint to GGUF (streaming; nothing is left behind on failure)."""
    from plm_gguf.convert.writer import convert as run
    from plm_gguf.memory import KVLayout, parse_layout

    layout = parse_layout(kv_cache)  # the one place --kv-cache is read
    check_threads(threads)

    result = run(model, outfile, outtype, force=force, pre_tokenizer=pre_tokenizer, progress=True, threads=threads,
                 kv_cache=layout)
    mib = result.nbytes / 2**20
    speed = result.source_bytes / 2**20 / max(result.seconds, 1e-9)
    console.print(f"[green]wrote[/] {result.outfile} ({result.outtype}, {mib:,.1f} MiB) in {result.seconds:.1f} s, "
                  f"{speed:,.0f} MiB/s of checkpoint")
    console.print("tensor types: " + ", ".join(f"{k} {v}" for k, v in sorted(result.tensor_types.items())))
    for name, count, wanted, got in _group_fallbacks(result.fallbacks):
        what = f"{name} ({count} tensors, one per block)" if count > 1 else name
        console.print(f"[yellow]fallback[/] {what}: rows do not fit {wanted} blocks, written as {got}")
    for note in result.notes:
        console.print(f"[yellow]note[/] {note}")
    if layout is KVLayout.LATENT:
        console.print("[yellow]latent KV layout[/]: stock llama.cpp refuses this file; plm-gguf verify, quantize "
                      "and deploy use llama.cpp with patches/llama.cpp applied")
    if verify_:
        _verify_and_print(model, result.outfile, threads)


def _group_fallbacks(fallbacks: list[tuple[str, str, str]]) -> list[tuple[str, int, str, str]]:
    """One line per tensor kind: blk.N.attn_k_b.weight of every block -> blk.*.attn_k_b.weight, N."""
    import re

    groups: dict[tuple[str, str, str], list[str]] = {}
    for name, wanted, got in fallbacks:
        groups.setdefault((re.sub(r"^blk\.\d+\.", "blk.*.", name), wanted, got), []).append(name)
    return [(pattern if len(names) > 1 else names[0], len(names), wanted, got)
            for (pattern, wanted, got), names in groups.items()]


def verify(
    model: str = typer.Argument(..., help="The checkpoint the GGUF was converted from."),
    gguf_file: Path = typer.Argument(..., help="The GGUF file to check."),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Check a GGUF against the torch reference: KL, top-1, logits, tokenization."""
    check_threads(threads)
    _verify_and_print(model, gguf_file, threads)


def _verify_and_print(model: str, gguf_file: Path, threads: int | None) -> None:
    from plm_gguf.convert.verify import verify as run

    result = run(model, gguf_file, threads=threads)
    limit = "-" if result.threshold is None else f"{result.threshold:g}"
    columns: list[tuple[str, object, str, str]] = []  # header, stats, limit, verdict

    def mark(ok: bool) -> str:
        return "[green]pass[/]" if ok else "[red]FAIL[/]"

    if result.file_stats is not None:
        columns.append(("file vs checkpoint", result.file_stats, limit, mark(result.file_passed)))
    if result.threshold is None:
        columns.append(("llama.cpp", result.stats, "-", "reported"))
    elif result.matched_dtype is None:
        columns.append(("llama.cpp", result.stats, limit, mark(result.runtime_passed)))
    else:
        from plm_gguf.convert.verify import RUNTIME_GROSS_KL, RUNTIME_MIN_TOP1

        columns.append((f"llama.cpp ({result.matched_dtype} inputs)", result.stats,
                        f"{RUNTIME_GROSS_KL:g}, top-1 ≥ {RUNTIME_MIN_TOP1:.0%}",
                        mark(result.runtime_passed)))
        columns.append(("llama.cpp (f32 reference)", result.exact, "-", "reported"))
    table = Table(title=f"{gguf_file.name} ({result.file_type}) against the torch reference")
    table.add_column("")
    for header, *_ in columns:
        table.add_column(header, justify="right")
    metrics = (("tokens", lambda s: str(s.n_tokens)), ("mean KL", lambda s: f"{s.mean_kl:.3g}"),
               ("max KL", lambda s: f"{s.max_kl:.3g}"), ("top-1", lambda s: f"{s.top1:.2%}"),
               ("max |Δlogit|", lambda s: f"{s.max_abs_diff:.3g}"))
    for label, fmt in metrics:
        table.add_row(label, *(fmt(stats) for _, stats, _, _ in columns))
    table.add_row("mean KL limit", *(lim for _, _, lim, _ in columns))
    table.add_row("result", *(verdict for *_, verdict in columns))
    console.print(table)
    console.print(f"peak memory: {result.peak_rss_bytes / 2**20:,.0f} MiB (plm-gguf, the torch reference), "
                  f"{result.llama_peak_rss_bytes / 2**20:,.0f} MiB (llama.cpp, the model file mapped)")
    if not result.token_diffs:
        console.print(f"tokenization: llama.cpp and the checkpoint's tokenizer agree on all {result.n_samples} samples")
    for d in result.token_diffs:
        why = "only NFC normalisation (llama.cpp does not normalise)" if d.nfc_only else "a real tokenizer difference"
        console.print(f"[yellow]tokenization differs[/] on {d.name!r}: {why}; "
                      f"tokenizer {len(d.hf_ids)} ids, llama.cpp {len(d.llama_ids)} ids")
    if not result.passed:
        what = "its weights do not compute what the checkpoint computes" if not result.file_passed \
            else "llama.cpp does not compute what the reference computes on it"
        raise VerificationError(f"{gguf_file.name} failed verification: {what}",
                                "see the table above; report it with this output")
