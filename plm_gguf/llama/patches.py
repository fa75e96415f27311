"""plm-gguf's llama.cpp patch set (patches/llama.cpp): where it is, its hash, applying it.

Every llama.cpp plm-gguf builds (the host build, device builds) applies these patches to a copy
of the source, unless asked for stock llama.cpp; build keys hash them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from plm_gguf.cache import llama_cpp_source
from plm_gguf.errors import LlamaCppError
from plm_gguf.llama import LLAMA_CPP_PYTHON_VERSION

FULL_CACHE_HINT = "use --kv-cache full (the stock layout, which stock llama.cpp runs)"
# patch 0004: the smallest batch a latent file attends to in the expanded form (0: every batch absorbed)
MLA_EXPAND_ENV = "LLAMA_PLM_MLA_EXPAND_MIN_TOKENS"


def patches_dir() -> Path:
    """patches/llama.cpp of the source tree, or plm_gguf/patches/llama.cpp where an installed
    package carries them as package data (PLM_GGUF_PATCHES overrides)."""
    override = os.environ.get("PLM_GGUF_PATCHES")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parents[1]  # plm_gguf/
    candidates = [here.parent / "patches" / "llama.cpp", here / "patches" / "llama.cpp"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def patch_files() -> list[Path]:
    folder = patches_dir()
    files = sorted(folder.glob("*.patch")) if folder.is_dir() else []
    if not files:
        raise LlamaCppError(f"no llama.cpp patches in {folder}", FULL_CACHE_HINT)
    return files


def hash_patches(digest) -> None:
    """Feed the patch set (names and diffs) to a hashlib digest: every build key that applies it."""
    for file in patch_files():
        digest.update(file.name.encode() + b"\0" + _patch_body(file.read_bytes()) + b"\0")


def _patch_body(data: bytes) -> bytes:
    """The diff itself: a format-patch header (message, diffstat) or signature builds nothing."""
    start = 0 if data.startswith(b"diff --git ") else data.find(b"\ndiff --git ") + 1
    body = data[start:]
    end = body.rfind(b"\n-- \n")
    return body[: end + 1] if end >= 0 else body


def source_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The pristine vendor/llama.cpp of llama-cpp-python VERSION's sdist, fetched with pip into
    CACHE/src (the same place plm_gguf.devices keeps it). Never modified: builds copy it."""
    return llama_cpp_source(version)


def apply_patches(tree: Path, patches: list[Path] | None = None, *, check_only: bool = False) -> None:
    """Apply the patch set to a llama.cpp tree (git apply, or patch -p1 without git); raise
    LlamaCppError naming the first patch that does not apply."""
    tree = Path(tree).resolve()
    # git apply inside some repository's work tree applies relative to that repository and
    # silently skips paths outside the current folder: keep git from looking above the tree
    env = os.environ | {"GIT_CEILING_DIRECTORIES": str(tree.parent)}
    for patch in patches or patch_files():
        patch = Path(patch).resolve()
        if shutil.which("git"):
            steps = [["git", "apply", "--check", "-p1", str(patch)]]
            if not check_only:  # apply, then prove it applied (the reverse must apply now)
                steps += [["git", "apply", "-p1", str(patch)], ["git", "apply", "--check", "-R", "-p1", str(patch)]]
        elif shutil.which("patch"):
            steps = [["patch", "-p1", "--dry-run", "-s", "-i", str(patch)]]
            if not check_only:
                steps += [["patch", "-p1", "-s", "-i", str(patch)]]
        else:
            raise LlamaCppError("neither git nor patch is installed to apply the llama.cpp patches",
                                f"install git, or {FULL_CACHE_HINT}")
        for cmd in steps:
            proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                said = (proc.stderr or proc.stdout).strip().splitlines()
                raise LlamaCppError(
                    f"the llama.cpp patch {patch.name} does not apply to {tree}: {said[0] if said else 'no output'}",
                    f"the patch targets the llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}; {FULL_CACHE_HINT}")
