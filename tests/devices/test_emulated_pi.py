"""Deploy to the emulated Raspberry Pi (devices/emulator.py) over its real sshd, no exec_wrapper:
probe, the static musl and the glibc 2.36 builds, sha256-checked upload, resume, smoke, llama-bench,
llama-server through an ssh port forward, undeploy, the latent layout with flash attention, and
what the emulated CPU refuses."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from plm_gguf.devices import emulator, toolchain
from plm_gguf.devices.deploy import deploy, resolve_profile, undeploy
from plm_gguf.devices.transports import connect, exec_argv, sh
from plm_gguf.errors import DeviceError

from .conftest import MLA_PROMPT, N_PREDICT, run_cli, wait_http, write_profile
from .elf import EM_AARCH64, elf_summary
from .sshd import _free_port

pytestmark = [pytest.mark.emulated, pytest.mark.slow]


@pytest.fixture()
def pi(emulated_pi, profile_dir, tmp_path):
    """A profile for the emulated Pi 5 (the shipped rpi5 with its own install folder), resolved with
    --address as a user passes it: the key and host key come from the running emulator."""
    name = f"pi-{tmp_path.name}"[:60]
    write_profile(profile_dir, name, f'extends = "rpi5"\ninstall_dir = "~/{name}"\nctx = 256\nheadroom_mib = 64\n')
    profile = resolve_profile(name, address=emulated_pi.address)
    assert profile.exec_wrapper == () and profile.transport.identity_file == emulated_pi.identity
    return profile


def _on_pi(profile, script: str, check: bool = True):
    return connect(profile).run(script, timeout=600, check=check)


def test_probe_sees_the_recorded_pi(emulated_pi):
    out = run_cli("devices", "probe", "rpi5", "--address", emulated_pi.address)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "machine aarch64" in text and "4x Cortex-A76" in text and "libc glibc 2.36" in text
    assert "asimddp" in text and "i8mm" not in text
    assert "MiB available of 8052 MiB" in text  # the recorded 8 GB board, not this machine
    assert "rpi5" in text.split("profiles that run here")[1]


def test_static_build_deploys_benches_serves_and_undeploys(pi, aarch64_build, tiny_gguf):
    port, local = _free_port(), _free_port()
    result = deploy(tiny_gguf, profile=pi, bench=True, bench_prompt=16, bench_gen=4, serve_port=port,
                    forward_port=local)
    try:
        assert result.build_key == aarch64_build.key and tiny_gguf.name in result.sent
        assert not any("qemu" in w for w in result.warnings)  # no wrapper: the features were checked
        assert result.smoke_output.startswith("The capital of France is")
        assert result.kernels == ["asimddp", "fphp"]
        assert result.bench.prompt_tps > 0 and result.bench.gen_tps > 0 and result.bench.raw
        assert {r["n_prompt"] for r in result.bench.raw} >= {16} and all("avg_ts" in r for r in result.bench.raw)
        # the forward deploy prints, run as a user would, reaches the server on the Pi
        assert result.server.forward.startswith("ssh ") and f"{local}:127.0.0.1:{port}" in result.server.forward
        tunnel = subprocess.Popen(shlex.split(result.server.forward), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert wait_http(f"http://127.0.0.1:{local}/health", timeout=120) == 200
        finally:
            tunnel.terminate()
            tunnel.wait(timeout=10)
    finally:
        removed = undeploy(profile=pi)
    assert tiny_gguf.name in removed and "llama-server" in removed and "server.pid" in removed
    folder = result.install_dir
    assert _on_pi(pi, f"test -e {sh(folder)} && echo there || echo gone").stdout.strip() == "gone"


def test_an_interrupted_upload_resumes_and_is_sha256_checked(pi, aarch64_build, tiny_gguf, tmp_path):
    half = tmp_path / "half"
    half.write_bytes(tiny_gguf.read_bytes()[:4096])

    def drop_link_mid_model(event, detail):
        if event == "put" and detail == tiny_gguf.name:
            folder = _on_pi(pi, "echo ~").stdout.strip() + "/" + pi.install_dir[2:]
            connect(pi).put(half, f"{folder}/.{tiny_gguf.name}.partial")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deploy(tiny_gguf, profile=pi, progress=drop_link_mid_model)
    resumed = deploy(tiny_gguf, profile=pi, smoke=False)
    assert resumed.sent == [tiny_gguf.name] and resumed.resumed == {tiny_gguf.name: 4096}
    remote = f"{resumed.install_dir}/{tiny_gguf.name}"
    assert _on_pi(pi, f"sha256sum < {sh(remote)}").stdout.split()[0] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    undeploy(profile=pi)


def test_the_glibc_2_36_build_runs_on_bookworm(pi, tiny_gguf):
    result = deploy(tiny_gguf, profile=pi, glibc="2.36", bench=True, bench_prompt=16, bench_gen=4)
    try:
        built = toolchain.cache_dir() / "builds" / result.build_key
        manifest = json.loads((built / "manifest.json").read_text())
        assert manifest["triple"] == "aarch64-linux-gnu" and manifest["glibc"] == "2.36"
        assert elf_summary(built / "bin" / "llama-completion") == {"machine": EM_AARCH64, "static": False,
                                                                    "stripped": True}
        assert result.smoke_output.startswith("The capital of France is") and result.bench.gen_tps > 0
        # it is the Pi's own glibc that runs it
        ldd = _on_pi(pi, f"ldd {sh(result.install_dir + '/llama-completion')}").stdout
        assert "libc.so.6 => /lib/aarch64-linux-gnu/libc.so.6" in ldd, ldd
    finally:
        undeploy(profile=pi)


def test_latent_file_runs_with_flash_attention_and_gives_the_stock_tokens(pi, aarch64_build, mla_pair):
    stock, latent, reference = mla_pair
    result = deploy(latent, profile=pi, bench=True, bench_prompt=16, bench_gen=4)
    deploy(stock, profile=pi, smoke=False)
    try:
        assert result.memory.flash_attn and all(r["flash_attn"] in (True, 1) for r in result.bench.raw)
        outputs = []
        for model in (stock, latent):
            argv = ["-m", f"{result.install_dir}/{model.name}", "-p", MLA_PROMPT, "-n", str(N_PREDICT), "--ignore-eos",
                    "-c", "256", "-t", "2", "-fa", "off", "-no-cnv", "--temp", "0", "-s", "1", "-ctk", "f32",
                    "-ctv", "f32"]
            outputs.append(_on_pi(pi, exec_argv(pi, f"{result.install_dir}/llama-completion", *argv)
                                  + " </dev/null").stdout)
        assert outputs[0] == outputs[1]
        assert outputs[0].startswith(reference.decode(errors="replace")), (outputs[0], reference)
    finally:
        undeploy(profile=pi)


def test_the_a72_refuses_the_a76_build_and_would_die_with_sigill(aarch64_build, tiny_gguf, profile_dir):
    """On an emulated Pi 4 the feature check refuses the Pi 5 build before anything is sent; run
    anyway, the build meets the emulated Cortex-A72's missing dotprod as a SIGILL."""
    pi4 = emulator.start("rpi4")
    try:
        write_profile(profile_dir, "pi5-build", 'extends = "rpi5"\ninstall_dir = "~/a76"\nctx = 256\nheadroom_mib = 64\n')
        profile = resolve_profile("pi5-build", address=pi4.address)
        with pytest.raises(DeviceError, match="asimddp|dotprod"):
            deploy(tiny_gguf, profile=profile)
        assert _on_pi(profile, "test -e ~/a76 && echo there || echo gone").stdout.strip() == "gone"
        transport = connect(profile)
        transport.run("mkdir -p ~/by-hand")
        transport.put(aarch64_build.binaries["llama-completion"], "~/by-hand/llama-completion")
        transport.put(tiny_gguf, "~/by-hand/model.gguf")
        run = transport.run("chmod +x ~/by-hand/llama-completion && ~/by-hand/llama-completion -m ~/by-hand/model.gguf "
                            "-p hello -n 4 -no-cnv -t 1 </dev/null", check=False, timeout=300)
        assert run.returncode == 132, (run.returncode, run.stderr[-500:])  # 128 + SIGILL
    finally:
        emulator.stop("rpi4")
    assert emulator.running("rpi4") is None


def test_stopping_leaves_nothing_running(emulated_pi):
    pi4 = emulator.start("rpi4")
    folder = pi4.folder
    assert emulator.stop("rpi4") and not Path(folder).exists()
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and folder.encode() in _cmdline(p)]
    assert leftover == []
    assert not emulator.stop("rpi4")  # stopping twice is fine
    # the host's own binfmt_misc never saw qemu (the registration lived in the namespace's)
    assert not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists() or os.environ.get("PLM_GGUF_HOST_BINFMT")


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_cli_starts_lists_and_stops(emulated_pi):
    out = run_cli("devices", "emulate", "rpi5")  # already running: the same machine, its address again
    assert out.returncode == 0, out.stderr
    assert f"address  {emulated_pi.address}" in out.stdout
    assert f"plm-gguf deploy MODEL.gguf --device rpi5 --address {emulated_pi.address}" in out.stdout
    listed = run_cli("devices", "emulate")
    assert f"running at {emulated_pi.address}" in listed.stdout and "rpi4" in listed.stdout


def test_an_unreachable_archive_is_one_clear_error(tmp_path):
    """A fresh cache must build the image; with the archive unreachable that is one line and an exit
    code, and no half-built image is left in the cache."""
    cache = tmp_path / "cache"
    out = run_cli("devices", "emulate", "rpi4", env={"PLM_GGUF_CACHE": str(cache),
                                                     emulator.MIRROR_ENV: "http://127.0.0.1:9/debian"})
    assert out.returncode == 7, out.stdout + out.stderr
    assert "error: the Debian archive at http://127.0.0.1:9/debian is unreachable" in out.stderr
    assert emulator.MIRROR_ENV in out.stderr and "Traceback" not in out.stderr
    assert [p.name for p in (cache / "emulate" / "images").iterdir() if not p.name.endswith(".lock")] == []


def test_without_root_it_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DeviceError, match="needs root") as err:
        emulator.require_host(building=False)
    assert "exec_wrapper" in err.value.hint


def test_a_namespace_that_cannot_be_set_up_is_named(tmp_path):
    """What the namespace launcher says when binfmt_misc cannot be mounted becomes the error's message."""
    log = tmp_path / "namespace.log"
    log.write_text("error: mount binfmt_misc on /proc/sys/fs/binfmt_misc: Operation not permitted "
                   "(binfmt_misc in a user namespace needs Linux 6.7 or later)\n")
    err = emulator._setup_failure(log)
    assert err.message == ("could not set up the emulated Pi's namespaces: mount binfmt_misc on "
                           "/proc/sys/fs/binfmt_misc: Operation not permitted (binfmt_misc in a user namespace "
                           "needs Linux 6.7 or later)")
    assert "Linux 6.7" in err.hint and os.uname().release in err.hint
