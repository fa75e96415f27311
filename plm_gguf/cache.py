"""plm-gguf's user cache (PLM_GGUF_CACHE overrides) and the llama.cpp source kept in it.

Everything built or fetched lives here, keyed by what made it: the Qwen tokenizer fixture,
device builds, the host build (plm_gguf.llama.host), and the llama-cpp-python sdist (pinned by
sha256) whose vendored llama.cpp all builds start from (so devices run the llama.cpp that
verify and the sweep ran).
"""

from __future__ import annotations

import hashlib
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


# The llama-cpp-python sdists plm-gguf builds from, pinned: a download that differs is refused.
SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}


def sdist_path(version: str) -> Path:
    """Where the sdist is kept (./run setup downloads it here once, for pip and for the builds)."""
    return cache_dir() / "src" / f"llama_cpp_python-{version}.tar.gz"


def llama_cpp_source(version: str) -> Path:
    """The pristine vendor/llama.cpp of llama-cpp-python VERSION's sdist, unpacked into
    CACHE/src once, behind a lock. Never modified: builds copy or build out of tree."""
    from filelock import FileLock

    root = cache_dir() / "src" / f"llama-cpp-python-{version}"
    src = root / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not src.is_dir():
            _unpack_sdist(_sdist(version), version, root)
    return src


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sdist(version: str) -> Path:
    """The sdist file, checked against its pinned sha256 (downloaded with pip when absent)."""
    path = sdist_path(version)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
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
            os.replace(sdists[0], path)
    want = SDIST_SHA256.get(version)
    got = sha256_file(path)
    if want and got != want:
        bad = path.with_name(path.name + ".rejected")
        os.replace(path, bad)
        raise LlamaCppError(f"the llama-cpp-python {version} sdist has sha256 {got[:16]}..., not the pinned "
                            f"{want[:16]}... (moved aside to {bad.name})",
                            "run again to download it anew; if it persists, your package index serves another file")
    return path


def _unpack_sdist(sdist: Path, version: str, root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = next(p for p in Path(tmp).iterdir() if p.is_dir())
        if not (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise LlamaCppError(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp",
                                "pass an unpacked llama.cpp with --llama-cpp PATH")
        os.replace(unpacked, root)


def main(argv: list[str] | None = None) -> None:
    """`python -m plm_gguf.cache sdist`: the pinned llama-cpp-python sdist, checked, downloaded
    when absent; prints its path (./run installs the bindings from it)."""
    import argparse

    from plm_gguf.llama import LLAMA_CPP_PYTHON_VERSION

    parser = argparse.ArgumentParser(prog="plm_gguf.cache")
    parser.add_argument("what", choices=["sdist"])
    parser.parse_args(argv)
    try:
        print(_sdist(LLAMA_CPP_PYTHON_VERSION))
    except LlamaCppError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
