"""The three verbs over real local, ssh (a real sshd) transports: quoting, exit codes, timeouts, host keys."""

from __future__ import annotations

import pytest

from plm_gguf.devices.profiles import load_profile
from plm_gguf.devices.transports import LocalTransport, connect, sh
from plm_gguf.errors import DeviceError

from .conftest import write_profile

NASTY = "a b'; touch PWNED; echo \"$(id)\" `id` \\"


def _ssh(sshd, profile_dir, extra=""):
    write_profile(profile_dir, "t-ssh", f'install_dir = "~/x"\n{extra}[target]\ntoolchain = "native"\n' + sshd.transport_toml())
    return connect(load_profile("t-ssh"))


def _roundtrip(transport, tmp_path):
    folder = tmp_path / NASTY
    folder.mkdir()
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 10)
    remote = str(folder / f"file {NASTY}")
    transport.put(src, remote)
    listing = transport.run(sh("ls", str(folder)))
    assert listing.stdout.strip() == f"file {NASTY}"
    back = tmp_path / "back.bin"
    transport.get(remote, back)
    assert back.read_bytes() == src.read_bytes()
    result = transport.run(sh("printf", "%s", NASTY))
    assert result.stdout == NASTY
    assert not list(tmp_path.rglob("PWNED"))


def test_local_roundtrip_and_quoting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _roundtrip(LocalTransport(), tmp_path)


@pytest.mark.ssh
def test_ssh_roundtrip_and_quoting(sshd, profile_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _roundtrip(_ssh(sshd, profile_dir), tmp_path)


@pytest.mark.ssh
def test_ssh_exit_codes_stderr_and_timeout(sshd, profile_dir):
    t = _ssh(sshd, profile_dir)
    r = t.run("echo out; echo err >&2; exit 3", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(DeviceError, match="exit 3"):
        t.run("exit 3")
    with pytest.raises(DeviceError, match="timed out"):
        t.run("sleep 5", timeout=1)


@pytest.mark.ssh
def test_ssh_refuses_an_unknown_host_key(sshd, profile_dir, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    toml = sshd.transport_toml().replace(str(sshd.known_hosts), str(empty))
    write_profile(profile_dir, "t-unknown", 'install_dir = "~/x"\n[target]\ntoolchain = "native"\n' + toml)
    with pytest.raises(DeviceError) as err:
        connect(load_profile("t-unknown")).run("true")
    assert "known_hosts" in err.value.hint
    assert empty.read_text() == ""  # nothing was accepted silently


def test_local_timeout():
    with pytest.raises(DeviceError, match="timed out"):
        LocalTransport().run("sleep 5", timeout=0.5)
