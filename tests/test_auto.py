"""The recipe search (quantize --auto) on the trained fixture: its groups, its knapsack, the TOML
it writes, and the mixes it finds measured against the stock types by llama.cpp."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from plm_gguf.convert.quantize import quantize_file
from plm_gguf.convert.writer import convert
from plm_gguf.ggufinfo import read_gguf_info
from plm_gguf.quant_eval import auto
from plm_gguf.quant_eval.recipes import Recipe, load_recipes

from .conftest import assert_clean_error, run_cli

TRAINED = Path(__file__).parent / "data" / "trained-plm"
CTX = 256


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    root = Path(__file__).parent.parent / "quant_eval"
    path.write_text("".join(p.read_text() for p in sorted(root.glob("*.py"))[:3]))
    return path


@pytest.mark.parametrize("layout", ["full", "latent"])
def test_groups_cover_every_quantizable_tensor_once(tmp_path, layout):
    convert(TRAINED, tmp_path / "b.gguf", "bf16", kv_cache=layout)
    tensors = read_gguf_info(tmp_path / "b.gguf").tensors
    groups = auto.tensor_groups(tensors, 4, bands=2)
    covered = [name for g in groups for name in g.tensors]
    assert len(covered) == len(set(covered))
    searchable = {t.name for t in tensors.values() if len(t.shape) >= 2 and t.shape[-1] % 32 == 0}
    assert set(covered) == searchable
    for g in groups:  # each override pattern names exactly its group's tensors
        assert {n for n in tensors if re.search(g.pattern, n)} == set(g.tensors)
        assert g.n_elements == sum(tensors[n].n_elements for n in g.tensors)
        assert g.ladder == auto.ladder_for(tensors[g.tensors[0]].shape[-1])
    names = {g.name for g in groups}
    assert {"token_embd", "ffn_down.0-1", "ffn_down.2-3"} <= names
    if layout == "latent":  # k_b's rows are qk_nope = 48 wide: no ggml block fits, llama.cpp keeps f16
        assert not any("attn_k_b" in n for n in covered) and any("attn_v_b" in n for n in covered)


def _toy(n_groups: int, seed: int) -> auto.Model:
    rng = np.random.default_rng(seed)
    groups, errors, probe = [], {}, {}
    for i in range(n_groups):
        ladder = auto.LADDER_K if i % 3 else auto.LADDER_32
        g = auto.Group(f"g{i}", f"^g{i}$", (f"g{i}",), 256 * int(rng.integers(1, 40)), ladder)
        steps = np.cumsum(rng.uniform(0.1, 4.0, len(ladder)))  # error grows down the ladder
        errors[g.name] = dict(zip(ladder, steps.tolist()))
        probe[g.name] = 0.01 + float(rng.uniform(0, 0.2))
        groups.append(g)
    return auto.Model(groups, 0.001, probe, errors)


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_finds_the_best_mix_under_the_budget(seed):
    model = _toy(5, seed)
    groups = model.groups
    smallest = sum(g.nbytes(g.ladder[-1]) for g in groups)
    largest = sum(g.nbytes(g.ladder[0]) for g in groups)
    budget = int(smallest + (largest - smallest) * (0.2 + 0.12 * seed))
    steps = 2000
    choice = auto.choose(model, budget, steps=steps)
    assert auto.choice_bytes(groups, choice) <= budget

    def best_under(limit: int) -> float:
        best = np.inf
        for kinds in itertools.product(*(g.ladder for g in groups)):
            c = dict(zip((g.name for g in groups), kinds))
            if auto.choice_bytes(groups, c) <= limit:
                best = min(best, model.predict(c))
        return best

    # exact up to the rounding of each group's bytes to a step (at most one step per group)
    slack = len(groups) * -(-budget // steps)
    assert best_under(budget) <= model.predict(choice) + 1e-12
    assert model.predict(choice) <= best_under(budget - slack) + 1e-12
    assert auto.choose(model, smallest - 1) is None


def test_rising_budget_never_predicts_worse():
    model = _toy(8, 42)
    predictions = [model.predict(auto.choose(model, budget)) for budget in range(40_000, 160_000, 10_000)]
    assert all(b <= a + 1e-12 for a, b in zip(predictions, predictions[1:]))


def test_recipe_toml_reads_back(tmp_path):
    recipes = [Recipe("auto-q4_k_m", "q4_k_m", {r"^blk\.(0|1)\.ffn_up\.weight$": "q5_k", r"^token_embd\.weight$":
                                                "q6_k"}, True, 'found "here", é'),
               Recipe("plain", "q8_0")]
    path = tmp_path / "r.toml"
    path.write_text(auto.recipe_toml(recipes))
    assert load_recipes(path) == recipes


@pytest.fixture(scope="module")
def searched(tmp_path_factory, text) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("auto") / "s"
    result = run_cli("quantize", TRAINED, "--sweep", "--auto", "--types", "q4_k_m,q6_k", "--ctx", str(CTX),
                     "--text", text, "--out", out, timeout=1800)  # about 2 min alone; a busy machine takes longer
    return out, result


@pytest.mark.slow
def test_auto_mixes_beat_the_stock_types_at_their_size(searched):
    out, result = searched
    assert result.code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    for stock in ("q4_k_m", "q6_k"):
        mix = rows[f"auto-{stock}"]
        assert mix["status"] == "ok" and mix["imatrix"] and mix["auto"]["stock"] == stock
        assert 0.99 * rows[stock]["file_bytes"] <= mix["file_bytes"] <= rows[stock]["file_bytes"]
        assert mix["kl_mean"] < rows[stock]["kl_mean"]
        assert abs(mix["file_bytes"] - mix["auto"]["predicted_bytes"]) <= 4096  # sizes predicted to the padding
        assert mix["kl_mean"] == pytest.approx(mix["auto"]["predicted_kl"], rel=0.5)
    search = report["auto_search"]
    assert search["probes"] == search["groups"] + 1 and search["seconds"] > 0
    assert max(search["sensitivity"], key=search["sensitivity"].get) == "token_embd"  # the tied output head
    assert "search:" in result.stdout and "auto-q4_k_m" in result.stdout
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_recipe_file_makes_the_same_file_again(searched, tmp_path):
    out, _ = searched
    recipes = {r.name: r for r in load_recipes(out / "auto-recipes.toml")}
    assert set(recipes) == {"auto-q4_k_m", "auto-q6_k"}
    recipe = recipes["auto-q4_k_m"]
    base = next(out.glob("base-*.gguf"))
    quantize_file(base, tmp_path / "again.gguf", recipe.base, overrides=recipe.override_types(),
                  imatrix=out / "imatrix.npz")
    assert (tmp_path / "again.gguf").read_bytes() == (out / "models" / "auto-q4_k_m.gguf").read_bytes()


@pytest.mark.slow
def test_auto_for_a_memory_budget(searched, text):
    out, _ = searched
    rows = json.loads((out / "report.json").read_text())["rows"]
    budget = round(rows["q4_k_m"]["memory_mib"], 2)
    result = run_cli("quantize", TRAINED, "--auto", "--budget-mb", str(budget), "--ctx", str(CTX), "--text", text,
                     "--out", out, timeout=1800)
    assert result.code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    name = f"auto-{budget:g}mb".replace(".", "_")
    mix = report["rows"][name]
    assert mix["memory_mib"] <= budget and mix["kl_mean"] < rows["q4_k_m"]["kl_mean"]
    assert report["recommendation"]["recipe"] in {name, "auto-q4_k_m"}
    assert "search:" in result.stdout and "search: probe" not in result.stdout  # the probes were kept
    assert_clean_error(run_cli("quantize", TRAINED, "--auto", "--ctx", str(CTX), "--text", text, "--out", out),
                       "--auto needs a budget")
    assert_clean_error(run_cli("quantize", TRAINED, "--auto", "--type", "q4_k_m"), "--auto does nothing with --type")
    assert_clean_error(run_cli("quantize", TRAINED, "--auto", "--budget-mb", "1", "--ctx", str(CTX), "--text", text,
                               "--out", out), "the smallest mix")
