"""plm_gguf.memory: one KV-cache size, one layout detection, one memory plan, shared by convert,
`quantize --device` (the sweep's recommendation) and deploy (its refusal)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from plm_gguf.devices import checks
from plm_gguf.devices.deploy import preflight
from plm_gguf.devices.profiles import load_profile
from plm_gguf.errors import DeviceError, UsageError
from plm_gguf.memory import (MIB, KVLayout, MemoryTarget, ModelShape, default_ctx, kv_cache_bytes,
                             kv_values_per_token_layer, layout_of, parse_layout)
from plm_gguf.quant_eval.sweep import recommend
from plm_gguf.schema import PLMConfig, config_from_gguf

from .conftest import ODD_CONFIG, run_cli
from .devices.recorded import recorded_facts

# PLM-1.8B's config.json sizes
PLM_1_8B = PLMConfig(hidden_size=2048, num_hidden_layers=32, num_attention_heads=16, intermediate_size=8192,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=151936,
                     max_position_embeddings=4096)


def test_kv_cache_of_plm_1_8b_full_and_latent():
    shape = ModelShape.of_config(PLM_1_8B)
    assert kv_values_per_token_layer(shape, KVLayout.FULL) == 16 * (192 + 128) == 5120
    assert kv_values_per_token_layer(shape, KVLayout.LATENT) == 512 + 64 == 576
    assert round(5120 / 576, 1) == 8.9
    # f16 at n_ctx 4096: 768 MiB K + 512 MiB V, against 144 MiB of latent + rope key
    assert kv_cache_bytes(shape, KVLayout.FULL, 4096) == 1280 * MIB
    assert kv_cache_bytes(shape, KVLayout.LATENT, 4096) == 144 * MIB
    assert kv_cache_bytes(shape, KVLayout.FULL, 4096, bytes_per_value=4) == 2560 * MIB  # an f32 cache
    assert kv_cache_bytes(shape, "latent", 1) == 32 * 576 * 2  # a str layout is accepted too


def test_layout_is_parsed_once_from_the_option():
    assert parse_layout("full") is KVLayout.FULL and parse_layout("latent") is KVLayout.LATENT
    assert parse_layout(KVLayout.LATENT) is KVLayout.LATENT and parse_layout(None) is None
    assert KVLayout.LATENT == "latent" and f"{KVLayout.FULL}" == "full"
    with pytest.raises(UsageError, match="--kv-cache 'mla' is not a layout") as err:
        parse_layout("mla")
    assert "full" in err.value.hint and "latent" in err.value.hint


@pytest.fixture(scope="module")
def files(tmp_path_factory, odd_checkpoint) -> dict[str, Path]:
    from plm_gguf.convert.writer import convert

    root = tmp_path_factory.mktemp("memory-plan")
    return {"f32": convert(odd_checkpoint, root / "odd-f32.gguf", "f32").outfile,
            "f16": convert(odd_checkpoint, root / "odd-f16.gguf", "f16").outfile,
            "q8_0": convert(odd_checkpoint, root / "odd-q8_0.gguf", "q8_0").outfile,
            "latent": convert(odd_checkpoint, root / "odd-latent.gguf", "f32", kv_cache="latent").outfile}


def test_layout_and_shape_read_from_files_agree_with_the_config(files):
    """The sweep sizes the cache from the base file's config, deploy from each file's metadata:
    one shape and one layout either way."""
    assert layout_of(files["latent"]) is KVLayout.LATENT and layout_of(files["f32"]) is KVLayout.FULL
    for name, path in files.items():
        model = checks.read_model(path)
        assert model.layout is layout_of(path) and model.latent == (name == "latent")
        assert model.shape == ModelShape.of_config(config_from_gguf(path)) == ModelShape.of_config(ODD_CONFIG)
    stock, latent = checks.read_model(files["f32"]), checks.read_model(files["latent"])
    assert stock.as_latent() == replace(stock, layout=KVLayout.LATENT)  # what `convert --kv-cache latent` writes
    c = ODD_CONFIG  # 5 heads x (18 + 20) values against latent 24 + rope 6, per token and layer
    assert kv_cache_bytes(latent.shape, latent.layout, 1024) == 3 * 1024 * (24 + 6) * 2
    assert kv_cache_bytes(stock.shape, stock.layout, 1024) == 3 * 1024 * c.n_head * (18 + 20) * 2


def _rows(files: dict[str, Path]) -> list[dict]:
    """Sweep rows as _measure writes them; memory_mib as measured at a short --ctx (small)."""
    kl = {"f32": 0.0001, "f16": 0.0002, "q8_0": 0.001}
    return [{"recipe": name, "status": "ok", "file_bytes": files[name].stat().st_size, "kl_mean": kl[name],
             "memory_mib": files[name].stat().st_size / MIB + 1.0} for name in kl] + [{"recipe": "x", "status": "failed"}]


@pytest.mark.parametrize("profile_ctx", [4096, 256])
def test_the_sweep_never_recommends_what_deploy_refuses(files, profile_ctx):
    profile = replace(load_profile("rpi5"), ctx=profile_ctx)
    facts = recorded_facts("rpi5")
    shape = ModelShape.of_config(config_from_gguf(files["f32"]))
    # MemAvailable between what q8_0 and f32 need at the profile's ctx (capped at training length)
    probe = MemoryTarget(available=0, headroom_mib=profile.headroom_mib, ctx=profile.ctx)
    need = {n: probe.plan(shape, KVLayout.FULL, files[n].stat().st_size).needed for n in ("q8_0", "f16", "f32")}
    assert need["q8_0"] < need["f16"] < need["f32"]
    facts = replace(facts, mem_available=(need["q8_0"] + need["f16"]) // 2)
    target = MemoryTarget(available=facts.mem_available, headroom_mib=profile.headroom_mib, ctx=profile.ctx,
                          source="rpi5 (recorded)")
    rows = _rows(files)
    rec = recommend(rows, target.budget_mib, target.source, target, shape, KVLayout.FULL, ctx=256)
    assert rec["recipe"] == "q8_0" and rec["ctx"] == default_ctx(profile_ctx, ODD_CONFIG.max_position_embeddings)
    assert f"ctx {rec['ctx']}" in rec["basis"] and f"at ctx {rec['ctx']}" in rec["plan"]
    # the memory measured at the sweep's short --ctx says every file fits: the old recommendation (f32)
    assert all(r["memory_mib"] <= target.budget_mib for r in rows if r["status"] == "ok")
    # deploy, with the same profile and facts, accepts the recommended file ...
    ctx, plan, _ = preflight(profile, facts, checks.read_model(files[rec["recipe"]]), None)
    assert plan.fits and ctx == rec["ctx"] and plan.describe() == rec["plan"]
    # ... and refuses each file the plan says does not fit
    for name in ("f16", "f32"):
        with pytest.raises(DeviceError, match="does not fit"):
            preflight(profile, facts, checks.read_model(files[name]), None)
    # nothing fits: none recommended, and deploy refuses the smallest
    poor = replace(facts, mem_available=need["q8_0"] - 1)
    target = replace(target, available=poor.mem_available)
    rec = recommend(rows, target.budget_mib, target.source, target, shape, KVLayout.FULL)
    assert rec["recipe"] is None and "q8_0" in rec["reason"]
    with pytest.raises(DeviceError, match="does not fit"):
        preflight(profile, poor, checks.read_model(files["q8_0"]), None)


def test_latent_files_are_planned_with_flash_attention_as_deploy_runs_them(files):
    profile, facts = load_profile("rpi5"), recorded_facts("rpi5")
    model = checks.read_model(files["latent"])
    target = MemoryTarget(available=facts.mem_available, headroom_mib=profile.headroom_mib, ctx=profile.ctx)
    planned = target.plan(model.shape, KVLayout.LATENT, model.size)
    _, plan, _ = preflight(profile, facts, model, None)
    assert plan == planned and plan.flash_attn


def test_budget_mb_keeps_the_measured_memory_and_names_its_ctx():
    rows = [{"recipe": "a", "status": "ok", "file_bytes": 100, "kl_mean": 0.01, "memory_mib": 300},
            {"recipe": "b", "status": "ok", "file_bytes": 60, "kl_mean": 0.05, "memory_mib": 200}]
    rec = recommend(rows, 250, "--budget-mb 250", ctx=512)
    assert rec["recipe"] == "b" and rec["ctx"] == 512 and "--ctx 512" in rec["basis"]


def test_device_options_belong_to_the_sweep(tmp_path):
    result = run_cli("quantize", tmp_path, "--type", "q4_0", "--profile", tmp_path / "p.toml")
    assert result.code == 2 and "--profile does nothing with --type" in result.stderr
    result = run_cli("quantize", tmp_path, "--sweep", "--address", "pi@pi5")
    assert result.code == 2 and "--address needs --device or --profile" in result.stderr
    result = run_cli("quantize", tmp_path, "--sweep", "--budget-mb", "100", "--profile", tmp_path / "p.toml")
    assert result.code == 2 and "--budget-mb or --device, not both" in result.stderr
