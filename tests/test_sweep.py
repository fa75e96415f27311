"""The quantization sweep on the trained fixture (tests/data/trained-plm): invariants that must
hold of real measurements, resuming, failures, and the report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from plm_gguf.errors import InputError
from plm_gguf.quant_eval.recipes import Recipe, load_recipes, stock_recipes
from plm_gguf.quant_eval.report import pareto_front
from plm_gguf.quant_eval.sweep import SweepOptions, _score, recommend, run_sweep

from .conftest import assert_clean_error, run_cli

TRAINED = Path(__file__).parent / "data" / "trained-plm"
CTX = 256


def _options(out: Path, recipes: list[Recipe], **kw) -> SweepOptions:
    text = "".join(sorted((Path(__file__).parent.parent / "quant_eval").glob("*.py"))[i].read_text() for i in range(3))
    return SweepOptions(out=out, recipes=recipes, text=text, text_source="plm-gguf source", ctx=CTX, **kw)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    recipes = stock_recipes(["q8_0", "q4_0", "q2_k"]) + [
        Recipe("q4_0+mla8", "q4_0", {r"attn_kv_a_mqa\.weight": "q8_0", r"attn_kv_b\.weight": "q8_0"}),
        Recipe("broken", "q4_0", {r"ffn_up\.weight": "iq2_xxs"}, imatrix=False),  # llama.cpp refuses: no imatrix
    ]
    run_sweep(str(TRAINED), _options(out, recipes, budget_mib=64.0, budget_source="test"))
    return out


@pytest.mark.slow
def test_sweep_invariants_on_the_trained_model(sweep_dir):
    report = json.loads((sweep_dir / "report.json").read_text())
    rows = report["rows"]
    assert report["base_info"]["verified"] is True
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert set(ok) == {"q8_0", "q4_0", "q2_k", "q4_0+mla8"}
    # accuracy falls with bits, size falls with bits
    assert 0 < ok["q8_0"]["kl_mean"] < ok["q4_0"]["kl_mean"] < ok["q2_k"]["kl_mean"]
    assert ok["q8_0"]["file_bytes"] > ok["q4_0"]["file_bytes"] > ok["q2_k"]["file_bytes"]
    assert ok["q8_0"]["bpw"] > ok["q4_0"]["bpw"] > ok["q2_k"]["bpw"]
    assert ok["q8_0"]["top1"] > ok["q2_k"]["top1"]
    for r in ok.values():
        # the KV cache our model of llama.cpp predicts is the one llama.cpp allocates
        assert r["kv_mib"] == pytest.approx(r["kv_mib_expected"], abs=0.01)
        assert r["kl_median"] <= r["kl_mean"] * 2 and r["kl_p99"] <= r["kl_max"]
        assert r["peak_rss_bytes"] > r["file_bytes"] and r["prompt_tps"] > 0 and r["gen_tps"] > 0
    assert ok["q2_k"]["imatrix"] and not ok["q4_0"]["imatrix"]
    assert ok["q4_0+mla8"]["types"]["attn_kv_b"] == ["Q8_0"] and ok["q4_0"]["types"]["attn_kv_b"] == ["Q4_0"]
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"]
    rec = report["recommendation"]
    assert rec["recipe"] == min((r for r in ok.values() if r["memory_mib"] <= 64), key=lambda r: r["kl_mean"])["recipe"]
    peaks = report["peak_rss_bytes"]  # users see what the sweep needed: its torch passes and llama.cpp's workers
    assert 0 < peaks["reference_and_imatrix"] <= peaks["plm_gguf"] and peaks["llama_cpp"] >= ok["q8_0"]["peak_rss_bytes"]


@pytest.mark.slow
def test_reference_against_itself_is_exact(sweep_dir):
    from plm_gguf.quant_eval.sweep import Sweep
    from plm_gguf.schema import config_from_gguf

    report = json.loads((sweep_dir / "report.json").read_text())
    base = Path(report["base_info"]["gguf"])
    sweep = Sweep(_options(sweep_dir, []), base, config_from_gguf(base), report)
    tokens = json.loads((sweep_dir / "tokens.json").read_text())
    same = _score(sweep, base, tokens, "compare")
    # the reference log-probs are stored as float32: that rounding is the only difference left
    assert same["top1"] == 1.0 and same["kl_mean"] < 1e-7 and same["kl_max"] < 1e-6, same


@pytest.mark.slow
def test_report_files(sweep_dir):
    with open(sweep_dir / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["recipe"] for r in rows] == ["q8_0", "q4_0", "q2_k", "q4_0+mla8", "broken"]
    assert rows[4]["status"] == "failed" and float(rows[0]["kl_mean"]) < float(rows[2]["kl_mean"])
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_resumes_and_measures_only_what_is_new(sweep_dir):
    events = []
    recipes = stock_recipes(["q8_0", "q4_0", "q5_0"])
    before = json.loads((sweep_dir / "report.json").read_text())["rows"]["q8_0"]
    run_sweep(str(TRAINED), _options(sweep_dir, recipes), on_event=lambda kind, data: events.append((kind, data)))
    skipped = [d["recipe"] for k, d in events if k == "skip"]
    measured = [d["recipe"] for k, d in events if k == "start"]
    assert skipped == ["q8_0", "q4_0"] and measured == ["q5_0"]
    assert not any(k == "reference" for k, _ in events)
    after = json.loads((sweep_dir / "report.json").read_text())["rows"]
    assert after["q8_0"] == before and after["q5_0"]["status"] == "ok"


@pytest.mark.slow
def test_sweep_command(tmp_path):
    result = run_cli("quantize", TRAINED, "--sweep", "--types", "q8_0,q4_k_m", "--ctx", str(CTX),
                     "--out", tmp_path / "s", "--budget-mb", "1", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "q4_k_m" in result.stdout and "no recipe fits" in result.stdout and "peak memory:" in result.stdout
    assert {"report.json", "report.csv", "pareto.png"} <= {p.name for p in (tmp_path / "s").iterdir()}


def test_quantize_one_file(tmp_path):
    from plm_gguf.convert.mla import is_latent
    from plm_gguf.quant_eval.sweep import file_facts

    result = run_cli("quantize", TRAINED, "--type", "q4_k_m", "--outfile", tmp_path / "q.gguf")
    assert result.code == 0, result.stderr
    facts = file_facts(tmp_path / "q.gguf")
    assert 4.5 < facts["bpw"] < 6.5 and facts["types"]["ffn_up"] == ["Q4_K"]
    result = run_cli("quantize", TRAINED, "--type", "q4_k_m", "--kv-cache", "latent", "--outfile", tmp_path / "l.gguf")
    assert result.code == 0, result.stderr
    assert is_latent(tmp_path / "l.gguf") and "attn_v_b" in file_facts(tmp_path / "l.gguf")["types"]
    assert_clean_error(run_cli("quantize", TRAINED, "--type", "q4_k_m", "--kv-cache", "mla", "--outfile",
                               tmp_path / "x.gguf"), "--kv-cache 'mla' is not a layout")
    assert_clean_error(run_cli("quantize", tmp_path / "l.gguf", "--type", "q4_0", "--kv-cache", "full", "--outfile",
                               tmp_path / "x.gguf"), "has the latent KV-cache layout")
    assert not (tmp_path / "x.gguf").exists()


def test_default_recipes_and_validation(tmp_path):
    recipes = load_recipes()
    names = [r.name for r in recipes]
    assert len(recipes) >= 14 and {"q8_0", "q4_k_m", "q2_k", "iq4_nl", "q4_k_m+mla8"} <= set(names)
    assert all(r.uses_imatrix for r in recipes if r.base.startswith(("iq", "q2_k", "q3_k")))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[recipe]]\nname = "x"\nbase = "q4_k_m"\noverrides = { "attn_q" = "q9_z" }\n')
    with pytest.raises(InputError, match="unknown tensor type"):
        load_recipes(bad)
    bad.write_text('[[recipe]]\nname = "x"\nbase = "f16"\n')
    with pytest.raises(InputError, match="not a quantized"):
        load_recipes(bad)
    assert_clean_error(run_cli("quantize", TRAINED, "--sweep", "--recipes", bad), "not a quantized")
    assert_clean_error(run_cli("quantize", TRAINED), "--type TYPE or --sweep")


def test_pareto_and_recommendation_logic():
    rows = [
        {"recipe": "a", "status": "ok", "file_bytes": 100, "kl_mean": 0.01, "memory_mib": 300},
        {"recipe": "b", "status": "ok", "file_bytes": 60, "kl_mean": 0.05, "memory_mib": 200},
        {"recipe": "c", "status": "ok", "file_bytes": 70, "kl_mean": 0.08, "memory_mib": 210},
        {"recipe": "d", "status": "failed"},
    ]
    assert pareto_front(rows) == ["b", "a"]
    assert recommend(rows, 250, "t")["recipe"] == "b"
    assert recommend(rows, 1000, "t")["recipe"] == "a"
    assert recommend(rows, 100, "t")["recipe"] is None


@pytest.mark.slow
def test_sweep_of_the_latent_layout(tmp_path):
    """--kv-cache latent: the base converted in the absorbed-MLA layout and verified on the patched
    llama.cpp; the MLA mixes reach attn_k_b/attn_v_b; the importance matrix has their per-head
    slices (llama.cpp refuses a wrongly sized one); an override naming no tensor is reported."""
    from plm_gguf.convert.mla import is_latent

    recipes = stock_recipes(["q8_0", "q2_k"]) + [
        Recipe("q4_0+mla8", "q4_0", {r"attn_kv_a_mqa\.weight": "q8_0", r"attn_(kv_b|k_b|v_b)\.weight": "q8_0"}),
        Recipe("q4_0+stale", "q4_0", {r"attn_kv_b\.weight": "q8_0"}),
    ]
    events = []
    sweep = run_sweep(str(TRAINED), _options(tmp_path / "s", recipes, kv_cache="latent"),
                      on_event=lambda kind, data: events.append((kind, data)))
    report = sweep.report
    assert is_latent(sweep.base) and report["base_info"]["verified"] is True and report["kv_cache"] == "latent"
    rows = report["rows"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["q8_0"]["kl_mean"] < rows["q2_k"]["kl_mean"] and rows["q2_k"]["imatrix"]
    # the mix reaches the latent layout's tensors (the stale pattern does not: that row is plain q4_0)
    assert rows["q4_0+mla8"]["types"]["attn_v_b"] == ["Q8_0"] and rows["q4_0+stale"]["types"]["attn_v_b"] == ["Q4_0"]
    assert rows["q4_0+mla8"]["types"]["attn_kv_a_mqa"] == ["Q8_0"]
    # attn_k_b rows are qk_nope = 48 wide here: no 32-block type fits, llama.cpp keeps them F16
    # (PLM-1.8B's are 128 wide: Q8_0 fits there, K-quants fall back)
    assert rows["q4_0+mla8"]["types"]["attn_k_b"] == rows["q4_0+stale"]["types"]["attn_k_b"] == ["F16"]
    assert "attn_kv_b" not in rows["q8_0"]["types"]
    assert rows["q4_0+stale"]["unmatched_overrides"] == [r"attn_kv_b\.weight"]
    assert ("unmatched", {"recipe": "q4_0+stale", "patterns": [r"attn_kv_b\.weight"]}) in events
    for r in rows.values():  # llama.cpp allocates the latent cache we count
        assert r["kv_mib"] == pytest.approx(r["kv_mib_expected"], abs=0.01)


def test_imatrix_has_the_latent_layouts_per_head_slices(tmp_path):
    import numpy as np

    from plm_gguf.checkpoint import Checkpoint
    from plm_gguf.quant_eval.imatrix import compute_imatrix
    from plm_gguf.reference import PLMForCausalLM

    model = PLMForCausalLM.from_checkpoint(Checkpoint(TRAINED))
    c = model.config
    tokens = list(range(300, 428))
    compute_imatrix(model, tokens, tmp_path / "full.npz", n_ctx=64)
    compute_imatrix(model, tokens, tmp_path / "latent.npz", n_ctx=64, latent=True)
    full, latent = np.load(tmp_path / "full.npz"), np.load(tmp_path / "latent.npz")
    assert "blk.0.attn_kv_b.weight" in full and "blk.0.attn_kv_b.weight" not in latent
    # llama.cpp wants ne0 * ne2 values for a 3D tensor: one slice per head
    v_b, k_b = latent["blk.0.attn_v_b.weight"], latent["blk.0.attn_k_b.weight"]
    assert v_b.shape == (c.kv_lora_rank * c.n_head,) and k_b.shape == (c.qk_nope_head_dim * c.n_head,)
    np.testing.assert_array_equal(v_b[: c.kv_lora_rank], full["blk.0.attn_kv_b.weight"])
    assert np.all(k_b > 0) and not np.allclose(k_b[: c.qk_nope_head_dim], k_b[c.qk_nope_head_dim: 2 * c.qk_nope_head_dim])


@pytest.mark.slow
def test_a_device_speed_replaces_this_cpus_and_is_measured_again_for_kept_rows(sweep_dir, tmp_path):
    """--device with a GPU here: each recipe's speed comes from the device (deploy.speed_here),
    and a rerun that keeps the measured rows measures only their speed there."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(sweep_dir, out)
    timed = []

    def speed(model: Path) -> tuple[float, float]:
        timed.append(model.name)
        return 1234.5, 67.8

    recipes = stock_recipes(["q8_0", "q4_0"])
    run_sweep(str(TRAINED), _options(out, recipes, budget_mib=64.0, budget_source="test", speed=speed,
                                     speed_on="test GPU (llama-bench, -ngl 999)"))
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert sorted(timed) == ["q4_0.gguf", "q8_0.gguf"]  # the kept rows: only their speed was measured
    for name in ("q8_0", "q4_0"):
        assert (rows[name]["prompt_tps"], rows[name]["gen_tps"]) == (1234.5, 67.8)
        assert rows[name]["speed_on"] == "test GPU (llama-bench, -ngl 999)"
    assert rows["q2_k"].get("speed_on", "") == ""  # not in this run: its CPU speed stays, and says so
