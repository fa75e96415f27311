"""`plm-gguf demo`: the whole pipeline on one machine, on a small PLM built locally.

No weights can be downloaded here, so the demo writes a PLM checkpoint with the real schema
(and the real Qwen2 vocabulary), then converts it, verifies each file against the torch
reference, and runs the later stages that are installed. The f32 and q4_k_m files are also
written in the absorbed-MLA layout (--kv-cache latent), verified and deployed beside the stock
ones, so the KV caches can be compared. The quantization sweep runs on the small *trained* PLM
that ships with the tests (tests/data/trained-plm): on random weights its KL and perplexity
would say nothing.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
# 4.4M parameters trained on Python's standard library (python -m plm_gguf.fixtures.train)
TRAINED = Path(__file__).resolve().parents[1] / "tests" / "data" / "trained-plm"

DEMO_TYPES = ("f32", "bf16", "f16", "q8_0", "q4_k_m")
LATENT_TYPES = ("f32", "q4_k_m")  # the absorbed-MLA layout, run on the patched llama.cpp


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    workdir: Path = typer.Option(Path("plm-gguf-demo"), "--workdir", help="Where the demo writes its files."),
    tokenizer: str = typer.Option("qwen", "--tokenizer", help="qwen (the real 151k vocabulary) or tiny."),
    deploy: bool = typer.Option(True, "--deploy/--no-deploy", help="Build llama.cpp for the device and bench it there."),
    emulate: bool = typer.Option(True, "--emulate/--no-emulate",
                                 help="Deploy to an emulated Raspberry Pi 5 where this machine can run one (root, "
                                      "Linux 6.7+, qemu-user-static); else, or with --no-emulate, to this machine."),
) -> None:
    """The whole pipeline on a small PLM built here: convert, verify, sweep, deploy to an emulated
    Raspberry Pi 5 (or this machine)."""
    # the stages, imported here so that `plm-gguf --help` (which registers this command) stays fast
    from plm_gguf.convert.verify import verify
    from plm_gguf.convert.writer import convert
    from plm_gguf.devices import cli as devices_cli
    from plm_gguf.devices import emulator
    from plm_gguf.devices.deploy import deploy as deploy_model
    from plm_gguf.devices.meter import UploadMeter
    from plm_gguf.fixtures.checkpoint import tiny_config, write_tiny_checkpoint
    from plm_gguf.quant_eval.cli import sweep_and_print
    from plm_gguf.quant_eval.sweep import default_corpus

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = workdir / "PLM-demo-checkpoint"
    # every matrix row a multiple of 256, so llama.cpp's K-quants apply as they do on PLM-1.8B
    config = tiny_config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                         kv_lora_rank=256, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=64,
                         vocab_size=151936 if tokenizer == "qwen" else 4096)
    console.rule("1. a PLM checkpoint")
    write_tiny_checkpoint(ckpt_dir, config, tokenizer="qwen" if tokenizer == "qwen" else "tiny")
    console.print(f"{ckpt_dir}: PLM's schema (MLA, squared ReLU, tied embeddings), random bf16 weights, "
                  f"{tokenizer} tokenizer")

    console.rule("2. convert and verify")
    table = Table(box=box.SIMPLE, caption="file KL: the GGUF's weights against the checkpoint's (torch); "
                                          "llama KL: llama.cpp against the torch reference")
    for col in ("type", "layout", "MiB", "conv s", "file KL", "llama KL", "top-1", "verdict"):
        table.add_column(col, justify="right")
    files = {}
    runs = [(t, "full") for t in DEMO_TYPES] + [(t, "latent") for t in LATENT_TYPES]
    for outtype, layout in runs:
        suffix = "" if layout == "full" else "-latent"
        result = convert(ckpt_dir, workdir / f"plm-demo-{outtype.upper()}{suffix}.gguf", outtype, force=True,
                         kv_cache=layout)
        files[outtype + suffix] = result.outfile
        check = verify(ckpt_dir, result.outfile)
        verdict = "reported" if check.threshold is None else ("pass" if check.passed else "FAIL")
        file_kl = "-" if check.file_stats is None else f"{check.file_stats.mean_kl:.2g}"
        table.add_row(outtype, layout, f"{result.nbytes / 2**20:.1f}", f"{result.seconds:.2f}", file_kl,
                      f"{check.stats.mean_kl:.2g}", f"{check.stats.top1:.1%}", verdict)
    console.print(table)

    if (TRAINED / "model.safetensors").is_file():
        console.rule("3. quantization sweep of a small trained PLM (budget: this machine's memory)")
        sweep_source = TRAINED
    else:  # an installed wheel carries no test data
        console.rule("3. quantization sweep (random weights: KL says little; budget: this machine's memory)")
        sweep_source = files["f32"]
    sweep_and_print(sweep_source, types="q8_0,q6_k,q4_k_m,q4_0", corpus=default_corpus(), corpus_name="built-in corpus",
                    ctx=256, device=("host", None, ""), out=workdir / "sweep",
                    replace=True)  # the demo owns its folder
    if not deploy:
        return
    profile, address, started = _deploy_target(emulate)
    where = f"the emulated Raspberry Pi 5 at {address}" if address else "this machine (host profile)"
    try:
        for rule, name in ((f"4. deploy to {where} and benchmark", "q4_k_m"),
                           ("5. the same model in the absorbed-MLA layout: latent KV cache, flash attention",
                            "q4_k_m-latent")):
            console.rule(rule)
            result = deploy_model(files[name], profile_name=profile, address=address, ctx=512, bench=True,
                                  progress=devices_cli.progress, meter=UploadMeter(devices_cli.console))
            devices_cli.print_deploy(result)
    finally:
        if started:
            emulator.stop("rpi5")
            console.print("stopped the emulated Raspberry Pi 5 (nothing left running)")


def _deploy_target(emulate: bool) -> tuple[str, str, bool]:
    """(profile, address, started here): the emulated Pi 5 when this machine can run one, else the host."""
    from plm_gguf.devices import cli as devices_cli
    from plm_gguf.devices import emulator
    from plm_gguf.errors import PlmGgufError

    if not emulate:
        return "host", "", False
    was_running = emulator.running("rpi5") is not None
    try:
        machine = emulator.start("rpi5", log=lambda line: devices_cli.progress("start", line))
    except PlmGgufError as err:
        console.print(f"[yellow]the emulated Raspberry Pi 5 cannot run here[/] ({err.message}); "
                      "deploying to this machine instead")
        return "host", "", False
    console.print(f"deploying to an emulated Raspberry Pi 5 (arm64 Debian bookworm under qemu, {machine.address}); "
                  "its speed is qemu's, not a Pi's")
    return "rpi5", machine.address, not was_running
