"""The real `adb` client against a stand-in adb server; the aarch64 build runs through exec_wrapper (qemu)."""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from plm_gguf.devices.deploy import deploy, probe, undeploy
from plm_gguf.devices.profiles import load_profile
from plm_gguf.devices.runner import stop_server
from plm_gguf.devices.transports import connect, sh
from plm_gguf.errors import DeviceError

from .adb_standin import AdbStandIn
from .conftest import _missing, write_profile
from .sshd import _free_port

pytestmark = [pytest.mark.adb]


@pytest.fixture()
def phone(tmp_path, monkeypatch):
    if not shutil.which("adb"):
        _missing("the adb client is not installed")
    with AdbStandIn(tmp_path / "phone") as server:
        for key, value in server.env_for_client.items():
            monkeypatch.setenv(key, value)
        yield server


def _profile(profile_dir, phone, serial=None):
    write_profile(profile_dir, "phone", f'extends = "rpi5"\ndescription = "adb stand-in"\n'
                  f'install_dir = "{phone.root}/data/local/tmp/plm-gguf"\nexec_wrapper = ["qemu-aarch64-static"]\n'
                  f'ctx = 256\nheadroom_mib = 64\n[transport]\nkind = "adb"\nserial = "{serial or phone.serial}"\n')
    return load_profile("phone")


def test_adb_transport_verbs_and_android_probe(phone, profile_dir, tmp_path):
    profile = _profile(profile_dir, phone)
    t = connect(profile)
    r = t.run("echo out; echo err >&2; exit 4", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (4, "out\n", "err\n")
    src = tmp_path / "a file; rm -rf x"
    src.write_text("payload")
    t.put(src, f"{phone.root}/dir with space/{src.name}")
    assert t.run(sh("cat", f"{phone.root}/dir with space/{src.name}")).stdout == "payload"
    facts = probe(profile, t)
    assert facts.libc == "bionic (Android 14)" and facts.mem_available > 0


def test_a_failed_adb_pull_leaves_no_partial_file(phone, profile_dir, tmp_path):
    t = connect(_profile(profile_dir, phone))
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"keep me")
    for local in (kept, tmp_path / "new.bin"):
        with pytest.raises(DeviceError, match="adb pull"):
            t.get(f"{phone.root}/no such file", local)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin", "phone", "profiles"]
    assert kept.read_bytes() == b"keep me"
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    t.put(src, f"{phone.root}/file")
    t.get(f"{phone.root}/file", kept)
    assert kept.read_bytes() == b"payload"


def test_adb_unknown_serial_is_a_clean_error(phone, profile_dir):
    with pytest.raises(DeviceError, match="not found"):
        connect(_profile(profile_dir, phone, serial="no-such-phone")).run("true")


@pytest.mark.slow
@pytest.mark.qemu
def test_deploy_bench_serve_over_adb(aarch64_build, phone, profile_dir, tiny_gguf, request):
    profile = _profile(profile_dir, phone)
    request.addfinalizer(lambda: stop_server(connect(profile), profile.install_dir))  # never leave a server behind
    port, local = _free_port(), _free_port()
    result = deploy(tiny_gguf, profile=profile, bench=True, bench_prompt=16, bench_gen=4, serve_port=port,
                    forward_port=local)
    assert result.smoke_output.startswith("The capital of France is") and result.bench.gen_tps > 0
    assert f"adb forward tcp:{local} tcp:{port}" in result.server.forward
    deadline, status = time.monotonic() + 120, 0
    while time.monotonic() < deadline and status != 200:
        try:
            status = urllib.request.urlopen(f"http://127.0.0.1:{local}/health", timeout=5).status
        except OSError:
            time.sleep(0.5)
    assert status == 200  # through the adb forward, to llama-server under qemu
    assert deploy(tiny_gguf, profile=profile, smoke=False).sent == []
    assert any(r.startswith("host:forward:") for r in phone.log)
    undeploy(profile=profile)
    assert any(r.startswith("host:killforward:") for r in phone.log)
    assert not Path(profile.install_dir).exists()
