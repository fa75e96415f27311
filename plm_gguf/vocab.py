"""The checkpoint's tokenizer as GGUF metadata: gpt2-style BPE tokens padded to the model's
vocab_size, token types, merges, special ids, add_bos and the chat template.

The pre-tokenizer is identified from tokenizer.json's own pre-tokenizer *definition* (its split
regex and byte-level settings), not by hashing a tokenization as llama.cpp's converter does, so
a Qwen2-style tokenizer that is not byte-identical to Qwen2's still converts. Special tokens,
merges and the chat template come through gguf-py's `SpecialVocab`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from plm_gguf.errors import TokenizerError

_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

# Split regexes llama.cpp implements, by the pre-tokenizer name it knows them under.
KNOWN_SPLIT_REGEXES = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}

# Pre-tokenizer names this vendored llama.cpp accepts for gpt2-style BPE vocabularies that
# plm-gguf can reasonably be told to use with --pre-tokenizer.
LLAMA_CPP_PRE_TOKENIZERS = (
    "qwen2", "deepseek-r1-qwen", "qwen35", "llama-bpe", "llama3", "gpt-2", "default",
    "deepseek-llm", "deepseek-coder", "deepseek-v3", "gpt-4o", "smollm", "olmo", "stablelm2",
)


def pre_tokenizer_from_definition(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer name that implements this tokenizer.json's pre-tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        return None
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds != ["Split", "ByteLevel"] or steps[1].get("use_regex", True):
        return None
    split = steps[0]
    pattern = split.get("pattern")
    pattern = pattern.get("Regex") if isinstance(pattern, dict) else None
    if split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    return KNOWN_SPLIT_REGEXES.get(pattern)


def _normalizer_kinds(tokenizer_json: dict) -> list[str]:
    norm = tokenizer_json.get("normalizer") or {}
    if not isinstance(norm, dict):
        raise TokenizerError("tokenizer.json's normalizer is not an object", "restore it from the original model")
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return [s.get("type") for s in steps if isinstance(s, dict) and s]


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    pre: str
    n_real: int  # tokens the tokenizer holds; the rest up to vocab_size are [PAD] padding
    normalizers: list[str]
    special: gguf.SpecialVocab = field(repr=False)

    @property
    def nfc(self) -> bool:
        return "NFC" in self.normalizers

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if "bos" not in self.special.add_special_token:  # PLM adds no BOS unless its config says so
            writer.add_add_bos_token(False)
        self.special.add_to_gguf(writer, quiet=True)


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{file.name} is not valid JSON ({exc})", "restore it from the original model") from exc


def _unique_ids(vocab: object, where: str) -> dict[str, int]:
    """A token -> id map whose ids are distinct non-negative integers (a duplicate would leave
    one of the two tokens without an id)."""
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{where} is not a token -> id object", "restore it from the original model")
    seen: dict[int, str] = {}
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(f"{where} maps {token!r} to {i!r}, not a token id", "restore it from the original model")
        if i in seen:
            raise TokenizerError(f"{where} gives id {i} to both {seen[i]!r} and {token!r}",
                                 "restore it from the original model; each id names one token")
        seen[i] = token
    return vocab


def _added_tokens(body: dict) -> list[dict]:
    """tokenizer.json's added_tokens, each complete (an integer id and its text), ids distinct."""
    added = body.get("added_tokens", [])
    if not isinstance(added, list):
        raise TokenizerError("tokenizer.json's added_tokens is not a list", "restore it from the original model")
    seen: set[int] = set()
    for entry in added:
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), int) and not isinstance(entry["id"], bool)
                and entry["id"] >= 0 and isinstance(entry.get("content"), str)):
            raise TokenizerError(f"tokenizer.json has an incomplete added token {str(entry)[:80]}",
                                 "each added token needs an integer id and its content; restore tokenizer.json")
        if entry["id"] in seen:
            raise TokenizerError(f"tokenizer.json adds two tokens with id {entry['id']}",
                                 "restore tokenizer.json from the original model")
        seen.add(entry["id"])
    return added


def load_vocab(folder: Path, vocab_size: int, pre_tokenizer: str | None = None) -> Vocab:
    """Read the tokenizer beside a checkpoint; fail before any weight is read if it is unusable."""
    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise TokenizerError(
            f"no tokenizer.json in {folder}",
            "copy tokenizer.json, tokenizer_config.json, vocab.json and merges.txt from the original model",
        )
    body = _read_json(tok_file)
    model = (body.get("model") if isinstance(body, dict) else None) or {}
    if not isinstance(model, dict):
        model = {"type": type(model).__name__}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"tokenizer.json holds a {model.get('type')} model; PLM uses byte-level BPE",
                             "use the Qwen2-style tokenizer that ships with PLM")

    if pre_tokenizer is None:
        pre_tokenizer = pre_tokenizer_from_definition(body)
        if pre_tokenizer is None:
            raise TokenizerError(
                "tokenizer.json's pre-tokenizer is not one llama.cpp implements (expected Qwen2's split regex + ByteLevel)",
                f"name llama.cpp's equivalent with --pre-tokenizer (e.g. {', '.join(LLAMA_CPP_PRE_TOKENIZERS[:4])})",
            )
    elif pre_tokenizer not in LLAMA_CPP_PRE_TOKENIZERS:
        raise TokenizerError(f"--pre-tokenizer {pre_tokenizer!r} is not a gpt2-style pre-tokenizer llama.cpp knows",
                             f"choose one of {', '.join(LLAMA_CPP_PRE_TOKENIZERS)}")

    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL)
                                         for t, i in _unique_ids(model["vocab"], "tokenizer.json's model.vocab").items()}
    for added in _added_tokens(body):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        known = by_id.get(added["id"])
        if known is not None and known[0] != added["content"]:
            raise TokenizerError(f"tokenizer.json gives id {added['id']} to both {known[0]!r} and the added token "
                                 f"{added['content']!r}", "restore tokenizer.json from the original model")
        by_id[added["id"]] = (added["content"], kind)
    if (folder / "vocab.json").is_file():  # read by Hugging Face's slow tokenizer: it must be sound too
        _unique_ids(_read_json(folder / "vocab.json"), "vocab.json")
    if not by_id:
        raise TokenizerError("tokenizer.json has an empty vocabulary", "restore it from the original model")
    n_real = max(by_id) + 1
    if n_real > vocab_size:
        raise TokenizerError(f"the tokenizer has {n_real:,} tokens but the model's vocab_size is {vocab_size:,}",
                             "the tokenizer belongs to another model; use the one from this checkpoint")
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))

    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise TokenizerError("the tokenizer has no BPE merges", "restore merges.txt or the merges in tokenizer.json")
    return Vocab(tokens, types, pre_tokenizer, n_real, _normalizer_kinds(body), special)
