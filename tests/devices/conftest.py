"""Fixtures for the device tests: a tiny PLM GGUF, the cached builds, and a scratch profile folder.

``write_tiny_plm_gguf`` (plm_gguf.fixtures.gguf_file) is written with the `gguf` package directly.
The builds are made once per session through the user cache (PLM_GGUF_CACHE), so a second
run of the suite builds nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from plm_gguf.fixtures.gguf_file import write_tiny_plm_gguf


def _missing(why: str) -> None:
    """Skip where a Debian package is absent, but fail in CI, which installs them (./run setup)."""
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must install it")
    pytest.skip(why)
@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_plm_gguf(tmp_path_factory.mktemp("model") / "tiny plm 'test'.gguf")


@pytest.fixture()
def profile_dir(tmp_path, monkeypatch) -> Path:
    """An empty user profile folder (PLM_GGUF_PROFILES) for profiles a test writes."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv("PLM_GGUF_PROFILES", str(folder))
    return folder


def _llama_cpp_source() -> str | None:
    """PLM_GGUF_LLAMA_CPP points the tests at an unpacked llama.cpp; else the default (fetched, cached)."""
    return os.environ.get("PLM_GGUF_LLAMA_CPP") or None


@pytest.fixture(scope="session")
def host_build():
    """The native build of llama.cpp for the `host` profile: built once, then from the cache."""
    from plm_gguf.devices import profiles, toolchain

    return toolchain.build(profiles.load_profile("host"), _llama_cpp_source())


@pytest.fixture(scope="session")
def aarch64_build():
    """The static aarch64-musl build (rpi5 recipe): one zig cross build per cache, shared by qemu and adb tests."""
    if not shutil.which("qemu-aarch64-static"):
        _missing("qemu-user-static is not installed")
    from plm_gguf.devices import profiles, toolchain

    return toolchain.build(profiles.load_profile("rpi5"), _llama_cpp_source())


def run_cli(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`plm-gguf ARGS` in a child process, as a user runs it."""
    full = os.environ | {"COLUMNS": "200", "PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "plm_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, env=full, timeout=timeout)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1 with a temporary host key and authorized key."""
    if not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh"):
        _missing("openssh-server / openssh-client are not installed")
    from .sshd import start_sshd, stop_sshd

    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


@pytest.fixture(scope="session")
def emulated_pi(aarch64_build):
    """The emulated Raspberry Pi 5 (devices/emulator.py): its image built once per cache, the machine
    started once per session (or the one already running reused) and stopped at the end."""
    if os.geteuid() != 0:
        _missing("the emulated Pi needs root")
    if not shutil.which("mmdebstrap") or not shutil.which("arch-test"):
        _missing("mmdebstrap / arch-test are not installed")
    from plm_gguf.devices import emulator

    was_running = emulator.running("rpi5")
    machine = emulator.start("rpi5")
    yield machine
    if not was_running:
        assert emulator.stop("rpi5")


def wait_http(url: str, timeout: float = 60.0) -> int:
    """GET url until it answers 200 or TIMEOUT seconds pass; the last status seen (0: none)."""
    deadline, status = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                status = resp.status
                if status == 200:
                    return status
        except OSError:
            pass
        time.sleep(0.5)
    return status


def write_profile(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path


# ---------------------------------------------------------------- absorbed MLA on the device builds

MLA_PROMPT = "def read_config(path):\n    "
N_PREDICT = 24
TRAINED = Path(__file__).resolve().parents[1] / "data" / "trained-plm"  # 4.4M PLM trained on Python's stdlib


@pytest.fixture(scope="session")
def mla_pair(tmp_path_factory):
    """The trained fixture PLM (nope 48 != v 64) converted to f32 in both KV-cache layouts, and the
    bytes of the torch reference's greedy continuation of MLA_PROMPT (byte-level BPE pieces)."""
    import torch
    from tokenizers import Tokenizer

    from plm_gguf.checkpoint import Checkpoint
    from plm_gguf.convert.writer import convert
    from plm_gguf.fixtures.tokenizers import bytes_to_unicode
    from plm_gguf.reference import PLMForCausalLM

    root = tmp_path_factory.mktemp("mla-qemu")
    ckpt = TRAINED
    stock = convert(ckpt, root / "stock-f32.gguf", "f32").outfile
    latent = convert(ckpt, root / "latent-f32.gguf", "f32", kv_cache="latent").outfile
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ids = tok.encode(MLA_PROMPT, add_special_tokens=False).ids
    n_prompt = len(ids)
    model = PLMForCausalLM.from_checkpoint(Checkpoint(ckpt))
    with torch.no_grad():
        for _ in range(N_PREDICT):
            ids.append(int(model(torch.tensor(ids))[-1].argmax()))
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = [bytes(to_byte[c] for c in tok.id_to_token(i)) for i in ids[n_prompt:]]
    assert len(set(pieces)) > 2, pieces  # a continuation that can tell two computations apart
    return stock, latent, MLA_PROMPT.encode() + b"".join(pieces)
