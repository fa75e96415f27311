"""`plm-gguf devices list|show|probe`, `build`, `deploy`, `undeploy`: parse, call one function, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)
MIB = 1024 * 1024

DEVICE = typer.Option("host", "--device", "-d", help="Profile name (see `plm-gguf devices list`).")
PROFILE = typer.Option(None, "--profile", help="A profile TOML file (instead of --device).")
ADDRESS = typer.Option("", "--address", help="ssh \\[user@]host\\[:port] or adb serial, overriding the profile.")
LLAMA_CPP = typer.Option(None, "--llama-cpp", help="llama.cpp source tree (default: the one llama-cpp-python vendors).")
GLIBC = typer.Option("", "--glibc", help="Link against this glibc (e.g. 2.36) instead of static musl.")
MLA_PATCH = typer.Option(True, "--mla-patch/--no-mla-patch",
                         help="Apply plm-gguf's llama.cpp patches (absorbed MLA: runs --kv-cache latent files; "
                              "stock-layout files run as before). --no-mla-patch builds stock llama.cpp.")


def _profile(device: str, profile_file: Optional[Path], address: str = "", exec_wrapper: Optional[str] = None):
    from .deploy import resolve_profile

    return resolve_profile(device, str(profile_file) if profile_file else None, address, exec_wrapper)


def progress(event: str, detail: str) -> None:
    console.print(f"[dim]{event:>6}[/] {escape(str(detail))}")


def cmd_list() -> None:
    """List device profiles (shipped and your own); a profile that does not load is a warning."""
    from plm_gguf.errors import UsageError

    from .profiles import HOST_TOOLCHAINS, SHIPPED_DIR, list_profiles, load_profile, user_profile_dir

    table = Table("name", "transport", "target", "description")
    broken = []
    for name in list_profiles():
        try:
            p = load_profile(name)
        except UsageError as err:
            broken.append(err.message)
            continue
        target = p.target.toolchain if p.target.toolchain in HOST_TOOLCHAINS else f"{p.target.triple} {p.target.mcpu}"
        mark = "" if Path(p.source).parent == SHIPPED_DIR else " (yours)"
        table.add_row(escape(name + mark), p.transport.kind, escape(target), escape(p.description))
    console.print(table)
    for message in broken:
        console.print(f"[yellow]warning:[/] {escape(message)} (not listed)", soft_wrap=True)
    console.print(f"[dim]add your own as {user_profile_dir()}/NAME.toml (`extends = \"rpi5\"` to start from one)[/]")


def cmd_show(name: str = typer.Argument(..., help="Profile name or TOML file.")) -> None:
    """Show one profile, resolved (extends applied)."""
    from dataclasses import asdict

    from .deploy import resolve_profile

    p = resolve_profile(name)
    data = asdict(p)
    data.pop("raw")
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                console.print(escape(f"{key}.{sub} = {v!r}"))
        else:
            console.print(escape(f"{key} = {value!r}"))


def cmd_probe(target: str = typer.Argument("host", help="Profile name."), profile_file: Optional[Path] = PROFILE,
              address: str = ADDRESS) -> None:
    """Print what a device is: CPU, features, memory, disk, libc, page size, temperature."""
    from .deploy import probe, suggest_profiles

    facts = probe(_profile(target, profile_file, address))
    rows = [
        ("machine", facts.machine), ("model", facts.model or "-"), ("CPUs", f"{facts.cpus} ({facts.cpu.summary})"),
        ("big cores", str(facts.big_cores)), ("features", " ".join(sorted(facts.cpu.features)) or "-"),
        ("memory", f"{facts.mem_available / MIB:.0f} MiB available of {facts.mem_total / MIB:.0f} MiB"),
        ("disk free", f"{facts.disk_free / MIB:.0f} MiB" if facts.disk_free >= 0 else "unknown"),
        ("libc", facts.libc), ("page size", str(facts.page_size)),
        *((f"GPU {i}", g.summary) for i, g in enumerate(facts.gpus)),
        *((("CUDA (driver)", facts.cuda_version),) if facts.cuda_version else ()),
        ("temperature", f"{facts.temperature_c:.1f} °C" if facts.temperature_c is not None else "not exposed"),
        ("profiles that run here", ", ".join(suggest_profiles(facts)) or "none"),
    ]
    for key, value in rows:
        console.print(f"[bold]{key:>22}[/]  {escape(value)}")


def cmd_build(device: str = DEVICE, profile_file: Optional[Path] = PROFILE, llama_cpp: Optional[Path] = LLAMA_CPP,
              glibc: str = GLIBC, jobs: int = typer.Option(0, "--jobs", "-j", help="Compile jobs (0: all CPUs)."),
              mla_patch: bool = MLA_PATCH) -> None:
    """Build (or find in the cache) llama-completion, llama-bench and llama-server for a device."""
    from .toolchain import build

    b = build(_profile(device, profile_file), llama_cpp, glibc=glibc, jobs=jobs, mla_patch=mla_patch,
              log=lambda s: progress("build", s))
    console.print(f"[green]built[/] {b.key} in {b.manifest['seconds']} s  ->  {b.path / 'bin'}")
    patches = b.manifest.get("patches") or {}
    console.print(f"  patches: {escape(', '.join(patches)) if patches else 'none (stock llama.cpp: --kv-cache full files only)'}")
    for name, size in sorted(b.manifest["sizes"].items()):
        console.print(f"  {name:<18} {size / MIB:7.1f} MiB (stripped)")


def cmd_deploy(model: Path = typer.Argument(..., help="The .gguf file."), device: str = DEVICE,
               profile_file: Optional[Path] = PROFILE, address: str = ADDRESS,
               ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length (default: the profile's)."),
               threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Threads (default: big cores)."),
               bench: bool = typer.Option(False, "--bench", help="Run llama-bench after the smoke test."),
               bench_prompt: int = typer.Option(64, "--bench-prompt", min=1, help="llama-bench's prompt tokens (-p)."),
               bench_gen: int = typer.Option(16, "--bench-gen", min=1, help="llama-bench's generated tokens (-n)."),
               bench_depth: str = typer.Option("", "--bench-depth", metavar="N,N,...",
                                               help="llama-bench at these context depths too (-d), e.g. 0,4096,16384."),
               serve: Optional[int] = typer.Option(None, "--serve", help="Start llama-server on this port."),
               forward_port: Optional[int] = typer.Option(None, "--forward-port",
                                                          help="Local end of the forward (default: PORT)."),
               llama_cpp: Optional[Path] = LLAMA_CPP, glibc: str = GLIBC, mla_patch: bool = MLA_PATCH,
               flash_attn: str = typer.Option("auto", "--flash-attn", metavar="auto|on|off",
                                              help="Flash attention: auto is on for --kv-cache latent files "
                                                   "(their fastest path) and off for stock ones, where it aborts "
                                                   "llama.cpp."),
               cache_type: str = typer.Option("f16", "--cache-type", metavar="TYPE",
                                              help="KV-cache type, K and V alike (-ctk/-ctv): f16, q8_0, q4_0, ...; "
                                                   "a quantized cache needs flash attention (latent files)."),
               exec_wrapper: Optional[str] = typer.Option(None, "--exec-wrapper", help="e.g. qemu-aarch64-static")
               ) -> None:
    """Check, push and smoke-test MODEL on a device; optionally bench it and serve it."""
    from .deploy import deploy
    from .meter import UploadMeter

    r = deploy(model, profile=_profile(device, profile_file, address, exec_wrapper), ctx=ctx, threads=threads,
               bench=bench or bool(bench_depth), bench_prompt=bench_prompt, bench_gen=bench_gen,
               bench_depths=parse_depths(bench_depth), serve_port=serve, forward_port=forward_port, llama_cpp=llama_cpp, glibc=glibc,
               mla_patch=mla_patch, flash_attn=flash_attn, cache_type=cache_type, progress=progress,
               meter=UploadMeter(console))
    print_deploy(r)


def parse_depths(text: str) -> tuple[int, ...]:
    """'0,4096,16384' -> (0, 4096, 16384); anything else is a UsageError."""
    from plm_gguf.errors import UsageError

    if not text:
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts) or len(parts) > 16:
        raise UsageError(f"--bench-depth {text!r} is not a list of token counts", "e.g. --bench-depth 0,4096,16384")
    return tuple(int(p) for p in parts)


def print_deploy(r) -> None:
    """What a deploy did, as `plm-gguf deploy` prints it (the demo prints it too)."""
    for warning in r.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"[green]deployed[/] to {escape(r.device)}:{escape(r.install_dir)}  (ctx {r.ctx}, {r.threads} threads, "
                  f"flash attention {'on' if r.memory.flash_attn else 'off'})")
    console.print(f"  llama.cpp: {escape(r.build_key)}"
                  + (" (with the absorbed-MLA patch: runs --kv-cache latent files)" if "-mla-" in r.build_key else ""))
    console.print(f"  memory: {escape(r.memory.describe())}")
    console.print(f"  sent: {escape(', '.join(r.sent)) or 'nothing (all up to date)'}")
    for name, offset in r.resumed.items():
        console.print(f"  resumed {escape(name)} from byte {offset} of an interrupted upload")
    if r.skipped:
        console.print(f"  already there: {escape(', '.join(r.skipped))}")
    console.print(f"  smoke: {escape(repr(r.smoke_output[-200:]))}")
    if r.buffers:
        console.print("  llama.cpp reported: " + ", ".join(f"{escape(k)} {v:.1f} MiB" for k, v in r.buffers.items())
                      + f" (the plan: KV {r.memory.kv_cache / MIB:.1f} MiB, compute {r.memory.compute / MIB:.1f} MiB)")
    if r.bench:
        b = r.bench
        temps = f"{b.temp_before_c} -> {b.temp_after_c} °C" if b.temp_before_c is not None else "not exposed"
        console.print(f"  bench: prompt {b.prompt_tps:.1f} tok/s (pp{b.n_prompt}), generation {b.gen_tps:.1f} tok/s "
                      f"(tg{b.n_gen}), {b.threads} threads, temperature {temps}, "
                      f"kernels: {', '.join(r.kernels) or 'armv8-a baseline (no dotprod, no Q4_0 repacking)'}")
        if len(b.by_depth) > 1:
            table = Table("depth", f"pp{b.n_prompt} tok/s", f"tg{b.n_gen} tok/s", box=None)
            for depth, pp, tg in b.by_depth:
                table.add_row(str(depth), f"{pp:,.1f}", f"{tg:,.1f}")
            console.print(table)
    if r.server:
        console.print(f"  server: pid {r.server.pid} on device 127.0.0.1:{r.server.port}; reach it: {escape(r.server.forward)}")


def cmd_undeploy(device: str = DEVICE, profile_file: Optional[Path] = PROFILE, address: str = ADDRESS) -> None:
    """Stop the server and remove everything deploy put on the device."""
    from .deploy import undeploy

    removed = undeploy(profile=_profile(device, profile_file, address))
    console.print(f"[green]removed[/] {escape(', '.join(removed))}")


def cmd_emulate(name: Optional[str] = typer.Argument(None, help="rpi5 or rpi4 (none: list what runs)."),
                port: int = typer.Option(0, "--port", min=0, max=65535,
                                         help="The loopback port for its sshd (0: a free one)."),
                stop: bool = typer.Option(False, "--stop", help="Stop it (every process in it ends, its files go).")
                ) -> None:
    """Start an emulated Raspberry Pi here (arm64 Debian bookworm under qemu, sshd on loopback), to
    rehearse `plm-gguf deploy --device rpi5 --address ...` without the board. Needs root."""
    from . import emulator

    if name is None:
        for m in emulator.MACHINES.values():
            up = emulator.running(m.name)
            console.print(f"{m.name:<6} {escape(m.description):<40} " + (f"[green]running[/] at {up.address}" if up else "stopped"))
        return
    if stop:
        console.print(f"[green]stopped[/] the emulated {name}" if emulator.stop(name) else f"the emulated {name} was not running")
        return
    m = emulator.machine(name)
    up = emulator.start(name, port=port, log=lambda s: progress("start", s))
    console.print(f"[green]running[/] an emulated {escape(m.description)}: arm64 Debian {emulator.SUITE} under qemu "
                  f"({m.qemu_cpu}), recorded /proc/cpuinfo and /proc/meminfo")
    for line in (f"  address  {up.address}",
                 f"  deploy   plm-gguf deploy MODEL.gguf --device {m.profile} --address {up.address}",
                 f"  shell    ssh -i {up.identity} -o UserKnownHostsFile={up.known_hosts} -p {up.port} {up.user}@127.0.0.1",
                 f"  stop     plm-gguf devices emulate {name} --stop"):
        console.print(escape(line), soft_wrap=True)  # whole lines, to copy


def register(app: typer.Typer) -> None:
    devices = typer.Typer(help="Device profiles and probing.", no_args_is_help=True)
    devices.command("list")(cmd_list)
    devices.command("show")(cmd_show)
    devices.command("probe")(cmd_probe)
    devices.command("emulate")(cmd_emulate)
    app.add_typer(devices, name="devices")
    app.command("build")(cmd_build)
    app.command("deploy")(cmd_deploy)
    app.command("undeploy")(cmd_undeploy)
