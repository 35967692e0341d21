"""The package's layers, bottom to top: the core (the torch-only top-level modules and the Triton kernels,
installed as sphere_fast.kernels), the editing algorithm, the harness, the command line. No module imports a
layer above its own, and no module imports itself through others (no import cycles). The benchmarks in
bench/ use only public names: no private name imported or read, no module of the package patched.

Two checks of the layers: every module is imported in fresh interpreters and ``sys.modules`` is read
afterwards; and every ``import`` statement in the source, including those inside functions (imports deferred
to the call), is read without running anything. bench/ is read the second way only.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The layers above the core, bottom to top; every other module of sphere_fast (kernels included) is the core.
LAYERS = ("sphere_fast.editing", "sphere_fast.harness", "sphere_fast.cli")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> int:
    """0 for the core, else 1 + the index of the module's package in LAYERS."""
    return next((i + 1 for i, package in enumerate(LAYERS) if _within(module, package)), 0)


def above(module: str) -> tuple[str, ...]:
    """The packages ``module`` must never import, even inside a function."""
    return LAYERS[layer(module):]


def layer_violations(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Module -> the modules of higher layers it imports, for the modules that import any."""
    wrong = {module: sorted(d for d in deps if layer(d) > layer(module)) for module, deps in graph.items()}
    return {module: deps for module, deps in wrong.items() if deps}


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
    # Every layer is present, and the kernels are read (as the core).
    assert {layer(m) for m in graph} == set(range(len(LAYERS) + 1))
    assert any(_within(m, "sphere_fast.kernels") for m in graph) and "sphere_fast.projector" in graph
    assert layer_violations(graph) == {}


def test_the_layer_check_sees_an_import_from_above():
    graph = {"sphere_fast.gram": {"sphere_fast.editing.editor"}, "sphere_fast.kernels.tiles": {"sphere_fast.cli"},
             "sphere_fast.harness.demo": {"sphere_fast.cli", "sphere_fast.editing.editor", "sphere_fast.gram"}}
    assert layer_violations(graph) == {"sphere_fast.gram": ["sphere_fast.editing.editor"],
                                       "sphere_fast.kernels.tiles": ["sphere_fast.cli"],
                                       "sphere_fast.harness.demo": ["sphere_fast.cli"]}


_IMPORT_ALL = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "sphere_fast" or m.startswith("sphere_fast."))))
"""


@pytest.mark.parametrize("level", ["core", "sphere_fast.editing", "sphere_fast.harness", "sphere_fast"])
def test_importing_a_layer_loads_no_layer_above_it(level):
    """Every module of the layer imports in a fresh interpreter, and loads nothing it must not
    ("sphere_fast": every module of the package at once)."""
    if level == "core":
        names, banned = sorted(m for m in source_modules() if layer(m) == 0), LAYERS
    else:
        names = sorted(m for m in source_modules() if _within(m, level))
        banned = above(level) if level != "sphere_fast" else ()
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(names)], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(names) <= set(loaded)
    assert [m for m in loaded if any(_within(m, b) for b in banned)] == []


# --------------------------------------------------------------------------- bench/ uses only public names

# Patching calls: monkeypatch.setattr / setattr / delattr / mock.patch / mock.patch.object.
_PATCHES = {"setattr", "delattr", "patch"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def private_uses(source: str, first_party: set[str], filename: str = "<source>") -> list[str]:
    """What ``source`` reaches of the first-party modules (``first_party``: top-level names, such as
    sphere_fast and the modules of bench/) that is not public, one line each: a private name or module
    imported, a private attribute read on anything but ``self``/``cls`` or another library's module (what
    an object holds cannot be told statically, so any), and a first-party module or name assigned to,
    deleted from or patched."""
    tree = ast.parse(source, filename)
    ours: set[str] = set()  # local names bound to first-party modules or names
    theirs: set[str] = set()  # local names bound to other libraries' modules or names
    found = []

    def say(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}: {ast.unparse(node)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                mine = alias.name.split(".")[0] in first_party
                (ours if mine else theirs).add(alias.asname or alias.name.split(".")[0])
                if mine and any(_private(part) for part in alias.name.split(".")):
                    say(node, "private module")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            mine = not node.level and module.split(".")[0] in first_party
            for alias in node.names:
                (ours if mine else theirs).add(alias.asname or alias.name)
            if mine and (any(_private(part) for part in module.split("."))
                         or any(_private(alias.name) for alias in node.names)):
                say(node, "private name imported")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = _root(node)
            if not (isinstance(root, ast.Name) and (root.id in ("self", "cls") or root.id in theirs - ours)):
                say(node, "private attribute")
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, (ast.Attribute, ast.Subscript)) and isinstance(_root(part), ast.Name) \
                        and _root(part).id in ours:
                    say(node, "first-party name patched")
                    break
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "object" and isinstance(func, ast.Attribute):  # mock.patch.object(target, ...)
                value = func.value
                name = value.attr if isinstance(value, ast.Attribute) else getattr(value, "id", "")
            first = node.args[0]
            if name in _PATCHES and (
                    (isinstance(_root(first), ast.Name) and _root(first).id in ours)
                    or (isinstance(first, ast.Constant) and isinstance(first.value, str)
                        and first.value.split(".")[0] in first_party)):
                say(node, "first-party name patched")
    return found


def bench_first_party() -> set[str]:
    return {"sphere_fast"} | {path.stem for path in (ROOT / "bench").glob("*.py")}


def test_bench_uses_only_public_names():
    first_party = bench_first_party()
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        found += private_uses(path.read_text(encoding="utf-8"), first_party, str(path.relative_to(ROOT)))
    assert found == []


@pytest.mark.parametrize("source,what", [
    ("from sphere_fast.harness.report import _figure\n", "private name imported"),
    ("from sphere_fast import _cuda\n", "private name imported"),
    ("from sphere_fast._cuda import top_eigenpairs\n", "private name imported"),
    ("import sphere_fast._cuda as c\n", "private module"),
    ("from benchutil import _run\n", "private name imported"),
    ("from sphere_fast.editing import editor\nn = editor._null_dim\n", "private attribute"),
    ("ed = make()\nn = ed._null_dim\n", "private attribute"),
    ("import sphere_fast.editing.covariance as cov\ncov.DEFAULT_BATCH_TOKENS = 1\n", "first-party name patched"),
    ("from sphere_fast.editing.editor import Editor\nEditor.edit_batch = None\n", "first-party name patched"),
    ("from sphere_fast.editing import editor\nsetattr(editor, 'Editor', None)\n", "first-party name patched"),
    ("def f(monkeypatch):\n    monkeypatch.setattr('sphere_fast.editing.editor.Editor', None)\n",
     "first-party name patched"),
    ("from unittest import mock\nfrom sphere_fast.editing import editor\nmock.patch.object(editor, 'x')\n",
     "first-party name patched"),
])
def test_the_bench_check_sees_a_private_use(source, what):
    found = private_uses(source, bench_first_party())
    assert len(found) == 1 and f": {what}: " in found[0], found


def test_the_bench_check_passes_public_uses():
    source = (
        "import torch\nfrom sphere_fast import SphereProjector\nfrom sphere_fast.harness.report import figure\n"
        "class P:\n    path = 'fit'\n    def __init__(self):\n        self._x = torch._C\n"
        "P.path = 'refit'\nargs.steps = 2\nfigure(2)\n"
    )
    assert private_uses(source, bench_first_party()) == []
