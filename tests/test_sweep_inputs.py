"""Broken and hostile input to `plm-gguf quantize`: one clean error before any work, nothing
lost, nothing left behind, nothing written outside --out; a rerun with other inputs never reports
the old numbers under the new name.

The sweeps run from a bf16 GGUF of the trained fixture (no verification step), one recipe,
--ctx 64 and one thread: a few seconds each."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from plm_gguf.errors import InputError, OutputError, UsageError
from plm_gguf.quant_eval.recipes import load_recipes
from plm_gguf.quant_eval.scoring import MIN_CTX

from .conftest import assert_clean_error, run_cli

TRAINED = Path(__file__).parent / "data" / "trained-plm"
CORPUS = (Path(__file__).parent.parent / "quant_eval" / "corpus" / "default.txt").read_text(encoding="utf-8")
CTX = str(MIN_CTX)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from plm_gguf.convert.writer import convert

    return convert(TRAINED, tmp_path_factory.mktemp("base") / "trained-BF16.gguf", "bf16").outfile


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    """Two different evaluation texts of a few hundred tokens."""
    folder = tmp_path_factory.mktemp("texts")
    (folder / "first.txt").write_text(CORPUS[:2500], encoding="utf-8")
    (folder / "second.txt").write_text(CORPUS[2500:4000], encoding="utf-8")
    return folder / "first.txt", folder / "second.txt"


@pytest.fixture(scope="module")
def measured(base, texts, tmp_path_factory) -> Path:
    """A finished sweep of q8_0 on the first text; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("measured") / "s"
    result = _sweep(base, out, texts[0])
    assert result.code == 0, result.stderr
    return out


def _sweep(base: Path, out: Path, text: Path, *extra: str | os.PathLike):
    return run_cli("quantize", base, "--sweep", "--types", "q8_0", "--ctx", CTX, "--threads", "1", "--text", text,
                   "--out", out, *extra, cwd=out.parent)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under FOLDER (symbolic links as such) and a hash of its bytes."""
    return {str(p.relative_to(folder)): "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def _copy(measured: Path, tmp_path: Path) -> Path:
    out = tmp_path / "s"
    shutil.copytree(measured, out)
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------- a rerun with other inputs


def test_rerun_with_another_text_is_refused_then_measured_again(base, texts, measured, tmp_path):
    out = _copy(measured, tmp_path)
    first, second = texts
    before = _snapshot(out)
    old = _report(out)
    old_tokens = json.loads((out / "tokens.json").read_text())

    refused = _sweep(base, out, second)
    assert_clean_error(refused, "holds the results of another text", str(first), str(second))
    assert refused.code == OutputError.exit_code
    assert _snapshot(out) == before  # nothing lost

    replaced = _sweep(base, out, second, "--force")
    assert replaced.code == 0, replaced.stderr
    assert "held results of another text" in replaced.stdout and "already measured" not in replaced.stdout
    new = _report(out)
    tokens = json.loads((out / "tokens.json").read_text())
    assert new["text"] == str(second) and new["text_sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()
    assert tokens != old_tokens and new["reference"]["n_chunks"] == len(tokens) // MIN_CTX
    assert new["reference"]["n_chunks"] != old["reference"]["n_chunks"]
    assert new["rows"]["q8_0"]["kl_mean"] != old["rows"]["q8_0"]["kl_mean"]
    key = json.loads((out / "sweep-key.json").read_text())
    assert key["text"] == new["text_sha256"] and key["ctx"] == MIN_CTX

    # the same text under another name: the same inputs, reused and reported under the new name
    renamed = tmp_path / "renamed.txt"
    shutil.copy(second, renamed)
    again = _sweep(base, out, renamed)
    assert again.code == 0, again.stderr
    assert "q8_0: already measured, kept" in again.stdout and "measuring the unquantized reference" not in again.stdout
    assert _report(out)["text"] == str(renamed) and _report(out)["rows"] == new["rows"]


def test_rerun_with_another_ctx_or_model_is_refused(base, texts, measured, tmp_path):
    out = _copy(measured, tmp_path)
    before = _snapshot(out)
    result = _sweep(base, out, texts[0], "--ctx", "128")  # the later --ctx wins
    assert_clean_error(result, "another --ctx (64, not 128)")
    model = tmp_path / "model.gguf"
    shutil.copy(base, model)
    result = _sweep(model, out, texts[0])
    assert_clean_error(result, "another model", str(base.resolve()), str(model.resolve()))
    assert result.code == OutputError.exit_code and _snapshot(out) == before


def test_corrupt_key_is_refused(base, texts, measured, tmp_path):
    out = _copy(measured, tmp_path)
    (out / "sweep-key.json").write_text("{not json")
    before = _snapshot(out)
    assert_clean_error(_sweep(base, out, texts[0]), "sweep-key.json is unreadable")
    assert _snapshot(out) == before


# ---------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "q4..x", "a b", "x" * 65, "", "-x", "x\\y"])
def test_unsafe_recipe_names_are_refused(tmp_path, name):
    recipes = tmp_path / "mine.toml"
    recipes.write_text(f'[[recipe]]\nname = {json.dumps(name)}\nbase = "q8_0"\n', encoding="utf-8")
    with pytest.raises(InputError, match="not a safe file name") as caught:
        load_recipes(recipes)
    assert str(recipes) in caught.value.message and repr(name) in caught.value.message


def test_recipe_that_would_leave_the_folder(base, texts, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    recipes = work / "evil.toml"
    recipes.write_text('[[recipe]]\nname = "../../x"\nbase = "q8_0"\n')
    before = _snapshot(tmp_path)
    result = run_cli("quantize", base, "--sweep", "--recipes", recipes, "--ctx", CTX, "--text", texts[0],
                     "--out", work / "s", cwd=work)
    assert_clean_error(result, str(recipes), "'../../x'", "not a safe file name")
    assert result.code == InputError.exit_code
    assert _snapshot(tmp_path) == before and not (work / "s").exists()


def test_a_link_out_of_the_folder_is_not_written_through(base, texts, measured, tmp_path):
    out = _copy(measured, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(out / "models" / "q8_0.gguf", elsewhere / "q8_0.gguf")
    (out / "models").rmdir()
    (out / "models").symlink_to(elsewhere)
    before, report = _snapshot(elsewhere), (out / "report.json").read_bytes()
    result = run_cli("quantize", base, "--sweep", "--types", "q8_0,q4_0", "--ctx", CTX, "--threads", "1",
                     "--text", texts[0], "--out", out, cwd=tmp_path)
    assert_clean_error(result, "outside the sweep folder")
    assert result.code == OutputError.exit_code
    assert _snapshot(elsewhere) == before and (out / "report.json").read_bytes() == report


def test_out_that_is_a_file_or_another_folder(base, texts, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert_clean_error(_sweep(base, notes, texts[0]), "is a file, not a folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.csv").write_text("mine")
    result = _sweep(base, mine, texts[0])
    assert_clean_error(result, "holds other files and is not a sweep folder")
    assert result.code == OutputError.exit_code
    assert notes.read_text() == "mine" and _snapshot(mine) == {"report.csv": hashlib.sha256(b"mine").hexdigest()}


# ---------------------------------------------------------------- options, before any work


@pytest.mark.parametrize("extra, needles", [
    (["--ctx", "0"], ["--ctx 0 is out of range", f"from {MIN_CTX}", "to 512 (the model's context length)"]),
    (["--ctx", str(MIN_CTX - 1)], [f"--ctx {MIN_CTX - 1} is out of range"]),
    (["--ctx", "513"], ["--ctx 513 is out of range"]),
    (["--threads", "0"], ["--threads 0 is out of range"]),
    (["--threads", "100000"], ["--threads 100000 is out of range", "512"]),
    (["--budget-mb", "-1"], ["--budget-mb -1 is not a positive amount"]),
    (["--budget-mb", "nan"], ["--budget-mb nan is not a positive amount"]),
    (["--budget-mb", "100", "--device", "host"], ["--budget-mb or --device, not both"]),
    (["--types", ","], ["--types names no type"]),
    (["--types", "q8_0,Q8_0"], ["names recipe 'q8_0' twice"]),
    (["--types", "q8_0,f16"], ["'f16' is not a quantized llama.cpp type"]),
    (["--outfile", "x.gguf"], ["--outfile does nothing with --sweep"]),
])
def test_bad_sweep_options(base, texts, tmp_path, extra, needles):
    result = run_cli("quantize", base, "--sweep", "--ctx", CTX, "--text", texts[0], "--out", tmp_path / "s", *extra,
                     cwd=tmp_path)
    assert_clean_error(result, *needles)
    assert result.code == UsageError.exit_code and _snapshot(tmp_path) == {}


@pytest.mark.parametrize("extra, needles", [
    (["--threads", "0"], ["--threads 0 is out of range"]),
    (["--out", "s"], ["--out does nothing with --type"]),
    (["--budget-mb", "10"], ["--budget-mb does nothing with --type"]),
])
def test_bad_type_options(base, tmp_path, extra, needles):
    result = run_cli("quantize", base, "--type", "q4_0", "--outfile", tmp_path / "q.gguf", *extra, cwd=tmp_path)
    assert_clean_error(result, *needles)
    assert result.code == UsageError.exit_code and _snapshot(tmp_path) == {}


# ---------------------------------------------------------------- the text


def _text_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "input" / f"{kind}.txt"
    path.parent.mkdir(exist_ok=True)
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would wait for ever
    elif kind != "missing":
        path.write_bytes({"latin1": "café au lait ".encode("latin-1") * 20, "nul": b"text\0" * 40,
                          "blank": b" \n\t\n", "bytes": b"too short"}[kind])
    return path


@pytest.mark.parametrize("kind, needles", [
    ("missing", ["does not exist"]),
    ("folder", ["is a folder"]),
    ("fifo", ["is not a regular file"]),
    ("latin1", ["is not UTF-8 text", "byte 0xe9 at offset 3"]),
    ("nul", ["holds NUL bytes"]),
    ("blank", ["is empty"]),
    ("bytes", ["is 9 bytes: fewer than the 64 tokens one --ctx 64 chunk needs"]),
])
def test_bad_text(base, tmp_path, kind, needles):
    text = _text_file(tmp_path, kind)
    before = _snapshot(tmp_path)
    result = _sweep(base, tmp_path / "s", text)
    assert_clean_error(result, str(text), *needles)
    assert result.code == UsageError.exit_code and _snapshot(tmp_path) == before and not (tmp_path / "s").exists()


def test_text_with_too_few_tokens(base, tmp_path):
    """Long enough in bytes, too short in tokens: found only once tokenized, after the folder
    was made; the error says how many tokens were found and needed, and the folder goes again."""
    text = tmp_path / "words.txt"
    text.write_text(" ".join(["the"] * 60))  # 239 bytes, one token a word
    out = tmp_path / "new" / "s"
    result = run_cli("quantize", base, "--sweep", "--types", "q8_0", "--ctx", "200", "--threads", "1",
                     "--text", text, "--out", out, cwd=tmp_path)
    assert_clean_error(result, str(text), "has 60 tokens: one --ctx 200 chunk needs 200")
    assert result.code == UsageError.exit_code and not (tmp_path / "new").exists()


def test_reference_too_large_for_the_disk(base, texts, tmp_path, monkeypatch):
    from plm_gguf.quant_eval import sweep as sw

    monkeypatch.setattr(sw.shutil, "disk_usage", lambda _path: SimpleNamespace(total=2**30, used=2**30 - 4096, free=4096))
    options = sw.SweepOptions(out=tmp_path / "s", recipes=load_recipes()[:1], text=texts[0].read_text(),
                              text_source="first", ctx=MIN_CTX, threads=1)
    with pytest.raises(OutputError, match="the reference log-probabilities of .* tokens need"):
        sw.run_sweep(str(base), options)
    assert not (tmp_path / "s").exists()


def test_imatrix_text_too_short_for_one_file(base, tmp_path):
    text = tmp_path / "words.txt"
    text.write_text(" ".join(["the"] * 20))
    result = run_cli("quantize", base, "--type", "q2_k", "--text", text, "--outfile", tmp_path / "q.gguf", cwd=tmp_path)
    assert_clean_error(result, f"has 20 tokens; an importance matrix needs {MIN_CTX}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["words.txt"]


# ---------------------------------------------------------------- recipe files


@pytest.mark.parametrize("body, needles", [
    (b'[[recipe]\nname = "x"', ["is not valid TOML"]),
    (b'[[recipe]]\nname = "caf\xe9"\nbase = "q8_0"\n', ["is not UTF-8 text"]),
    (b"recipe = 5\n", ["recipe = 5 is not a list of [[recipe]] tables"]),
    (b'[recipe]\nname = "x"\nbase = "q8_0"\n', ["has a single [recipe] table"]),
    (b'[[recipes]]\nname = "x"\nbase = "q8_0"\n', ["unknown top-level key 'recipes'"]),
    (b"", ["defines no recipes"]),
    (b'[[recipe]]\nname = 5\nbase = "q8_0"\n', ["a recipe", "name = 5 has the wrong type"]),
    (b'[[recipe]]\nname = "x"\nbase = "q8_0"\noverrides = "attn"\n', ["recipe 'x'", "overrides = 'attn' has the wrong type"]),
    (b'[[recipe]]\nname = "x"\nbase = "q8_0"\nimatrix = "yes"\n', ["imatrix = 'yes'"]),
    (b'[[recipe]]\nname = "x"\nbase = "q8_0"\noverrides = { "attn" = 8 }\n', ["maps to 8, not a type name"]),
    (b'[[recipe]]\nname = "x"\nbase = "q8_0"\noverrides = { "attn" = "i32" }\n', ["unknown tensor type 'i32'"]),
    (b'[[recipe]]\nname = "x"\nbase = "q8_0"\noverrides = { "(" = "q8_0" }\n', ["bad pattern '('"]),
    (b'[[recipe]]\nname = "x"\nbase = "q9_z"\n', ["'q9_z' is not a quantized llama.cpp type"]),
    (b'[[recipe]]\nname = "x"\n', ["recipe 'x'", "has no base"]),
    (b'[[recipe]]\nname = "x"\nbase = "q8_0"\nbits = 4\n', ["unknown field bits"]),
    (b'[[recipe]]\nname = "x"\nbase = "q8_0"\n[[recipe]]\nname = "X"\nbase = "q4_0"\n', ["names recipe 'X' twice (also as 'x')"]),
])
def test_bad_recipe_files(tmp_path, body, needles):
    path = tmp_path / "recipes.toml"
    path.write_bytes(body)
    with pytest.raises(InputError) as caught:
        load_recipes(path)
    for needle in [str(path), *needles]:
        assert needle in caught.value.message, caught.value.message
    assert caught.value.hint


def test_bad_recipe_file_through_the_command(base, texts, tmp_path):
    path = tmp_path / "recipes.toml"
    path.write_text('[[recipe]]\nname = "x"\nbase = "q8_0"\noverrides = { "attn" = "q8_k" }\n')
    result = _sweep(base, tmp_path / "s", texts[0], "--types", "q8_0", "--recipes", path)
    assert_clean_error(result, "give --types or --recipes, not both")
    result = run_cli("quantize", base, "--sweep", "--recipes", path, "--out", tmp_path / "s", cwd=tmp_path)
    assert_clean_error(result, str(path), "unknown tensor type 'q8_k'")
    assert result.code == InputError.exit_code and not (tmp_path / "s").exists()


# ---------------------------------------------------------------- the model


def test_source_that_is_no_unquantized_plm_gguf(texts, measured, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 60)
    for source, needles in ((junk, [str(junk)]), (measured / "models" / "q8_0.gguf", ["already quantized (MOSTLY_Q8_0)"])):
        result = run_cli("quantize", source, "--sweep", "--types", "q8_0", "--ctx", CTX, "--text", texts[0],
                         "--out", tmp_path / "s", cwd=tmp_path)
        assert_clean_error(result, *needles)
        assert not (tmp_path / "s").exists()
