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
from pathlib import Path

import pytest

from plm_gguf.fixtures.gguf_file import write_tiny_plm_gguf

DATA = Path(__file__).parents[1] / "data" / "devices"


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


def write_profile(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path
