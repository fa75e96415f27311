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

from plm_gguf.errors import InputError, PlmGgufError, UsageError
from plm_gguf.qtypes import DIRECT_TYPES, llama_file_types

# Types that need (IQ1/IQ2) or clearly benefit from (other IQ, 2-3 bit K) an importance matrix.
_IMATRIX_AUTO = re.compile(r"^(iq\d|q2_k|q3_k)")
# A recipe's name is its file name in the sweep folder (models/NAME.gguf): nothing that could
# leave the folder or hide there ('/', '..', a leading dot), nothing a shell or a CSV mangles.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_NAME_RULE = "a name is 1 to 64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit, without '..'"
# ggml types a tensor can be stored in; the rest are integer, f64 or dot-product scratch types.
_NOT_STORAGE = {"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"}
OVERRIDE_TYPES = sorted(name.lower() for name in QT.__members__ if name not in _NOT_STORAGE)
_FIELDS = {"name": str, "base": str, "overrides": dict, "imatrix": (bool, str), "description": str}
_FORMAT = ("see quant_eval/recipes/default.toml: [[recipe]] tables with name, base, and optionally overrides, "
           "imatrix, description")


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


def check_name(name: str, source: str, error: type[PlmGgufError] = UsageError) -> None:
    """Refuse a recipe name that is not a safe file name."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise error(f"recipe name {name!r} in {source} is not a safe file name", _NAME_RULE)


def _validate(recipe: Recipe, source: str, error: type[PlmGgufError]) -> Recipe:
    """RECIPE, refused with ERROR (InputError for a file's recipe, UsageError for --types) unless
    its name, types and patterns are ones llama.cpp and the sweep folder take."""
    check_name(recipe.name, source, error)
    if recipe.base not in llama_file_types() or recipe.base in ("f32", "f16", "bf16"):
        raise error(f"recipe {recipe.name!r} in {source}: {recipe.base!r} is not a quantized llama.cpp type",
                    f"use one of {', '.join(sorted(set(llama_file_types()) - set(DIRECT_TYPES)))}, q8_0")
    if recipe.imatrix not in (True, False, "auto"):
        raise error(f"recipe {recipe.name!r} in {source}: imatrix = {recipe.imatrix!r}",
                    'imatrix is "auto" (the default), true or false')
    for pattern, kind in recipe.overrides.items():
        if not isinstance(kind, str):
            raise error(f"recipe {recipe.name!r} in {source}: override {pattern!r} maps to {kind!r}, "
                        "not a type name", 'overrides map tensor-name regexes to type names: { "attn_kv_b" = "q8_0" }')
        try:
            re.compile(pattern)
        except re.error as exc:
            raise error(f"recipe {recipe.name!r} in {source}: bad pattern {pattern!r} ({exc})",
                        "overrides map a regex on tensor names to a type") from exc
        if kind.lower() not in OVERRIDE_TYPES:
            raise error(f"recipe {recipe.name!r} in {source}: unknown tensor type {kind!r}",
                        "use a ggml type such as q8_0, q6_k, q5_k, q4_k, f16")
    return recipe


def _recipe(table: object, source: str) -> Recipe:
    """One [[recipe]] table as a Recipe: its fields and their types checked."""
    if not isinstance(table, dict):
        raise InputError(f"{source}: a recipe is {table!r}, not a table", _FORMAT)
    name = table.get("name")
    label = f"recipe {name!r}" if isinstance(name, str) else "a recipe"
    unknown = sorted(set(table) - set(_FIELDS))
    missing = [f for f in ("name", "base") if f not in table]
    if unknown or missing:
        problem = f"unknown field {', '.join(unknown)}" if unknown else f"no {' and no '.join(missing)}"
        raise InputError(f"{label} in {source} has {problem}", _FORMAT)
    for key, kind in _FIELDS.items():
        if key in table and not isinstance(table[key], kind):
            raise InputError(f"{label} in {source}: {key} = {table[key]!r} has the wrong type", _FORMAT)
    return _validate(Recipe(**table), source, InputError)


def load_recipes(path: Path | None = None) -> list[Recipe]:
    """Recipes from a TOML file ([[recipe]] tables), or the built-in default set."""
    if path is None:
        text, source = resources.files("plm_gguf.quant_eval").joinpath("recipes/default.toml").read_text(), "default"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read recipes file {path} ({exc.strerror})", "pass an existing TOML file") from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"recipes file {path} is not UTF-8 text (byte {exc.start})", _FORMAT) from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source} is not valid TOML ({exc})", _FORMAT) from exc
    unknown = sorted(set(document) - {"recipe"})
    if unknown:
        raise InputError(f"{source} has unknown top-level key {', '.join(map(repr, unknown))}", _FORMAT)
    tables = document.get("recipe", [])
    if isinstance(tables, dict):
        raise InputError(f"{source} has a single [recipe] table",
                         "write [[recipe]], with two brackets, above each recipe")
    if not isinstance(tables, list):
        raise InputError(f"{source}: recipe = {tables!r} is not a list of [[recipe]] tables", _FORMAT)
    recipes = [_recipe(table, source) for table in tables]
    if not recipes:
        raise InputError(f"{source} defines no recipes", _FORMAT)
    check_unique([r.name for r in recipes], source, InputError)
    return recipes


def check_unique(names: list[str], source: str, error: type[PlmGgufError] = UsageError) -> None:
    """Refuse a name given twice, letter case aside (a case-insensitive file system has one file for both)."""
    for i, name in enumerate(names):
        earlier = next((n for n in names[:i] if n.casefold() == name.casefold()), None)
        if earlier is not None:
            also = "" if earlier == name else f" (also as {earlier!r})"
            raise error(f"{source} names recipe {name!r} twice{also}",
                        "give each recipe its own name; names that differ only in letter case are the same file")


def stock_recipes(types: list[str]) -> list[Recipe]:
    """One recipe per stock llama.cpp type, for --types."""
    names = [t.strip().lower() for t in types if t.strip()]
    if not names:
        raise UsageError("--types names no type", "give comma-separated llama.cpp types, e.g. --types q8_0,q4_k_m")
    check_unique(names, "--types")
    return [_validate(Recipe(name=n, base=n), "--types", UsageError) for n in names]
