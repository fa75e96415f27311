"""NVIDIA GPUs: what nvidia-smi says about a device's GPUs, and the nvcc that builds for them.

Parsers are pure functions of recorded outputs (tests/devices/test_gpu.py); the probe script's
`gpu` and `cuda` sections run these queries on the device:

    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,memory.free --format=csv,noheader,nounits
    nvidia-smi            (its header names the highest CUDA version the driver supports)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from plm_gguf.errors import DeviceError

MIB = 1024 * 1024
QUERY = "name,compute_cap,driver_version,memory.total,memory.free"
PROBE_SCRIPT = (f"s gpu; nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits 2>/dev/null\n"
                "s cuda; nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*'")
NVCC_HINT = ("install the CUDA toolkit (its nvcc), or put nvcc on PATH, or set CUDA_HOME "
             "(plm-gguf looks in PATH, $CUDA_HOME/bin and /usr/local/cuda/bin)")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_cap: str  # "9.0"
    driver: str
    mem_total: int  # bytes
    mem_free: int  # bytes

    @property
    def arch(self) -> str:
        """The CUDA architecture CMake names: "90" for compute capability 9.0."""
        return self.compute_cap.replace(".", "")

    @property
    def summary(self) -> str:
        return (f"{self.name} (sm_{self.arch}, {self.mem_free / MIB:.0f} MiB free of {self.mem_total / MIB:.0f} MiB, "
                f"driver {self.driver})")


def parse_gpus(text: str) -> list[GpuInfo]:
    """The rows of the --query-gpu CSV (noheader, nounits: memory in MiB); other lines are skipped."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5 or not re.fullmatch(r"\d+\.\d+", fields[1]):
            continue
        try:
            total, free = int(float(fields[3])) * MIB, int(float(fields[4])) * MIB
        except ValueError:
            continue
        gpus.append(GpuInfo(fields[0], fields[1], fields[2], total, free))
    return gpus


def parse_cuda_version(text: str) -> str:
    """'CUDA Version: 13.0' (nvidia-smi's header) -> '13.0'; '' when absent."""
    found = re.search(r"CUDA Version:\s*(\d+\.\d+)", text)
    return found.group(1) if found else ""


def parse_nvcc_version(text: str) -> str:
    """`nvcc --version` -> '13.0' (from 'release 13.0, V13.0.48')."""
    found = re.search(r"release (\d+\.\d+)", text)
    if not found:
        raise DeviceError("nvcc --version printed no CUDA release", NVCC_HINT)
    return found.group(1)


def find_nvcc() -> str:
    """The nvcc to build with: on PATH, else $CUDA_HOME/bin, else /usr/local/cuda/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    raise DeviceError("nvcc (the CUDA compiler) is not installed here", NVCC_HINT)


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError as exc:
        raise DeviceError(f"{nvcc} does not run: {exc.strerror or exc}", NVCC_HINT) from None
    return parse_nvcc_version(out)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def check_driver(build_cuda: str, driver_cuda: str, where: str) -> None:
    """A CUDA build runs where the driver supports its CUDA version (same major, minor at least)."""
    if driver_cuda and version_tuple(driver_cuda) < version_tuple(build_cuda):
        raise DeviceError(f"the build uses CUDA {build_cuda} but the driver on {where} supports CUDA {driver_cuda}",
                          f"update the NVIDIA driver there, or build with a CUDA {driver_cuda} toolkit "
                          "(put its nvcc first on PATH)")
