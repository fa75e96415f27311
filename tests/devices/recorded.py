"""Device facts assembled from the recorded outputs in devices/machines (as the probe would see them)."""

from __future__ import annotations

from plm_gguf.devices.emulator import MACHINES_DIR
from plm_gguf.devices.facts import DeviceFacts, parse_probe

DATA = MACHINES_DIR
EXTRA = {
    "rpi4": dict(pagesize="4096", libc="glibc 2.36", model="Raspberry Pi 4 Model B Rev 1.4", temp="48686", nproc="4"),
    "rpi5": dict(pagesize="16384", libc="glibc 2.36", model="Raspberry Pi 5 Model B Rev 1.0", temp="51250",
                 vcgencmd="temp=51.1'C", nproc="4"),
    "sd8gen2": dict(pagesize="4096", libc="", android="14", model="SM-S911B", temp="38100\n-273000\n41200", nproc="8"),
}


def probe_text(name: str, **overrides: str) -> str:
    extra = {**EXTRA[name], **overrides}
    freq = DATA / f"{name}.cpufreq"
    sections = {
        "uname": "aarch64",
        "cpuinfo": (DATA / f"{name}.cpuinfo").read_text(),
        "meminfo": (DATA / f"{name}.meminfo").read_text(),
        "pagesize": extra["pagesize"], "nproc": extra["nproc"], "home": "/home/pi",
        "df": "Filesystem     1K-blocks    Used Available Use% Mounted on\n/dev/mmcblk0p2  30358348 5123456  23865432  18% /",
        "libc": extra["libc"], "android": extra.get("android", ""), "model": extra["model"],
        "maxfreq": freq.read_text() if freq.exists() else "", "temp": extra["temp"],
        "vcgencmd": extra.get("vcgencmd", ""), "tools": "sha256sum\nnohup\nmv",
    }
    return "".join(f"@@@{k}\n{v}\n" for k, v in sections.items()) + "@@@end\n"


def recorded_facts(name: str, **overrides: str) -> DeviceFacts:
    return parse_probe(probe_text(name, **overrides))
