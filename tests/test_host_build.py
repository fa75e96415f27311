"""The host build of llama.cpp: instruction-set choice, self-check with fallback, progress,
the pinned sdist, and the build itself running every weight type on this machine."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest

from plm_gguf.errors import LlamaCppError, UsageError
from plm_gguf.llama import isa
from plm_gguf.llama.build import BuildProgress
from plm_gguf.llama.host import LIBS, SELF_CHECK_TYPES, TOOLS, build_until_checked, host_build, self_check

XEON_AMX = ("flags : fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
            "avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16\n")


def test_cpuinfo_flags_reads_x86_and_arm():
    assert "amx_tile" in isa.cpuinfo_flags("processor : 0\n" + XEON_AMX)
    assert isa.cpuinfo_flags("Features : fp asimd asimddp i8mm\nCPU part : 0xd0b\n") == {"fp", "asimd", "asimddp", "i8mm"}
    assert isa.cpuinfo_flags("nothing here") == set()


def test_amx_is_never_chosen_automatically():
    level, found = isa.choose_x86(isa.cpuinfo_flags(XEON_AMX), lambda feature: True)
    assert level.name == "zen4" and "AMX_INT8" not in level.features
    assert "-DGGML_AMX_INT8=OFF" in isa.x86_cmake_args(level) and "-DGGML_NATIVE=OFF" in isa.x86_cmake_args(level)
    level, _ = isa.choose_x86(isa.cpuinfo_flags(XEON_AMX), lambda feature: True, requested="sapphirerapids")
    assert "-DGGML_AMX_INT8=ON" in isa.x86_cmake_args(level)


def test_a_listed_extension_that_does_not_execute_is_left_out():
    """cpuinfo lists AVX-512, but its instructions fault (a hypervisor that hides it): haswell + AVX-VNNI."""
    level, found = isa.choose_x86(isa.cpuinfo_flags(XEON_AMX), lambda feature: not feature.startswith("AVX512"))
    assert level.name == "alderlake"
    assert found["AVX512"] == "listed, did not run" and found["AVX2"] == "ran"
    level, found = isa.choose_x86({"sse4_2", "avx"}, lambda feature: True)
    assert level.name == "sandybridge" and found["AVX2"] == "not listed"


def test_a_requested_level_is_checked_too():
    with pytest.raises(LlamaCppError, match="AVX512"):
        isa.choose_x86({"sse4_2", "avx", "avx2"}, lambda feature: True, requested="skylakex")
    with pytest.raises(UsageError, match="names no x86 level"):
        isa.choose_x86(set(), lambda feature: True, requested="pentium")


def test_fallback_chain_ends_at_the_baseline():
    level = isa.HostIsa("x86_64", "sapphirerapids", ())
    seen = []
    while level is not None:
        seen.append(level.level)
        level = isa.fallback(level)
    assert seen == ["sapphirerapids", "zen4", "icelake", "skylakex", "haswell", "sse42", "x64"]
    assert isa.fallback(isa.HostIsa("aarch64", "armv8.2-a+dotprod", ())).level == "armv8-a"


def test_arm_levels_follow_cpuinfo():
    assert isa.arm_march({"fp", "asimd"}) == "armv8-a"
    assert isa.arm_march({"asimddp", "asimdhp"}) == "armv8.2-a+dotprod+fp16"
    assert isa.arm_march({"asimddp", "asimdhp", "i8mm"}) == "armv8.6-a+dotprod+fp16+i8mm"


def test_probe_runs_this_machines_extensions():
    """Every extension the chosen level uses executed in a child process here."""
    chosen = isa.detect()
    if chosen.arch != "x86_64":
        pytest.skip("the execution probe is x86 only")
    assert all(chosen.probed[f] == "ran" for f in chosen.features), chosen.probed
    assert "AMX_INT8" not in chosen.features


def _fake_build(levels_built):
    def build_at(level):
        levels_built.append(level.level)
        return BuildProgress("fake", log=lambda line: None)
    return build_at


def test_self_check_failure_falls_back_and_records_why(tmp_path):
    built: list[str] = []
    verdicts = iter([{"q8_0": "SIGILL in llama-completion", "f16": "ok"}, {"q8_0": "ok", "f16": "ok"}])
    start = isa.HostIsa("x86_64", "zen4", isa.x86_cmake_args(isa.x86_level("zen4")), isa.x86_level("zen4").features)
    level, attempts = build_until_checked(start, _fake_build(built), lambda: next(verdicts), tmp_path / "log")
    assert built == ["zen4", "icelake"] and level.level == "icelake"
    assert "-DGGML_AVX512_BF16=OFF" in level.cmake_args
    assert attempts[0] == {"level": "zen4", "results": {"q8_0": "SIGILL in llama-completion", "f16": "ok"}}


def test_self_check_that_fails_everywhere_is_an_error(tmp_path):
    start = isa.HostIsa("x86_64", "sse42", ())
    with pytest.raises(LlamaCppError, match="even at x64"):
        build_until_checked(start, _fake_build([]), lambda: {"q4_0": "SIGSEGV in llama-completion"}, tmp_path / "l")


def test_progress_in_a_log_is_a_line_every_tenth():
    out = io.StringIO()
    progress = BuildProgress("host build", stream=out)
    for i in range(1, 201):
        progress.line(f"[{i}/200] Building CXX object x{i}.o\n")
    progress.line("warning: not a step\n")
    progress.done()
    lines = out.getvalue().splitlines()
    assert lines[0] == "host build: 1/200 steps, 0:00"
    assert [l.split(":")[1].split()[0] for l in lines[1:-1]] == [f"{20 * k}/200" for k in range(1, 11)]
    assert lines[-1].startswith("host build: built in")


def test_a_tampered_sdist_is_refused(tmp_path, monkeypatch):
    from plm_gguf import cache

    monkeypatch.setenv("PLM_GGUF_CACHE", str(tmp_path))
    path = cache.sdist_path("0.3.36")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the sdist")
    with pytest.raises(LlamaCppError, match="not the pinned"):
        cache.llama_cpp_source("0.3.36")
    assert not path.exists() and path.with_name(path.name + ".rejected").is_file()
    assert not (tmp_path / "src" / "llama-cpp-python-0.3.36").exists()


# ---------------------------------------------------------------- the real build (slow)

@pytest.mark.slow
def test_host_build_has_libraries_and_tools_and_ran_every_type():
    built = host_build()
    for name in LIBS + TOOLS:
        assert (built.bin / name).is_file(), name
    last = built.manifest["self_check"][-1]
    assert last["level"] == built.manifest["isa"]
    assert last["results"] == {t: "ok" for t in SELF_CHECK_TYPES}
    assert "-DGGML_NATIVE=OFF" in built.manifest["cmake_flags"]
    # the tools load the libraries beside them (RUNPATH $ORIGIN), wherever the folder is
    dynamic = subprocess.run(["readelf", "-d", str(built.bin / "llama-completion")], capture_output=True,
                             text=True).stdout
    assert "[$ORIGIN]" in dynamic
    resolved = subprocess.run(["ldd", str(built.bin / "llama-completion")], capture_output=True, text=True).stdout
    ours = [line.split("=>")[1].split()[0] for line in resolved.splitlines() if "llama" in line or "ggml" in line]
    assert {Path(p).name for p in ours} >= {"libllama.so", "libggml.so", "libggml-cpu.so"}
    assert all(Path(p).parent == built.bin for p in ours), resolved


@pytest.mark.slow
def test_self_check_runs_each_type_again_on_the_cached_build():
    built = host_build()
    results = self_check(built.bin, types=("q8_0", "q4_k_m"))
    assert results == {"q8_0": "ok", "q4_k_m": "ok"}
    assert json.loads((built.path / "manifest.json").read_text())["key"] == built.key
