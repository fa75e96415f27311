"""The host build of llama.cpp: one CMake tree for the libraries and the tools, self-checked.

What verify, the sweep and the host deploy run. One build of the (patched) llama.cpp source
gives both:

- the shared libraries llama-cpp-python loads through LLAMA_CPP_LIB_PATH (libllama.so,
  libggml*.so): plm-gguf installs llama-cpp-python without a library of its own (`./run`
  passes -DLLAMA_BUILD=OFF), so llama.cpp is compiled once, not twice;
- llama-completion, llama-bench and llama-quantize (and llama-server when a deploy serves),
  linked to those libraries with RUNPATH $ORIGIN, so the `host` device profile deploys the
  folder as it is.

The instruction-set level comes from plm_gguf.llama.isa (probed, never -march=native). After
compiling, `self_check` quantizes a tiny PLM to every weight type whose kernels differ and runs
a prompt and a decode on each; a type that dies on a signal makes the build fall back to the
next lower level and build again, and the manifest records why. So a host build that exists
has run every weight type on this machine.

With a :class:`CudaTarget` the same tree is built with ggml's CUDA backend as well
(libggml-cuda.so), for that GPU architecture only: the `cuda` device profile deploys it. Its
self-check runs every type with all layers on the GPU where this machine has one.

Layout: CACHE/llama/KEY/bin/ (libraries and tools), manifest.json, build.log. KEY names the
llama-cpp-python version (or the source tree), patched or stock, the CPU (plm_gguf.llama.isa.cpu_id),
the GPU architecture and CUDA version of a CUDA build, and hashes the recipe, the patches and
PLM_GGUF_HOST_ISA.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from plm_gguf.cache import cache_dir, sha256_file
from plm_gguf.errors import LlamaCppError
from plm_gguf.fixtures.gguf_file import write_tiny_plm_gguf
from plm_gguf.llama import LLAMA_CPP_PYTHON_VERSION, isa
from plm_gguf.llama.build import BuildProgress, Log, cached_entry, cmake_build
from plm_gguf.llama.patches import apply_patches, hash_patches, patch_files, source_dir

RECIPE_VERSION = 2  # bump when the recipe below changes
TOOLS = ("llama-completion", "llama-bench", "llama-quantize")
SERVER = "llama-server"  # built on demand (deploy --serve): it and its HTTP and multimodal parts
# take about a third of the build, which verify, the sweep and the demo never use
LIBS = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
    # libraries and tools find each other in their own folder, wherever it is copied
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON",
)
# One file per kernel family: float, q8_0, the repacked q4_0/iq4_nl, and the K-quants.
SELF_CHECK_TYPES = ("f16", "bf16", "q8_0", "q4_0", "iq4_nl", "q4_k_m", "q5_k_m", "q6_k", "q2_k")
# Rows of 256 so that every K-quant applies; a prompt long enough for the batched (tiled) kernels.
SELF_CHECK_MODEL = dict(n_embd=256, n_layer=1, n_head=4, qk_nope=32, qk_rope=32, v_dim=64, kv_lora=256, n_ff=512)
SELF_CHECK_PROMPT = "the quick brown fox jumps over the lazy dog " * 3


@dataclass(frozen=True)
class CudaTarget:
    """A CUDA build: the GPU architecture (compute capability without the dot: "90" for an
    H100/H200) and the nvcc that compiles it (and its CUDA version, e.g. "13.0")."""

    arch: str
    cuda_version: str
    nvcc: str
    gpu_here: bool = False  # this machine has that GPU: the self-check runs on it

    @property
    def tag(self) -> str:
        return f"cuda{self.arch}-{self.cuda_version}"

    @property
    def lib_dir(self) -> str:
        """The toolkit's runtime libraries (libcudart, libcublas), beside nvcc's bin/."""
        roots = [Path(self.nvcc).resolve().parent.parent, *(Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH")
                                                             if os.environ.get(v)), Path("/usr/local/cuda")]
        dirs = [d for root in roots for d in (root / "lib64", root / "targets" / f"{platform.machine()}-linux" / "lib")]
        return str(next((d for d in dirs if any(d.glob("libcudart.so*"))), dirs[0]))

    @property
    def cmake_args(self) -> list[str]:
        # RUNPATH: the build's own folder, then the toolkit's libraries (often not on the loader's path)
        return ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.arch}", f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
                f"-DCMAKE_INSTALL_RPATH=$ORIGIN;{self.lib_dir}"]


@dataclass(frozen=True)
class HostBuild:
    path: Path  # the cache entry
    manifest: dict

    @property
    def bin(self) -> Path:
        """Libraries and tools (LLAMA_CPP_LIB_PATH points here)."""
        return self.path / "bin"

    @property
    def key(self) -> str:
        return self.path.name


def _source(source: str | os.PathLike | None) -> tuple[Path, str]:
    if source is None:
        return source_dir(LLAMA_CPP_PYTHON_VERSION), f"lcp{LLAMA_CPP_PYTHON_VERSION}"
    src = Path(source).expanduser().resolve()
    digest = hashlib.sha256()
    for rel in ("CMakeLists.txt", "src/llama-model.cpp", "ggml/src/ggml.c", "ggml/CMakeLists.txt"):
        file = src / rel
        digest.update(file.read_bytes() if file.is_file() else b"-")
    return src, f"src-{digest.hexdigest()[:12]}"


def host_key(source: str | os.PathLike | None = None, mla_patch: bool = True, cuda: CudaTarget | None = None) -> str:
    """The cache key of the host build: known without building (and without probing the CPU)."""
    _, label = _source(source)
    digest = hashlib.sha256(json.dumps([RECIPE_VERSION, CMAKE_FLAGS, SELF_CHECK_TYPES,
                                        os.environ.get(isa.ENV, "")]).encode())
    if mla_patch:
        hash_patches(digest)
    machine = platform.machine() + (f"-{cuda.tag}" if cuda else "")
    return f"{label}{'-mla' if mla_patch else ''}-host-{machine}-{isa.cpu_id()}-{digest.hexdigest()[:10]}"


def entry_dir(source: str | os.PathLike | None = None, mla_patch: bool = True, cuda: CudaTarget | None = None) -> Path:
    return cache_dir() / "llama" / host_key(source, mla_patch, cuda)


def _libs(cuda: CudaTarget | None) -> tuple[str, ...]:
    return LIBS + (("libggml-cuda.so",) if cuda else ())


def _has(entry: Path, names: tuple[str, ...]) -> bool:
    return (entry / "manifest.json").is_file() and all((entry / "bin" / name).exists() for name in names)


def find_host_build(source: str | os.PathLike | None = None, mla_patch: bool = True,
                    server: bool = False, cuda: CudaTarget | None = None) -> HostBuild | None:
    entry = entry_dir(source, mla_patch, cuda)
    names = _libs(cuda) + TOOLS + ((SERVER,) if server else ())
    return HostBuild(entry, json.loads((entry / "manifest.json").read_text())) if _has(entry, names) else None


def host_build(source: str | os.PathLike | None = None, *, mla_patch: bool = True, server: bool = False,
               log: Log | None = None, jobs: int | None = None, cuda: CudaTarget | None = None) -> HostBuild:
    """The host build, made first if the cache has none (progress on stderr, or to `log`).
    server=True adds llama-server: the entry is built again with it (with ccache installed, only
    the server's own files compile) and replaced. cuda: with ggml's CUDA backend for that GPU."""
    found = find_host_build(source, mla_patch, server, cuda)
    if found:
        return found
    src, label = _source(source)
    entry = entry_dir(source, mla_patch, cuda)
    tools = TOOLS + ((SERVER,) if server or (entry / "bin" / SERVER).exists() else ())
    with cached_entry(entry, lambda e: _has(e, _libs(cuda) + tools)) as staging:
        if staging is None:  # another process built it while we waited for the lock
            return HostBuild(entry, json.loads((entry / "manifest.json").read_text()))
        manifest = _build_checked(src, label, staging, mla_patch, log, jobs, cache_dir() / "logs" / f"{entry.name}.log",
                                  tools, cuda)
        manifest["key"] = entry.name
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return HostBuild(entry, manifest)


def _build_checked(src: Path, label: str, staging: Path, mla_patch: bool, log: Log | None, jobs: int | None,
                   log_file: Path, tools: tuple[str, ...], cuda: CudaTarget | None = None) -> dict:
    started = time.monotonic()
    tree = staging / "llama.cpp"
    shutil.copytree(src, tree, symlinks=True, ignore=shutil.ignore_patterns(".git", "build"))
    patches = {}
    if mla_patch:
        apply_patches(tree)
        patches = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in patch_files()}
    build_dir = staging / "cmake"
    out = staging / "bin"

    gpu_args = cuda.cmake_args if cuda else []

    def build_at(level: isa.HostIsa) -> BuildProgress:
        progress = BuildProgress(f"llama.cpp host build ({level.level}{', CUDA sm_' + cuda.arch if cuda else ''})", log)
        # a fallback reconfigures the same tree: only ggml-cpu, whose flags change, compiles again
        cmake_build(tree, build_dir, [*CMAKE_FLAGS, *level.cmake_args, *gpu_args], ["llama", *tools],
                    log_file=log_file, progress=progress, jobs=jobs)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for file in sorted((build_dir / "bin").iterdir()):
            if file.name in tools or file.name.endswith(".so"):
                shutil.copy2(file, out / file.name)
        missing = [n for n in _libs(cuda) + tools if not (out / n).is_file()]
        if missing:
            raise LlamaCppError(f"the llama.cpp host build made no {', '.join(missing)}",
                                f"see the build log {log_file}")
        progress.phase("self-check: a prompt and a decode on every weight type"
                       + (" (all layers on the GPU)" if cuda and cuda.gpu_here else ""))
        return progress

    if cuda is None:
        def check() -> dict[str, str]:
            return self_check(out)
    elif cuda.gpu_here:
        def check() -> dict[str, str]:
            return self_check(out, gpu_layers=999)
    else:  # built here for a GPU elsewhere: its libraries need that machine's driver to load
        def check() -> dict[str, str]:
            return {}
    level, attempts = build_until_checked(isa.detect(), build_at, check, log_file)
    shutil.copy2(build_dir / ".ninja_log", staging / "ninja_log.txt")  # what each step took
    shutil.copy2(log_file, staging / "build.log")
    shutil.rmtree(build_dir, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    return {
        "source": str(src), "source_label": label, "patches": patches, "latent_kv": bool(patches),
        "profile": "host", "toolchain": "cuda" if cuda else "native", "arch": level.arch, "triple": level.arch, "libc": "host",
        "glibc": "", "uses": [], "isa": level.level, "isa_features": list(level.features),
        "isa_probe": level.probed, "isa_requested": level.requested,
        "cmake_flags": [*CMAKE_FLAGS, *level.cmake_args, *gpu_args],
        "cuda_arch": cuda.arch if cuda else "", "cuda_version": cuda.cuda_version if cuda else "",
        "gpu_self_check": bool(cuda and cuda.gpu_here),
        "self_check": attempts, "binaries": sorted(p.name for p in out.iterdir()),
        "sizes": {p.name: p.stat().st_size for p in out.iterdir()},
        "sha256": {p.name: sha256_file(p) for p in out.iterdir()},  # checked before anything is deployed
        "seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_until_checked(level: isa.HostIsa, build_at, check, log_file: Path) -> tuple[isa.HostIsa, list[dict]]:
    """Build at `level`, self-check, and on a type that dies fall back one level and build again.
    build_at(level) -> a BuildProgress; check() -> {type: "ok" | why it died}."""
    attempts = []
    while True:
        progress = build_at(level)
        results = check()
        attempts.append({"level": level.level, "results": results})
        died = {t: r for t, r in results.items() if r != "ok"}
        if not died:
            return level, attempts
        said = ", ".join(f"{t}: {r}" for t, r in died.items())
        lower = isa.fallback(level)
        if lower is None:
            raise LlamaCppError(f"the llama.cpp host build dies on this CPU even at {level.level} ({said})",
                                f"report it with the build log {log_file}")
        progress.phase(f"self-check failed at {level.level} ({said}); building for {lower.level} instead")
        level = lower


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def self_check(bin_dir: Path, types: tuple[str, ...] = SELF_CHECK_TYPES, threads: int | None = None,
               gpu_layers: int = 0) -> dict[str, str]:
    """Quantize a tiny PLM to each type with the build's llama-quantize and run a prompt plus a
    few decoded tokens with its llama-completion (gpu_layers on the GPU): {type: "ok" | "SIGILL" |
    ...}. A non-zero exit that is not a signal is a broken build, not a CPU problem: raised."""
    threads = threads or min(4, os.cpu_count() or 1)
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="plm-gguf-selfcheck-") as tmp:
        base = write_tiny_plm_gguf(Path(tmp) / "f32.gguf", seed=7, **SELF_CHECK_MODEL)
        for qtype in types:
            model = Path(tmp) / f"{qtype}.gguf"
            steps = [
                [str(bin_dir / "llama-quantize"), str(base), str(model), qtype, str(threads)],
                [str(bin_dir / "llama-completion"), "-m", str(model), "-p", SELF_CHECK_PROMPT, "-n", "4", "-c", "256",
                 "-t", str(threads), "-fa", "off", "-no-cnv", "--temp", "0", "-s", "1", "--no-warmup",
                 "-ngl", str(gpu_layers)],
            ]
            results[qtype] = "ok"
            for cmd in steps:
                proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300,
                                      stdin=subprocess.DEVNULL)
                if proc.returncode < 0:
                    results[qtype] = f"{_signal_name(proc.returncode)} in {Path(cmd[0]).name}"
                    break
                if proc.returncode != 0:
                    said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    raise LlamaCppError(f"the host build's {Path(cmd[0]).name} failed on a {qtype} file: {said}",
                                        "rebuild after removing the cache entry; report it if it persists")
    return results
