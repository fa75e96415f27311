"""llama.cpp's own pipeline, from the source the installed llama-cpp-python vendors.

Everything lives under benchmarks/work/ (gitignored) and is made once:

- the llama-cpp-python sdist (`pip download --no-binary llama-cpp-python`; `:all:`
  would build cmake and ninja from source too), unpacked: its vendor/llama.cpp
  holds convert_hf_to_gguf.py, gguf-py and the C++ tools;
- convert-venv/: a virtual environment for convert_hf_to_gguf.py with the vendored
  requirements-convert_hf_to_gguf.txt, except torch (the local CPU wheel, 2.13.0, instead of the
  pinned 2.11.0 from download.pytorch.org, which cannot be reached here) and gguf (the vendored
  gguf-py, installed from the source tree);
- llama-build/KEY/: llama-quantize and llama-perplexity of the unpatched source, built with
  cmake -DGGML_NATIVE=OFF through plm_gguf.llama.build (`cmake_build` + `cached_entry`, keyed by
  `tools_key`). Not the host build: that one is patched, shared-library and probed-ISA, and has
  no llama-perplexity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from plm_gguf.llama.build import BuildProgress, cached_entry, cmake_build

WORK = Path(__file__).parent / "work"
TORCH = "torch==2.13.0"  # the local CPU wheel; any other version pulls the CUDA wheels
TOOLS = ("llama-quantize", "llama-perplexity")
# Requirements of convert_hf_to_gguf.py that are replaced here, and why.
REPLACED = {"torch": f"{TORCH} (local CPU wheel; the pinned version needs download.pytorch.org)",
            "gguf": "the vendored gguf-py, installed from the source tree"}


@dataclass
class Toolchain:
    llama_cpp: Path  # the vendored llama.cpp source tree
    python: Path  # convert-venv's interpreter
    quantize: Path
    perplexity: Path
    notes: list[str] = field(default_factory=list)

    @property
    def convert_script(self) -> Path:
        return self.llama_cpp / "convert_hf_to_gguf.py"

    def describe(self) -> dict:
        venv = self.python.parent.parent
        return {"llama_cpp_python": _llama_cpp_python_version(), "llama_cpp_commit": _git_head(self.llama_cpp),
                "llama_cpp_build": _build_info(self.perplexity), "source": str(self.llama_cpp),
                "convert_venv": {name: _venv_version(venv, name) for name in ("torch", "numpy", "transformers", "gguf")},
                "cmake_flags": CMAKE_FLAGS, "notes": self.notes}


def _llama_cpp_python_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def ensure_toolchain(log=print) -> Toolchain:
    """Everything made once; a second harness started meanwhile waits for the first's setup."""
    WORK.mkdir(parents=True, exist_ok=True)
    with _locked(WORK / ".setup.lock"):
        src = ensure_sdist(log)
        python, notes = ensure_convert_venv(src, log)
        quantize, perplexity = ensure_llama_tools(src, log)
    return Toolchain(src, python, quantize, perplexity, notes)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_sdist(log=print) -> Path:
    version = _llama_cpp_python_version()
    folder = WORK / "sdist"
    src = folder / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        log(f"downloading the llama-cpp-python {version} sdist")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
              f"llama-cpp-python=={version}", "-d", str(folder)])
    log(f"unpacking {archive.name}")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="tar")
    return src


def ensure_convert_venv(src: Path, log=print) -> tuple[Path, list[str]]:
    venv = WORK / "convert-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".plm-bench-ready"
    reqs = flatten_requirements(src / "requirements" / "requirements-convert_hf_to_gguf.txt")
    kept = [r for r in reqs if _req_name(r) not in REPLACED]
    notes = [f"convert_hf_to_gguf.py's requirement {r!r} replaced by {REPLACED[_req_name(r)]}"
             for r in reqs if _req_name(r) in REPLACED]
    if stamp.exists():
        return python, notes
    log(f"making {venv} for convert_hf_to_gguf.py")
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(python), "-m", "pip", "install", "-q", TORCH])
    _run([str(python), "-m", "pip", "install", "-q", str(src / "gguf-py")])
    pinned = WORK / "convert-requirements.txt"
    pinned.write_text("\n".join(kept) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "-r", str(pinned), "py-spy"])
    stamp.write_text("\n".join(kept) + "\n")
    return python, notes


def flatten_requirements(path: Path) -> list[str]:
    """Requirement lines with `-r` includes followed; index options dropped."""
    out: list[str] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith(("--extra-index-url", "--index-url", "-i ")):
            continue
        if line.startswith("-r"):
            out += flatten_requirements(path.parent / line[2:].strip())
        else:
            out.append(line)
    return out


def _req_name(line: str) -> str:
    return re.split(r"[<>=~!\[; ]", line, maxsplit=1)[0].strip().lower()


CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"]


def tools_key() -> str:
    """The cache key of the tools' build: the llama-cpp-python version (its vendored source),
    the machine, and a hash of the recipe."""
    digest = hashlib.sha256(json.dumps([CMAKE_FLAGS, TOOLS]).encode()).hexdigest()[:10]
    return f"lcp{_llama_cpp_python_version()}-stock-{platform.machine()}-{digest}"


def ensure_llama_tools(src: Path, log=print) -> tuple[Path, Path]:
    """llama-quantize and llama-perplexity of the unpatched source, built once per key into
    WORK/llama-build/KEY/bin (plm_gguf.llama.build: one lock per key, a staging folder renamed
    into place when complete, the build log kept as KEY/build.log)."""
    entry = WORK / "llama-build" / tools_key()
    with cached_entry(entry, lambda e: all((e / "bin" / t).is_file() for t in TOOLS)) as staging:
        if staging is not None:
            log(f"building {', '.join(TOOLS)} in {entry} (a few minutes)")
            build_dir = staging / "cmake"
            cmake_build(src, build_dir, CMAKE_FLAGS, list(TOOLS), log_file=staging / "build.log",
                        progress=BuildProgress("llama.cpp benchmark tools", log), jobs=2)
            (staging / "bin").mkdir()
            for name in TOOLS:
                shutil.copy2(build_dir / "bin" / name, staging / "bin" / name)
            shutil.rmtree(build_dir, ignore_errors=True)
    return tuple(entry / "bin" / t for t in TOOLS)  # type: ignore[return-value]


def _git_head(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _build_info(binary: Path) -> str:
    """The tool's own `--version` line (build number and commit)."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("version")]
    return lines[0] if lines else "unknown"


def _venv_version(venv: Path, name: str) -> str:
    found = sorted(venv.glob(f"lib/python*/site-packages/{name}-*.dist-info"))
    return found[-1].name.removeprefix(f"{name}-").removesuffix(".dist-info") if found else "missing"


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)
