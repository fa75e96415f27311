"""The `host` profile (local transport), as the README demo runs it, and refusals through the CLI."""

from __future__ import annotations

import pytest

from plm_gguf.devices import toolchain
from plm_gguf.devices.deploy import deploy, undeploy
from plm_gguf.errors import DeviceError

from .conftest import run_cli, write_profile


@pytest.mark.slow
def test_readme_demo_deploys_to_host_with_a_short_bench(host_build, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PLM_GGUF_CACHE", str(toolchain.cache_dir()))  # keep the build cache when HOME moves
    monkeypatch.setenv("HOME", str(tmp_path))
    result = deploy(tiny_gguf, profile_name="host", bench=True, bench_prompt=16, bench_gen=4)
    assert result.install_dir == f"{tmp_path}/.local/share/plm-gguf/device"
    assert result.bench.gen_tps > 0 and result.smoke_output
    assert result.memory.fits and result.ctx == 512  # the model's training context caps the profile's 2048
    assert undeploy("host")


@pytest.fixture(scope="module")
def quantized(host_build, tmp_path_factory):
    """q4_k_m and q8_0 files (rows of 256, so the K-quants apply) made by the host build's llama-quantize."""
    import subprocess

    from plm_gguf.fixtures.gguf_file import write_tiny_plm_gguf
    from plm_gguf.llama.host import SELF_CHECK_MODEL

    folder = tmp_path_factory.mktemp("quantized")
    base = write_tiny_plm_gguf(folder / "f32.gguf", seed=3, **SELF_CHECK_MODEL)
    files = {}
    for qtype in ("q4_k_m", "q8_0"):
        files[qtype] = folder / f"tiny-{qtype}.gguf"
        subprocess.run([str(host_build.binaries["llama-quantize"]), str(base), str(files[qtype]), qtype],
                       check=True, capture_output=True, timeout=300)
    return files


@pytest.mark.slow
@pytest.mark.parametrize(("qtype", "shown"), [("q4_k_m", "Q4_K - Medium"), ("q8_0", "Q8_0")])
def test_quantized_files_run_on_the_host_build(quantized, qtype, shown, tmp_path, monkeypatch):
    """The types that crashed a -march=native build on an AMX Xeon: llama-completion and llama-bench."""
    monkeypatch.setenv("PLM_GGUF_CACHE", str(toolchain.cache_dir()))
    monkeypatch.setenv("HOME", str(tmp_path))
    result = deploy(quantized[qtype], profile_name="host", bench=True, bench_prompt=64, bench_gen=8)
    assert result.smoke_output and result.bench.prompt_tps > 0 and result.bench.gen_tps > 0
    assert {r["model_type"].split(" ", 2)[-1] for r in result.bench.raw} == {shown}
    assert result.kernels and "self-checked" in result.kernels[0]
    assert undeploy("host")


def test_cli_memory_refusal_before_building(profile_dir, tiny_gguf, tmp_path):
    write_profile(profile_dir, "tiny-ram", f'extends = "host"\ninstall_dir = "{tmp_path}/d"\nheadroom_mib = 100000000\n')
    out = run_cli("deploy", tiny_gguf, "--device", "tiny-ram", env={"PLM_GGUF_PROFILES": str(profile_dir),
                                                                  "PLM_GGUF_CACHE": str(tmp_path / "empty-cache")})
    assert out.returncode == 7, out.stderr
    assert "does not fit in memory" in out.stderr and "MemAvailable" in out.stderr and "hint:" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "empty-cache" / "builds").exists()  # refused before building
    assert not (tmp_path / "empty-cache" / "llama").exists()
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_cli_refuses_a_foreign_architecture_build(profile_dir, tiny_gguf, tmp_path):
    write_profile(profile_dir, "arm-here", f'extends = "linux-aarch64"\ninstall_dir = "{tmp_path}/d"\n'
                  '[transport]\nkind = "local"\n')
    out = run_cli("deploy", tiny_gguf, "--device", "arm-here", env={"PLM_GGUF_PROFILES": str(profile_dir)})
    assert out.returncode == 7 and "the build is for aarch64 but the device is x86_64" in out.stderr
    assert "exec_wrapper" in out.stderr


def test_cli_usage_errors_are_clean(tmp_path):
    out = run_cli("deploy", tmp_path / "missing.gguf", "--device", "host")
    assert out.returncode == 2 and "model file not found" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("devices", "show", "no-such-device")
    assert out.returncode == 2 and "unknown device profile" in out.stderr


def test_cli_devices_list_show_probe():
    listing = run_cli("devices", "list")
    for name in ("rpi-zero2w", "rpi4", "rpi5", "android", "android-i8mm", "linux-aarch64", "host"):
        assert name in listing.stdout
    show = run_cli("devices", "show", "rpi5")
    assert "cortex_a76" in show.stdout and "asimddp" in show.stdout
    probe = run_cli("devices", "probe", "host")
    assert probe.returncode == 0 and "MiB available" in probe.stdout and "page size" in probe.stdout


@pytest.mark.slow
def test_cli_build_reuses_the_cache(host_build):
    out = run_cli("build", "--device", "host")
    assert out.returncode == 0 and host_build.key in out.stdout and "llama-completion" in out.stdout


def test_a_latent_file_with_a_q8_0_cache_runs_and_llama_cpp_allocates_the_planned_cache(mla_pair, tmp_path,
                                                                                       monkeypatch):
    """--cache-type q8_0 on a latent file: -ctk and -ctv together, flash attention on; the KV
    buffer llama.cpp reports is the plan's (1 layer x 256 tokens x (256 + 32) values x 34/32
    bytes). The trained fixture's 256 + 16 cached values are refused: llama.cpp needs blocks of 32."""
    from plm_gguf.convert.mla import rewrite_to_latent
    from plm_gguf.fixtures.gguf_file import write_tiny_plm_gguf
    from plm_gguf.llama.host import SELF_CHECK_MODEL

    monkeypatch.setenv("PLM_GGUF_CACHE", str(toolchain.cache_dir()))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DeviceError, match="not a multiple of 32"):
        deploy(mla_pair[1], profile_name="host", ctx=256, cache_type="q8_0")
    stock = write_tiny_plm_gguf(tmp_path / "stock.gguf", seed=5, **SELF_CHECK_MODEL)  # kv_lora 256, rope 32
    latent = rewrite_to_latent(stock, tmp_path / "latent.gguf")
    result = deploy(latent, profile_name="host", ctx=256, cache_type="q8_0", bench=True, bench_prompt=16, bench_gen=4)
    try:
        assert result.memory.cache_type == "q8_0" and result.memory.flash_attn
        assert result.memory.kv_cache == 1 * 256 * (256 + 32) * 34 // 32
        assert result.buffers["CPU KV"] == pytest.approx(result.memory.kv_cache / 2**20, abs=0.01)
        assert result.smoke_output.startswith("The capital of France is")
        assert all(r["type_k"] == r["type_v"] == "q8_0" for r in result.bench.raw)
    finally:
        undeploy("host")
