"""The house drawn from the code (issue 29): the import graph of the installed packages has no
circles, and its arrows run one way: core <- kernels <- passes, core <- export, core <- zoo <-
bench, and the CLI on top. Imports under `if TYPE_CHECKING:` are annotations, not arrows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"ditopt": "ditopt", "passes": "ditopt.passes", "kernels": "ditopt.kernels", "export": "ditopt.export",
            "cli": "ditopt.cli"}
LAYERS = ("passes", "kernels", "export", "cli", "zoo", "bench")
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "passes": {"core", "kernels"},
    "export": {"core"},
    "zoo": {"core"},
    "bench": {"core", "zoo"},
    "cli": {"core", "kernels", "passes", "export", "zoo", "bench"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = [p for p in file.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = file
    return mods


def _runtime_imports(tree: ast.AST):
    """Import nodes anywhere in the module (functions included), except under TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from _runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, file in mods.items():
        base = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                candidates = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                candidates = [a.name for a in node.names]
            targets |= {c for c in candidates if c in mods and c != name}
        edges[name] = targets
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circles():
    assert cycles(import_graph()) == []


def test_arrows_run_one_way_between_layers():
    wrong = sorted(f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
                   if layer(t) != layer(m) and layer(t) not in ALLOWED[layer(m)])
    assert wrong == []


def test_the_check_sees_a_circle_and_a_wrong_arrow():
    # The checks above can fail: a planted circle and a planted core -> passes arrow are found.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    edges = import_graph()
    assert "ditopt.registry" in edges and layer("ditopt.registry") == "core"
    assert layer("ditopt.passes.caching.stage") == "passes" and "passes" not in ALLOWED["core"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    assert [a.name for n in _runtime_imports(tree) for a in n.names] == ["TYPE_CHECKING", "y"]


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_every_source_folder_is_seen(folder):
    assert any(name.startswith(PACKAGES[folder]) for name in _modules())


def test_a_pass_reads_collectors_of_the_core_or_of_its_own_family():
    # A family is one folder: what its passes need from calibration is recorded by a collector
    # registered in that folder (caching's residual sketches, attention's masses) or by the core
    # (block inputs), never by another family's folder.
    from ditopt.registry import available_passes, get_collector

    def home(module: str) -> str:
        return layer(module) if layer(module) != "passes" else ".".join(module.split(".")[:3])

    wrong = sorted(f"{name} needs {need!r} from {get_collector(need).__module__}"
                   for name, spec in available_passes().items() for need in spec.needs
                   if home(get_collector(need).__module__) not in ("core", home(spec.family)))
    assert wrong == []
    assert home("ditopt.passes.caching.collector") == home("ditopt.passes.caching.calibrated_schedule") != "core"
    assert home("ditopt.passes.attention.collector") != home("ditopt.passes.caching.delta_cache")
