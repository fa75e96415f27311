"""The wheel carries everything plm-gguf reads at run time: the llama.cpp patch set, device
profiles, sweep recipes and corpus, and finds them when installed (not from the source tree)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_the_data_and_finds_the_patches(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("plm_gguf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for source, installed in (("patches", "plm_gguf/patches"), ("devices/profiles", "plm_gguf/devices/profiles"),
                              ("quant_eval/recipes", "plm_gguf/quant_eval/recipes"),
                              ("quant_eval/corpus", "plm_gguf/quant_eval/corpus")):
        for file in (ROOT / source).rglob("*"):
            if file.is_file() and file.suffix in {".patch", ".toml", ".txt"}:
                assert f"{installed}/{file.relative_to(ROOT / source).as_posix()}" in names, file
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = ("from plm_gguf.llama import patches, runtime; print(runtime.__file__); "
             "print(*[p.as_posix() for p in patches.patch_files()]); print(runtime.build_key())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(unpacked), "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(unpacked))
    assert out[1].startswith(f"{unpacked}/plm_gguf/patches/llama.cpp/") and out[1].endswith(".patch")
    from plm_gguf.llama import runtime

    assert out[2] == runtime.build_key()  # the same patched library as the source tree's


@pytest.mark.parametrize(("command", "shown"), [
    (["quantize"], "[[recipe]] tables"),
    (["deploy"], "ssh [user@]host[:port]"),
    (["deploy"], "--no-mla-patch"),
    (["convert"], "--kv-cache"),
])
def test_help_shows_option_text_verbatim(command, shown):
    """Rich markup would swallow [bracketed] help text; every command's --help keeps it."""
    from tests.conftest import run_cli

    result = run_cli(*command, "--help")
    assert result.code == 0, result.stderr
    assert shown in " ".join(result.stdout.split()), result.stdout
