"""The package's layers: the editing algorithm never imports the harness or the command line, the harness
never imports the command line, and no module imports itself through others (no import cycles).

Two checks: every module is imported in fresh interpreters and ``sys.modules`` is read afterwards; and
every ``import`` statement in the source, including those inside functions (imports deferred to the call),
is read without running anything.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Which packages a module of each layer must never import, even inside a function.
FORBIDDEN = {
    "sphere_fast.editing": ("sphere_fast.harness", "sphere_fast.cli"),
    "sphere_fast.harness": ("sphere_fast.cli",),
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def source_modules() -> dict[str, Path]:
    """Module name -> source file, for sphere_fast/ and kernels/ (installed as sphere_fast.kernels)."""
    found = {}
    for folder, prefix in ((ROOT / "sphere_fast", ["sphere_fast"]), (ROOT / "kernels", ["sphere_fast", "kernels"])):
        for path in folder.rglob("*.py"):
            parts = prefix + list(path.relative_to(folder).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the sphere_fast modules its source imports anywhere (top level or inside functions)."""
    modules = source_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # "from package import module" imports the module; "from module import name" the module.
                deps.update(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def test_the_source_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_source_respects_the_layers():
    graph = import_graph()
    assert any(_within(m, "sphere_fast.editing") for m in graph) and any(_within(m, "sphere_fast.harness") for m in graph)
    wrong = {module: sorted(d for d in deps for banned in FORBIDDEN[layer] if _within(d, banned))
             for module, deps in graph.items() for layer in FORBIDDEN if _within(module, layer)}
    assert {m: d for m, d in wrong.items() if d} == {}


_IMPORT_ALL = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "sphere_fast" or m.startswith("sphere_fast."))))
"""


@pytest.mark.parametrize("layer", ["sphere_fast.editing", "sphere_fast.harness", "sphere_fast"])
def test_importing_a_layer_loads_no_layer_above_it(layer):
    """Every module of the layer imports in a fresh interpreter, and loads nothing it must not."""
    names = sorted(m for m in source_modules() if _within(m, layer))
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(names)], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(names) <= set(loaded)
    banned = FORBIDDEN.get(layer, ())
    assert [m for m in loaded if any(_within(m, b) for b in banned)] == []
