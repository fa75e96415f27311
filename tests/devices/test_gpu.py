"""The CUDA target without a GPU: nvidia-smi and nvcc parsers on recorded outputs, the CUDA build's
CMake flags and cache key, the profiles, the memory plan against VRAM, the buffers llama.cpp
reports and llama-bench's depths. The real path (build, deploy, bench on a GPU) is the `cuda`
marker's, run where nvidia-smi finds a GPU."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from plm_gguf.devices import checks, gpu, toolchain
from plm_gguf.devices.cli import parse_depths
from plm_gguf.devices.emulator import MACHINES_DIR
from plm_gguf.devices.facts import parse_probe
from plm_gguf.devices.profiles import load_profile
from plm_gguf.devices.runner import BenchResult, parse_bench_json, parse_buffers
from plm_gguf.errors import DeviceError, UsageError
from plm_gguf.llama.host import CudaTarget, host_key
from plm_gguf.memory import MIB

from .conftest import run_cli
from .recorded import probe_text
from .test_checks import PLM_1_8B_Q4KM, PLM_1_8B_Q4KM_MLA

H200_QUERY = (MACHINES_DIR / "h200.nvidia-smi-query").read_text()
H200_SMI = (MACHINES_DIR / "h200.nvidia-smi").read_text()
H200_NVCC = (MACHINES_DIR / "h200.nvcc").read_text()


def h200_facts():
    """A probe of the H200 box: the rpi5 recording's CPU side with the recorded GPU sections."""
    cuda = "\n".join(line for line in H200_SMI.splitlines() if "CUDA Version" in line)  # what the probe greps
    text = probe_text("rpi5").replace("@@@end", f"@@@gpu\n{H200_QUERY}\n@@@cuda\n{cuda}\n@@@end")
    return parse_probe(text)


def test_nvidia_smi_and_nvcc_parse():
    (h200,) = gpu.parse_gpus(H200_QUERY)
    assert h200.name == "NVIDIA H200" and h200.compute_cap == "9.0" and h200.arch == "90"
    assert h200.mem_total > 140_000 * MIB and 0 < h200.mem_free <= h200.mem_total
    assert gpu.parse_cuda_version(H200_SMI) == "13.0"
    assert gpu.parse_nvcc_version(H200_NVCC) == "13.0"
    assert gpu.parse_gpus("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") == []
    two = gpu.parse_gpus("NVIDIA GeForce RTX 4090, 8.9, 550.54.14, 24564, 23010\nTesla T4, 7.5, 535.1, 15360, 15000\n")
    assert [g.arch for g in two] == ["89", "75"] and two[0].mem_free == 23010 * MIB


def test_probe_reports_the_gpu():
    facts = h200_facts()
    assert facts.gpus[0].name == "NVIDIA H200" and facts.cuda_version == "13.0"
    assert parse_probe(probe_text("rpi5")).gpus == []  # a Pi: no GPU sections answered


def test_the_cuda_build_compiles_only_the_gpus_architecture():
    target = CudaTarget(arch="90", cuda_version="13.0", nvcc="/usr/local/cuda/bin/nvcc")
    args = target.cmake_args
    assert "-DGGML_CUDA=ON" in args and "-DCMAKE_CUDA_ARCHITECTURES=90" in args
    assert "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc" in args
    assert any(a.startswith("-DCMAKE_INSTALL_RPATH=$ORIGIN;") for a in args)  # the toolkit's libraries too
    # cached per architecture and CUDA version, apart from the CPU host build
    keys = {host_key(None, True, None), host_key(None, True, target), host_key(None, True, replace(target, arch="89")),
            host_key(None, True, replace(target, cuda_version="12.8"))}
    assert len(keys) == 4 and "cuda90-13.0" in host_key(None, True, target)


def test_cuda_profiles_offload_every_layer():
    local, remote = load_profile("cuda"), load_profile("cuda-remote")
    assert local.target.toolchain == remote.target.toolchain == "cuda" and local.gpu_layers == 999
    assert local.transport.kind == "local" and remote.transport.kind == "ssh"
    assert toolchain.target_manifest(local)["toolchain"] == "cuda"


def test_a_pinned_architecture_builds_without_asking_the_device(profile_dir, monkeypatch):
    """target.cuda_arch: the remote template can be built here without reaching the box."""
    monkeypatch.setattr(gpu, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(gpu, "nvcc_version", lambda nvcc: "12.8")
    (profile_dir / "box.toml").write_text('extends = "cuda-remote"\n[target]\ntoolchain = "cuda"\ncuda_arch = "89"\n')
    chain = toolchain.toolchain_for(load_profile("box"))
    target = chain.cuda_target(load_profile("box"))
    assert (target.arch, target.cuda_version, target.gpu_here) == ("89", "12.8", False)


def test_without_nvcc_or_gpu_the_errors_say_what_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("/usr/local/cuda/bin/nvcc is installed here")
    with pytest.raises(DeviceError, match="nvcc .* is not installed") as err:
        gpu.find_nvcc()
    assert "CUDA_HOME" in err.value.hint
    with pytest.raises(DeviceError, match="supports CUDA 12.4"):
        gpu.check_driver("13.0", "12.4", "gpu-box")
    gpu.check_driver("13.0", "13.1", "gpu-box")


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_build_for_cuda_here_without_a_gpu_is_one_clear_error():
    if not shutil.which("nvcc") and not Path("/usr/local/cuda/bin/nvcc").exists():
        out = run_cli("build", "--device", "cuda")
        assert out.returncode == 7 and "nvcc (the CUDA compiler) is not installed" in out.stderr
        return
    out = run_cli("build", "--device", "cuda")
    assert out.returncode == 7, out.stderr
    assert "error: no NVIDIA GPU answers on local" in out.stderr and "target.cuda_arch" in out.stderr
    assert "Traceback" not in out.stderr


def test_memory_plan_counts_against_free_vram():
    facts = h200_facts()
    h200 = facts.gpus[0]
    plan = checks.check_memory(PLM_1_8B_Q4KM, 4096, facts, 1024, gpu=h200)
    assert plan.available == h200.mem_free and plan.budget == "free VRAM of the NVIDIA H200"
    assert "vs free VRAM of the NVIDIA H200" in plan.describe()
    small = replace(h200, mem_free=2500 * MIB)  # a small card: the stock cache does not fit, the latent one does
    with pytest.raises(DeviceError, match="does not fit in VRAM") as err:
        checks.check_memory(PLM_1_8B_Q4KM_MLA, 4096, facts, 512, gpu=small)
    assert "--kv-cache latent" in err.value.hint and "--ctx" in err.value.hint
    with pytest.raises(DeviceError, match="nvidia-smi finds none"):
        checks.offload_gpu(999, parse_probe(probe_text("rpi5")), "rpi5")
    assert checks.offload_gpu(0, facts, "cpu") is None


def test_buffers_llama_cpp_reports_are_read_from_its_log():
    log = ("0.00.022.066 I load_tensors:   CPU_Mapped model buffer size =     0.32 MiB\n"
           "0.00.023.058 I llama_kv_cache:      CUDA0 KV buffer size =  1280.00 MiB\n"
           "0.00.025.188 I sched_reserve:      CUDA0 compute buffer size =   300.75 MiB\n"
           "0.00.025.190 I sched_reserve:  CUDA_Host compute buffer size =    12.01 MiB\n")
    assert parse_buffers(log) == {"CPU_Mapped model": 0.32, "CUDA0 KV": 1280.0, "CUDA0 compute": 300.75,
                                  "CUDA_Host compute": 12.01}


def test_bench_depths():
    records = [{"n_prompt": 512, "n_gen": 0, "n_depth": d, "avg_ts": pp, "n_threads": 16} for d, pp in
               ((0, 16850.0), (4096, 12257.0))] + [{"n_prompt": 0, "n_gen": 64, "n_depth": d, "avg_ts": tg,
                                                    "n_threads": 16} for d, tg in ((0, 403.0), (4096, 341.0))]
    import json

    pp, tg, threads, n_prompt, n_gen, raw = parse_bench_json(json.dumps(records))
    assert (pp, tg, n_prompt, n_gen) == (16850.0, 403.0, 512, 64)  # the shallowest depth
    bench = BenchResult(pp, tg, threads, n_prompt, n_gen, None, None, raw)
    assert bench.by_depth == [(0, 16850.0, 403.0), (4096, 12257.0, 341.0)]
    assert parse_depths("0,4096,16384") == (0, 4096, 16384) and parse_depths("") == ()
    with pytest.raises(UsageError):
        parse_depths("0,4k")


@pytest.mark.cuda
def test_deploy_and_bench_on_this_machines_gpu(tiny_gguf):
    """The real path: the CUDA build for this GPU, deploy, smoke on the GPU, llama-bench at two depths."""
    if not shutil.which("nvidia-smi") or subprocess.run(["nvidia-smi"], capture_output=True).returncode != 0:
        pytest.skip("no NVIDIA GPU here")
    from plm_gguf.devices.deploy import deploy, undeploy

    result = deploy(tiny_gguf, profile_name="cuda", bench=True, bench_prompt=32, bench_gen=8, bench_depths=(0, 128))
    try:
        assert result.smoke_output.startswith("The capital of France is")
        assert any(k.startswith("CUDA0 KV") for k in result.buffers), result.buffers
        assert [d for d, _, _ in result.bench.by_depth] == [0, 128] and result.bench.gen_tps > 0
        assert result.kernels[0].startswith("CUDA sm_")
    finally:
        undeploy("cuda")
