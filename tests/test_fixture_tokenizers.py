"""The test tokenizers: the rebuilt Qwen2 tokenizer and the tiny Qwen2-style ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from plm_gguf.fixtures import tokenizers as fx

HF_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ROUND_TRIP = {
    "ascii": "Hello, world! It's 2024; x = [1, 2, 3]\n\tdone.  ",
    "chinese": "你好，世界！今天的天气很好。",
    "emoji": "😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
}


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return fx.cached_qwen_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen(qwen_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))


def _load(dest: Path) -> Tokenizer:
    return Tokenizer.from_file(str(dest / "tokenizer.json"))


# --- the real Qwen2 tokenizer -------------------------------------------------------------------


def test_qwen_has_151646_tokens(qwen_dir: Path, qwen: Tokenizer) -> None:
    assert all((qwen_dir / name).is_file() for name in HF_FILES)
    assert qwen.get_vocab_size(with_added_tokens=True) == 151_646
    assert qwen.get_vocab_size(with_added_tokens=False) == 151_643
    assert len(json.loads((qwen_dir / "vocab.json").read_text(encoding="utf-8"))) == 151_643
    lines = (qwen_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == 151_643 - 256  # one merge per multi-byte token
    assert lines[1:4] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"]  # Qwen2's merges.txt starts so


def test_qwen_special_and_known_ids(qwen: Tokenizer) -> None:
    assert [qwen.token_to_id(s) for s in fx.SPECIAL_TOKENS] == [151_643, 151_644, 151_645]
    assert len(qwen.encode("2024").ids) == 4  # Qwen2 splits digits one by one
    assert qwen.encode("Hello world").ids == [9707, 1879]  # as Qwen2's own tokenizer gives
    assert qwen.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 151_644


def test_qwen_agrees_with_tiktoken(qwen_dir: Path) -> None:
    assert fx.check_against_tiktoken(qwen_dir, fx.SAMPLE_TEXTS) == []


def test_qwen_pre_tokenizer_and_config(qwen_dir: Path) -> None:
    spec = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["normalizer"] == {"type": "NFC"}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": QWEN2_REGEX} and fx.QWEN2_PATTERN == QWEN2_REGEX
    assert (split["behavior"], split["invert"]) == ("Isolated", False)
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False,
                          "trim_offsets": False, "use_regex": False}
    assert spec["model"]["byte_fallback"] is False
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["bos_token"] is None and config["add_bos_token"] is False
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"] == fx.CHATML_TEMPLATE


def test_nfc_is_applied(qwen: Tokenizer) -> None:
    # The documented divergence from llama.cpp: tokenizer.json composes "e" + U+0301 into "é".
    assert qwen.encode("cafe\u0301").ids == qwen.encode("café").ids


# --- the checker itself ---------------------------------------------------------------------------


def test_check_against_tiktoken_catches_wrong_merges(tmp_path: Path) -> None:
    fx.write_tiny_bpe_tokenizer(tmp_path, 1000)
    assert fx.check_against_tiktoken(tmp_path) == []
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"].reverse()  # same vocabulary, wrong merge priorities
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    mismatches = fx.check_against_tiktoken(tmp_path)
    assert mismatches and all(m.expected != m.actual for m in mismatches)


# --- tiny tokenizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [300, 1000, 4096])
@pytest.mark.parametrize("kind", sorted(ROUND_TRIP))
def test_tiny_round_trips(tmp_path: Path, vocab_size: int, kind: str) -> None:
    assert fx.write_tiny_bpe_tokenizer(tmp_path, vocab_size) <= vocab_size
    tok = _load(tmp_path)
    text = ROUND_TRIP[kind]
    ids = tok.encode(text).ids
    assert max(ids) < vocab_size - 3  # plain text never hits a special token
    assert tok.decode(ids) == text


@pytest.mark.parametrize("vocab_size", [259, 300, 1000, 4096])
def test_tiny_special_tokens_are_last(tmp_path: Path, vocab_size: int) -> None:
    n = fx.write_tiny_bpe_tokenizer(tmp_path, vocab_size)
    tok = _load(tmp_path)
    assert n == tok.get_vocab_size(with_added_tokens=True) <= vocab_size
    assert [tok.token_to_id(s) for s in fx.SPECIAL_TOKENS] == [n - 3, n - 2, n - 1]
    assert tok.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>").ids[0] == n - 2
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert sorted(int(i) for i in config["added_tokens_decoder"]) == [n - 3, n - 2, n - 1]


def test_tiny_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert fx.write_tiny_bpe_tokenizer(a, 777) == fx.write_tiny_bpe_tokenizer(b, 777)
    for name in HF_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tiny_differs_from_qwen(tmp_path: Path, qwen: Tokenizer) -> None:
    fx.write_tiny_bpe_tokenizer(tmp_path, 1000)
    text = fx.SAMPLE_TEXTS[0]
    assert len(_load(tmp_path).encode(text).ids) > len(qwen.encode(text).ids)


@pytest.mark.parametrize("vocab_size", [0, 258, 151_647])
def test_tiny_rejects_bad_sizes(tmp_path: Path, vocab_size: int) -> None:
    with pytest.raises(ValueError):
        fx.write_tiny_bpe_tokenizer(tmp_path, vocab_size)


# --- the cache ------------------------------------------------------------------------------------


def test_cache_builds_once_and_rebuilds_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def fake_write(dest: Path) -> None:
        calls.append(dest)
        (dest / "tokenizer.json").write_text("{}")

    monkeypatch.setenv("PLM_GGUF_CACHE", str(tmp_path))
    monkeypatch.setattr(fx, "write_qwen_tokenizer", fake_write)
    first = fx.cached_qwen_tokenizer_dir()
    assert first == tmp_path / "fixtures" / "qwen2-tokenizer"
    assert fx.cached_qwen_tokenizer_dir() == first and len(calls) == 1
    assert (first / "tokenizer.json").is_file() and calls[0] != first  # built aside, then renamed
    leftovers = sorted(p.name for p in first.parent.iterdir())
    assert leftovers == ["qwen2-tokenizer", "qwen2-tokenizer.lock"]  # no temp dirs left
    (first / ".plm-gguf-fixture").write_text("stale")
    assert fx.cached_qwen_tokenizer_dir() == first and len(calls) == 2
