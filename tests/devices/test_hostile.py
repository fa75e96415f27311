"""Broken and hostile input against the device commands: one clean error, nothing lost, nothing
written outside its place. Most cases run the real `plm-gguf` command in a child process, over
the local transport and over a real OpenSSH server on loopback.

What is refused: an install_dir that is /, the home folder, a path that climbs out or holds a
control character, or a folder holding files plm-gguf did not put there; a file the deploy
manifest does not list; a corrupt manifest; a server.pid that names another process or no
process; a build output that changed since it was built. A broken profile is a warning in
`devices list`. A failed download leaves no partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from plm_gguf.devices import toolchain
from plm_gguf.devices.deploy import MANIFEST, deploy, undeploy
from plm_gguf.devices.profiles import load_profile
from plm_gguf.devices.runner import stop_server
from plm_gguf.devices.transports import LocalTransport, connect
from plm_gguf.errors import DeviceError

from ..conftest import assert_clean_error, run_cli
from .conftest import write_profile


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under FOLDER: the bytes of files, None for folders."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _env(profile_dir: Path, cache: Path | None = None, **extra: str) -> dict[str, str]:
    return {"PLM_GGUF_PROFILES": str(profile_dir), "PLM_GGUF_CACHE": str(cache or toolchain.cache_dir()), **extra}


def _local(profile_dir: Path, install_dir: str) -> Path:
    return write_profile(profile_dir, "hostile", f"install_dir = {json.dumps(install_dir)}\nextends = \"host\"\n")


def _deployed(folder: Path, files: dict[str, bytes], manifest: dict | None = None) -> dict[str, bytes | None]:
    """A folder as deploy leaves it: FILES and a manifest listing them (or MANIFEST as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    listing = {"files": sorted(files), "build": "test", "profile": "hostile", "model": "m.gguf"}
    (folder / MANIFEST).write_text(json.dumps(manifest if manifest is not None else listing))
    return _snapshot(folder)


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def device(request, profile_dir):
    """`device(install_dir)` writes a profile for the transport under test and returns its file."""
    if request.param == "local":
        body = 'extends = "host"\n'
    else:
        sshd = request.getfixturevalue("sshd")
        body = 'threads = 2\nctx = 256\nheadroom_mib = 64\n[target]\ntoolchain = "native"\n' + sshd.transport_toml()
    return lambda install_dir: write_profile(profile_dir, f"hostile-{request.param}",
                                             f"install_dir = {json.dumps(str(install_dir))}\n{body}")


# -- install_dir ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("install_dir", "needle"), [
    ("/", "is the root folder"), ("//.", "is the root folder"),
    ("~", "is the home folder itself"), ("~/", "is the home folder itself"), ("$HOME", "is the home folder itself"),
    ("${HOME}/.", "is the home folder itself"), (".", "is the home folder itself"),
    ("", "is empty"), ("   ", "is empty"),
    ("~/plm\ngguf", "control character"), ("/tmp/plm\x00gguf", "control character"),
    ("../escape", "climbs out"), ("~/plm-gguf/../../x", "climbs out"), ("/opt/x/..", "climbs out"),
    ("~root/plm-gguf", "only ~/ is expanded"), ("$TMPDIR/plm-gguf", "names a variable"),
])
def test_unsafe_install_dirs_are_refused_before_anything_runs(profile_dir, tiny_gguf, tmp_path, install_dir, needle):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "notes.txt").write_text("mine")
    path = _local(profile_dir, install_dir)
    env = _env(profile_dir, tmp_path / "empty-cache", HOME=str(home))
    for args in (("deploy", tiny_gguf, "--profile", path), ("undeploy", "--profile", path)):
        result = run_cli(*args, cwd=cwd, env=env)
        assert result.code == 2, result.stderr
        assert_clean_error(result, "install_dir", needle, str(path))
        assert "~/plm-gguf" in result.stderr  # the hint names a safe choice
    assert _snapshot(home) == {"notes.txt": b"mine"} and _snapshot(cwd) == {}
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.parametrize("how", ["path", "symlink to it"])
def test_the_home_folder_is_refused_however_it_is_named(profile_dir, tiny_gguf, tmp_path, how):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    install_dir = home
    if how != "path":
        install_dir = tmp_path / "link"
        install_dir.symlink_to(home)
    path = _local(profile_dir, str(install_dir))
    env = _env(profile_dir, tmp_path / "empty-cache", HOME=str(home))
    for args in (("deploy", tiny_gguf, "--profile", path), ("undeploy", "--profile", path)):
        result = run_cli(*args, env=env)
        assert result.code == 7, result.stderr
        assert_clean_error(result, "the home folder", str(home))
    assert _snapshot(home) == {"notes.txt": b"mine"}
    assert not (tmp_path / "empty-cache").exists()  # refused before building


def test_a_symlink_to_the_root_folder_is_refused(profile_dir, tiny_gguf, tmp_path):
    (tmp_path / "root").symlink_to("/")
    result = run_cli("deploy", tiny_gguf, "--profile", _local(profile_dir, str(tmp_path / "root")),
                     env=_env(profile_dir, tmp_path / "empty-cache"))
    assert result.code == 7
    assert_clean_error(result, "is /, the root folder")


def test_a_file_as_install_dir_is_refused(profile_dir, tiny_gguf, tmp_path):
    (tmp_path / "d").write_text("a file")
    result = run_cli("deploy", tiny_gguf, "--profile", _local(profile_dir, str(tmp_path / "d")),
                     env=_env(profile_dir, tmp_path / "empty-cache"))
    assert result.code == 7
    assert_clean_error(result, "is not a folder")
    assert (tmp_path / "d").read_text() == "a file"


def test_a_folder_holding_other_files_is_refused(device, profile_dir, tiny_gguf, tmp_path):
    folder = tmp_path / "their folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / ".hidden").write_text("mine too")
    path = device(folder)
    result = run_cli("deploy", tiny_gguf, "--profile", path, env=_env(profile_dir, tmp_path / "empty-cache"))
    assert result.code == 7
    assert_clean_error(result, str(folder), "which plm-gguf did not put there", MANIFEST)
    assert "empty folder" in result.stderr
    assert _snapshot(folder) == {".hidden": b"mine too", "notes.txt": b"mine"}
    assert not (tmp_path / "empty-cache").exists()  # refused before building
    result = run_cli("undeploy", "--profile", path, env=_env(profile_dir))
    assert result.code == 7
    assert_clean_error(result, "nothing deployed by plm-gguf", str(folder))
    assert _snapshot(folder) == {".hidden": b"mine too", "notes.txt": b"mine"}


# -- the deploy manifest -----------------------------------------------------------------------

def test_deploy_never_overwrites_a_file_its_manifest_does_not_list(device, profile_dir, tiny_gguf, tmp_path, host_build):
    folder = tmp_path / "device"
    _deployed(folder, {tiny_gguf.name: tiny_gguf.read_bytes()})
    (folder / "llama-completion").write_bytes(b"#!/bin/sh\necho the user's own build\n")
    before = _snapshot(folder)
    result = run_cli("deploy", tiny_gguf, "--profile", device(folder), env=_env(profile_dir))
    assert result.code == 7, result.stderr
    assert_clean_error(result, "holds llama-completion, which plm-gguf did not install", "nothing was overwritten")
    assert _snapshot(folder) == before  # the user's file has its bytes, nothing was added


@pytest.mark.parametrize("manifest", [
    "{not json", "", "[]", '{"files": "llama-server"}', '{"files": ["../victim"]}', '{"files": ["/etc/passwd"]}',
    '{"files": ["a\\nb"]}', '{"files": [3]}', '{"files": [], "forward_port": "5555; reboot"}',
])
def test_a_corrupt_manifest_is_an_error_not_a_reason_to_delete(device, profile_dir, tiny_gguf, tmp_path, manifest):
    folder = tmp_path / "device"
    folder.mkdir()
    (tmp_path / "victim").write_text("keep")
    (folder / "llama-server").write_text("installed")
    (folder / MANIFEST).write_text(manifest)
    path = device(folder)
    before = _snapshot(tmp_path)
    for args in (("undeploy", "--profile", path), ("deploy", tiny_gguf, "--profile", path)):
        result = run_cli(*args, env=_env(profile_dir, tmp_path / "empty-cache"))
        assert result.code == 7, result.stderr
        assert_clean_error(result, f"{folder}/{MANIFEST}", "is corrupt")
        assert _snapshot(tmp_path) == before


def test_undeploy_removes_only_what_the_manifest_lists(device, profile_dir, tmp_path):
    folder = tmp_path / "device"
    _deployed(folder, {"llama-completion": b"ours", "m.gguf": b"ours"})
    (folder / "notes.txt").write_text("mine")
    (folder / ".m.gguf.partial").write_text("ours, unfinished")
    (folder / ".notes.txt.partial").write_text("mine")
    result = run_cli("undeploy", "--profile", device(folder), env=_env(profile_dir))
    assert result.code == 0, result.stderr
    assert _snapshot(folder) == {".notes.txt.partial": b"mine", "notes.txt": b"mine"}  # the folder stays
    _deployed(folder / "inner", {"m.gguf": b"ours"})
    assert run_cli("undeploy", "--profile", device(folder / "inner"), env=_env(profile_dir)).code == 0
    assert not (folder / "inner").exists()  # emptied: removed


@pytest.mark.slow
def test_a_redeploy_and_undeploy_leave_a_users_file_in_the_folder(profile_dir, tiny_gguf, tmp_path, host_build):
    folder = tmp_path / "device"
    path = _local(profile_dir, str(folder))
    assert run_cli("deploy", tiny_gguf, "--profile", path, "--ctx", "128", env=_env(profile_dir)).code == 0
    (folder / "notes.txt").write_text("mine")
    again = run_cli("deploy", tiny_gguf, "--profile", path, "--ctx", "128", env=_env(profile_dir))
    assert again.code == 0 and "nothing (all up to date)" in again.stdout, again.stderr
    assert run_cli("undeploy", "--profile", path, env=_env(profile_dir)).code == 0
    assert _snapshot(folder) == {"notes.txt": b"mine"}


# -- server.pid ----------------------------------------------------------------------------------

@pytest.fixture()
def sleeper():
    """A process that is not plm-gguf's server; it must outlive every test that points at it."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("pid", ["sleeper", "1"])
def test_a_pid_that_is_not_our_server_is_never_killed(device, profile_dir, tmp_path, sleeper, pid):
    pid = str(sleeper.pid) if pid == "sleeper" else pid
    folder = tmp_path / "device"
    before = _deployed(folder, {"llama-server": b"ours", "server.pid": f"{pid}\n".encode(), "server.log": b""})
    result = run_cli("undeploy", "--profile", device(folder), env=_env(profile_dir))
    assert result.code == 7, result.stderr
    assert_clean_error(result, f"names process {pid}, which is not the llama-server plm-gguf started", "left running")
    assert sleeper.poll() is None  # still running
    assert _snapshot(folder) == before  # nothing stopped, nothing removed


@pytest.mark.parametrize("content", ["", "12; rm -rf ~", "-1", "0", "$(reboot)", "123456789012", "١٢"])
def test_a_pid_file_without_a_pid_is_refused(device, profile_dir, tmp_path, content):
    folder = tmp_path / "device"
    before = _deployed(folder, {"llama-server": b"ours", "server.pid": content.encode()})
    result = run_cli("undeploy", "--profile", device(folder), env=_env(profile_dir))
    assert result.code == 7, result.stderr
    assert_clean_error(result, "server.pid holds", "not a process id")
    assert _snapshot(folder) == before


def test_our_server_is_stopped_and_a_stale_pid_file_removed(tmp_path):
    """The server plm-gguf started (its command line names FOLDER/llama-server) is stopped; a pid
    file whose process is gone is just removed."""
    folder = tmp_path / "device"
    folder.mkdir()
    shutil.copy2(shutil.which("sleep"), folder / "llama-server")
    server = subprocess.Popen([str(folder / "llama-server"), "300"])
    (folder / "server.pid").write_text(f"{server.pid}\n")
    try:
        stop_server(LocalTransport(), str(folder))
        assert server.wait(timeout=10) == -15  # SIGTERM
    finally:
        server.kill()
    assert not (folder / "server.pid").exists()
    (folder / "server.pid").write_text(f"{server.pid}\n")  # reaped: that process no longer exists
    stop_server(LocalTransport(), str(folder))
    assert not (folder / "server.pid").exists()


# -- profiles ------------------------------------------------------------------------------------

def test_devices_list_warns_about_a_broken_profile_and_lists_the_rest(profile_dir):
    write_profile(profile_dir, "mine", 'extends = "rpi5"\ndescription = "my pi"\n')
    bad = {"bad-toml": b"install_dir = \n", "bad-type": b'extends = "rpi5"\nthreads = "many"\n',
           "bad-dir": b'extends = "rpi5"\ninstall_dir = "/"\n', "bad-utf8": b'description = "\xff"\n',
           "bad-parent": b'extends = "no-such-profile"\n'}
    for name, body in bad.items():
        (profile_dir / f"{name}.toml").write_bytes(body)
    result = run_cli("devices", "list", env=_env(profile_dir))
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert "mine (yours)" in result.stdout and "my pi" in result.stdout and "rpi4" in result.stdout
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(bad)
    for name in set(bad) - {"bad-parent"}:
        assert any(str(profile_dir / f"{name}.toml") in w for w in warnings), (name, warnings)
    assert any("unknown device profile 'no-such-profile'" in w for w in warnings), warnings


@pytest.mark.parametrize(("line", "needles"), [
    ('threads = "many"', ["threads", "expected an integer, got a string"]),
    ("ctx = true", ["ctx", "expected an integer, got a boolean"]),
    ("headroom_mib = 1.5", ["headroom_mib", "expected an integer, got a number"]),
    ("install_dir = 7", ["install_dir", "expected a string, got an integer"]),
    ("exec_wrapper = 5", ["exec_wrapper", "expected a string or a list of strings"]),
    ('transport = "ssh"', ["transport", "expected a table, got a string"]),
    ('[transport]\nport = "22"', ["transport.port", "expected an integer, got a string"]),
    ('[transport]\noptions = ["A=1", 2]', ["transport.options", "expected a list of strings, got a list"]),
    ('[target]\nuses = "fp asimd"', ["target.uses", "expected a list of strings, got a string"]),
    ('instal_dir = "~/x"', ["unknown key 'instal_dir'"]),
    ('[target]\nmpcu = "cortex_a76"', ["unknown key 'target.mpcu'"]),
])
def test_profile_values_are_type_checked_when_loaded(tmp_path, line, needles):
    path = write_profile(tmp_path, "typed", f'extends = "rpi5"\n{line}\n')
    result = run_cli("devices", "show", path)
    assert result.code == 2
    assert_clean_error(result, f"profile {path}", *needles)


# -- downloads -----------------------------------------------------------------------------------

def _get_fails(transport, remote: str, folder: Path) -> None:
    """A failed get: a DeviceError; an existing local file keeps its bytes, a new one never appears."""
    folder.mkdir()
    kept = folder / "kept.bin"
    kept.write_bytes(b"keep me")
    for local in (kept, folder / "new.bin"):
        with pytest.raises(DeviceError):
            transport.get(remote, local)
    assert _snapshot(folder) == {"kept.bin": b"keep me"}


def test_a_failed_local_get_leaves_nothing(tmp_path):
    _get_fails(LocalTransport(), str(tmp_path / "missing"), tmp_path / "here")


@pytest.mark.ssh
def test_a_failed_ssh_get_leaves_nothing(sshd, profile_dir, tmp_path, monkeypatch):
    write_profile(profile_dir, "t-ssh", 'install_dir = "~/x"\n[target]\ntoolchain = "native"\n' + sshd.transport_toml())
    transport = connect(load_profile("t-ssh"))
    _get_fails(transport, str(tmp_path / "missing"), tmp_path / "here")
    # a copy that stops halfway: 4 KiB arrive, then nothing until the copy times out
    fifo, release = tmp_path / "stalls", threading.Event()
    os.mkfifo(fifo)

    def writer() -> None:
        with open(fifo, "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            release.wait(30)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    monkeypatch.setattr("plm_gguf.devices.transports.DEFAULT_TIMEOUT", 0.3)
    try:
        with pytest.raises(DeviceError, match="timed out"):
            transport.get(str(fifo), tmp_path / "half.bin")
    finally:
        release.set()
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # a writer still waiting for a reader goes on
        thread.join(10)
    assert [p.name for p in tmp_path.iterdir() if "half.bin" in p.name] == []


# -- build outputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["longer", "same size, sha256 recorded"])
def test_a_changed_build_output_is_not_deployed(profile_dir, tiny_gguf, tmp_path, host_build, change):
    """A copy of the host build in a cache of its own, one binary changed after it was built."""
    cache = tmp_path / "cache"
    (cache / "llama").mkdir(parents=True)
    (cache / "src").symlink_to(toolchain.cache_dir() / "src")
    entry = cache / "llama" / host_build.key
    shutil.copytree(host_build.path, entry, ignore=shutil.ignore_patterns("build.log", "test", "*.txt"))
    binary = entry / "bin" / "llama-completion"
    data = binary.read_bytes()
    if change == "longer":
        binary.write_bytes(data + b"\0")
    else:  # the sha256 record cross builds write (and host builds will)
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["sha256"] = {n: hashlib.sha256((entry / "bin" / n).read_bytes()).hexdigest() for n in manifest["binaries"]}
        (entry / "manifest.json").write_text(json.dumps(manifest))
        binary.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    folder = tmp_path / "device"
    result = run_cli("deploy", tiny_gguf, "--profile", _local(profile_dir, str(folder)), env=_env(profile_dir, cache))
    assert result.code == 7, result.stderr
    assert_clean_error(result, "llama-completion in the llama.cpp build", "the build recorded")
    assert f"delete {entry}" in result.stderr
    assert not folder.exists()  # nothing was sent


# -- remote names --------------------------------------------------------------------------------

def test_a_model_name_with_a_newline_is_refused(profile_dir, tiny_gguf, tmp_path):
    model = tmp_path / "two\nlines.gguf"
    shutil.copy(tiny_gguf, model)
    folder = tmp_path / "device"
    result = run_cli("deploy", model, "--profile", _local(profile_dir, str(folder)),
                     env=_env(profile_dir, tmp_path / "empty-cache"))
    assert result.code == 2
    assert_clean_error(result, "control character")
    assert not folder.exists()


@pytest.mark.ssh
@pytest.mark.slow
def test_a_hostile_model_name_stays_data_over_ssh(sshd, profile_dir, tiny_gguf, tmp_path, host_build, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / " a\\b $(touch PWNED) `touch PWNED` 'q\".gguf"
    shutil.copy(tiny_gguf, model)
    folder = tmp_path / "device"
    write_profile(profile_dir, "names", f"install_dir = {json.dumps(str(folder))}\n"
                  'ctx = 256\nheadroom_mib = 64\n[target]\ntoolchain = "native"\n' + sshd.transport_toml())
    profile = load_profile("names")
    first = deploy(model, profile=profile, smoke=False)
    assert model.name in first.sent and (folder / model.name).read_bytes() == model.read_bytes()
    assert deploy(model, profile=profile, smoke=False).sent == []  # its sha256 read back under its own name
    assert model.name in undeploy(profile=profile) and not folder.exists()
    assert not list(tmp_path.rglob("PWNED")) and not (Path.home() / "PWNED").exists()
