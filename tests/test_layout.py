"""The package layout is its layering: a module may import only from its own folder and the folders below it.
Checked by reading every import (module level, inside functions, under TYPE_CHECKING)."""

import ast
import importlib
from pathlib import Path

import pytest

import omnilens

ROOT = Path(omnilens.__file__).parent

# folder -> the folders its modules may import from (besides itself)
ALLOWED = {
    "core": set(),
    "testing": set(),
    "inputs": {"core"},
    "adapters": {"core", "inputs"},
    "executors": {"core", "adapters"},
    "lens": {"core", "adapters", "executors", "inputs"},
    "viz": {"core"},
    "data": {"core", "inputs"},
    "methods": {"core", "adapters", "executors", "inputs", "lens", "viz", "data"},
    "zoo": {"core", "lens", "testing"},
    "studies": {"core", "adapters", "executors", "inputs", "lens", "viz", "data", "methods", "zoo", "testing"},
    "app": {"core", "adapters", "executors", "inputs", "lens", "viz", "data", "methods", "zoo", "testing",
            "studies"},
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) > 1:
            yield rel, path


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [f"omnilens.{a.name}" for a in node.names] if node.module == "omnilens" else [node.module]
    return [m for m in out if m == "omnilens" or m.startswith("omnilens.")]


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(ALLOWED), f"folders without a layer rule: {folders - set(ALLOWED)}"
    assert not [p.name for p in ROOT.glob("*.py") if p.name != "__init__.py"], "modules at the package root"


def test_no_import_runs_up_the_layers():
    bad = []
    for rel, path in _modules():
        layer = rel.parts[0]
        for mod in _imports(path):
            parts = mod.split(".")
            if len(parts) < 2:
                bad.append(f"{rel}: imports the package root ({mod})")
                continue
            target = parts[1]
            if target in omnilens.PUBLIC_PATHS:
                bad.append(f"{rel}: imports the short public path {mod}; inside the package use the layered path")
            elif target != layer and target not in ALLOWED[layer]:
                bad.append(f"{rel}: {layer} may not import {target} ({mod})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph = {}
    for rel, path in _modules():
        name = "omnilens." + ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in _imports(path)}
    names = set(graph)
    edges = {n: {t for m in deps for t in (m, m.rsplit(".", 1)[0]) if t in names and t != n} for n, deps in graph.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of logic
    edges = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for t in edges[n]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])


def test_no_module_is_over_400_lines():
    long = {str(rel): n for rel, path in _modules() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


@pytest.mark.parametrize("short", sorted(omnilens.PUBLIC_PATHS))
def test_short_public_paths_are_the_layered_modules(short):
    assert importlib.import_module(f"omnilens.{short}") is importlib.import_module(omnilens.PUBLIC_PATHS[short])
    assert getattr(omnilens, short) is importlib.import_module(omnilens.PUBLIC_PATHS[short])


def test_short_paths_reach_submodules_and_names_users_write():
    from omnilens.concepts import build_concepts
    from omnilens.graph import HookSpec
    from omnilens.patching import patch_exact
    from omnilens.patching.replay import TowerReplay

    import omnilens.methods.patching.replay as replay

    assert TowerReplay is replay.TowerReplay
    assert HookSpec is omnilens.HookSpec and callable(patch_exact) and callable(build_concepts)
    assert omnilens.load is omnilens.lens.load
