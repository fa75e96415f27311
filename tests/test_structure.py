"""The structure ARCHITECTURE.md promises, read from the source: no import cycle between files
(module-level and function-level imports alike), and a core that imports no stage."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {"plm_gguf": "plm_gguf", "convert": "plm_gguf.convert", "quant_eval": "plm_gguf.quant_eval",
            "devices": "plm_gguf.devices"}
STAGES = ("plm_gguf.convert", "plm_gguf.quant_eval", "plm_gguf.devices")
# The command line and the demo run the stages; everything else in plm_gguf/ is the core.
RUNS_STAGES = {"plm_gguf.cli", "plm_gguf.demo"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = [p for p in file.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = file
    return found


def _imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The plm_gguf modules FILE imports anywhere in it (relative imports resolved)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def test_no_import_cycle_between_files():
    known = _modules()
    graph = {name: _imports(name, file, known) for name, file in known.items()}
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, [*path, nxt], done)

    for name in sorted(graph):
        visit(name, [name], {name})
    assert cycles == [], " -> ".join(cycles[0]) if cycles else ""


def test_the_core_imports_no_stage():
    known = _modules()
    core = {n: f for n, f in known.items() if not n.startswith(STAGES) and n not in RUNS_STAGES}
    offenders = {n: sorted(m for m in _imports(n, f, known) if m.startswith(STAGES)) for n, f in core.items()}
    assert {n: ms for n, ms in offenders.items() if ms} == {}
