"""The zig cross build for aarch64: a static, stripped ELF that runs a PLM GGUF under qemu-aarch64-static."""

from __future__ import annotations

import pytest

from plm_gguf.devices.deploy import deploy
from plm_gguf.devices.profiles import load_profile

from .conftest import write_profile
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
    assert "profile that matches" in err.value.hint
