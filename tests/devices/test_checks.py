"""The refusals before a deploy: CPU features (no SIGILL), memory fit (with PLM's full K/V cache), libc, pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from plm_gguf.devices import checks
from plm_gguf.devices.deploy import preflight, suggest_profiles, target_manifest
from plm_gguf.devices.profiles import load_profile
from plm_gguf.errors import DeviceError, UsageError
from plm_gguf.memory import KVLayout, compute_bytes, kv_cache_bytes

from .recorded import recorded_facts

MIB = 2**20
# PLM-1.8B as published (Q4_K_M file size), sized from its GGUF metadata.
PLM_1_8B_Q4KM = checks.ModelInfo(path=Path("plm-1.8b-q4_k_m.gguf"), size=1_182_708_992, arch="plm", n_layer=32,
                                 n_head=16, n_head_kv=16, key_length=192, value_length=128, n_embd=2048, n_ff=8192,
                                 n_vocab=151936, n_ctx_train=4096)


def test_kv_cache_is_full_per_head_k_and_v():
    # 32 layers x 4096 tokens x (16*192 K + 16*128 V) x 2 bytes = 768 MiB + 512 MiB, as measured.
    assert kv_cache_bytes(PLM_1_8B_Q4KM.shape, KVLayout.FULL, 4096) == 1280 * MIB


def test_memory_refusal_names_the_numbers_and_a_context_that_fits():
    pi4 = recorded_facts("rpi4")  # 3.2 GiB available
    with pytest.raises(DeviceError) as err:
        checks.check_memory(PLM_1_8B_Q4KM, 4096, pi4, headroom_mib=1024)
    message, hint = err.value.message, err.value.hint
    assert "does not fit" in message and "KV cache 1280 MiB at ctx 4096" in message
    assert "MemAvailable 3327 MiB" in message
    suggested = int(hint.split("--ctx ")[1].split()[0])
    assert 256 <= suggested < 4096
    assert checks.plan_memory(PLM_1_8B_Q4KM, suggested, pi4, 1024).fits
    assert not checks.plan_memory(PLM_1_8B_Q4KM, suggested + 256, pi4, 1024).fits


def test_memory_refusal_when_nothing_fits_says_so():
    with pytest.raises(DeviceError, match="does not fit") as err:
        checks.check_memory(PLM_1_8B_Q4KM, 2048, recorded_facts("rpi4"), headroom_mib=3000)
    assert "smaller quantization" in err.value.hint


def test_memory_fit_on_pi5_8gb():
    plan = checks.check_memory(PLM_1_8B_Q4KM, 4096, recorded_facts("rpi5"), headroom_mib=384)
    assert plan.fits and plan.kv_cache == 1280 * MIB


def test_cpu_feature_refusal_rpi5_build_on_pi4():
    with pytest.raises(DeviceError) as err:
        checks.check_features(target_manifest(load_profile("rpi5")), recorded_facts("rpi4"))
    assert "asimddp" in err.value.message and "SIGILL" in err.value.message
    assert "4x Cortex-A72" in err.value.message


def test_cpu_feature_refusal_i8mm_build_on_pi5():
    with pytest.raises(DeviceError, match="i8mm"):
        checks.check_features(target_manifest(load_profile("android-i8mm")), recorded_facts("rpi5"))


def test_warning_when_build_misses_features_the_cpu_has():
    warnings = checks.check_features(target_manifest(load_profile("rpi4")), recorded_facts("rpi5"))
    assert warnings and "asimddp" in warnings[0]
    assert checks.check_features(target_manifest(load_profile("rpi5")), recorded_facts("rpi5")) == []
    phone_warn = checks.check_features(target_manifest(load_profile("android")), recorded_facts("sd8gen2"))
    assert "i8mm" in phone_warn[0]


def test_preflight_refuses_before_anything_is_built():
    with pytest.raises(DeviceError, match="SIGILL"):
        preflight(load_profile("rpi5"), recorded_facts("rpi4"), PLM_1_8B_Q4KM, 512)
    ctx, plan, warnings = preflight(load_profile("android-i8mm"), recorded_facts("sd8gen2"), PLM_1_8B_Q4KM, None)
    assert ctx == 4096 and plan.fits and warnings == []


def test_threads_default_to_big_cores():
    assert checks.default_threads(4, recorded_facts("sd8gen2")) == 4
    assert checks.default_threads(0, recorded_facts("sd8gen2")) == 5
    assert checks.default_threads(8, recorded_facts("sd8gen2")) == 5


def test_libc_and_page_size_checks():
    pi5 = recorded_facts("rpi5")
    checks.check_libc({"glibc": "2.36"}, pi5)
    with pytest.raises(DeviceError, match="glibc 2.38"):
        checks.check_libc({"glibc": "2.38"}, pi5)
    with pytest.raises(DeviceError, match="16384-byte pages"):
        checks.check_page_size({"max_page_size": 4096, "toolchain": "zig"}, pi5)
    checks.check_page_size(target_manifest(load_profile("rpi5")), pi5)


def test_suggested_profiles_follow_the_cpu():
    assert suggest_profiles(recorded_facts("rpi4"))[-3:] == sorted(["linux-aarch64", "rpi-zero2w", "rpi4"])
    assert suggest_profiles(recorded_facts("sd8gen2"))[0] == "android-i8mm"
    assert "android-i8mm" not in suggest_profiles(recorded_facts("rpi5"))


PLM_1_8B_Q4KM_MLA = checks.ModelInfo(**{**PLM_1_8B_Q4KM.__dict__, "kv_lora_rank": 512, "rope_dim": 64})


def test_latent_layout_caches_576_values_per_token_and_layer():
    latent = PLM_1_8B_Q4KM_MLA.as_latent()
    assert latent.latent and latent.as_latent() is None
    assert kv_cache_bytes(latent.shape, latent.layout, 4096) == 144 * MIB  # 32 x 4096 x (512 + 64) x 2 bytes
    assert PLM_1_8B_Q4KM.as_latent() is None  # no MLA metadata: nothing to offer


def test_memory_refusal_offers_the_latent_layout_when_it_fits():
    pi4 = recorded_facts("rpi4")
    with pytest.raises(DeviceError) as err:
        checks.check_memory(PLM_1_8B_Q4KM_MLA, 4096, pi4, headroom_mib=1024)
    assert "--kv-cache latent" in err.value.hint and "144 MiB instead of 1280 MiB" in err.value.hint
    assert checks.plan_memory(PLM_1_8B_Q4KM_MLA.as_latent(), 4096, pi4, 1024).fits
    with pytest.raises(DeviceError) as err:  # a stock build cannot run it: not offered
        checks.check_memory(PLM_1_8B_Q4KM_MLA, 4096, pi4, headroom_mib=1024, latent_runs=False)
    assert "--kv-cache latent" not in err.value.hint and "--ctx" in err.value.hint


def test_latent_file_needs_the_patched_build():
    latent = PLM_1_8B_Q4KM_MLA.as_latent()
    checks.check_layout(latent, mla_patch=True)
    checks.check_layout(PLM_1_8B_Q4KM_MLA, mla_patch=False)
    with pytest.raises(DeviceError, match="latent KV-cache layout") as err:
        checks.check_layout(latent, mla_patch=False)
    assert "--no-mla-patch" in err.value.hint
    with pytest.raises(DeviceError, match="latent KV-cache layout"):  # preflight refuses before building
        preflight(load_profile("rpi5"), recorded_facts("rpi5"), latent, 4096, mla_patch=False)


def test_flash_attention_auto_is_on_for_latent_files_and_refused_for_stock_ones():
    latent = PLM_1_8B_Q4KM_MLA.as_latent()
    assert checks.resolve_flash_attn(latent, "auto") is True
    assert checks.resolve_flash_attn(latent, "auto", mla_patch=False) is False  # (a stock build refuses the file)
    assert checks.resolve_flash_attn(latent, "off") is False
    assert checks.resolve_flash_attn(PLM_1_8B_Q4KM, "auto") is False
    assert checks.resolve_flash_attn(PLM_1_8B_Q4KM, "off") is False
    with pytest.raises(DeviceError, match="flash attention aborts llama.cpp on plm-1.8b-q4_k_m.gguf") as err:
        checks.resolve_flash_attn(PLM_1_8B_Q4KM, "on")
    assert "--kv-cache latent" in err.value.hint
    with pytest.raises(UsageError, match="--flash-attn 'yes' is not one of auto, on, off"):
        checks.resolve_flash_attn(latent, "yes")
    with pytest.raises(DeviceError, match="flash attention aborts"):  # preflight refuses before building
        preflight(load_profile("rpi5"), recorded_facts("rpi5"), PLM_1_8B_Q4KM, 4096, flash_attn="on")
    _, plan, _ = preflight(load_profile("rpi5"), recorded_facts("rpi5"), latent, 4096)
    assert plan.flash_attn and "(flash attention)" in plan.describe()


def test_memory_plan_shows_small_caches_to_a_tenth_of_a_mib():
    plan = checks.MemoryPlan(512, 37 * MIB, 557_056, 29 * MIB, 512 * MIB, 20_000 * MIB)
    assert "KV cache 0.5 MiB at ctx 512" in plan.describe() and "headroom 512 MiB" in plan.describe()


def test_flash_attention_keeps_no_score_matrix_in_the_compute_buffer():
    latent = PLM_1_8B_Q4KM_MLA.as_latent()
    scores = 4096 * checks.UBATCH * 16 * 4  # KQ [ctx, ubatch, n_head] in f32: 128 MiB at ctx 4096
    assert scores == 128 * MIB
    assert compute_bytes(latent.shape, latent.layout, 4096) - compute_bytes(latent.shape, latent.layout, 4096, flash_attn=True) == scores
    # with flash attention only the expanded prompt batches (patch 0004) grow with the context: 32 KiB per token
    grows = compute_bytes(latent.shape, latent.layout, 4096, flash_attn=True) - \
        compute_bytes(latent.shape, latent.layout, 512, flash_attn=True)
    assert grows == (4096 - 512) * 32 * 1024
    stock = PLM_1_8B_Q4KM
    assert compute_bytes(stock.shape, stock.layout, 512, flash_attn=True) == \
        compute_bytes(stock.shape, stock.layout, 4096, flash_attn=True)


def test_a_quantized_cache_is_planned_and_needs_flash_attention():
    latent = PLM_1_8B_Q4KM_MLA.as_latent()
    f16 = checks.plan_memory(latent, 4096, recorded_facts("rpi5"), 384, flash_attn=True)
    q8 = checks.plan_memory(latent, 4096, recorded_facts("rpi5"), 384, flash_attn=True, cache_type="q8_0")
    assert f16.kv_cache == 144 * MIB and q8.kv_cache == 144 * MIB * 34 // 64  # 34 bytes per 32 values
    assert "KV cache (q8_0) 76 MiB" in q8.describe()  # 76.5
    checks.check_cache_type(latent, "q8_0", flash_attn=True)
    with pytest.raises(DeviceError, match="stock-layout") as err:
        checks.check_cache_type(PLM_1_8B_Q4KM, "q8_0", flash_attn=False)
    assert "--kv-cache latent" in err.value.hint
    with pytest.raises(DeviceError, match="--flash-attn is off"):
        checks.check_cache_type(latent, "q4_0", flash_attn=False)
    with pytest.raises(UsageError, match="not a KV-cache type"):
        checks.check_cache_type(latent, "q3_k", flash_attn=True)
    checks.check_cache_type(PLM_1_8B_Q4KM, "f32", flash_attn=False)
