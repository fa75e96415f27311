"""Which CPU instruction-set extensions the host build of llama.cpp may use.

`-DGGML_NATIVE=ON` compiles for everything the compiler reads from CPUID. On a virtual machine
that is more than the guest may run: on an Intel Xeon VM that lists AVX-512 and AMX, a native
build died on q4_k_m and q8_0 files (SIGSEGV, SIGILL at an AMX `tilezero`), while an AVX2 build
ran them. So the host build names its extensions explicitly (`-DGGML_NATIVE=OFF` plus one
`-DGGML_<EXT>=ON|OFF` for each), chosen here:

1. an extension counts only if /proc/cpuinfo lists it *and* a probe executes its instructions
   in a child process (isa_probe.c; SIGILL there means the OS or hypervisor does not allow it);
2. the build takes the best of ggml's own CPU variants (the names of GGML_CPU_ALL_VARIANTS)
   whose extensions all passed;
3. AMX is never chosen automatically. ggml loads the tile configuration once per thread
   (`ggml_tile_config_init`, a thread_local flag) and assumes it persists; an AMX instruction
   executed with no tile configuration loaded raises #UD, which is the fault that was recorded.
   A one-shot probe cannot prove the configuration survives every context switch of a guest,
   and AMX speeds up only prompt processing of quantized types on Xeons, so it is opt-in
   (PLM_GGUF_HOST_ISA=sapphirerapids).

After the build, a self-check runs every weight type (plm_gguf.llama.host); a type that dies there makes
the build fall back to the next lower level (`fallback`). PLM_GGUF_HOST_ISA names a level to
use instead of choosing (`plm-gguf` prints the levels in its error when the name is unknown).

On aarch64 the level is an -march string from /proc/cpuinfo's Features (dotprod, fp16, i8mm);
elsewhere ggml's defaults with GGML_NATIVE=OFF.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from plm_gguf.errors import LlamaCppError, UsageError

ENV = "PLM_GGUF_HOST_ISA"
PROBE_SOURCE = Path(__file__).with_name("isa_probe.c")

# ggml's x86 CMake options (GGML_<NAME>) that a level turns on or off, and the /proc/cpuinfo
# flags each needs. AVX512 in ggml means F, CD, VL, DQ and BW together.
X86_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",), "AVX": ("avx",), "F16C": ("f16c",), "FMA": ("fma",), "AVX2": ("avx2",),
    "BMI2": ("bmi2",), "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",), "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",), "AMX_INT8": ("amx_int8",),
}
# The probe's names: AMX_TILE is exercised by the AMX_INT8 probe.
PROBED = {"AMX_TILE": "AMX_INT8"}

_HASWELL = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
_SKYLAKEX = _HASWELL + ("AVX512",)
_ICELAKE = _SKYLAKEX + ("AVX512_VBMI", "AVX512_VNNI")


@dataclass(frozen=True)
class Level:
    name: str
    features: tuple[str, ...]
    auto: bool = True  # chosen automatically when its features pass; False: only when named


# ggml's variant names and feature sets (ggml/src/CMakeLists.txt), best last.
X86_LEVELS = (
    Level("x64", ()),
    Level("sse42", ("SSE42",)),
    Level("sandybridge", ("SSE42", "AVX")),
    Level("haswell", _HASWELL),
    Level("alderlake", _HASWELL + ("AVX_VNNI",)),
    Level("skylakex", _SKYLAKEX),
    Level("icelake", _ICELAKE),
    Level("zen4", _ICELAKE + ("AVX512_BF16",)),
    Level("sapphirerapids", _ICELAKE + ("AVX512_BF16", "AMX_TILE", "AMX_INT8"), auto=False),
)
# What a failed self-check falls back to: the level below, dropping the newest extensions first.
X86_FALLBACK = {"sapphirerapids": "zen4", "zen4": "icelake", "icelake": "skylakex", "skylakex": "haswell",
                "alderlake": "haswell", "haswell": "sse42", "sandybridge": "sse42", "sse42": "x64"}
ARM_FEATURES = (("asimddp", "dotprod"), ("asimdhp", "fp16"), ("i8mm", "i8mm"))


@dataclass(frozen=True)
class HostIsa:
    """What the host build compiles for: a level, its CMake arguments, and why."""

    arch: str
    level: str
    cmake_args: tuple[str, ...]
    features: tuple[str, ...] = ()
    probed: dict = field(default_factory=dict, compare=False)  # feature -> "ran" | "listed, did not run" | ...
    requested: str = ""  # PLM_GGUF_HOST_ISA, if set

    def describe(self) -> str:
        how = f"{ENV}={self.requested}" if self.requested else "probed"
        return f"{self.arch} {self.level} ({how}: {' '.join(self.features) or 'baseline'})"


def cpuinfo_flags(text: str) -> set[str]:
    """The CPU flags (x86 'flags', ARM 'Features') of the first processor in /proc/cpuinfo."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def x86_level(name: str) -> Level:
    for level in X86_LEVELS:
        if level.name == name:
            return level
    raise UsageError(f"{ENV}={name!r} names no x86 level",
                     f"use one of {', '.join(l.name for l in X86_LEVELS)} (or unset it to probe)")


def x86_cmake_args(level: Level) -> tuple[str, ...]:
    return ("-DGGML_NATIVE=OFF",) + tuple(f"-DGGML_{f}={'ON' if f in level.features else 'OFF'}" for f in X86_FLAGS)


def choose_x86(listed: set[str], runs, requested: str = "") -> tuple[Level, dict]:
    """The best automatic level whose extensions are all listed and run (`runs(feature) -> bool`),
    or the requested one, which must pass the same checks. Returns (level, what was found)."""
    found: dict[str, str] = {}

    def ok(feature: str) -> bool:
        if feature not in found:
            if not all(flag in listed for flag in X86_FLAGS[feature]):
                found[feature] = "not listed"
            else:
                found[feature] = "ran" if runs(PROBED.get(feature, feature)) else "listed, did not run"
        return found[feature] == "ran"

    if requested:
        level = x86_level(requested)
        bad = [f for f in level.features if not ok(f)]
        if bad:
            raise LlamaCppError(f"{ENV}={requested} needs {', '.join(bad)}, which this CPU "
                                f"({', '.join(found[f] for f in bad)}) cannot run",
                                f"choose a lower level, e.g. {X86_FALLBACK.get(requested, 'x64')}, or unset {ENV}")
        return level, found
    for feature in X86_FLAGS:  # record every one (the manifest shows what this CPU can run)
        ok(feature)
    best = X86_LEVELS[0]
    for level in X86_LEVELS:
        if level.auto and all(ok(f) for f in level.features):
            best = level
    return best, found


def arm_march(flags: set[str], requested: str = "") -> str:
    if requested:
        return requested
    extras = [name for flag, name in ARM_FEATURES if flag in flags]
    if not extras:
        return "armv8-a"
    return ("armv8.6-a" if "i8mm" in extras else "armv8.2-a") + "".join(f"+{e}" for e in extras)


def fallback(isa: HostIsa) -> HostIsa | None:
    """The next lower level after a self-check failure, or None at the bottom."""
    if isa.arch == "x86_64":
        lower = X86_FALLBACK.get(isa.level)
        if lower is None:
            return None
        level = x86_level(lower)
        return HostIsa(isa.arch, level.name, x86_cmake_args(level), level.features, isa.probed, isa.requested)
    if isa.arch == "aarch64" and isa.level != "armv8-a":
        return HostIsa(isa.arch, "armv8-a", ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a"), (), isa.probed,
                       isa.requested)
    return None


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_id() -> str:
    """A short hash of what the CPU says about itself and the kernel: host builds are keyed by it."""
    text = _read_cpuinfo()
    model = next((l for l in text.splitlines() if l.startswith(("model name", "CPU part"))), "")
    flags = " ".join(sorted(cpuinfo_flags(text)))
    return hashlib.sha256(f"{platform.machine()}|{model}|{flags}".encode()).hexdigest()[:10]


class _Prober:
    """Compiles isa_probe.c once, then runs one extension per child process."""

    def __init__(self, workdir: Path):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            raise LlamaCppError("no C compiler to build llama.cpp", "install gcc (Debian: apt-get install build-essential)")
        self.binary = workdir / "isa_probe"
        proc = subprocess.run([cc, "-O1", "-o", str(self.binary), str(PROBE_SOURCE)], capture_output=True, text=True)
        self.compiled = proc.returncode == 0
        self.error = "" if self.compiled else (proc.stderr.strip().splitlines() or ["?"])[0]

    def __call__(self, feature: str) -> bool:
        if not self.compiled:  # an old compiler without these intrinsics: trust the listed flags
            return True
        try:
            proc = subprocess.run([str(self.binary), feature], capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def detect(requested: str | None = None) -> HostIsa:
    """The level for this machine (PLM_GGUF_HOST_ISA, when set, names it instead)."""
    requested = os.environ.get(ENV, "") if requested is None else requested
    machine = platform.machine().lower()
    text = _read_cpuinfo()
    flags = cpuinfo_flags(text)
    if machine in ("x86_64", "amd64"):
        with tempfile.TemporaryDirectory(prefix="plm-gguf-isa-") as tmp:
            prober = _Prober(Path(tmp))
            level, found = choose_x86(flags, prober, requested)
        if not prober.compiled:
            found["probe"] = f"not compiled ({prober.error}); listed flags trusted"
        return HostIsa("x86_64", level.name, x86_cmake_args(level), level.features, found, requested)
    if machine in ("aarch64", "arm64"):
        march = arm_march(flags, requested)
        return HostIsa("aarch64", march, ("-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={march}"),
                       tuple(march.split("+")[1:]), {}, requested)
    return HostIsa(machine, "default", ("-DGGML_NATIVE=OFF",), (), {}, requested)
