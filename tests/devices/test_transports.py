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


def test_every_transport_is_one_interface(tmp_path, monkeypatch):
    """Capabilities are methods of Transport: resumable uploads and the server's port forward."""
    from plm_gguf.devices.profiles import TransportSpec
    from plm_gguf.devices.transports import AdbTransport, SshTransport, Transport

    monkeypatch.chdir(tmp_path)
    ssh = SshTransport(TransportSpec(kind="ssh", host="pi.local", user="pi", port=2222))
    adb = AdbTransport(TransportSpec(kind="adb"))
    local = LocalTransport()
    assert all(isinstance(t, Transport) for t in (local, ssh, adb))
    assert (local.can_append, ssh.can_append, adb.can_append) == (True, True, False)
    with pytest.raises(DeviceError, match="cannot resume"):
        adb.append(tmp_path / "x", "/data/local/tmp/x", 1)
    assert local.forward(8081, 8080) == "none needed (local)"
    hint = ssh.forward(8081, 8080)  # nothing set up: the command to run
    assert "-L 8081:127.0.0.1:8080" in hint and hint.endswith("pi@pi.local") and "-p 2222" in hint
    local.unforward(8081)
    ssh.unforward(8081)
    src, remote = tmp_path / "src.bin", tmp_path / "remote.bin"
    src.write_bytes(b"0123456789")
    remote.write_bytes(b"0123")
    local.append(src, str(remote), 4)
    assert remote.read_bytes() == src.read_bytes()
    with pytest.raises(TypeError):
        type("Half", (Transport,), {"run": lambda self, script, **kw: None})()  # put, get, describe missing


def test_nothing_above_the_transports_asks_which_one_it_is():
    """runner, deploy and facts use the Transport interface only: no isinstance/hasattr on a transport
    and no transport class imported."""
    import ast
    from pathlib import Path

    from plm_gguf import devices

    classes = {"LocalTransport", "SshTransport", "AdbTransport"}
    for module in ("runner.py", "deploy.py", "facts.py", "checks.py", "cli.py"):
        tree = ast.parse((Path(devices.__file__).parent / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not classes & {a.name for a in node.names}, module
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("isinstance", "hasattr") and node.args):
                assert "transport" not in ast.unparse(node.args[0]).lower(), (module, ast.unparse(node))
