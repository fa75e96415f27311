"""The recipe search (`quantize --auto`): the most accurate per-tensor mix under a byte budget.

    tensor groups (role x band of layers; token_embd, which is also the tied output)
      -> the top file: every group at its ladder's top (q8_0), scored once
      -> one probe per group: that group alone lowered to its probe type, scored against the
         reference log-probs on disk: the KL it adds (its sensitivity)
      -> each group's weight error at every ladder type, from a sample of its rows quantized by
         ggml and weighted by the importance matrix (no scoring)
      -> predicted KL rise of a group at a type = sensitivity / error at the probe x error there
      -> an exact multiple-choice knapsack over the groups: the lowest predicted KL whose bytes fit
      -> the chosen recipe quantized by llama.cpp and measured like any sweep row (the full
         evaluation), and written as TOML that `--recipes` takes again

Why a knapsack and not a greedy KL-per-byte: each group picks one type from its ladder, and
the predicted KL against bytes is not convex along a ladder (q5_k costs 0.6 bit more than
q4_k for a gain that differs from q6_k's over q5_k per group), so the greedy that walks down
the steepest slope can stop short of the budget or skip the better pair of choices. With a few
dozen groups of at most six types, dynamic programming over the budget in 4,000 steps is exact
to within one step's bytes and costs milliseconds.

Why a model of the KL rise and not a probe per (group, type): the probes are the cost (each is
a quantization and a full scoring); the weight error per type is nearly free. KL rises about
linearly with the energy of the output error a weight perturbation causes (second order in
the perturbation), and that energy is what the importance-weighted error measures, so one
probe per group calibrates the group and the errors carry it to the other types.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from plm_gguf.convert import ggmlq
from plm_gguf.errors import UsageError

# Ladders of ggml types from most to least precise, by row length: the K-quants need rows of
# 256, the legacy and IQ4_NL types rows of 32. A tensor whose rows fit neither stays as llama.cpp
# falls back (f16) and is not part of the search.
LADDER_K = ("q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")
LADDER_32 = ("q8_0", "q5_1", "q5_0", "iq4_nl")
PROBE = {LADDER_K: "q4_k", LADDER_32: "iq4_nl"}
MAX_BANDS = 4  # layers are grouped into at most this many bands per role: a probe each
SAMPLE_ROWS = 256  # rows per tensor quantized to estimate each type's weight error
DP_STEPS = 4000
STOCK_TARGETS = ("q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")  # --sweep --auto mixes at these sizes


def type_bytes(kind: str, n_elements: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[QT[kind.upper()]]
    return n_elements // block * size


def ladder_for(row_length: int) -> tuple[str, ...]:
    if row_length % 256 == 0:
        return LADDER_K
    if row_length % 32 == 0:
        return LADDER_32
    return ()


@dataclass(frozen=True)
class Group:
    """Tensors that always share a type: one role in one band of layers (or token_embd)."""

    name: str  # e.g. "ffn_down.0-7", "token_embd"
    pattern: str  # the override regex naming exactly these tensors
    tensors: tuple[str, ...]
    n_elements: int
    ladder: tuple[str, ...]

    @property
    def probe(self) -> str:
        return PROBE[self.ladder]

    def nbytes(self, kind: str) -> int:
        return type_bytes(kind, self.n_elements)


def tensor_groups(tensors: dict, n_layers: int, bands: int = MAX_BANDS) -> list[Group]:
    """The searchable groups of a file's tensors (ggufinfo TensorInfo by name): every matrix
    whose rows fit a ladder, by role and band of layers."""
    n_bands = max(1, min(bands, n_layers))
    found: dict[tuple[str, int], list] = {}
    for info in tensors.values():
        if len(info.shape) < 2 or not ladder_for(info.shape[-1]):
            continue
        parts = info.name.split(".")
        if parts[0] == "blk":
            layer, role = int(parts[1]), parts[2]
            found.setdefault((role, layer * n_bands // n_layers), []).append(info)
        else:
            found.setdefault((parts[0], -1), []).append(info)
    groups = []
    for (role, band), infos in sorted(found.items()):
        ladders = {ladder_for(i.shape[-1]) for i in infos}
        if len(ladders) > 1:  # rows of two lengths in one role: split by ladder (not seen in PLM)
            raise AssertionError(f"{role}: tensors of different row lengths")
        if band < 0:
            name, pattern = role, rf"^{re.escape(infos[0].name)}$"
        else:
            layers = sorted(int(i.name.split(".")[1]) for i in infos)
            name = f"{role}.{layers[0]}" + (f"-{layers[-1]}" if len(layers) > 1 else "")
            pattern = rf"^blk\.({'|'.join(map(str, layers))})\.{re.escape(role)}\.weight$"
        groups.append(Group(name, pattern, tuple(i.name for i in infos), sum(i.n_elements for i in infos),
                            ladders.pop()))
    return groups


def groups_key(groups: list[Group]) -> str:
    body = json.dumps([asdict(g) for g in groups], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


# --- weight errors ---------------------------------------------------------------------------

def _rows(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    """A tensor of the unquantized base file as rows of its stored type (a view of the mapped
    file: 3-D tensors' heads stacked); `_f32` converts the rows the caller takes."""
    t = next(t for t in reader.tensors if t.name == name)
    data = np.asarray(t.data)
    if t.tensor_type == QT.BF16:  # gguf-py gives its bytes
        data = data.view(np.uint16)
    return data.reshape(-1, int(t.shape[0]))


def _f32(rows: np.ndarray) -> np.ndarray:
    """Rows of f32, f16 or bf16 (GGUFReader gives bf16 as uint16) as contiguous float32."""
    if rows.dtype == np.uint16:
        rows = (rows.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(rows, dtype=np.float32)


def weight_errors(base: Path, groups: list[Group], imatrix: dict[str, np.ndarray] | None,
                  sample_rows: int = SAMPLE_ROWS) -> dict[str, dict[str, float]]:
    """Group -> type -> the importance-weighted squared error of the group's weights in that
    type (sum over columns of importance x squared error, scaled from the sampled rows to all)."""
    reader = gguf.GGUFReader(base)
    errors: dict[str, dict[str, float]] = {}
    for kind in {k for g in groups for k in g.ladder}:
        ggmlq.prepare(QT[kind.upper()])
    for g in groups:
        per_type = dict.fromkeys(g.ladder, 0.0)
        for name in g.tensors:
            rows = _rows(reader, name)  # only the sampled rows are read and converted
            n_rows, width = rows.shape
            take = np.unique(np.linspace(0, n_rows - 1, min(sample_rows, n_rows)).astype(np.int64))
            sample = _f32(rows[take])
            imp = None if imatrix is None else imatrix.get(name)
            if imp is not None:
                imp = np.asarray(imp, np.float32).reshape(-1)
                heads = imp.size // width
                if imp.size % width or n_rows % max(heads, 1):
                    imp = None
            for kind in g.ladder:
                qt = QT[kind.upper()]
                if imp is None or imp.size == width:
                    q = ggmlq.quantize_rows(sample, qt, imp)
                    deq = gguf.quants.dequantize(q, qt).reshape(sample.shape)
                    weight = np.ones(width, np.float32) if imp is None else imp
                    err = float(((sample - deq) ** 2 * weight).sum())
                else:  # per-head importances (latent attn_k_b / attn_v_b): rows of head h use slice h
                    per_head = n_rows // heads
                    err = 0.0
                    for h in range(heads):
                        sel = take[(take >= h * per_head) & (take < (h + 1) * per_head)]
                        if sel.size == 0:
                            continue
                        part = _f32(rows[sel])
                        w = imp[h * width:(h + 1) * width]
                        deq = gguf.quants.dequantize(ggmlq.quantize_rows(part, qt, w), qt).reshape(part.shape)
                        err += float(((part - deq) ** 2 * w).sum())
                per_type[kind] += err * n_rows / take.size
        errors[g.name] = per_type
    return errors


# --- the search ------------------------------------------------------------------------------

@dataclass
class Model:
    """What the search knows: KL of the top file, each group's sensitivity and weight errors."""

    groups: list[Group]
    top_kl: float
    probe_kl: dict[str, float]  # group -> KL with that group alone at its probe type
    errors: dict[str, dict[str, float]]

    def rise(self, group: Group, kind: str) -> float:
        """Predicted KL added by GROUP at KIND over the top file."""
        e = self.errors[group.name]
        scale = e[group.probe] - e[group.ladder[0]]
        slope = max(self.probe_kl[group.name] - self.top_kl, 0.0) / scale if scale > 0 else 0.0
        return slope * max(e[kind] - e[group.ladder[0]], 0.0)

    def predict(self, choice: dict[str, str]) -> float:
        return self.top_kl + sum(self.rise(g, choice[g.name]) for g in self.groups)


def choose(model: Model, budget_bytes: int, steps: int = DP_STEPS) -> dict[str, str] | None:
    """The types (group -> type) of least predicted KL whose bytes are at most BUDGET_BYTES: a
    multiple-choice knapsack by dynamic programming over the budget in STEPS units (costs rounded
    up, so the chosen bytes never exceed the budget). None if even the smallest types do not fit."""
    groups = model.groups
    if sum(g.nbytes(g.ladder[-1]) for g in groups) > budget_bytes:
        return None
    unit = max(1, math.ceil(budget_bytes / steps))
    cap = budget_bytes // unit
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = []
    for g in groups:
        nxt = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for k, kind in enumerate(g.ladder):
            cost = math.ceil(g.nbytes(kind) / unit)
            if cost > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[cost:] = best[: cap + 1 - cost] + model.rise(g, kind)
            better = cand < nxt
            nxt[better], arg[better] = cand[better], k
        picks.append(arg)
        best = nxt
    if not np.isfinite(best).any():
        return None
    at = cap - int(np.argmin(best[::-1]))  # of equal predictions, the one that uses the most bytes
    choice = {}
    for g, arg in zip(reversed(groups), reversed(picks)):
        k = int(arg[at])
        choice[g.name] = g.ladder[k]
        at -= math.ceil(g.nbytes(g.ladder[k]) / unit)
    return choice


def choice_bytes(groups: list[Group], choice: dict[str, str]) -> int:
    return sum(g.nbytes(choice[g.name]) for g in groups)


def overrides_for(groups: list[Group], choice: dict[str, str]) -> dict[str, str]:
    return {g.pattern: choice[g.name] for g in groups}


def nearest_stock(bpw: float) -> str:
    """A stock file type of about BPW bits per weight, to name as the mix's base (llama.cpp
    writes it as general.file_type; every searched tensor is overridden)."""
    sizes = {"q2_k": 3.0, "q3_k_m": 3.9, "q4_k_m": 4.9, "q5_k_m": 5.7, "q6_k": 6.6, "q8_0": 8.5}
    return min(sizes, key=lambda k: abs(sizes[k] - bpw))


def recipe_toml(recipes: list) -> str:
    """[[recipe]] tables that load_recipes reads back; the overrides as a [recipe.overrides]
    table, one pattern per line (TOML literal strings: a regex's backslashes stay as they are)."""
    lines = ["# Found by `plm-gguf quantize --auto`: one override per tensor group, chosen under a byte budget",
             "# from the groups' measured sensitivities. Measure them again with:",
             "#   plm-gguf quantize MODEL --sweep --recipes THIS_FILE", ""]
    for r in recipes:
        lines += ["[[recipe]]", f"name = {json.dumps(r.name)}", f"base = {json.dumps(r.base)}",
                  f"imatrix = {str(r.imatrix).lower() if isinstance(r.imatrix, bool) else json.dumps(r.imatrix)}"]
        if r.description:
            lines.append(f"description = {json.dumps(r.description, ensure_ascii=False)}")
        if r.overrides:
            if any("'" in p or "\n" in p for p in r.overrides):
                raise AssertionError("an override pattern that a TOML literal string cannot hold")
            lines += ["[recipe.overrides]", *(f"'{p}' = {json.dumps(t)}" for p, t in r.overrides.items())]
        lines.append("")
    return "\n".join(lines)


def check_budget(budget_bytes: float, groups: list[Group], overhead: int, what: str) -> None:
    smallest = overhead + sum(g.nbytes(g.ladder[-1]) for g in groups)
    if budget_bytes < smallest:
        raise UsageError(f"{what} leaves {max(budget_bytes, 0) / 2**20:,.1f} MiB for the weights; the smallest mix "
                         f"the search can make ({', '.join(sorted({g.ladder[-1] for g in groups}))}) needs "
                         f"{smallest / 2**20:,.1f} MiB", "give a larger --budget-mb, or a device with more memory")
