"""Quantization recipes as data: a base llama.cpp file type plus per-tensor overrides."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from gguf import GGMLQuantizationType as QT

from plm_gguf.errors import UsageError

# Types that need (IQ1/IQ2) or clearly benefit from (other IQ, 2-3 bit K) an importance matrix.
_IMATRIX_AUTO = re.compile(r"^(iq\d|q2_k|q3_k)")


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str  # a llama.cpp file type: q4_k_m, iq4_nl, ...
    overrides: dict[str, str] = field(default_factory=dict)  # tensor-name regex -> ggml type name
    imatrix: bool | str = "auto"
    description: str = ""

    @property
    def uses_imatrix(self) -> bool:
        return _IMATRIX_AUTO.match(self.base) is not None if self.imatrix == "auto" else bool(self.imatrix)

    def override_types(self) -> dict[str, int]:
        """Overrides as llama.cpp wants them: regex -> ggml type id."""
        return {pattern: int(QT[kind.upper()]) for pattern, kind in self.overrides.items()}

    @property
    def key(self) -> str:
        """Changes whenever anything that shapes the file changes (for resuming a sweep)."""
        body = json.dumps(asdict(self) | {"imatrix": self.uses_imatrix}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


def _validate(recipe: Recipe, source: str) -> Recipe:
    from plm_gguf.convert.writer import DIRECT_TYPES, llama_file_types

    if recipe.base not in llama_file_types() or recipe.base in ("f32", "f16", "bf16"):
        raise UsageError(f"recipe {recipe.name!r} in {source}: {recipe.base!r} is not a quantized llama.cpp type",
                         f"use one of {', '.join(sorted(set(llama_file_types()) - set(DIRECT_TYPES)))}, q8_0")
    for pattern, kind in recipe.overrides.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"recipe {recipe.name!r} in {source}: bad pattern {pattern!r} ({exc})",
                             "overrides map a regex on tensor names to a type") from exc
        if kind.upper() not in QT.__members__:
            raise UsageError(f"recipe {recipe.name!r} in {source}: unknown tensor type {kind!r}",
                             "use a ggml type such as q8_0, q6_k, q5_k, q4_k, f16")
    return recipe


def load_recipes(path: Path | None = None) -> list[Recipe]:
    """Recipes from a TOML file ([[recipe]] tables), or the built-in default set."""
    if path is None:
        text, source = resources.files("plm_gguf.quant_eval").joinpath("recipes/default.toml").read_text(), "default"
    else:
        try:
            text, source = Path(path).read_text(), str(path)
        except OSError as exc:
            raise UsageError(f"cannot read recipes file {path} ({exc.strerror})", "pass an existing TOML file") from exc
    try:
        tables = tomllib.loads(text).get("recipe", [])
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source} is not valid TOML ({exc})", "see quant_eval/recipes/default.toml for the format") from exc
    recipes = []
    for table in tables:
        try:
            recipes.append(_validate(Recipe(**table), source))
        except TypeError as exc:
            raise UsageError(f"a recipe in {source} has unknown or missing fields ({exc})",
                             "a recipe has name, base, and optionally overrides, imatrix, description") from exc
    names = [r.name for r in recipes]
    if not recipes or len(set(names)) != len(names):
        raise UsageError(f"{source} defines no recipes or repeats a name", "give each [[recipe]] a unique name")
    return recipes


def stock_recipes(types: list[str]) -> list[Recipe]:
    """One recipe per stock llama.cpp type, for --types."""
    return [_validate(Recipe(name=t.strip().lower(), base=t.strip().lower()), "--types") for t in types if t.strip()]
