"""plm-gguf's user cache (PLM_GGUF_CACHE overrides) and the llama.cpp source kept in it.

Everything built or fetched lives here, keyed by what made it: the Qwen tokenizer fixture,
device builds, the patched host library, and the llama-cpp-python sdist whose vendored
llama.cpp all builds start from (so devices run the llama.cpp that verify and the sweep ran).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from plm_gguf.errors import LlamaCppError


def cache_dir() -> Path:
    """The user cache directory (PLM_GGUF_CACHE overrides)."""
    override = os.environ.get("PLM_GGUF_CACHE")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("plm-gguf"))


def llama_cpp_source(version: str) -> Path:
    """The pristine vendor/llama.cpp of llama-cpp-python VERSION's sdist, fetched with pip into
    CACHE/src once, behind a lock. Never modified: builds copy or build out of tree."""
    from filelock import FileLock

    root = cache_dir() / "src" / f"llama-cpp-python-{version}"
    src = root / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not src.is_dir():
            _fetch_sdist(version, root)
    return src


def _fetch_sdist(version: str, root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        # --no-binary names the package only: with :all: pip also builds the sdist's build
        # dependencies from source just to read its metadata (minutes, measured here)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
               "-d", tmp, f"llama-cpp-python=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LlamaCppError(f"could not download the llama-cpp-python {version} sdist: {tail[0]}",
                                "check access to PyPI, or pass an unpacked llama.cpp with --llama-cpp PATH")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = next(p for p in Path(tmp).iterdir() if p.is_dir())
        if not (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise LlamaCppError(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp",
                                "pass an unpacked llama.cpp with --llama-cpp PATH")
        os.replace(unpacked, root)
