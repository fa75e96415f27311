"""Every bad input gets a one-line error with a hint, a non-zero exit, no traceback, and no
output file (nor a temporary one) left behind. Each runs the real `plm-gguf` command."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from plm_gguf.fixtures.checkpoint import random_state_dict, write_state_dict, write_tiny_checkpoint

from .conftest import ODD_CONFIG, assert_clean_error, run_cli


def _checkpoint(tmp_path, *, state_fn=None, config_fn=None, fmt="safetensors"):
    ckpt = write_tiny_checkpoint(tmp_path / "ck", ODD_CONFIG, fmt=fmt)
    if state_fn:
        state = random_state_dict(ODD_CONFIG)
        state_fn(state)
        for f in list(ckpt.glob("*.safetensors")) + list(ckpt.glob("*.bin")):
            f.unlink()
        write_state_dict(ckpt, state, fmt=fmt)
    if config_fn:
        config = json.loads((ckpt / "config.json").read_text())
        config_fn(config)
        (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def _convert_fails(tmp_path, ckpt, *needles, extra=()):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    result = run_cli("convert", ckpt, "--outfile", out / "m.gguf", "--outtype", "q8_0", *extra)
    assert_clean_error(result, *needles)
    assert list(out.iterdir()) == [], "no output or temporary file may be left"
    return result


def test_non_plm_checkpoint(tmp_path):
    def llama(c):
        c["architectures"], c["model_type"] = ["LlamaForCausalLM"], "llama"
    _convert_fails(tmp_path, _checkpoint(tmp_path, config_fn=llama), "LlamaForCausalLM", "not a PLM")


def test_missing_tensor(tmp_path):
    ckpt = _checkpoint(tmp_path, state_fn=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    _convert_fails(tmp_path, ckpt, "lacks", "model.layers.1.mlp.up_proj.weight")


def test_extra_tensor(tmp_path):
    def gate(s):
        s["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(96, 80, dtype=torch.bfloat16)
    result = _convert_fails(tmp_path, _checkpoint(tmp_path, state_fn=gate), "unexpected", "gate_proj")
    assert "no gate_proj" in result.stderr


def test_shape_disagrees_with_config(tmp_path):
    def wider(c):
        c["intermediate_size"] = 128
    _convert_fails(tmp_path, _checkpoint(tmp_path, config_fn=wider), "mlp.up_proj.weight", "[128, 80]", "[96, 80]")


def test_lm_head_that_differs_from_embeddings(tmp_path):
    def untied(s):
        s["lm_head.weight"] = s["model.embed_tokens.weight"].clone() * 2
    _convert_fails(tmp_path, _checkpoint(tmp_path, state_fn=untied), "lm_head.weight differs")


def test_lm_head_equal_to_embeddings_is_accepted(tmp_path):
    def tied(s):
        s["lm_head.weight"] = s["model.embed_tokens.weight"].clone()
    ckpt = _checkpoint(tmp_path, state_fn=tied)
    assert run_cli("convert", ckpt, "--outfile", tmp_path / "m.gguf").code == 0


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_nan_and_inf_weights(tmp_path, outtype):
    def poison(s):
        s["model.layers.2.self_attn.kv_b_proj.weight"][3, 4] = float("nan")
        s["model.layers.2.self_attn.kv_b_proj.weight"][5, 6] = float("inf")
    ckpt = _checkpoint(tmp_path, state_fn=poison)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("convert", ckpt, "--outfile", out / "m.gguf", "--outtype", outtype)
    assert_clean_error(result, "model.layers.2.self_attn.kv_b_proj.weight", "2 NaN/Inf")
    assert list(out.iterdir()) == []


def test_truncated_safetensors(tmp_path):
    ckpt = _checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size - 1000)
    _convert_fails(tmp_path, ckpt, "model.safetensors is truncated")


def test_corrupt_safetensors(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"<html>503 Service Unavailable</html>" * 10)
    _convert_fails(tmp_path, ckpt, "model.safetensors")


def test_unsupported_dtype(tmp_path):
    def f64(s):
        s["model.layers.0.self_attn.q_proj.weight"] = s["model.layers.0.self_attn.q_proj.weight"].double()
    _convert_fails(tmp_path, _checkpoint(tmp_path, state_fn=f64), "F64", "bf16, f16 and f32")


def test_missing_tokenizer(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "tokenizer.json").unlink()
    _convert_fails(tmp_path, ckpt, "no tokenizer.json")


def test_missing_config(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "config.json").unlink()
    _convert_fails(tmp_path, ckpt, "no config.json")


def test_pickle_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = _checkpoint(tmp_path, fmt="bin")
    with open(ckpt / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": Exploit()}, fh)
    _convert_fails(tmp_path, ckpt, "pytorch_model.bin", "safely")
    assert not marker.exists()


def test_not_a_checkpoint_and_bad_options(tmp_path):
    ckpt = _checkpoint(tmp_path)
    assert_clean_error(run_cli("convert", tmp_path / "nowhere"), "neither a local folder")
    assert_clean_error(run_cli("convert", ckpt / "config.json"), "is a file")
    assert_clean_error(run_cli("convert", ckpt, "--outtype", "q9_9"), "unknown output type")
    assert_clean_error(run_cli("convert", ckpt, "--outtype", "iq2_xxs"), "importance matrix")
    assert_clean_error(run_cli("convert", ckpt, "--outfile", tmp_path / "no" / "m.gguf"), "does not exist")


def test_existing_output_needs_force(tmp_path):
    ckpt = _checkpoint(tmp_path)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    assert_clean_error(run_cli("convert", ckpt, "--outfile", target), "already exists", )
    assert target.read_bytes() == b"precious"
    assert run_cli("convert", ckpt, "--outfile", target, "--force").code == 0
    assert target.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_ctrl_c_leaves_nothing(tmp_path, big_checkpoint):
    """SIGINT while the file is being written: exit 130, a clean message, no partial file."""
    ckpt = big_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "plm_gguf.cli", "convert", str(ckpt), "--outtype", "q4_k_m",
                             "--outfile", str(out / "m.gguf")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in out.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "conversion ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert list(out.iterdir()) == []
