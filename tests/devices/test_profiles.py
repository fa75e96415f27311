"""Profiles as data: the shipped ones, user profiles, `extends`, and clean errors for bad files."""

from __future__ import annotations

import pytest

from plm_gguf.devices import toolchain
from plm_gguf.devices.profiles import list_profiles, load_profile, with_overrides
from plm_gguf.errors import DeviceError, UsageError

from .conftest import write_profile

SHIPPED = ["android", "android-i8mm", "cuda", "cuda-remote", "host", "linux-aarch64", "rpi-zero2w", "rpi4", "rpi5"]


def test_shipped_profiles_load_and_are_consistent():
    assert set(SHIPPED) <= set(list_profiles())
    for name in SHIPPED:
        p = load_profile(name)
        assert p.install_dir and p.ctx > 0 and p.headroom_mib > 0
        if p.target.toolchain == "zig":
            assert p.target.triple == "aarch64-linux-musl" and {"fp", "asimd"} <= set(p.target.uses)
    assert load_profile("android").transport.kind == "adb"
    assert load_profile("android").install_dir.startswith("/data/local/tmp/")  # /sdcard is noexec
    assert "i8mm" in load_profile("android-i8mm").target.uses
    assert load_profile("host").transport.kind == "local"


def test_user_profile_extends_and_shadows(profile_dir):
    write_profile(profile_dir, "my-pi", 'extends = "rpi5"\n[transport]\nhost = "pi.lan"\nuser = "me"\n')
    p = load_profile("my-pi")
    assert (p.transport.kind, p.transport.host, p.transport.user) == ("ssh", "pi.lan", "me")
    assert p.target.mcpu == "cortex_a76" and p.description == ""
    assert "my-pi" in list_profiles()
    write_profile(profile_dir, "rpi5", 'extends = "rpi5"\n[transport]\nhost = "10.0.0.5"\n')
    mine = load_profile("rpi5")  # shadows the shipped rpi5 and builds on it
    assert mine.transport.host == "10.0.0.5" and mine.target.mcpu == "cortex_a76"
    write_profile(profile_dir, "loop-a", 'extends = "loop-b"\n')
    write_profile(profile_dir, "loop-b", 'extends = "loop-a"\n')
    with pytest.raises(UsageError, match="unknown device profile|extends itself"):
        load_profile("loop-a")


def test_profile_file_path_and_overrides(tmp_path):
    path = write_profile(tmp_path, "board", 'install_dir = "/opt/x"\nexec_wrapper = "qemu-aarch64-static -cpu max"\n'
                         '[transport]\nkind = "ssh"\nhost = "a"\n[target]\ntoolchain = "zig"\ntriple = "aarch64-linux-gnu"\n'
                         'glibc = "2.36"\nmcpu = "cortex_a72"\n')
    p = load_profile(str(path))
    assert p.exec_wrapper == ("qemu-aarch64-static", "-cpu", "max") and p.target.libc == "gnu.2.36"
    q = with_overrides(p, address="pi@10.0.0.7:2222")
    assert (q.transport.user, q.transport.host, q.transport.port) == ("pi", "10.0.0.7", 2222)
    assert with_overrides(load_profile("android"), address="R5CT").transport.serial == "R5CT"


@pytest.mark.parametrize("body, needle", [
    ('install_dir = "x"\n[transport]\nkind = "telnet"\n[target]\ntoolchain = "native"\n', "transport.kind"),
    ('install_dir = "x"\n[transport]\nkind = "local"\n[target]\ntoolchain = "zig"\n', "target.triple is missing"),
    ('[transport]\nkind = "local"\n[target]\ntoolchain = "native"\n', "install_dir is missing"),
    ('install_dir = \n', "not valid TOML"),
    ('install_dir = "x"\nthreads = "many"\n[transport]\nkind = "local"\n[target]\ntoolchain = "native"\n', "wrong type"),
])
def test_bad_profiles_are_usage_errors(tmp_path, body, needle):
    with pytest.raises(UsageError, match=needle):
        load_profile(str(write_profile(tmp_path, "bad", body)))
    with pytest.raises(UsageError, match="unknown device profile"):
        load_profile("no-such-device")


def test_failed_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("PLM_GGUF_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "broken llama.cpp"
    (src / "ggml").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text('cmake_minimum_required(VERSION 3.14)\nproject(x C)\nmessage(FATAL_ERROR "broken")\n')
    with pytest.raises(DeviceError, match="failed") as err:  # stock: the patch would be refused first
        toolchain.build(load_profile("host"), src, mla_patch=False)
    assert "build log" in err.value.hint
    builds = tmp_path / "cache" / "llama"  # native profiles use the host build
    assert [p.name for p in builds.iterdir() if not p.name.endswith(".lock")] == []
    assert toolchain.find_build(load_profile("host"), src, mla_patch=False) is None


def test_build_key_names_source_and_target(tmp_path):
    src = tmp_path / "llama.cpp"
    (src / "ggml").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("x")
    _, label = toolchain.resolve_source(src)
    key5 = toolchain.build_key(load_profile("rpi5"), src, label)
    key4 = toolchain.build_key(load_profile("rpi4"), src, label)
    keyg = toolchain.build_key(load_profile("rpi5"), src, label, glibc="2.36")
    assert key5.startswith(label) and "cortex_a76" in key5 and "cortex_a72" in key4
    assert "aarch64-linux-gnu.2.36" in keyg and len({key5, key4, keyg}) == 3


def test_android_profiles_switch_to_the_ndk_when_it_is_set(tmp_path, monkeypatch):
    """The NDK build itself cannot run here (no NDK on this machine): this checks the recipe only."""
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    assert load_profile("android").target.toolchain == "zig"
    ndk = tmp_path / "ndk"
    monkeypatch.setenv("ANDROID_NDK_HOME", str(ndk))
    profile = load_profile("android-i8mm")
    assert (profile.target.toolchain, profile.target.libc, profile.target.uses) == ("ndk", "bionic", ("fp", "asimd"))
    with pytest.raises(DeviceError, match="ANDROID_NDK_HOME"):
        toolchain._configure_args(profile, tmp_path)
    (ndk / "build" / "cmake").mkdir(parents=True)
    (ndk / "build" / "cmake" / "android.toolchain.cmake").write_text("")
    args, _, slug = toolchain._configure_args(profile, tmp_path)
    assert "-DANDROID_ABI=arm64-v8a" in args and "-DCMAKE_INSTALL_RPATH=$ORIGIN" in args
    assert "-DGGML_CPU_ALL_VARIANTS=ON" in args and slug == "android-ndk-arm64"


@pytest.mark.parametrize(("install_dir", "folder"), [
    ("~/plm-gguf", "/home/pi/plm-gguf"), ("$HOME/plm-gguf", "/home/pi/plm-gguf"), ("${HOME}/a", "/home/pi/a"),
    ("plm-gguf", "/home/pi/plm-gguf"), ("./a//b/./", "/home/pi/a/b"), ("//opt/plm-gguf/", "/opt/plm-gguf"),
    ("/~", "/~"), ("/home/pi/.", None), ("//home//pi/", None),
])
def test_install_dir_is_absolute_and_relative_paths_are_under_the_home(tmp_path, install_dir, folder):
    """`folder` None: the device's home folder itself, refused."""
    from plm_gguf.devices.deploy import install_folder
    from plm_gguf.devices.facts import CpuInfo, DeviceFacts

    facts = DeviceFacts("aarch64", CpuInfo(frozenset(), []), 0, 0, 4096, 4, "/home/pi/", -1, "musl")
    profile = load_profile(str(write_profile(tmp_path, "p", f'install_dir = "{install_dir}"\n[transport]\n'
                                             'kind = "local"\n[target]\ntoolchain = "native"\n')))
    if folder is None:
        with pytest.raises(DeviceError, match="is /home/pi, the home folder"):
            install_folder(profile, facts)
    else:
        assert install_folder(profile, facts) == folder
