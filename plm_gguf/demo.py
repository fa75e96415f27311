"""`plm-gguf demo`: the whole pipeline on one machine, on a small PLM built locally.

No weights can be downloaded here, so the demo writes a PLM checkpoint with the real schema
(and the real Qwen2 vocabulary), then converts it, verifies each file against the torch
reference, and runs the later stages that are installed.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)

DEMO_TYPES = ("f32", "bf16", "f16", "q8_0", "q4_k_m")


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    workdir: Path = typer.Option(Path("plm-gguf-demo"), "--workdir", help="Where the demo writes its files."),
    tokenizer: str = typer.Option("qwen", "--tokenizer", help="qwen (the real 151k vocabulary) or tiny."),
) -> None:
    """Build a small PLM checkpoint, convert it to several types and verify each one."""
    from plm_gguf.convert.verify import verify
    from plm_gguf.convert.writer import convert
    from plm_gguf.fixtures.checkpoint import tiny_config, write_tiny_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = workdir / "PLM-demo-checkpoint"
    vocab = 151936 if tokenizer == "qwen" else 1024
    config = tiny_config(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                         kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, vocab_size=vocab)
    console.rule("1. checkpoint")
    write_tiny_checkpoint(ckpt_dir, config, tokenizer="qwen" if tokenizer == "qwen" else "tiny")
    console.print(f"wrote a PLM checkpoint (bf16 safetensors, {tokenizer} tokenizer) to {ckpt_dir}")

    console.rule("2. convert and verify")
    table = Table()
    for col in ("type", "size MiB", "convert s", "mean KL", "top-1", "verdict"):
        table.add_column(col, justify="right")
    files = {}
    for outtype in DEMO_TYPES:
        result = convert(ckpt_dir, workdir / f"plm-demo-{outtype.upper()}.gguf", outtype, force=True)
        files[outtype] = result.outfile
        check = verify(ckpt_dir, result.outfile)
        verdict = "reported" if check.threshold is None else ("pass" if check.passed else "FAIL")
        table.add_row(outtype, f"{result.nbytes / 2**20:.2f}", f"{result.seconds:.2f}", f"{check.stats.mean_kl:.3g}",
                      f"{check.stats.top1:.1%}", verdict)
    console.print(table)
    _later_stages(ckpt_dir, files, workdir)


def _later_stages(ckpt_dir: Path, files: dict[str, Path], workdir: Path) -> None:
    """The sweep and the host deploy, where those stages are installed."""
    try:
        from plm_gguf.devices.deploy import demo_deploy
    except ImportError:
        return
    console.rule("3. deploy to this machine (host profile) and benchmark")
    demo_deploy(files["q4_k_m"], console=console)
