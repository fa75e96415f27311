"""What a device is: parsers for /proc/cpuinfo, /proc/meminfo and friends, and one probe.

The probe runs a single POSIX shell script over the transport (it works with busybox, toybox
and mksh) whose output is split into sections; each section has its own pure parser, tested on
recorded outputs of real devices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from plm_gguf.errors import DeviceError

from .gpu import PROBE_SCRIPT as GPU_SCRIPT
from .gpu import GpuInfo, parse_cuda_version, parse_gpus

# ARM's CPU part numbers (implementer 0x41) and a few others seen in phones.
CPU_PARTS = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76", (0x41, 0xD0D): "Cortex-A77",
    (0x41, 0xD41): "Cortex-A78", (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2", (0x41, 0xD4D): "Cortex-A715",
    (0x41, 0xD4E): "Cortex-X3", (0x41, 0xD80): "Cortex-A520", (0x41, 0xD81): "Cortex-A720",
    (0x41, 0xD82): "Cortex-X4", (0x41, 0xD85): "Cortex-X925", (0x41, 0xD87): "Cortex-A725",
    (0x51, 0x001): "Oryon",
}
# Features that change which ggml kernels a build can use, best first.
SPEED_FEATURES = ("sve2", "sve", "i8mm", "asimddp", "fphp")

TEMP_SCRIPT = r"""s temp; for f in /sys/class/thermal/thermal_zone*/temp; do [ -r "$f" ] && cat "$f"; done
s vcgencmd; vcgencmd measure_temp 2>/dev/null"""

PROBE_SCRIPT = r"""
s() { echo "@@@$1"; }
s uname; uname -m 2>/dev/null
s cpuinfo; cat /proc/cpuinfo 2>/dev/null
s meminfo; cat /proc/meminfo 2>/dev/null
s pagesize; getconf PAGESIZE 2>/dev/null || getconf PAGE_SIZE 2>/dev/null
s nproc; getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null
s home; echo "$HOME"
s df; d={dir}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -k "$d" 2>/dev/null
s libc; (getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n 1) 2>/dev/null
s android; getprop ro.build.version.release 2>/dev/null
s model; cat /proc/device-tree/model 2>/dev/null; echo; getprop ro.product.model 2>/dev/null
s maxfreq; for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; do [ -r "$f" ] && cat "$f"; done
{temp}
{gpu}
s tools; for t in sha256sum nohup mv; do command -v $t >/dev/null 2>&1 && echo $t; done
s end
"""


@dataclass
class CpuInfo:
    features: frozenset[str]
    parts: list[str]  # one per CPU, e.g. "Cortex-A76" or "0x41:0xd0b"
    model: str = ""  # "Hardware"/"Model" line where present

    @property
    def summary(self) -> str:
        counts: dict[str, int] = {}
        for part in self.parts:
            counts[part] = counts.get(part, 0) + 1
        return " + ".join(f"{n}x {p}" for p, n in counts.items()) or "unknown CPU"


@dataclass
class DeviceFacts:
    machine: str
    cpu: CpuInfo
    mem_total: int  # bytes
    mem_available: int  # bytes
    page_size: int
    cpus: int
    home: str
    disk_free: int  # bytes free at the install dir, -1 when unknown
    libc: str  # "glibc 2.36", "bionic (Android 14)", "musl/unknown"
    glibc: tuple[int, ...] = ()
    model: str = ""
    max_freqs: list[int] = field(default_factory=list)  # kHz per CPU
    temperature_c: float | None = None
    tools: frozenset[str] = frozenset()
    gpus: list[GpuInfo] = field(default_factory=list)  # NVIDIA GPUs nvidia-smi lists
    cuda_version: str = ""  # the highest CUDA version the NVIDIA driver supports

    @property
    def big_cores(self) -> int:
        """CPUs at the highest max frequency tier (all CPUs when frequencies are unknown)."""
        if not self.max_freqs:
            return self.cpus
        top = max(self.max_freqs)
        return sum(1 for f in self.max_freqs if f >= 0.8 * top) or self.cpus


def split_sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@@@"):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def parse_cpuinfo(text: str) -> CpuInfo:
    """Features (the union over CPUs: big.LITTLE cores agree on them) and CPU parts per core."""
    features: set[str] = set()
    parts: list[str] = []
    implementer = 0
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("features", "flags"):
            features.update(value.split())
        elif key == "cpu implementer":
            implementer = int(value, 16)
        elif key == "cpu part":
            part = int(value, 16)
            parts.append(CPU_PARTS.get((implementer, part), f"{implementer:#x}:{part:#x}"))
        elif key == "model name" and not value.lower().startswith("arm"):
            parts.append(value)
        elif key in ("hardware", "model") and value and not value.isdigit():
            model = value
    return CpuInfo(frozenset(features), parts, model)


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes; old kernels without MemAvailable get Free+Cached."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    if "MemTotal" not in values:
        raise DeviceError("/proc/meminfo has no MemTotal", "is this a Linux device?")
    available = values.get("MemAvailable", values.get("MemFree", 0) + values.get("Cached", 0))
    return values["MemTotal"], available


def parse_df(text: str) -> int:
    """Free bytes from POSIX-ish `df -k DIR` (GNU, busybox and toybox layouts)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return -1
    fields = " ".join(lines[1:]).split()  # a long device name wraps onto its own line
    numbers = [f for f in fields if f.isdigit()]
    return int(numbers[2]) * 1024 if len(numbers) >= 3 else -1


def parse_libc(libc_text: str, android_text: str) -> tuple[str, tuple[int, ...]]:
    if android_text.strip():
        return f"bionic (Android {android_text.strip()})", ()
    match = re.search(r"(?:glibc|libc|GLIBC|GNU libc)\D*(\d+)\.(\d+)", libc_text)
    if match and "musl" not in libc_text.lower():
        version = (int(match.group(1)), int(match.group(2)))
        return f"glibc {version[0]}.{version[1]}", version
    return ("musl" if "musl" in libc_text.lower() else "unknown libc"), ()


def parse_temperature(temp_text: str, vcgencmd_text: str) -> float | None:
    match = re.search(r"temp=([\d.]+)", vcgencmd_text)
    if match:
        return float(match.group(1))
    readings = [int(v) for v in temp_text.split() if v.lstrip("-").isdigit()]
    readings = [v / 1000 if abs(v) > 1000 else float(v) for v in readings]
    readings = [v for v in readings if 0 < v < 150]  # drop unplugged sensors
    return max(readings) if readings else None


def parse_probe(text: str) -> DeviceFacts:
    sec = split_sections(text)
    if "end" not in sec or not sec.get("uname"):
        raise DeviceError("the device probe returned no usable output", "can the device run /bin/sh commands?")
    total, available = parse_meminfo(sec.get("meminfo", ""))
    libc, glibc = parse_libc(sec.get("libc", ""), sec.get("android", ""))
    cpu = parse_cpuinfo(sec.get("cpuinfo", ""))
    ints = lambda s: [int(v) for v in s.split() if v.isdigit()]  # noqa: E731
    nproc = ints(sec.get("nproc", ""))
    page = ints(sec.get("pagesize", ""))
    model = " ".join(v for v in sec.get("model", "").replace("\x00", "").splitlines() if v.strip())
    return DeviceFacts(
        machine=sec["uname"].split()[0],
        cpu=cpu,
        mem_total=total,
        mem_available=available,
        page_size=page[0] if page else 4096,
        cpus=nproc[0] if nproc else max(len(cpu.parts), 1),
        home=sec.get("home", "").strip(),
        disk_free=parse_df(sec.get("df", "")),
        libc=libc,
        glibc=glibc,
        model=model or cpu.model,
        max_freqs=ints(sec.get("maxfreq", "")),
        temperature_c=parse_temperature(sec.get("temp", ""), sec.get("vcgencmd", "")),
        tools=frozenset(sec.get("tools", "").split()),
        gpus=parse_gpus(sec.get("gpu", "")),
        cuda_version=parse_cuda_version(sec.get("cuda", "")),
    )


def probe_script(install_dir: str) -> str:
    """The probe; install_dir must already be shell-quoted (a leading ~/ is left to the shell)."""
    return PROBE_SCRIPT.replace("{temp}", TEMP_SCRIPT).replace("{gpu}", GPU_SCRIPT).replace("{dir}", install_dir)


def temperature_script() -> str:
    return 's() { echo "@@@$1"; }\n' + TEMP_SCRIPT + "\ns end\n"


def parse_temperature_output(text: str) -> float | None:
    sec = split_sections(text)
    return parse_temperature(sec.get("temp", ""), sec.get("vcgencmd", ""))
