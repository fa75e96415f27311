"""Build llama.cpp's device binaries for a profile: zig cross builds, the Android NDK, or the host.

Each toolchain is one :class:`Toolchain` (``TOOLCHAINS`` maps the profile's ``target.toolchain``
to it): :class:`ZigToolchain` and :class:`NdkToolchain` are cross builds sharing one recipe
(:class:`CrossToolchain`: their CMake arguments, environment and target slug differ), and
:class:`NativeToolchain` is the host build of plm_gguf.llama.host, and :class:`CudaToolchain`
that build with ggml's CUDA backend for one GPU architecture. The module-level
``build_key``, ``find_build``, ``build`` and ``target_manifest`` pick the profile's toolchain.

Every build applies plm-gguf's llama.cpp patch set (patches/llama.cpp, the absorbed-MLA `plm`
graph that runs `--kv-cache latent` files; stock-layout files run as before) to a copy of the
source, unless asked for stock llama.cpp (`mla_patch=False`). A patch that does not apply is an
error naming it, with the stock build as the way out; nothing is built from a half-patched tree.

Builds are cached under ``cache_dir()/builds/KEY`` where KEY names the llama.cpp source, the
target and a hash of everything that went into the build. A file lock serialises builds of one
key; a build is assembled in a staging folder and renamed into place only when complete, so a
failed or interrupted build leaves no half entry. The manifest records each output's size and
sha256; :func:`verify_build` refuses outputs that changed since, before anything is deployed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

from plm_gguf.cache import cache_dir, llama_cpp_source, sha256_file
from plm_gguf.errors import DeviceError, LlamaCppError, UsageError
from plm_gguf.llama import patches as llama_patches
from plm_gguf.llama.build import BuildProgress, cached_entry, cmake_build
from plm_gguf.llama.host import CudaTarget, find_host_build, host_build, host_key

from . import gpu
from .profiles import Profile, TargetSpec
from .transports import plain_name

# llama-cli in this llama.cpp is an interactive chat client built on the server; the
# non-interactive generator is llama-completion.
BINARIES = ("llama-completion", "llama-bench", "llama-server")
MAX_PAGE_SIZE = 16384  # Pi 5 kernels and new Android phones use 16 KiB pages
BUILD_VERSION = 1  # bump when the recipe below changes
STOCK_HINT = ("build stock llama.cpp with --no-mla-patch; it runs files converted with --kv-cache full "
              "(the default), not --kv-cache latent ones")

COMMON_CMAKE = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF", "-DGGML_CCACHE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
]


@dataclass(frozen=True)
class Build:
    key: str
    path: Path  # the cache entry: bin/ and manifest.json
    manifest: dict

    @property
    def binaries(self) -> dict[str, Path]:
        return {name: self.path / "bin" / name for name in self.manifest["binaries"]}


def _llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        pass
    for req in importlib.metadata.requires("plm-gguf") or ():  # the version plm-gguf pins
        match = re.match(r"llama[-_]cpp[-_]python\s*==\s*([\w.]+)", req)
        if match:
            return match.group(1)
    raise UsageError("no llama-cpp-python version to take llama.cpp from", "pass --llama-cpp PATH")


def _fingerprint(src: Path) -> str:
    digest = hashlib.sha256()
    for rel in ("CMakeLists.txt", "src/llama-model.cpp", "ggml/src/ggml.c", "ggml/CMakeLists.txt"):
        file = src / rel
        digest.update(file.read_bytes() if file.is_file() else b"-")
    return digest.hexdigest()[:12]


def resolve_source(path: str | Path | None = None) -> tuple[Path, str]:
    """The llama.cpp source tree and a label for it (fetched into the cache when not given)."""
    if path:
        src = Path(path).expanduser().resolve()
        if not (src / "CMakeLists.txt").is_file() or not (src / "ggml").is_dir():
            raise UsageError(f"{src} is not a llama.cpp source tree", "point at the folder with CMakeLists.txt and ggml/")
        return src, f"src-{_fingerprint(src)}"
    version = _llama_cpp_python_version()
    return llama_cpp_source(version), f"lcp{version}"


def _zig() -> str:
    try:
        import ziglang
    except ImportError:
        raise DeviceError("zig is not installed", "install the devices extra of plm-gguf (pip install ziglang==0.17.0)") from None
    return str(Path(ziglang.__file__).parent / "zig")


def _write_zig_wrappers(folder: Path, target: TargetSpec) -> None:
    """cc/c++/ar/ranlib wrappers: zig reads -march as a CPU name, so drop ggml's -march/-mcpu and name ours."""
    triple = target.triple + (f".{target.glibc}" if target.glibc and "gnu" in target.triple else "")
    zig = _zig()
    folder.mkdir(parents=True, exist_ok=True)
    for name, mode in (("zcc", "cc"), ("zcxx", "c++")):
        (folder / name).write_text(
            "#!/bin/sh\n"
            'n=$#; i=0\n'
            'while [ "$i" -lt "$n" ]; do a=$1; shift; i=$((i+1));\n'
            '  case "$a" in -march=*|-mcpu=*) ;; *) set -- "$@" "$a" ;; esac\n'
            "done\n"
            f'exec "{zig}" {mode} -target {triple} -mcpu={target.mcpu or "generic"} "$@"\n'
        )
    for name, verb in (("zar", "ar"), ("zranlib", "ranlib")):
        (folder / name).write_text(f'#!/bin/sh\nexec "{zig}" {verb} "$@"\n')
    for script in folder.iterdir():
        script.chmod(0o755)


class Toolchain(ABC):
    """How llama.cpp is built for a profile: the cache key, the cached build, a build, and what a
    build will use (known before building, for the checks)."""

    name: str = ""

    @abstractmethod
    def build_key(self, profile: Profile, source: Path, label: str, glibc: str = "", mla_patch: bool = True) -> str:
        """The cache key: names the source, the target and a hash of the whole recipe."""

    @abstractmethod
    def find(self, profile: Profile, source: str | Path | None, glibc: str, mla_patch: bool,
             server: bool) -> Build | None:
        """The cached build, or None."""

    @abstractmethod
    def build(self, profile: Profile, source: str | Path | None, *, glibc: str, jobs: int, log, mla_patch: bool,
              server: bool) -> Build:
        """The cached build, built first when absent."""

    def target_manifest(self, profile: Profile, glibc: str = "") -> dict:
        """What a build for the profile will use, known before building (the checks read this)."""
        target = profile.target
        return {"profile": profile.name, "toolchain": self.name, "arch": target.arch, "uses": list(target.uses),
                "glibc": glibc or target.glibc, "max_page_size": MAX_PAGE_SIZE}

    def kernels(self, manifest: dict) -> list[str]:
        """The speed features a build (its manifest) compiles in, as deploy reports them."""
        return [f for f in ("i8mm", "asimddp", "fphp") if f in manifest.get("uses", ())]


class CrossToolchain(Toolchain):
    """A CMake cross build cached under cache_dir()/builds; subclasses give its CMake arguments."""

    shared_libraries = False  # the build's *.so go next to the binaries (RPATH $ORIGIN)

    @abstractmethod
    def configure(self, profile: Profile, staging: Path, write: bool = True) -> tuple[list[str], dict[str, str], str]:
        """CMake arguments, extra environment and a slug naming the target (write=False: no files, for keys)."""

    def build_key(self, profile: Profile, source: Path, label: str, glibc: str = "", mla_patch: bool = True) -> str:
        """source version (+ "-mla" when patched) + target slug + a hash of the whole recipe, the
        patches included (paths of temporary wrappers left out)."""
        target = _with_glibc(profile.target, glibc)
        args, _, slug = self.configure(_replace_target(profile, target), Path("/nonexistent"), write=False)
        recipe = json.dumps([BUILD_VERSION, COMMON_CMAKE, target.toolchain, target.triple, target.glibc,
                             target.mcpu, [a for a in args if "/zig/" not in a], BINARIES])
        digest = hashlib.sha256(recipe.encode())
        if mla_patch:
            _patch_files()
            llama_patches.hash_patches(digest)
        return f"{label}{'-mla' if mla_patch else ''}-{slug}-{digest.hexdigest()[:8]}"

    def find(self, profile: Profile, source: str | Path | None, glibc: str, mla_patch: bool,
             server: bool) -> Build | None:
        src, label = resolve_source(source)
        entry = cache_dir() / "builds" / self.build_key(profile, src, label, glibc, mla_patch)
        manifest = entry / "manifest.json"
        return Build(entry.name, entry, json.loads(manifest.read_text())) if manifest.is_file() else None

    def build(self, profile: Profile, source: str | Path | None, *, glibc: str, jobs: int, log, mla_patch: bool,
              server: bool) -> Build:
        """Cross builds always have llama-server (`server` is for the host build)."""
        src, label = resolve_source(source)
        profile = _replace_target(profile, _with_glibc(profile.target, glibc))
        key = self.build_key(profile, src, label, mla_patch=mla_patch)
        entry = cache_dir() / "builds" / key
        with cached_entry(entry, lambda e: (e / "manifest.json").is_file()) as staging:
            if staging is None:
                return Build(key, entry, json.loads((entry / "manifest.json").read_text()))
            manifest = self._run_build(profile, src, label, staging, jobs, log, mla_patch)
            manifest["key"] = key
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
            for scratch in ("cmake", "llama.cpp", "zig-cache"):
                shutil.rmtree(staging / scratch, ignore_errors=True)
        return Build(key, entry, manifest)

    def _run_build(self, profile: Profile, src: Path, label: str, staging: Path, jobs: int, log,
                   mla_patch: bool) -> dict:
        patches = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _patch_files()} if mla_patch else {}
        tree = _patched_tree(src, staging, label) if mla_patch else src
        args, extra_env, slug = self.configure(profile, staging)
        log_path = cache_dir() / "logs" / f"{staging.name.split('.partial-')[0].lstrip('.')}.log"
        started = time.monotonic()
        progress = BuildProgress(f"llama.cpp for {profile.name} ({slug})", log)
        try:
            cmake_build(tree, staging / "cmake", [*COMMON_CMAKE, *args], list(BINARIES), log_file=log_path,
                        progress=progress, env={**os.environ, **extra_env}, jobs=jobs or None)
        except LlamaCppError as err:
            raise DeviceError(err.message, err.hint) from None
        build_dir = staging / "cmake"
        (staging / "bin").mkdir()
        sizes = {}
        for name in BINARIES:
            built = build_dir / "bin" / name
            if not built.is_file():
                raise DeviceError(f"the build produced no {name}", f"see the build log {log_path}")
            shutil.copy2(built, staging / "bin" / name)
            sizes[name] = (staging / "bin" / name).stat().st_size
        if self.shared_libraries:
            for lib in (build_dir / "bin").glob("*.so"):
                shutil.copy2(lib, staging / "bin" / lib.name)
                sizes[lib.name] = lib.stat().st_size
        return {
            "source": str(src), "source_label": label,
            "patches": patches, "latent_kv": bool(patches),  # runs --kv-cache latent files
            "profile": profile.name, "toolchain": profile.target.toolchain,
            "triple": profile.target.triple or platform.machine(),
            "arch": profile.target.arch or platform.machine(), "libc": profile.target.libc,
            "glibc": profile.target.glibc, "mcpu": profile.target.mcpu, "uses": list(profile.target.uses),
            "max_page_size": MAX_PAGE_SIZE, "binaries": sorted(sizes), "sizes": sizes,
            "sha256": {name: sha256_file(staging / "bin" / name) for name in sorted(sizes)},
            "seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


class ZigToolchain(CrossToolchain):
    """zig cc as the C/C++ compiler for the profile's triple and CPU: static musl, or a chosen glibc."""

    name = "zig"

    def configure(self, profile: Profile, staging: Path, write: bool = True) -> tuple[list[str], dict[str, str], str]:
        target = profile.target
        link = f"-Wl,-z,max-page-size={MAX_PAGE_SIZE}"
        wrappers = staging / "zig"
        if write:
            _write_zig_wrappers(wrappers, target)
        static = "-static " if target.libc == "musl" else ""
        args = [f"-DCMAKE_C_COMPILER={wrappers / 'zcc'}", f"-DCMAKE_CXX_COMPILER={wrappers / 'zcxx'}",
                "-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={target.arch}",
                f"-DCMAKE_EXE_LINKER_FLAGS={static}-s {link}",
                f"-DCMAKE_AR={wrappers / 'zar'}", f"-DCMAKE_RANLIB={wrappers / 'zranlib'}"]
        env = {"ZIG_GLOBAL_CACHE_DIR": str(cache_dir() / "zig"), "ZIG_LOCAL_CACHE_DIR": str(staging / "zig-cache")}
        slug = f"{target.triple}{'.' + target.glibc if target.glibc else ''}-{target.mcpu.replace('+', '_')}"
        return args, env, slug


class NdkToolchain(CrossToolchain):
    """The Android NDK at ANDROID_NDK_HOME: arm64-v8a, shared ggml CPU variants chosen at run time."""

    name = "ndk"
    shared_libraries = True

    def configure(self, profile: Profile, staging: Path, write: bool = True) -> tuple[list[str], dict[str, str], str]:
        link = f"-Wl,-z,max-page-size={MAX_PAGE_SIZE}"
        ndk = os.environ.get("ANDROID_NDK_HOME", "")
        if not ndk or not Path(ndk, "build/cmake/android.toolchain.cmake").is_file():
            raise DeviceError("toolchain 'ndk' needs ANDROID_NDK_HOME", "set ANDROID_NDK_HOME to an unpacked Android NDK")
        args = [f"-DCMAKE_TOOLCHAIN_FILE={ndk}/build/cmake/android.toolchain.cmake",
                "-DANDROID_ABI=arm64-v8a", "-DANDROID_PLATFORM=android-28", "-DBUILD_SHARED_LIBS=ON",
                "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_LLAMAFILE=OFF",
                "-DCMAKE_BUILD_RPATH=$ORIGIN", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
                f"-DCMAKE_SHARED_LINKER_FLAGS={link} -s", f"-DCMAKE_EXE_LINKER_FLAGS={link} -s"]
        return args, {}, "android-ndk-arm64"


class NativeToolchain(Toolchain):
    """The host build (plm_gguf.llama.host) serves native profiles: one tree, libraries and tools."""

    name = "native"

    def build_key(self, profile: Profile, source: Path, label: str, glibc: str = "", mla_patch: bool = True) -> str:
        return host_key(source if label.startswith("src-") else None, mla_patch)

    def find(self, profile: Profile, source: str | Path | None, glibc: str, mla_patch: bool,
             server: bool) -> Build | None:
        found = _host(find_host_build, source, mla_patch, server=server)
        return Build(found.key, found.path, found.manifest) if found else None

    def build(self, profile: Profile, source: str | Path | None, *, glibc: str, jobs: int, log, mla_patch: bool,
              server: bool) -> Build:
        """The host build adds llama-server when `server` asks."""
        if glibc:
            raise UsageError("--glibc is for cross builds", "the host build links this machine's own C library")
        hb = _host(host_build, source, mla_patch, server=server, log=log, jobs=jobs or None)
        return Build(hb.key, hb.path, hb.manifest)

    def target_manifest(self, profile: Profile, glibc: str = "") -> dict:
        return {"profile": profile.name, "toolchain": self.name, "arch": platform.machine(), "uses": [], "glibc": ""}

    def kernels(self, manifest: dict) -> list[str]:
        return [f"{manifest.get('isa', 'host')} (self-checked)"]


class CudaToolchain(NativeToolchain):
    """The host build with ggml's CUDA backend, for one GPU architecture: built here with this
    machine's nvcc (found on PATH, $CUDA_HOME/bin or /usr/local/cuda/bin) for the GPU that
    nvidia-smi reports on the device (the profile's transport: this machine or an SSH box), or
    for target.cuda_arch; cached by architecture and CUDA version."""

    name = "cuda"

    def cuda_target(self, profile: Profile) -> CudaTarget:
        nvcc = gpu.find_nvcc()
        version = gpu.nvcc_version(nvcc)
        local = profile.transport.kind == "local"
        arch = profile.target.cuda_arch
        if not arch or local:
            found = self.device_gpus(profile)
            arch = arch or found[0].arch
            local = local and any(g.arch == arch for g in found)
        return CudaTarget(arch=arch, cuda_version=version, nvcc=nvcc, gpu_here=local)

    @staticmethod
    def device_gpus(profile: Profile) -> list[gpu.GpuInfo]:
        from .transports import connect

        transport = connect(profile)
        out = transport.run(f"nvidia-smi --query-gpu={gpu.QUERY} --format=csv,noheader,nounits", timeout=60,
                            check=False)
        found = gpu.parse_gpus(out.stdout)
        if not found:
            said = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()[-1][:200]
            raise DeviceError(f"no NVIDIA GPU answers on {transport.describe()} (nvidia-smi: {said})",
                              "install the NVIDIA driver there, or set target.cuda_arch (e.g. \"89\") to build "
                              "without asking")
        return found

    def build_key(self, profile: Profile, source: Path, label: str, glibc: str = "", mla_patch: bool = True) -> str:
        return host_key(source if label.startswith("src-") else None, mla_patch, self.cuda_target(profile))

    def find(self, profile: Profile, source: str | Path | None, glibc: str, mla_patch: bool,
             server: bool) -> Build | None:
        found = _host(find_host_build, source, mla_patch, server=server, cuda=self.cuda_target(profile))
        return Build(found.key, found.path, found.manifest) if found else None

    def build(self, profile: Profile, source: str | Path | None, *, glibc: str, jobs: int, log, mla_patch: bool,
              server: bool) -> Build:
        if glibc:
            raise UsageError("--glibc is for cross builds", "the CUDA build links this machine's own C library")
        hb = _host(host_build, source, mla_patch, server=server, log=log, jobs=jobs or None,
                   cuda=self.cuda_target(profile))
        return Build(hb.key, hb.path, hb.manifest)

    def target_manifest(self, profile: Profile, glibc: str = "") -> dict:
        return {**super().target_manifest(profile, glibc), "toolchain": self.name}

    def kernels(self, manifest: dict) -> list[str]:
        return [f"CUDA sm_{manifest.get('cuda_arch', '?')} (CUDA {manifest.get('cuda_version', '?')})",
                *super().kernels(manifest)]


TOOLCHAINS: dict[str, Toolchain] = {t.name: t for t in (ZigToolchain(), NdkToolchain(), NativeToolchain(),
                                                         CudaToolchain())}


def toolchain_for(profile: Profile) -> Toolchain:
    """The toolchain the profile's target.toolchain names; an unknown name is a DeviceError."""
    name = profile.target.toolchain
    try:
        return TOOLCHAINS[name]
    except KeyError:
        raise DeviceError(f"profile {profile.name} names toolchain {name!r}, which plm-gguf does not know",
                          f"set target.toolchain to one of {', '.join(TOOLCHAINS)}") from None


def _configure_args(profile: Profile, staging: Path, write: bool = True) -> tuple[list[str], dict[str, str], str]:
    """CMake arguments, extra environment and a slug naming the target of a cross build."""
    chain = toolchain_for(profile)
    if not isinstance(chain, CrossToolchain):
        raise DeviceError(f"toolchain {chain.name!r} is not a CMake cross build", "use a zig or ndk profile")
    return chain.configure(profile, staging, write)


def build_key(profile: Profile, source: Path, label: str, glibc: str = "", mla_patch: bool = True) -> str:
    """The cache key of the profile's build (Toolchain.build_key of its toolchain)."""
    return toolchain_for(profile).build_key(profile, source, label, glibc, mla_patch)


def target_manifest(profile: Profile, glibc: str = "") -> dict:
    """What a build for the profile will use, known before building (the checks read this)."""
    return toolchain_for(profile).target_manifest(profile, glibc)


def _patch_files() -> list[Path]:
    try:
        return llama_patches.patch_files()
    except LlamaCppError as err:
        raise DeviceError(err.message, STOCK_HINT) from None


def _patched_tree(src: Path, staging: Path, label: str) -> Path:
    """A copy of the source with the patch set applied (the source itself is never modified)."""
    tree = staging / "llama.cpp"
    shutil.copytree(src, tree, symlinks=True, ignore=shutil.ignore_patterns(".git", "build"))
    try:
        llama_patches.apply_patches(tree, _patch_files())
    except LlamaCppError as err:
        raise DeviceError(err.message.replace(str(tree), f"llama.cpp {label}"), STOCK_HINT) from None
    return tree


def _with_glibc(target: TargetSpec, glibc: str) -> TargetSpec:
    if not glibc:
        return target
    return replace(target, triple=target.triple.replace("musl", "gnu"), glibc=glibc)


def _replace_target(profile: Profile, target: TargetSpec) -> Profile:
    return replace(profile, target=target)


def find_build(profile: Profile, source: str | Path | None = None, glibc: str = "",
               mla_patch: bool = True, server: bool = False) -> Build | None:
    return toolchain_for(profile).find(profile, source, glibc, mla_patch, server)


def _host(fn, source, mla_patch, **kw):
    """The host build (plm_gguf.llama.host) serves native profiles: one tree, libraries and tools."""
    if source is not None:
        resolve_source(source)  # a clean error for a folder that is no llama.cpp tree
    try:
        return fn(source, mla_patch=mla_patch, **kw)
    except LlamaCppError as err:
        raise DeviceError(err.message, err.hint) from None


def build(profile: Profile, source: str | Path | None = None, *, glibc: str = "", jobs: int = 0,
          log=None, mla_patch: bool = True, server: bool = False) -> Build:
    """The cached build for the profile (patched unless mla_patch=False), building it first when
    absent. Cross builds always have llama-server; the host build adds it when `server` asks."""
    return toolchain_for(profile).build(profile, source, glibc=glibc, jobs=jobs, log=log, mla_patch=mla_patch,
                                        server=server)


def verify_build(build: Build) -> None:
    """Refuse outputs that are not the files the build made: each one's sha256 against the
    manifest's, or its size where the manifest records no sha256 (entries made before it did)."""
    sums, sizes = build.manifest.get("sha256", {}), build.manifest.get("sizes", {})
    for name in build.manifest.get("binaries", ()):
        path = build.path / "bin" / name
        why = "is not a plain file name" if not plain_name(name) else "is missing" if not path.is_file() else ""
        if not why and name in sums:
            digest = sha256_file(path)
            if digest != sums[name]:
                why = f"has sha256 {digest[:16]}..., not the {str(sums[name])[:16]}... the build recorded"
        elif not why and path.stat().st_size != sizes.get(name):
            why = f"has {path.stat().st_size} bytes, not the {sizes.get(name)} the build recorded"
        if why:
            raise DeviceError(f"{name} in the llama.cpp build {build.key} {why}",
                              f"the cached build changed after it was made: delete {build.path} and deploy again "
                              "(it builds llama.cpp anew)")
