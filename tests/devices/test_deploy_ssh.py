"""Deploy the host build over a real OpenSSH server: smoke, bench, redeploy, interrupt/resume, serve, undeploy."""

from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest

from plm_gguf.devices import toolchain
from plm_gguf.devices.deploy import MANIFEST, deploy, undeploy
from plm_gguf.devices.profiles import load_profile
from plm_gguf.devices.runner import stop_server
from plm_gguf.devices.transports import connect

from .conftest import run_cli, wait_http, write_profile

pytestmark = [pytest.mark.ssh, pytest.mark.slow]


def built(key: str) -> list[str]:
    """What the host build a deploy used holds (libraries and tools; llama-server once a deploy served)."""
    return sorted(json.loads((toolchain.cache_dir() / "llama" / key / "manifest.json").read_text())["binaries"])


@pytest.fixture()
def ssh_profile(sshd, profile_dir, tmp_path, host_build):
    install = tmp_path / "device home" / "plm 'gguf'"
    path = write_profile(profile_dir, "ssh-host", f'description = "this machine over ssh"\ninstall_dir = "{install}"\n'
                         'threads = 2\nctx = 256\nheadroom_mib = 64\n[target]\ntoolchain = "native"\n' + sshd.transport_toml())
    return load_profile("ssh-host"), install, path


def test_deploy_smoke_bench_then_redeploy_sends_nothing(ssh_profile, tiny_gguf):
    profile, install, _ = ssh_profile
    first = deploy(tiny_gguf, profile=profile, bench=True, bench_prompt=32, bench_gen=8)
    assert sorted(first.sent) == sorted(built(first.build_key) + [tiny_gguf.name]) and first.skipped == []
    assert {"llama-completion", "llama-bench", "libllama.so", "libggml-cpu.so"} <= set(first.sent)
    assert first.smoke_output.startswith("The capital of France is")
    assert first.bench.prompt_tps > 0 and first.bench.gen_tps > 0 and first.bench.threads == 2
    assert (first.bench.n_prompt, first.bench.n_gen) == (32, 8)
    assert (install / tiny_gguf.name).read_bytes() == tiny_gguf.read_bytes()
    assert not list(install.glob(".*.partial"))
    again = deploy(tiny_gguf, profile=profile)
    assert again.sent == [] and sorted(again.skipped) == sorted(built(again.build_key) + [tiny_gguf.name])


def test_interrupted_deploy_resumes_without_resending(ssh_profile, tiny_gguf):
    profile, install, _ = ssh_profile

    def interrupt_before_model(event, detail):
        if event == "put" and detail == tiny_gguf.name:
            # the link drops mid-copy: half a file under the temporary name, then the interrupt
            (install / f".{tiny_gguf.name}.partial").write_bytes(tiny_gguf.read_bytes()[:1000])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deploy(tiny_gguf, profile=profile, progress=interrupt_before_model)
    binaries = sorted(p.name for p in install.iterdir() if not p.name.startswith(".") and p.name != MANIFEST)
    assert "llama-completion" in binaries and tiny_gguf.name not in binaries
    assert tiny_gguf.name in json.loads((install / MANIFEST).read_text())["files"]  # listed before it was sent
    resumed = deploy(tiny_gguf, profile=profile)
    assert resumed.sent == [tiny_gguf.name] and sorted(resumed.skipped) == binaries == built(resumed.build_key)
    assert resumed.resumed == {tiny_gguf.name: 1000}  # the good first 1000 bytes were kept
    want = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert hashlib.sha256((install / tiny_gguf.name).read_bytes()).hexdigest() == want
    assert not list(install.glob(".*.partial"))


def test_a_corrupt_partial_upload_is_replaced_not_resumed(ssh_profile, tiny_gguf):
    profile, install, _ = ssh_profile
    install.mkdir(parents=True)
    (install / f".{tiny_gguf.name}.partial").write_bytes(b"garbage" * 100)
    result = deploy(tiny_gguf, profile=profile, smoke=False)
    assert tiny_gguf.name in result.sent and result.resumed == {}
    assert (install / tiny_gguf.name).read_bytes() == tiny_gguf.read_bytes()


def test_serve_then_undeploy_removes_everything(ssh_profile, tiny_gguf, request):
    from .sshd import _free_port

    profile, install, _ = ssh_profile
    request.addfinalizer(lambda: stop_server(connect(profile), str(install)))  # never leave a server behind
    port = _free_port()
    result = deploy(tiny_gguf, profile=profile, smoke=False, serve_port=port)
    assert result.server.forward.startswith("ssh ") and f"{port}:127.0.0.1:{port}" in result.server.forward
    assert wait_http(f"http://127.0.0.1:{port}/health") == 200  # sshd is on loopback: no tunnel needed here
    assert "llama-server" in built(result.build_key)  # the host build adds it for a deploy that serves
    removed = undeploy(profile=profile)
    assert sorted(removed) == sorted(built(result.build_key) + [tiny_gguf.name, "server.log", "server.pid"])
    assert not install.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_cli_deploy_over_ssh(ssh_profile, tiny_gguf):
    _, install, path = ssh_profile
    out = run_cli("deploy", tiny_gguf, "--profile", path, "--ctx", "128")
    assert out.returncode == 0, out.stderr
    assert "deployed" in out.stdout and "ctx 128" in out.stdout
    again = run_cli("deploy", tiny_gguf, "--profile", path, "--ctx", "128")
    assert "nothing (all up to date)" in again.stdout, again.stdout + again.stderr
    gone = run_cli("undeploy", "--profile", path)
    assert gone.returncode == 0 and not install.exists()
