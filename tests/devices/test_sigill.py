"""A binary that dies with SIGILL on a device: the error names the likely extension and the setting that avoids it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from plm_gguf.devices.profiles import load_profile
from plm_gguf.devices.runner import _fail


def _died(code: int) -> SimpleNamespace:
    return SimpleNamespace(returncode=code, stdout="", stderr="Illegal instruction\n")


@pytest.mark.parametrize("code", [132, -4])  # through a shell (128 + 4), or a local child killed by signal 4
def test_sigill_on_a_pi_names_dotprod_and_the_profile_settings(code):
    profile = load_profile("rpi5")
    manifest = {"toolchain": "zig", "uses": list(profile.target.uses), "mcpu": profile.target.mcpu}
    err = _fail("the smoke generation", _died(code), profile, manifest)
    assert "SIGILL" in err.message and "rpi5" in err.message
    assert "dotprod" in err.hint and 'target.mcpu = "cortex_a76"' in err.hint
    assert "rpi4" in err.hint and "target.uses" in err.hint


def test_sigill_with_i8mm_names_i8mm_first():
    profile = load_profile("android-i8mm")
    err = _fail("llama-bench", _died(132), profile, {"toolchain": "zig", "uses": list(profile.target.uses),
                                                      "mcpu": profile.target.mcpu})
    assert err.hint.index("i8mm") < err.hint.index("dotprod")
    assert "the likeliest culprit is i8mm" in err.hint


def test_sigill_on_the_host_names_the_isa_level_and_the_override():
    manifest = {"toolchain": "native", "isa": "zen4",
                "isa_features": ["SSE42", "AVX", "AVX2", "AVX512", "AVX512_BF16"]}
    err = _fail("the smoke generation", _died(-4), load_profile("host"), manifest)
    assert "zen4" in err.hint and "AVX512_BF16" in err.hint and "PLM_GGUF_HOST_ISA" in err.hint


def test_sigill_on_a_baseline_build_points_elsewhere():
    profile = load_profile("linux-aarch64")
    err = _fail("the smoke generation", _died(132), profile, {"toolchain": "zig", "uses": ["fp", "asimd"],
                                                               "mcpu": "generic"})
    assert "already the armv8-a baseline" in err.hint and "uname -m" in err.hint


def test_other_failures_keep_their_hints():
    err = _fail("llama-bench", _died(137), load_profile("rpi5"), None)
    assert "SIGKILL" in err.message and "--ctx" in err.hint
