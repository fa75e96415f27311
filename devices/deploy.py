"""Deploy a PLM GGUF to a device: probe, check, build, push (verified), smoke test, bench, serve.

``deploy()`` is the one entry point the CLI and the README demo call; ``undeploy()`` removes
what it put on the device (listed in a manifest it keeps there).

plm-gguf touches only what that manifest lists. A deploy goes into a folder that is new, empty,
or holds the manifest; it never writes over a file the manifest does not list, and it lists
every file before sending it (so an interrupted deploy is still accounted for). Undeploy
removes listed files one by one and the folder only when that leaves it empty. A manifest
that cannot be read is an error, never a reason to remove anything.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from plm_gguf.cache import sha256_file
from plm_gguf.errors import DeviceError, UsageError
from plm_gguf.memory import default_ctx

from . import checks, emulator, gpu, toolchain
from .facts import DeviceFacts, parse_probe, probe_script
from .profiles import INSTALL_DIR_HINT, Profile, check_install_dir, load_profile, with_overrides
from .runner import BenchResult, ServerInfo, run_bench, smoke_test, start_server, stop_server
from .transports import Report, Transport, connect, plain_name, quote_path, sh

MANIFEST = "plm-gguf-deploy.json"
RUNTIME = ("server.log", "server.pid")  # what a deploy that serves writes beside the files it sends
MANIFEST_MAX = 1 << 20  # bytes of it read: a larger one is corrupt
Progress = Callable[[str, str], None]
# meter(name, size, offset): a context manager around one upload that yields its `report` (devices/meter.py)
Meter = Callable[[str, int, int], AbstractContextManager[Report | None]]
# What the install folder holds, in one round trip: the real paths of it and of $HOME, the first
# entry that is neither the manifest nor an upload in progress, which of NAMES exist, the manifest.
INSPECT_SCRIPT = r"""d={dir}
h=; [ -n "$HOME" ] && h=$(cd "$HOME" 2>/dev/null && pwd -P); printf '@home %s\n' "$h"
{ [ -e "$d" ] || [ -L "$d" ]; } || exit 0
[ -d "$d" ] || { echo @notdir; exit 0; }
printf '@real %s\n' "$(cd "$d" 2>/dev/null && pwd -P)"
for e in "$d"/* "$d"/.*; do
  n=${e##*/}; { [ -e "$e" ] || [ -L "$e" ]; } || continue
  case "$n" in .|..|{manifest}|{temporaries}) ;; *) printf '@other %s\n' "$n" | head -n 1; break ;; esac
done
for n in {names}; do { [ -e "$d/$n" ] || [ -L "$d/$n" ]; } && printf '@has %s\n' "$n"; done
[ -f "$d/"{manifest} ] && { echo @manifest; head -c {max} "$d/"{manifest}; }
exit 0
"""


@dataclass
class DeployResult:
    profile: str
    device: str
    facts: DeviceFacts
    build_key: str
    install_dir: str
    model_remote: str
    ctx: int
    threads: int
    memory: checks.MemoryPlan
    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed: dict[str, int] = field(default_factory=dict)  # file -> bytes kept from an interrupted upload
    warnings: list[str] = field(default_factory=list)
    smoke_output: str = ""
    buffers: dict[str, float] = field(default_factory=dict)  # KV and compute buffers llama.cpp reported (MiB)
    bench: BenchResult | None = None
    server: ServerInfo | None = None
    kernels: list[str] = field(default_factory=list)  # speed features the build compiles in (dotprod, i8mm, fp16)


def resolve_profile(profile_name: str = "host", profile_file: str | None = None, address: str = "",
                    exec_wrapper: str | None = None) -> Profile:
    profile = with_overrides(load_profile(profile_file or profile_name), address=address, exec_wrapper=exec_wrapper)
    spec = profile.transport
    emulated = emulator.for_address(spec.host, spec.port) if spec.kind == "ssh" else None
    if emulated and not (spec.identity_file or spec.known_hosts):  # `devices emulate` made its key and host key
        spec = replace(spec, user=spec.user or emulated.user, identity_file=emulated.identity,
                       known_hosts=emulated.known_hosts)
        profile = replace(profile, transport=spec)
    return profile


def probe(profile: Profile, transport: Transport | None = None) -> DeviceFacts:
    """Facts about the device behind the profile's transport (one round trip)."""
    transport = transport or connect(profile)
    result = transport.run(probe_script(quote_path(profile.install_dir)), timeout=60)  # ssh/adb failures raise here
    return parse_probe(result.stdout)


def suggest_profiles(facts: DeviceFacts) -> list[str]:
    """Profiles whose builds this CPU can run, the one using most features first."""
    from .profiles import list_profiles

    fits = []
    for name in list_profiles():
        try:
            p = load_profile(name)
            if p.gpu_layers > 0 and not facts.gpus:  # offloads to a GPU this device lacks
                continue
            manifest = target_manifest(p)
            checks.check_arch(manifest, facts, wrapped=False)
            checks.check_features(manifest, facts)
        except (DeviceError, UsageError):
            continue
        fits.append((-len(p.target.uses), name))
    return [name for _, name in sorted(fits)]


def _normal(path: str) -> str:
    return "/" + posixpath.normpath(path).lstrip("/")


def install_folder(profile: Profile, facts: DeviceFacts) -> str:
    """The absolute install folder: ~ and relative paths are under the device's $HOME, and it is
    neither / nor the home folder itself (profiles.check_install_dir has the other rules)."""
    path = check_install_dir(profile.install_dir, f"profile {profile.name}")
    home = facts.home if facts.home.startswith("/") else ""
    if not path.startswith("/"):
        if not home:
            raise DeviceError(f"the device reports no $HOME for install_dir {profile.install_dir!r}",
                              "use an absolute install_dir")
        path = f"{home}/{path[2:] if path.startswith('~/') else path}"
    folder = _normal(path)
    if home and folder == _normal(home):
        raise DeviceError(f"install_dir {profile.install_dir!r} is {folder}, the home folder on the device",
                          INSTALL_DIR_HINT)
    return folder


@dataclass
class InstallDir:
    """What the install folder holds, as far as plm-gguf cares."""
    folder: str
    device: str
    manifest: dict | None  # None: no manifest there
    present: set[str]  # the names asked about that exist there
    other: str  # an entry that is neither the manifest nor an upload in progress ('' when none)


def _manifest_ok(data: object) -> bool:
    """A JSON object whose files are plain names in the folder and whose forward_port is a port."""
    if not isinstance(data, dict):
        return False
    files, port = data.get("files", []), data.get("forward_port")
    return (isinstance(files, list) and all(isinstance(n, str) and plain_name(n) for n in files)
            and (port is None or (type(port) is int and 0 < port < 65536)))


def parse_manifest(text: str, where: str) -> dict:
    """The install manifest, checked: one that cannot be read is an error, never a reason to remove things."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not _manifest_ok(data):
        raise DeviceError(f"the deploy manifest {where} is corrupt (not the JSON plm-gguf writes)",
                          "plm-gguf removes and overwrites only what that file lists, so it stopped: look at the "
                          "folder, then empty it by hand or choose another install_dir")
    return data


def inspect_folder(transport: Transport, folder: str, names: list[str] | tuple[str, ...] = ()) -> InstallDir:
    """What the folder holds; refuses a folder that is no folder, is / or $HOME (symlinks resolved
    on the device), or has a corrupt manifest."""
    script = (INSPECT_SCRIPT.replace("{dir}", shlex.quote(folder)).replace("{manifest}", shlex.quote(MANIFEST))
              .replace("{temporaries}", "|".join(shlex.quote(f".{n}.partial") for n in [*names, MANIFEST]))
              .replace("{names}", " ".join(map(shlex.quote, names))).replace("{max}", str(MANIFEST_MAX)))
    lines = transport.run(script, timeout=60).stdout.split("\n")
    cut = lines.index("@manifest") if "@manifest" in lines else len(lines)  # the manifest's text follows
    tags = [line.partition(" ")[::2] for line in lines[:cut]]
    first = {tag: value for tag, value in reversed(tags)}
    device = transport.describe()
    if "@notdir" in first:
        raise DeviceError(f"install_dir {folder} on {device} is not a folder", INSTALL_DIR_HINT)
    real, home = first.get("@real", ""), first.get("@home", "")
    if real and real in ("/", home):
        raise DeviceError(f"install_dir {folder} on {device} is {real}, the {'root' if real == '/' else 'home'} folder",
                          INSTALL_DIR_HINT)
    manifest = (parse_manifest("\n".join(lines[cut + 1:]), f"{folder}/{MANIFEST} on {device}")
                if cut < len(lines) else None)
    return InstallDir(folder, device, manifest, {v for t, v in tags if t == "@has"}, first.get("@other", ""))


def writable_manifest(transport: Transport, folder: str, names: list[str]) -> dict:
    """The manifest of a folder deploy may write NAMES into ({} for a new one): refused when the
    folder holds files plm-gguf did not put there, or a NAME its manifest does not list."""
    state = inspect_folder(transport, folder, names)
    if state.manifest is None and state.other:
        raise DeviceError(f"install_dir {folder} on {state.device} holds {state.other!r}, which plm-gguf did not "
                          f"put there (the folder has no {MANIFEST})",
                          "choose an empty folder, such as ~/plm-gguf, or one plm-gguf deployed to")
    manifest = state.manifest or {}
    foreign = sorted(state.present - set(manifest.get("files", [])))
    if foreign:
        raise DeviceError(f"install_dir {folder} on {state.device} holds {', '.join(foreign)}, which plm-gguf did "
                          f"not install (its {MANIFEST} does not list it); nothing was overwritten",
                          "move that file away, or choose another install_dir")
    return manifest


def remote_state(transport: Transport, folder: str, names: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """sha256 of the installed files, and the sizes of partial uploads left by an interrupted deploy."""
    quoted = " ".join(map(shlex.quote, names))
    # sha256sum reads stdin: it escapes names with a backslash when it prints them
    script = (f"cd {shlex.quote(folder)} 2>/dev/null || exit 0; for f in {quoted}; do "
              '[ -f "$f" ] && h=$(sha256sum < "$f") && printf "%s %s\\n" "${h%% *}" "$f"; '
              '[ -f ".$f.partial" ] && echo "@partial $(wc -c < ".$f.partial") $f"; '
              "done; exit 0")
    hashes, partials = {}, {}
    for line in transport.run(script, timeout=600).stdout.splitlines():
        if line.startswith("@partial "):
            _, size, name = line.split(" ", 2)
            partials[name] = int(size)
        else:
            digest, _, name = line.partition(" ")
            hashes[name] = digest
    return hashes, partials


def _prefix_sha256(path: Path, size: int) -> str:
    digest, left = hashlib.sha256(), size
    with open(path, "rb") as fh:
        while left > 0:
            chunk = fh.read(min(1 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _resume_offset(transport: Transport, local: Path, partial: str, size: int) -> int:
    """How much of an interrupted upload can be kept: its bytes must equal the file's first bytes."""
    if not transport.can_append or not 0 < size < local.stat().st_size:
        return 0
    there = transport.run(f"head -c {size} {sh(partial)} | sha256sum", timeout=600, check=False).stdout.split()[:1]
    return size if there == [_prefix_sha256(local, size)] else 0


def push_files(transport: Transport, folder: str, files: dict[str, Path], executable: set[str],
               facts: DeviceFacts, progress: Progress, meter: Meter | None = None
               ) -> tuple[list[str], list[str], dict[str, int]]:
    """Send what differs: to a temporary name (resuming an interrupted upload), sha256 checked, renamed.
    meter, when given, shows each upload's progress."""
    if facts.tools and "sha256sum" not in facts.tools:
        raise DeviceError("the device has no sha256sum to verify uploads", "install coreutils or busybox on the device")
    local = {name: sha256_file(path) for name, path in files.items()}
    there, partials = remote_state(transport, folder, list(files))
    todo = [n for n in files if there.get(n) != local[n]]
    checks.check_disk(sum(files[n].stat().st_size - partials.get(n, 0) for n in todo), facts, folder)
    resumed = {}
    for name in todo:
        partial = f"{folder}/.{name}.partial"
        offset = _resume_offset(transport, files[name], partial, partials.get(name, 0))
        progress("put", name + (f" (resuming at {offset} bytes)" if offset else ""))
        with meter(name, files[name].stat().st_size, offset) if meter else nullcontext() as report:
            if offset:
                transport.append(files[name], partial, offset, report=report)
                resumed[name] = offset
            else:
                transport.put(files[name], partial, report=report)
        got = transport.run(f"sha256sum < {sh(partial)}", timeout=600).stdout.split()[:1]
        if got != [local[name]]:
            transport.run(sh("rm", "-f", partial), timeout=30, check=False)
            raise DeviceError(f"{name} arrived corrupted on the device (sha256 mismatch)", "run the deploy again")
        mode = "755" if name in executable else "644"
        transport.run(f"{sh('chmod', mode, partial)} && {sh('mv', '-f', partial, f'{folder}/{name}')}", timeout=30)
    return todo, [n for n in files if n not in todo], resumed


def _write_manifest(transport: Transport, folder: str, data: dict) -> None:
    transport.run(sh("mkdir", "-p", folder), timeout=30)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
        transport.put(path, f"{folder}/.{MANIFEST}.partial")
    transport.run(sh("mv", "-f", f"{folder}/.{MANIFEST}.partial", f"{folder}/{MANIFEST}"), timeout=30)


def claim(transport: Transport, folder: str, names: list[str], **fields: object) -> None:
    """List NAMES (and FIELDS) in the folder's manifest before any of them is sent, so that an
    interrupted deploy is accounted for; refused where writable_manifest refuses."""
    manifest = writable_manifest(transport, folder, names)
    manifest.update(fields, files=sorted(set(manifest.get("files", [])) | set(names)))
    _write_manifest(transport, folder, manifest)


def target_manifest(profile: Profile, glibc: str = "") -> dict:
    """What a build for the profile will use, known before building (the checks read this)."""
    return toolchain.target_manifest(profile, glibc)


def preflight(profile: Profile, facts: DeviceFacts, model: checks.ModelInfo, ctx: int | None,
              glibc: str = "", mla_patch: bool = True, flash_attn: str = "auto", cache_type: str = "f16"
              ) -> tuple[int, checks.MemoryPlan, list[str]]:
    """All refusals before anything is built or sent: (ctx, memory plan, warnings). The plan says
    whether llama.cpp runs with flash attention (`flash_attn`: auto, on or off) and the KV
    cache's type (`cache_type`, K and V alike)."""
    checks.check_layout(model, mla_patch)
    use_flash_attn = checks.resolve_flash_attn(model, flash_attn, mla_patch)
    checks.check_cache_type(model, cache_type, use_flash_attn)
    manifest = target_manifest(profile, glibc)
    wrapped = bool(profile.exec_wrapper)
    checks.check_arch(manifest, facts, wrapped)
    warnings = []
    if wrapped:
        warnings.append(f"CPU features not checked: binaries run under {' '.join(profile.exec_wrapper)}")
    else:
        warnings += checks.check_features(manifest, facts)
        checks.check_libc(manifest, facts)
        checks.check_page_size(manifest, facts)
    if model.arch != "plm":
        warnings.append(f"the model's architecture is {model.arch!r}, not 'plm'")
    if ctx is None:
        ctx = default_ctx(profile.ctx, model.n_ctx_train)  # as the sweep's MemoryTarget plans it
    elif model.n_ctx_train and ctx > model.n_ctx_train:
        warnings.append(f"ctx {ctx} is beyond the model's training context {model.n_ctx_train}")
    if ctx < 64:
        raise UsageError(f"--ctx {ctx} is too small", "use --ctx 256 or more")
    gpu = checks.offload_gpu(profile.gpu_layers, facts, profile.name)
    plan = checks.check_memory(model, ctx, facts, profile.headroom_mib, latent_runs=mla_patch,
                               flash_attn=use_flash_attn, gpu=gpu, cache_type=cache_type)
    return ctx, plan, warnings


def deploy(model_path: str | Path, profile_name: str = "host", *, profile: Profile | None = None,
           address: str = "", ctx: int | None = None, threads: int | None = None, bench: bool = False,
           serve_port: int | None = None, forward_port: int | None = None,
           llama_cpp: str | Path | None = None, glibc: str = "",
           bench_prompt: int = 64, bench_gen: int = 16, bench_depths: tuple[int, ...] = (), smoke: bool = True,
           mla_patch: bool = True,
           flash_attn: str = "auto", cache_type: str = "f16", progress: Progress | None = None,
           meter: Meter | None = None) -> DeployResult:
    """Put llama.cpp (with plm-gguf's patches unless mla_patch=False) and the model on the
    device and prove they run there. flash_attn: auto (on for latent-layout files), on or off.
    meter shows each upload's progress (devices/meter.py; None: only the `put` event)."""
    progress = progress or (lambda event, detail: None)
    profile = profile or resolve_profile(profile_name, address=address)
    model = checks.read_model(Path(model_path).expanduser())
    if not plain_name(model.path.name):
        raise UsageError(f"the model's file name {model.path.name!r} has a control character (a newline, ...)",
                         "rename the file")
    transport = connect(profile)
    progress("probe", transport.describe())
    facts = probe(profile, transport)
    folder = install_folder(profile, facts)
    ctx, plan, warnings = preflight(profile, facts, model, ctx, glibc, mla_patch, flash_attn, cache_type)
    writable_manifest(transport, folder, [model.path.name])  # a folder deploy may not fill: refused before building
    n_threads = threads or checks.default_threads(profile.threads, facts)
    progress("build", profile.name)
    built = toolchain.build(profile, llama_cpp, glibc=glibc, mla_patch=mla_patch, server=bool(serve_port),
                            log=lambda line: progress("build", line))
    toolchain.verify_build(built)
    if built.manifest.get("cuda_version"):  # a CUDA build runs where the driver supports its CUDA
        gpu.check_driver(built.manifest["cuda_version"], facts.cuda_version, transport.describe())
    files = {**built.binaries, model.path.name: model.path}
    served = {"forward_port": forward_port or serve_port} if serve_port else {}
    claim(transport, folder, [*files, *(RUNTIME if serve_port else ())], build=built.key, profile=profile.name,
          model=model.path.name, **served)
    sent, skipped, resumed = push_files(transport, folder, files, set(built.binaries), facts, progress, meter)
    result = DeployResult(profile.name, transport.describe(), facts, built.key, folder, f"{folder}/{model.path.name}",
                          ctx, n_threads, plan, sent, skipped, resumed, warnings)
    result.kernels = toolchain.toolchain_for(profile).kernels(built.manifest)
    if smoke:
        progress("smoke", "llama-completion")
        ran = smoke_test(transport, profile, folder, result.model_remote, ctx, n_threads,
                         flash_attn=plan.flash_attn, manifest=built.manifest, cache_type=cache_type)
        result.smoke_output, result.buffers = ran.text, ran.buffers
    if bench:
        progress("bench", f"llama-bench -p {bench_prompt} -n {bench_gen} -t {n_threads}")
        result.bench = run_bench(transport, profile, folder, result.model_remote, n_threads, bench_prompt, bench_gen,
                                 flash_attn=plan.flash_attn, manifest=built.manifest, depths=bench_depths,
                                 cache_type=cache_type)
    if serve_port:
        progress("serve", f"llama-server on 127.0.0.1:{serve_port}")
        result.server = start_server(transport, profile, folder, result.model_remote, ctx, n_threads, serve_port,
                                     forward_port, flash_attn=plan.flash_attn, cache_type=cache_type)
    return result


def speed_here(profile: Profile, *, n_prompt: int = 128, n_gen: int = 32,
               log: Callable[[str], None] | None = None) -> Callable[[Path], tuple[float, float]]:
    """For a profile of this machine (local transport, e.g. `cuda`): a function that measures a
    file's prompt and generation tok/s with the profile's own llama-bench (its -ngl, flash
    attention as deploy runs that layout), built first if need be. The sweep's --device speed."""
    if profile.transport.kind != "local":
        raise UsageError(f"measuring speed on {profile.name} needs the device to be this machine",
                         "run the sweep on the device itself, or deploy a chosen file there with --bench")
    built = toolchain.build(profile, log=log)
    toolchain.verify_build(built)
    transport, folder = connect(profile), str(built.path / "bin")
    threads = checks.default_threads(profile.threads, probe(profile, transport))

    def speed(model: Path) -> tuple[float, float]:
        flash = checks.resolve_flash_attn(checks.read_model(model), "auto")
        result = run_bench(transport, profile, folder, str(Path(model).resolve()), threads, n_prompt, n_gen,
                           flash_attn=flash, manifest=built.manifest)
        return result.prompt_tps, result.gen_tps

    return speed


def undeploy(profile_name: str = "host", *, profile: Profile | None = None, address: str = "") -> list[str]:
    """Stop the server (once the device confirms its pid is that server) and remove the files the
    manifest lists, and their unfinished uploads; the folder too when that leaves it empty."""
    profile = profile or resolve_profile(profile_name, address=address)
    transport = connect(profile)
    facts = probe(profile, transport)
    folder = install_folder(profile, facts)
    manifest = inspect_folder(transport, folder).manifest
    if manifest is None:
        raise DeviceError(f"nothing deployed by plm-gguf in {folder} on {transport.describe()} (no {MANIFEST})",
                          "check --device/--address")
    stop_server(transport, folder, manifest.get("forward_port"))
    files = list(manifest.get("files", []))
    paths = [f"{folder}/{n}" for name in [*files, MANIFEST] for n in (name, f".{name}.partial")]
    transport.run(sh("rm", "-f", *paths) + "; " + sh("rmdir", folder) + " 2>/dev/null; exit 0", timeout=60)
    return files


__all__ = ["DeployResult", "deploy", "undeploy", "probe", "preflight", "resolve_profile", "speed_here"]
