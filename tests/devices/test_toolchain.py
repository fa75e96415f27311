"""The zig CPU names in the profiles turn on exactly the ggml kernels their `uses` lists promise."""

from __future__ import annotations

import subprocess

import pytest

from plm_gguf.devices.profiles import list_profiles, load_profile

MACROS = {"__ARM_FEATURE_DOTPROD": "asimddp", "__ARM_FEATURE_MATMUL_INT8": "i8mm",
          "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp"}


@pytest.mark.parametrize("name", [n for n in list_profiles() if load_profile(n).target.toolchain == "zig"])
def test_zig_cpu_flags_match_the_features_the_profile_declares(name):
    ziglang = pytest.importorskip("ziglang")
    from pathlib import Path

    target = load_profile(name).target
    zig = Path(ziglang.__file__).parent / "zig"
    out = subprocess.run([str(zig), "cc", "-target", target.triple, f"-mcpu={target.mcpu}", "-dM", "-E", "-x", "c", "-"],
                         input="", capture_output=True, text=True, timeout=120, check=True).stdout
    defined = {line.split()[1] for line in out.splitlines() if line.startswith("#define __ARM_FEATURE")}
    for macro, feature in MACROS.items():
        assert (macro in defined) == (feature in target.uses), (name, macro)
    assert "__ARM_FEATURE_SVE" not in defined  # no SVE: Snapdragons and Pis do not expose it
