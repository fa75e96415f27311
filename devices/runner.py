"""Running the installed llama.cpp binaries on the device: smoke test, llama-bench, llama-server.

Flash attention is on or off as deploy decided (checks.resolve_flash_attn): on for latent-layout
files by default (the patched build's fastest path for them), always off for stock-layout PLM
files, where llama.cpp's flash-attention path aborts.

A server is stopped by the pid it recorded in server.pid, and only after /proc/PID/cmdline on
the device shows that process runs the installed llama-server: a pid file that names another
process (reused after a reboot, or written by hand) never gets anything killed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from plm_gguf.errors import DeviceError

from .facts import parse_temperature_output, temperature_script
from .profiles import HOST_TOOLCHAINS, Profile
from .transports import Transport, exec_argv, sh

SMOKE_PROMPT = "The capital of France is"
SERVER = "llama-server"
PID = re.compile(r"[1-9][0-9]{0,6}")  # Linux pids go up to 2**22
SIGNALS = {132: "SIGILL (illegal instruction: the build uses CPU features the device lacks)",
           134: "SIGABRT (llama.cpp aborted)", 137: "SIGKILL (out of memory?)", 139: "SIGSEGV"}


@dataclass
class BenchResult:
    prompt_tps: float
    gen_tps: float
    threads: int
    n_prompt: int
    n_gen: int
    temp_before_c: float | None
    temp_after_c: float | None
    raw: list

    @property
    def by_depth(self) -> list[tuple[int, float, float]]:
        """(depth, prompt tok/s, generation tok/s) for each depth llama-bench ran at (-d)."""
        rows: dict[int, list[float]] = {}
        for r in self.raw:
            row = rows.setdefault(int(r.get("n_depth", 0)), [0.0, 0.0])
            if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
                row[0] = float(r.get("avg_ts", 0.0))
            elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
                row[1] = float(r.get("avg_ts", 0.0))
        return [(depth, pp, tg) for depth, (pp, tg) in sorted(rows.items())]


@dataclass
class ServerInfo:
    port: int
    pid: int
    url: str
    forward: str  # what was set up, or the command the user runs to reach the server


# /proc/cpuinfo feature -> what a person calls the extension, newest (likeliest to be missing) first
ARM_EXTENSIONS = (("sve2", "SVE2"), ("sve", "SVE"), ("i8mm", "i8mm (int8 matrix multiply)"),
                  ("asimddp", "dotprod (int8 dot product)"), ("asimdhp", "fp16 arithmetic"),
                  ("fphp", "fp16 arithmetic"))


def sigill_hint(profile: Profile, manifest: dict | None) -> str:
    """Which extension the build probably used that this CPU cannot run, and the setting that avoids it."""
    manifest = manifest or {}
    if (manifest.get("toolchain") or profile.target.toolchain) in HOST_TOOLCHAINS:
        level = manifest.get("isa", "?")
        features = " ".join(manifest.get("isa_features", ())) or "baseline"
        newest = (manifest.get("isa_features") or ["?"])[-1]
        return (f"the host build is for {level} ({features}); the likeliest culprit is {newest}: "
                f"set PLM_GGUF_HOST_ISA to a lower level (e.g. haswell, the AVX2 baseline) and deploy again")
    uses = list(manifest.get("uses", profile.target.uses))
    used = [name for feature, name in ARM_EXTENSIONS if feature in uses]
    mcpu = manifest.get("mcpu", profile.target.mcpu) or "generic"
    if used:
        return (f"the {profile.name} build uses {', '.join(dict.fromkeys(used))} (target.mcpu = \"{mcpu}\"); "
                f"the likeliest culprit is {used[0]}: deploy with a profile for an older CPU (rpi4 or "
                f"linux-aarch64 run any armv8-a), or set target.mcpu and target.uses in your profile to what "
                f"the device's /proc/cpuinfo lists")
    return (f"the {profile.name} build (target.mcpu = \"{mcpu}\") is already the armv8-a baseline: "
            "check that the device is 64-bit ARM (uname -m) and that the profile's exec_wrapper is right")


def _fail(what: str, result, profile: Profile, manifest: dict | None = None) -> DeviceError:
    code = 128 - result.returncode if result.returncode < 0 else result.returncode  # -4 (local) == 132 (shell)
    why = SIGNALS.get(code, f"exit {code}")
    tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
    hint = (sigill_hint(profile, manifest) if code == 132 else
            "lower --ctx or use a smaller model" if code == 137 else
            "the last lines were: " + " | ".join(tail)[:400])
    return DeviceError(f"{what} failed on {profile.name}: {why}", hint)


def _fa(flash_attn: bool, on: str = "on", off: str = "off") -> str:
    return on if flash_attn else off


def _cache(cache_type: str) -> list[str]:
    """-ctk and -ctv together (a latent file's V is a view of its K: llama.cpp wants them equal)."""
    return [] if cache_type == "f16" else ["-ctk", cache_type, "-ctv", cache_type]


def _ngl(profile: Profile) -> list[str]:
    """-ngl for a profile that offloads layers to a GPU; nothing for a CPU profile."""
    return ["-ngl", str(profile.gpu_layers)] if profile.gpu_layers > 0 else []


SMOKE_ATTEMPTS = 3
# "0.00.023.058 I llama_kv_cache:        CPU KV buffer size =     0.31 MiB" (printed at -lv 4)
BUFFER_LINE = re.compile(r"\w+:\s+(\S+) (model|KV|compute) buffer size =\s*([\d.]+) MiB")


def parse_buffers(log: str) -> dict[str, float]:
    """The weight, KV cache and compute buffers llama.cpp reported (MiB, by buffer): {"CUDA0 KV": 1280.0,
    "CUDA0 compute": 300.6, "CUDA_Host compute": 12.0, ...}, from its load log."""
    found: dict[str, float] = {}
    for device, kind, mib in BUFFER_LINE.findall(log):
        found[f"{device} {kind}"] = found.get(f"{device} {kind}", 0.0) + float(mib)
    return found


@dataclass
class SmokeResult:
    text: str  # what llama-completion printed: the prompt and the continuation
    buffers: dict[str, float]  # parse_buffers of its log


def smoke_test(transport: Transport, profile: Profile, folder: str, model: str, ctx: int, threads: int,
               n_predict: int = 8, flash_attn: bool = False, manifest: dict | None = None,
               cache_type: str = "f16") -> SmokeResult:
    """A short greedy generation: the text printed (prompt and continuation) and the buffers llama.cpp reported."""
    cmd = exec_argv(profile, f"{folder}/llama-completion", "-m", model, "-p", SMOKE_PROMPT, "-n", str(n_predict),
                    "-c", str(ctx), "-t", str(threads), "-fa", _fa(flash_attn), "-no-cnv", "--temp", "0", "-s", "1",
                    "-lv", "4", *_ngl(profile), *_cache(cache_type))  # -lv 4: the load log names each buffer's size
    for _ in range(SMOKE_ATTEMPTS):
        result = transport.run(f"cd {sh(folder)} && {cmd} </dev/null", timeout=600, check=False)
        if not result.ok:
            raise _fail("the smoke generation", result, profile, manifest)
        if result.stdout.strip():
            break
        # stock llama-completion's log is written by a thread that exit() may end before it wrote
        # anything (about 1 run in 8 of a tiny model on 2 cores): run it again. Patched builds
        # drain the log at exit (patches/llama.cpp/0003-completion-drain-log-at-exit.patch)
    return SmokeResult(result.stdout.strip(), parse_buffers(result.stderr))


def read_temperature(transport: Transport) -> float | None:
    return parse_temperature_output(transport.run(temperature_script(), timeout=30, check=False).stdout)


def parse_bench_json(text: str) -> tuple[float, float, int, int, int, list]:
    """(prompt tok/s, generation tok/s, threads, n_prompt, n_gen, records) from `llama-bench -o json`."""
    start = text.find("[")
    try:
        records = json.loads(text[start:]) if start >= 0 else []
    except json.JSONDecodeError:
        records = []
    if not records:
        raise DeviceError("llama-bench printed no JSON results", "run it by hand on the device to see why")
    first = min(int(r.get("n_depth", 0)) for r in records)  # the shallowest depth (-d 0 unless asked)
    at_first = [r for r in records if int(r.get("n_depth", 0)) == first]
    prompt = next((r for r in at_first if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), {})
    gen = next((r for r in at_first if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0), {})
    threads = int((prompt or gen).get("n_threads", 0))
    return (float(prompt.get("avg_ts", 0.0)), float(gen.get("avg_ts", 0.0)), threads,
            int(prompt.get("n_prompt", 0)), int(gen.get("n_gen", 0)), records)


def run_bench(transport: Transport, profile: Profile, folder: str, model: str, threads: int,
              n_prompt: int = 64, n_gen: int = 16, reps: int = 2, flash_attn: bool = False,
              manifest: dict | None = None, depths: tuple[int, ...] = (), cache_type: str = "f16") -> BenchResult:
    """llama-bench: pp N_PROMPT and tg N_GEN, at each of DEPTHS tokens already in the cache (-d)."""
    before = read_temperature(transport)
    cmd = exec_argv(profile, f"{folder}/llama-bench", "-m", model, "-t", str(threads), "-p", str(n_prompt),
                    "-n", str(n_gen), "-r", str(reps), "-fa", _fa(flash_attn, "1", "0"), "-o", "json",
                    *_ngl(profile), *_cache(cache_type), *(["-d", ",".join(map(str, depths))] if depths else []))
    result = transport.run(f"cd {sh(folder)} && {cmd} </dev/null", timeout=1800, check=False)
    if not result.ok:
        raise _fail("llama-bench", result, profile, manifest)
    after = read_temperature(transport)
    prompt_tps, gen_tps, used, np_, ng, records = parse_bench_json(result.stdout)
    return BenchResult(prompt_tps, gen_tps, used or threads, np_, ng, before, after, records)


def start_server(transport: Transport, profile: Profile, folder: str, model: str, ctx: int, threads: int,
                 port: int, forward_port: int | None = None, flash_attn: bool = False,
                 cache_type: str = "f16") -> ServerInfo:
    """llama-server bound to 127.0.0.1 under nohup; then the forward that makes it reachable here."""
    stop_server(transport, folder)  # a server this tool started before; the forward is rebound below
    cmd = exec_argv(profile, f"{folder}/{SERVER}", "-m", model, "--host", "127.0.0.1", "--port", str(port),
                    "-c", str(ctx), "-t", str(threads), "-fa", _fa(flash_attn), *_ngl(profile), *_cache(cache_type))
    # `cd || exit` on its own: `cd && nohup ... &` would background a subshell holding the session open.
    pidfile = sh(f"{folder}/server.pid")
    script = (f"cd {sh(folder)} || exit 1; nohup {cmd} > server.log 2>&1 < /dev/null & echo $! > {pidfile};"
              f" sleep 2; kill -0 $(cat {pidfile}) && cat {pidfile}")
    result = transport.run(script, timeout=60, check=False)
    if not result.ok or not result.stdout.strip().isdigit():
        log = transport.run(sh("tail", "-n", "5", f"{folder}/server.log"), timeout=30, check=False).stdout
        raise DeviceError(f"llama-server did not stay up on {profile.name}",
                          "its log ends: " + " | ".join(log.splitlines())[:400])
    pid = int(result.stdout.strip())
    forward = transport.forward(forward_port or port, port)
    return ServerInfo(port, pid, f"http://127.0.0.1:{port}", forward)


def stop_server(transport: Transport, folder: str, port: int | None = None) -> None:
    """Stop the llama-server this tool started (by the pid it recorded, once /proc confirms the
    process is that server), and the forward the transport set up for it (adb's). A pid file
    naming another process is an error and that process is left alone; a pid file of a process
    that is gone is removed."""
    pidfile = f"{folder}/server.pid"
    pid = _recorded_pid(transport, pidfile)
    if pid is not None:
        _stop_if_ours(transport, pid, f"{folder}/{SERVER}", pidfile)
    if port:
        transport.unforward(port)  # port: the local end of the forward


def _recorded_pid(transport: Transport, pidfile: str) -> int | None:
    """The pid in server.pid (None without the file); anything else in it is refused."""
    out = transport.run(f"[ -f {sh(pidfile)} ] || exit 0; echo @pid; head -c 64 {sh(pidfile)}", timeout=30).stdout
    if not out.startswith("@pid\n"):
        return None
    text = out[len("@pid\n"):].strip()
    if not PID.fullmatch(text):
        raise DeviceError(f"{pidfile} holds {text[:40]!r}, not a process id",
                          "plm-gguf stops only the server it started and nothing was stopped: "
                          "look at the file, remove it by hand, and run again")
    return int(text)


def _stop_if_ours(transport: Transport, pid: int, binary: str, pidfile: str) -> None:
    """kill `pid` only when one of its arguments is `binary` (the server itself, or behind an exec_wrapper)."""
    cmdline = f"/proc/{pid}/cmdline"
    gone = f"[ ! -d /proc/{pid} ] || grep -q '^State:[[:space:]]*Z' /proc/{pid}/status"  # exited (a zombie too)
    script = (f"if {gone}; then rm -f {sh(pidfile)}; echo @gone; "
              f"elif tr '\\000' '\\n' < {cmdline} | grep -qxF -e {sh(binary)}; then "
              f"kill {pid} && rm -f {sh(pidfile)} && echo @stopped; "
              f"else echo @other; tr '\\000' ' ' < {cmdline} | head -c 200; fi")
    said, _, command = transport.run(script, timeout=30, check=False).stdout.partition("\n")
    if said in ("@gone", "@stopped"):
        return
    if said == "@other":
        raise DeviceError(f"{pidfile} names process {pid}, which is not the {SERVER} plm-gguf started "
                          f"({command.strip()[:80] or 'no command line'}); it was left running",
                          f"nothing was stopped or removed; if plm-gguf's server is gone, remove {pidfile} and run again")
    raise DeviceError(f"could not stop {SERVER} (pid {pid})", f"stop it by hand, remove {pidfile}, and run again")
