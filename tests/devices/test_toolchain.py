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
    from plm_gguf.llama import patches
    from plm_gguf.devices import toolchain

    profile, src = load_profile("rpi5"), tmp_path / "src"
    patched = toolchain.build_key(profile, src, "lcpX")
    stock = toolchain.build_key(profile, src, "lcpX", mla_patch=False)
    assert patched.startswith("lcpX-mla-aarch64-linux-musl-") and stock.startswith("lcpX-aarch64-linux-musl-")
    copy = tmp_path / "patches"
    copy.mkdir()
    for file in patches.patch_files():
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


# The build keys computed before the toolchains became classes: a changed key orphans every cached build.
FIXED_PATCH = "diff --git a/x b/x\n+fixed\n"
KEYS_BEFORE_TOOLCHAIN_CLASSES = {  # build_key(profile, Path('/src'), 'lcp0.3.16', glibc, mla) with FIXED_PATCH
    ('android', True, ''): 'lcp0.3.16-mla-aarch64-linux-musl-cortex_a55-b6767bbc',
    ('android', True, '2.36'): 'lcp0.3.16-mla-aarch64-linux-gnu.2.36-cortex_a55-3236b388',
    ('android', False, ''): 'lcp0.3.16-aarch64-linux-musl-cortex_a55-c0b739d2',
    ('android', False, '2.36'): 'lcp0.3.16-aarch64-linux-gnu.2.36-cortex_a55-efeb62bc',
    ('android-i8mm', True, ''): 'lcp0.3.16-mla-aarch64-linux-musl-cortex_a76_i8mm_bf16-cdc33ced',
    ('android-i8mm', True, '2.36'): 'lcp0.3.16-mla-aarch64-linux-gnu.2.36-cortex_a76_i8mm_bf16-cdae11a4',
    ('android-i8mm', False, ''): 'lcp0.3.16-aarch64-linux-musl-cortex_a76_i8mm_bf16-f378eab2',
    ('android-i8mm', False, '2.36'): 'lcp0.3.16-aarch64-linux-gnu.2.36-cortex_a76_i8mm_bf16-f0c44e15',
    ('linux-aarch64', True, ''): 'lcp0.3.16-mla-aarch64-linux-musl-generic-d87a8295',
    ('linux-aarch64', True, '2.36'): 'lcp0.3.16-mla-aarch64-linux-gnu.2.36-generic-8450d198',
    ('linux-aarch64', False, ''): 'lcp0.3.16-aarch64-linux-musl-generic-606006ec',
    ('linux-aarch64', False, '2.36'): 'lcp0.3.16-aarch64-linux-gnu.2.36-generic-753589cd',
    ('rpi-zero2w', True, ''): 'lcp0.3.16-mla-aarch64-linux-musl-cortex_a53-494103bd',
    ('rpi-zero2w', True, '2.36'): 'lcp0.3.16-mla-aarch64-linux-gnu.2.36-cortex_a53-f7816c7e',
    ('rpi-zero2w', False, ''): 'lcp0.3.16-aarch64-linux-musl-cortex_a53-14655ed7',
    ('rpi-zero2w', False, '2.36'): 'lcp0.3.16-aarch64-linux-gnu.2.36-cortex_a53-85409c9b',
    ('rpi4', True, ''): 'lcp0.3.16-mla-aarch64-linux-musl-cortex_a72-93d1a45c',
    ('rpi4', True, '2.36'): 'lcp0.3.16-mla-aarch64-linux-gnu.2.36-cortex_a72-76bf41aa',
    ('rpi4', False, ''): 'lcp0.3.16-aarch64-linux-musl-cortex_a72-039ae2e9',
    ('rpi4', False, '2.36'): 'lcp0.3.16-aarch64-linux-gnu.2.36-cortex_a72-4f031431',
    ('rpi5', True, ''): 'lcp0.3.16-mla-aarch64-linux-musl-cortex_a76-94c41d12',
    ('rpi5', True, '2.36'): 'lcp0.3.16-mla-aarch64-linux-gnu.2.36-cortex_a76-ebe87d70',
    ('rpi5', False, ''): 'lcp0.3.16-aarch64-linux-musl-cortex_a76-c266f90e',
    ('rpi5', False, '2.36'): 'lcp0.3.16-aarch64-linux-gnu.2.36-cortex_a76-7743363d',
}
NDK_KEYS_BEFORE = {  # android-i8mm with ANDROID_NDK_HOME=ndk (relative: the path is part of the recipe)
    (True, ''): 'lcp0.3.16-mla-android-ndk-arm64-ed1bcd0e',
    (True, '2.36'): 'lcp0.3.16-mla-android-ndk-arm64-1bc0b2f0',
    (False, ''): 'lcp0.3.16-android-ndk-arm64-236a7e22',
    (False, '2.36'): 'lcp0.3.16-android-ndk-arm64-3d08a549',
}


def _fixed_patches(tmp_path, monkeypatch):
    folder = tmp_path / "fixed-patches"
    folder.mkdir()
    (folder / "0001-fixed.patch").write_text(FIXED_PATCH)
    monkeypatch.setenv("PLM_GGUF_PATCHES", str(folder))


def test_build_keys_are_the_ones_before_the_toolchain_classes(tmp_path, monkeypatch):
    """Existing cache entries stay valid: zig and ndk keys byte-identical to the keys computed
    before Toolchain existed; native keys are the host build's."""
    from pathlib import Path

    from plm_gguf.devices import toolchain
    from plm_gguf.llama.host import host_key

    _fixed_patches(tmp_path, monkeypatch)
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    for (name, mla, glibc), key in KEYS_BEFORE_TOOLCHAIN_CLASSES.items():
        assert toolchain.build_key(load_profile(name), Path("/src"), "lcp0.3.16", glibc, mla) == key, (name, mla, glibc)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ndk" / "build" / "cmake").mkdir(parents=True)
    (tmp_path / "ndk" / "build" / "cmake" / "android.toolchain.cmake").write_text("")
    monkeypatch.setenv("ANDROID_NDK_HOME", "ndk")
    profile = load_profile("android-i8mm")
    assert isinstance(toolchain.toolchain_for(profile), toolchain.NdkToolchain)
    for (mla, glibc), key in NDK_KEYS_BEFORE.items():
        assert toolchain.build_key(profile, Path("/src"), "lcp0.3.16", glibc, mla) == key, (mla, glibc)
    host = load_profile("host")
    for mla in (True, False):
        assert toolchain.build_key(host, Path("/src"), "lcp0.3.16", mla_patch=mla) == host_key(None, mla)


def test_toolchains_are_chosen_by_the_profile(tmp_path, monkeypatch):
    from dataclasses import replace

    from plm_gguf.devices import toolchain
    from plm_gguf.errors import DeviceError

    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    assert set(toolchain.TOOLCHAINS) == {"zig", "ndk", "native", "cuda"}
    assert all(isinstance(t, toolchain.Toolchain) and t.name == n for n, t in toolchain.TOOLCHAINS.items())
    assert isinstance(toolchain.toolchain_for(load_profile("rpi5")), toolchain.ZigToolchain)
    assert isinstance(toolchain.toolchain_for(load_profile("host")), toolchain.NativeToolchain)
    assert isinstance(toolchain.toolchain_for(load_profile("cuda")), toolchain.CudaToolchain)
    odd = replace(load_profile("rpi5"), target=replace(load_profile("rpi5").target, toolchain="vulkan"))
    with pytest.raises(DeviceError, match="toolchain 'vulkan'") as err:
        toolchain.build_key(odd, tmp_path, "lcpX")
    assert "zig, ndk, native, cuda" in err.value.hint
    with pytest.raises(DeviceError, match="toolchain 'vulkan'"):
        toolchain.build(odd, tmp_path)
    rpi5 = toolchain.target_manifest(load_profile("rpi5"), "2.36")
    assert (rpi5["toolchain"], rpi5["arch"], rpi5["glibc"], rpi5["max_page_size"]) == ("zig", "aarch64", "2.36", 16384)
    assert toolchain.target_manifest(load_profile("host"))["toolchain"] == "native"
    assert toolchain.TOOLCHAINS["zig"].kernels({"uses": ["fp", "asimddp", "i8mm"]}) == ["i8mm", "asimddp"]
    assert toolchain.TOOLCHAINS["native"].kernels({"isa": "x86-64-v3"}) == ["x86-64-v3 (self-checked)"]
