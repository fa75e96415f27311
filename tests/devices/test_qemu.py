"""The zig cross build for aarch64: a static, stripped ELF that runs a PLM GGUF under qemu-aarch64-static."""

from __future__ import annotations

import pytest

from plm_gguf.devices.deploy import deploy
from plm_gguf.devices.profiles import load_profile

from .conftest import MLA_PROMPT, N_PREDICT, write_profile
from .elf import EM_AARCH64, elf_summary

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_cross_build_is_static_stripped_aarch64(aarch64_build):
    assert sorted(aarch64_build.binaries) == ["llama-bench", "llama-completion", "llama-server"]
    for name, path in aarch64_build.binaries.items():
        info = elf_summary(path)
        assert info == {"machine": EM_AARCH64, "static": True, "stripped": True}, name
    manifest = aarch64_build.manifest
    assert manifest["triple"] == "aarch64-linux-musl" and manifest["mcpu"] == "cortex_a76"
    assert "asimddp" in manifest["uses"] and manifest["max_page_size"] == 16384


def test_deploy_runs_the_aarch64_build_under_qemu(aarch64_build, profile_dir, tmp_path, tiny_gguf):
    write_profile(profile_dir, "pi5-emulated",
                  f'extends = "rpi5"\ninstall_dir = "{tmp_path}/pi home/plm-gguf"\nexec_wrapper = ["qemu-aarch64-static"]\n'
                  'ctx = 256\nheadroom_mib = 64\n[transport]\nkind = "local"\n')
    result = deploy(tiny_gguf, profile=load_profile("pi5-emulated"), bench=True, bench_prompt=16, bench_gen=4)
    assert result.build_key == aarch64_build.key
    assert result.smoke_output.startswith("The capital of France is")
    assert result.bench.gen_tps > 0 and result.bench.prompt_tps > 0
    assert result.kernels == ["asimddp", "fphp"]  # dotprod and fp16 kernels compiled in
    assert any("qemu-aarch64-static" in w for w in result.warnings)  # features not checked under emulation


def test_a_build_above_the_cpu_dies_with_sigill_and_says_so(aarch64_build, profile_dir, tmp_path, tiny_gguf):
    """What the CPU-feature check prevents: the Cortex-A76 build on an emulated Cortex-A72 (no dotprod).

    Under exec_wrapper the feature check cannot see the emulated CPU, so the smoke test meets the SIGILL.
    """
    from plm_gguf.errors import DeviceError

    write_profile(profile_dir, "pi4-emulated",
                  f'extends = "rpi5"\ninstall_dir = "{tmp_path}/pi4"\nexec_wrapper = "qemu-aarch64-static -cpu cortex-a72"\n'
                  'ctx = 256\nheadroom_mib = 64\n[transport]\nkind = "local"\n')
    with pytest.raises(DeviceError, match="SIGILL") as err:
        deploy(tiny_gguf, profile=load_profile("pi4-emulated"))
    # the hint names the likeliest extension (the A72 has no dotprod) and the settings that avoid it
    assert "the likeliest culprit is dotprod" in err.value.hint, err.value.hint
    assert 'target.mcpu = "cortex_a76"' in err.value.hint and "rpi4" in err.value.hint


# ---------------------------------------------------------------- absorbed MLA on the device build

def _complete_under_qemu(build, model, expand: str | None = None) -> bytes:
    """llama-completion's stdout: the prompt and the greedy continuation, as bytes. EXPAND sets
    LLAMA_PLM_MLA_EXPAND_MIN_TOKENS (patch 0004: the smallest batch attending in the expanded form)."""
    import os
    import subprocess

    argv = ["qemu-aarch64-static", str(build.binaries["llama-completion"]), "-m", str(model), "-p", MLA_PROMPT,
            "-n", str(N_PREDICT), "--ignore-eos", "-c", "256", "-t", "2", "-fa", "off", "-no-cnv", "--temp", "0",
            "-s", "1", "-ctk", "f32", "-ctv", "f32"]
    from plm_gguf.llama.patches import MLA_EXPAND_ENV

    env = os.environ | ({MLA_EXPAND_ENV: expand} if expand is not None else {})
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:].decode(errors="replace")
    return proc.stdout


def test_aarch64_build_carries_the_mla_patch(aarch64_build):
    from plm_gguf.llama import patches

    assert aarch64_build.key.startswith("lcp") and "-mla-" in aarch64_build.key
    assert aarch64_build.manifest["latent_kv"] is True
    assert set(aarch64_build.manifest["patches"]) == {p.name for p in patches.patch_files()}


@pytest.fixture(scope="module")
def stock_under_qemu(aarch64_build, mla_pair) -> bytes:
    return _complete_under_qemu(aarch64_build, mla_pair[0])


@pytest.mark.parametrize("expand", [None, "2"], ids=["default", "expanded-prompt"])
def test_latent_layout_on_the_aarch64_build_gives_the_stock_greedy_tokens(aarch64_build, mla_pair, stock_under_qemu,
                                                                            expand):
    """The short prompt is absorbed at the default threshold; with it lowered to 2 the prompt attends
    in the expanded form and each generated token absorbed, as a long prompt does by default."""
    stock, latent, reference = mla_pair
    out_stock = stock_under_qemu
    out_latent = _complete_under_qemu(aarch64_build, latent, expand)
    assert out_latent == out_stock
    # and both are the torch reference's greedy tokens (llama-completion ends its output with a newline)
    assert out_stock.startswith(reference) and out_stock[len(reference):].strip() == b"", (out_stock, reference)


def test_deploy_a_latent_file_under_exec_wrapper_qemu(aarch64_build, mla_pair, profile_dir, tmp_path):
    """deploy pushes the patched build with a latent file, counts the latent cache, runs it with
    flash attention (auto) and without; asked for stock llama.cpp, or for flash attention on a
    stock-layout file, it refuses before building or sending anything."""
    from plm_gguf.devices import checks
    from plm_gguf.errors import DeviceError
    from plm_gguf.memory import KVLayout, kv_cache_bytes

    stock, latent, _ = mla_pair
    write_profile(profile_dir, "pi5-emulated",
                  f'extends = "rpi5"\ninstall_dir = "{tmp_path}/pi/plm-gguf"\nexec_wrapper = ["qemu-aarch64-static"]\n'
                  'ctx = 256\nheadroom_mib = 64\n[transport]\nkind = "local"\n')
    result = deploy(latent, profile=load_profile("pi5-emulated"), bench=True, bench_prompt=16, bench_gen=4)
    assert result.build_key == aarch64_build.key
    assert result.smoke_output.startswith("The capital of France is")
    # 4 layers x 256 tokens x (latent 256 + rope 16) x 2 bytes, against full K and V: 4 x 256 x 4 x (64 + 64) x 2
    assert result.memory.kv_cache == 4 * 256 * (256 + 16) * 2 == 557_056
    assert kv_cache_bytes(checks.read_model(stock).shape, KVLayout.FULL, 256) == 4 * 256 * 4 * (64 + 64) * 2
    # auto: flash attention on for the latent layout, in the smoke test and in llama-bench
    assert result.memory.flash_attn and result.bench.gen_tps > 0
    assert all(r["flash_attn"] in (True, 1) for r in result.bench.raw)
    result = deploy(latent, profile=load_profile("pi5-emulated"), flash_attn="off", bench=True, bench_prompt=16,
                    bench_gen=4)
    assert not result.memory.flash_attn and result.smoke_output.startswith("The capital of France is")
    assert all(r["flash_attn"] in (False, 0) for r in result.bench.raw)
    with pytest.raises(DeviceError, match="latent KV-cache layout"):
        deploy(latent, profile=load_profile("pi5-emulated"), mla_patch=False, llama_cpp=tmp_path / "never read")
    with pytest.raises(DeviceError, match="flash attention aborts"):  # it would: llama.cpp aborts on a stock file
        deploy(stock, profile=load_profile("pi5-emulated"), flash_attn="on")
