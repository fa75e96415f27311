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


def test_build_key_names_and_hashes_the_patch_set(tmp_path, monkeypatch):
    from plm_gguf import llama_lib
    from plm_gguf.devices import toolchain

    profile, src = load_profile("rpi5"), tmp_path / "src"
    patched = toolchain.build_key(profile, src, "lcpX")
    stock = toolchain.build_key(profile, src, "lcpX", mla_patch=False)
    assert patched.startswith("lcpX-mla-aarch64-linux-musl-") and stock.startswith("lcpX-aarch64-linux-musl-")
    copy = tmp_path / "patches"
    copy.mkdir()
    for file in llama_lib.patch_files():
        (copy / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("PLM_GGUF_PATCHES", str(copy))
    assert toolchain.build_key(profile, src, "lcpX") == patched
    first = sorted(copy.glob("*.patch"))[0]
    first.write_bytes(first.read_bytes().replace(b"\n+", b"\n+ ", 1))  # one changed line of the diff
    assert toolchain.build_key(profile, src, "lcpX") != patched
    assert toolchain.build_key(profile, src, "lcpX", mla_patch=False) == stock  # stock builds do not care


def test_a_patch_that_does_not_apply_is_refused_before_compiling(tmp_path, monkeypatch):
    """Another llama.cpp: the error names the patch, offers the stock build, and leaves no cache entry."""
    from plm_gguf.devices import toolchain
    from plm_gguf.errors import DeviceError

    monkeypatch.setenv("PLM_GGUF_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "other llama.cpp"
    (src / "ggml").mkdir(parents=True)
    (src / "src" / "models").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(x)\n")
    (src / "src" / "models" / "plm.cpp").write_text("// a llama.cpp this patch does not target\n")
    with pytest.raises(DeviceError, match=r"0001-plm-absorbed-mla\.patch does not apply") as err:
        toolchain.build(load_profile("rpi5"), src)
    assert "--no-mla-patch" in err.value.hint and "--kv-cache full" in err.value.hint
    builds = tmp_path / "cache" / "builds"
    assert [p.name for p in builds.iterdir() if not p.name.endswith(".lock")] == []
    assert (src / "src" / "models" / "plm.cpp").read_text().startswith("// a llama.cpp")  # source untouched
