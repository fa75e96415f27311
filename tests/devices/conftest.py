"""Fixtures for the device tests: a tiny PLM GGUF, the cached builds, and a scratch profile folder.

``write_tiny_plm_gguf`` is written with the `gguf` package directly; swap it for
``plm_gguf.convert.writer.convert`` on a ``write_tiny_checkpoint`` once those are settled.
The builds are made once per session through the user cache (PLM_GGUF_CACHE), so a second
run of the suite builds nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parents[1] / "data" / "devices"


def _missing(why: str) -> None:
    """Skip where a Debian package is absent, but fail in CI, which installs them (./run setup)."""
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must install it")
    pytest.skip(why)
TINY = dict(n_embd=64, n_layer=2, n_head=4, qk_nope=16, qk_rope=8, v_dim=16, kv_lora=32, n_ff=128, ctx=512)


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one token per byte, as byte-level BPE needs."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_plm_gguf(path: Path, seed: int = 0, **overrides) -> Path:
    """A PLM GGUF with tiny sizes that stock llama.cpp loads and runs (f32 weights)."""
    import gguf

    c = {**TINY, **overrides}
    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = _byte_tokens() + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    n_vocab = len(tokens)
    key_len = c["qk_nope"] + c["qk_rope"]

    w = gguf.GGUFWriter(str(path), "plm")
    w.add_name("tiny-plm-test")
    w.add_block_count(c["n_layer"])
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["n_embd"])
    w.add_feed_forward_length(c["n_ff"])
    w.add_head_count(c["n_head"])
    w.add_head_count_kv(c["n_head"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    w.add_kv_lora_rank(c["kv_lora"])
    w.add_key_length(key_len)
    w.add_value_length(c["v_dim"])
    w.add_rope_dimension_count(c["qk_rope"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 3)
    w.add_eos_token_id(n_vocab - 3)
    w.add_add_bos_token(False)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    e, h = c["n_embd"], c["n_head"]
    w.add_tensor("token_embd.weight", mat(n_vocab, e))
    for i in range(c["n_layer"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm(e))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(h * key_len, e))
        w.add_tensor(f"blk.{i}.attn_kv_a_mqa.weight", mat(c["kv_lora"] + c["qk_rope"], e))
        w.add_tensor(f"blk.{i}.attn_kv_a_norm.weight", norm(c["kv_lora"]))
        w.add_tensor(f"blk.{i}.attn_kv_b.weight", mat(h * (c["qk_nope"] + c["v_dim"]), c["kv_lora"]))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(e, h * c["v_dim"]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm(e))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(c["n_ff"], e))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(e, c["n_ff"]))
    w.add_tensor("output_norm.weight", norm(e))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_plm_gguf(tmp_path_factory.mktemp("model") / "tiny plm 'test'.gguf")


@pytest.fixture()
def profile_dir(tmp_path, monkeypatch) -> Path:
    """An empty user profile folder (PLM_GGUF_PROFILES) for profiles a test writes."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv("PLM_GGUF_PROFILES", str(folder))
    return folder


def _llama_cpp_source() -> str | None:
    """PLM_GGUF_LLAMA_CPP points the tests at an unpacked llama.cpp; else the default (fetched, cached)."""
    return os.environ.get("PLM_GGUF_LLAMA_CPP") or None


@pytest.fixture(scope="session")
def host_build():
    """The native build of llama.cpp for the `host` profile: built once, then from the cache."""
    from plm_gguf.devices import profiles, toolchain

    return toolchain.build(profiles.load_profile("host"), _llama_cpp_source())


@pytest.fixture(scope="session")
def aarch64_build():
    """The static aarch64-musl build (rpi5 recipe): one zig cross build per cache, shared by qemu and adb tests."""
    if not shutil.which("qemu-aarch64-static"):
        _missing("qemu-user-static is not installed")
    from plm_gguf.devices import profiles, toolchain

    return toolchain.build(profiles.load_profile("rpi5"), _llama_cpp_source())


def run_cli(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`plm-gguf ARGS` in a child process, as a user runs it."""
    full = os.environ | {"COLUMNS": "200", "PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "plm_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, env=full, timeout=timeout)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """An OpenSSH server on 127.0.0.1 with a temporary host key and authorized key."""
    if not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh"):
        _missing("openssh-server / openssh-client are not installed")
    from .sshd import start_sshd, stop_sshd

    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


def write_profile(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path
