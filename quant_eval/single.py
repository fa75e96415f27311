"""`plm-gguf quantize SOURCE --type T`: one quantized file, with an importance matrix where the
type needs or benefits from one (computed from --text with the torch reference)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from plm_gguf.convert.quantize import quantize_file
from plm_gguf.convert.writer import convert
from plm_gguf.errors import UsageError
from plm_gguf.llama.runtime import run_worker
from plm_gguf.memory import KVLayout, layout_of, parse_layout
from plm_gguf.options import check_threads
from plm_gguf.outputs import check_target, claimed, partial_path
from plm_gguf.quant_eval.imatrix import compute_imatrix
from plm_gguf.quant_eval.recipes import stock_recipes
from plm_gguf.quant_eval.scoring import MIN_CTX
from plm_gguf.quant_eval.sweep import file_facts, gguf_in_layout
from plm_gguf.reference import GgufWeights
from plm_gguf.schema import config_from_gguf


def quantize_one(source: str, type_: str, outfile: Path | None, *, force: bool, text: str, threads: int,
                 kv_cache: KVLayout | str | None = None) -> dict:
    recipe = stock_recipes([type_])[0]
    kv_cache = parse_layout(kv_cache)  # (a KVLayout from the CLI; a str from a Python caller)
    check_threads(threads)
    path = Path(source).expanduser()
    is_gguf = path.is_file()
    if is_gguf:
        config_from_gguf(path)  # a PLM GGUF, every key it is read by type-checked, before any work
    if not is_gguf and not recipe.uses_imatrix:  # plain llama.cpp type from a checkpoint: convert does it
        result = convert(source, outfile, recipe.base, force=force, progress=True, threads=threads,
                         kv_cache=kv_cache or KVLayout.FULL)
        return {"outfile": result.outfile, "imatrix": False, **file_facts(result.outfile)}

    target = outfile or Path.cwd() / f"{(path.stem if is_gguf else str(source).split('/')[-1])}-{type_.upper()}.gguf"
    inputs = [path] if is_gguf else [p for p in path.iterdir() if p.is_file()] if path.is_dir() else []
    check_target(target, force, inputs=inputs)
    with claimed(target), tempfile.TemporaryDirectory(prefix="plm-gguf-q-", dir=target.parent) as tmp, \
            partial_path(target, ".partial") as out:
        base = (gguf_in_layout(path, kv_cache, Path(tmp) / "base-latent.gguf") if is_gguf else
                convert(source, Path(tmp) / "base.gguf", "auto", kv_cache=kv_cache or KVLayout.FULL).outfile)
        imatrix = _imatrix_for(base, text, Path(tmp)) if recipe.uses_imatrix else None
        quantize_file(base, out, recipe.base, threads=threads, progress=True, imatrix=imatrix)
        os.replace(out, target)
    return {"outfile": target, "imatrix": imatrix is not None, **file_facts(target)}


def _imatrix_for(base: Path, text: str, tmp: Path) -> Path:
    (tmp / "text.json").write_text(json.dumps([text]))
    run_worker(["tokenize", str(base), "--texts", str(tmp / "text.json"), "--out", str(tmp / "ids.json")])
    tokens = json.loads((tmp / "ids.json").read_text())[0]
    if len(tokens) < MIN_CTX:
        raise UsageError(f"the calibration text has {len(tokens)} tokens; an importance matrix needs {MIN_CTX}",
                         "give a longer --text (a few pages), or leave --text out for the built-in corpus")
    weights = GgufWeights(base, config_from_gguf(base))  # layer by layer: one layer's weights resident
    compute_imatrix(weights, tokens[:4096], tmp / "imatrix.npz", latent=layout_of(base) is KVLayout.LATENT)
    return tmp / "imatrix.npz"
