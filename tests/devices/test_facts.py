"""Parsers of device facts, on recorded outputs of a Pi 4, a Pi 5 and a Snapdragon 8 Gen 2 phone."""

from __future__ import annotations

import pytest

from plm_gguf.devices.facts import parse_cpuinfo, parse_df, parse_libc, parse_meminfo, parse_temperature
from plm_gguf.errors import DeviceError

from .recorded import DATA, recorded_facts


def test_pi4_cpuinfo_is_armv8a_without_dotprod():
    cpu = parse_cpuinfo((DATA / "rpi4.cpuinfo").read_text())
    assert cpu.parts == ["Cortex-A72"] * 4
    assert cpu.features == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    assert "asimddp" not in cpu.features and "fphp" not in cpu.features
    assert cpu.model == "Raspberry Pi 4 Model B Rev 1.4"


def test_pi5_cpuinfo_has_dotprod_and_fp16_not_i8mm():
    cpu = parse_cpuinfo((DATA / "rpi5.cpuinfo").read_text())
    assert cpu.summary == "4x Cortex-A76"
    assert {"asimddp", "fphp", "asimdhp"} <= cpu.features
    assert "i8mm" not in cpu.features


def test_snapdragon_big_little_parts_and_i8mm():
    cpu = parse_cpuinfo((DATA / "sd8gen2.cpuinfo").read_text())
    assert cpu.summary == "3x Cortex-A510 + 2x Cortex-A715 + 2x Cortex-A710 + 1x Cortex-X3"
    assert {"asimddp", "i8mm", "bf16"} <= cpu.features
    assert "sve" not in cpu.features


@pytest.mark.parametrize("name, total_mib, avail_mib", [("rpi4", 3790, 3327), ("rpi5", 8052, 7420), ("sd8gen2", 11073, 4757)])
def test_meminfo(name, total_mib, avail_mib):
    total, available = parse_meminfo((DATA / f"{name}.meminfo").read_text())
    assert (total // 2**20, available // 2**20) == (total_mib, avail_mib)


def test_meminfo_without_memavailable_falls_back_and_garbage_is_refused():
    assert parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 50 kB\n") == (1024000, 153600)
    with pytest.raises(DeviceError):
        parse_meminfo("not meminfo")


def test_df_layouts():
    gnu = "Filesystem 1K-blocks Used Available Use% Mounted on\n/dev/root 100 40 60 40% /"
    wrapped = "Filesystem 1K-blocks Used Available Use% Mounted on\n/dev/mapper/very-long-name\n 100 40 60 40% /"
    assert parse_df(gnu) == parse_df(wrapped) == 60 * 1024
    assert parse_df("") == -1


def test_libc_and_temperature():
    assert parse_libc("glibc 2.36", "") == ("glibc 2.36", (2, 36))
    assert parse_libc("ldd (Debian GLIBC 2.36-9+deb12u4) 2.36", "") == ("glibc 2.36", (2, 36))
    assert parse_libc("", "14")[0] == "bionic (Android 14)"
    assert parse_libc("musl libc (aarch64)", "")[0] == "musl"
    assert parse_temperature("48686", "") == pytest.approx(48.686)
    assert parse_temperature("-273000\n41200\n38100", "") == pytest.approx(41.2)
    assert parse_temperature("51000", "temp=51.1'C") == pytest.approx(51.1)
    assert parse_temperature("", "") is None


def test_full_probe_of_recorded_devices():
    pi5 = recorded_facts("rpi5")
    assert (pi5.machine, pi5.page_size, pi5.glibc, pi5.cpus) == ("aarch64", 16384, (2, 36), 4)
    assert pi5.model == "Raspberry Pi 5 Model B Rev 1.0" and pi5.temperature_c == pytest.approx(51.1)
    phone = recorded_facts("sd8gen2")
    assert phone.libc == "bionic (Android 14)"
    assert phone.big_cores == 5  # the three A510s are the little cores
    assert phone.max_freqs[-1] == 3187200
