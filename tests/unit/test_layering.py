"""The import structure of loracc: no cycles, every module importable on its own, layers respected.

The graph is read from the source (every ``import`` statement, including those inside functions
and under ``TYPE_CHECKING``), so a cycle hidden in a lazy import fails here even if no test
happens to take that path.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import loracc

ROOT = Path(loracc.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imported_names(node: ast.AST, package: str) -> set[str]:
    """The modules an ``import`` statement names: the loracc module a name comes from when it
    is one (``from loracc.api import onnx`` is ``loracc.api.onnx``), else the module named;
    third-party imports by their full dotted name. Empty for any other statement."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    module = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join([*parts, module] if module else parts)
    return {
        f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
        for alias in node.names
    }


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in it (:func:`_imported_names`)."""
    package = _package(name, path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        found |= _imported_names(node, package)
    return found


GRAPH: dict[str, set[str]] = {name: _imports(name, path) for name, path in MODULES.items()}


def _internal(name: str) -> set[str]:
    return {m for m in GRAPH[name] if m in MODULES and m != name}


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(_internal(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports() -> None:
    """The reader is not vacuous: it finds imports at the top, inside functions, relative."""
    assert "loracc.cli.common" in GRAPH["loracc.cli.hf"]
    assert "loracc.api.onnx" in GRAPH["loracc.api.inspect"]
    assert "onnxruntime" in GRAPH["loracc.io.ort"]
    assert {"loracc.pipeline", "loracc.cli", "loracc.io.ort"} <= MODULES.keys()


def test_no_import_cycle() -> None:
    assert _cycles() == []


def test_cycle_detector_finds_a_cycle() -> None:
    GRAPH["loracc.errors"].add("loracc.cli")
    try:
        assert any("loracc.errors" in c for c in _cycles())
    finally:
        GRAPH["loracc.errors"].discard("loracc.cli")


_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "loracc" or m.startswith("loracc.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=1).strip().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, with no other loracc module loaded: a cycle between modules
    fails with "partially initialized module" only for some entry points. One fresh interpreter
    for all of them, with loracc's modules dropped before each import (torch, numpy and onnx,
    which import the same whichever module comes first, load once: a fresh interpreter per
    module would spend minutes importing torch). ``__main__`` modules run the CLI: not imported."""
    names = sorted(name for name in MODULES if not name.endswith(".__main__"))
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


# Layers: a module under the first prefix may not import a module under any of the others.
_LOWERINGS_AND_UP = ("loracc.lower", "loracc.api", "loracc.cli", "loracc.golden", "loracc.runner")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "loracc.io": ("loracc.passes", "loracc.pipeline", *_LOWERINGS_AND_UP),
    "loracc.passes": ("loracc.pipeline", *_LOWERINGS_AND_UP),
    "loracc.lower": ("loracc.api", "loracc.cli", "loracc.golden", "loracc.runner"),
    "loracc.pipeline": ("loracc.lower", "loracc.api", "loracc.cli"),
    "loracc.api": ("loracc.cli",),
    "loracc.golden": ("loracc.api", "loracc.cli"),
    "loracc.runner": ("loracc.api", "loracc.cli"),
}
# The core (the IR, its invariants and printer, the formulas, the legality table, architecture
# data, the base-weights protocol, the errors) imports only itself: no I/O, passes or lowerings.
CORE = (
    "loracc._model_types",
    "loracc.arch",
    "loracc.errors",
    "loracc.ir",
    "loracc.kernels",
    "loracc.legality",
    "loracc.printer",
    "loracc.verify",
    "loracc.weights",
)
# Third-party modules only one loracc module may import.
ONLY_IN: dict[str, str] = {"onnxruntime": "loracc.io.ort"}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_layers() -> None:
    wrong = [
        f"{name} imports {dep}"
        for name in GRAPH
        for prefix, banned in FORBIDDEN.items()
        if _under(name, prefix)
        for dep in sorted(_internal(name))
        if any(_under(dep, b) for b in banned)
    ]
    assert wrong == []


def test_core_imports_only_the_core() -> None:
    assert "loracc.errors" in CORE
    wrong = {name: _internal(name) - set(CORE) for name in CORE if name in MODULES}
    assert {name: deps for name, deps in wrong.items() if deps} == {}
    assert _internal("loracc.errors") == set()


def test_cli_is_imported_by_nobody() -> None:
    users = {
        name
        for name in GRAPH
        if not _under(name, "loracc.cli") and name != "loracc.__main__"
        if any(_under(dep, "loracc.cli") for dep in _internal(name))
    }
    assert users == set()


@pytest.mark.parametrize("package", sorted(ONLY_IN))
def test_third_party_confined(package: str) -> None:
    users = {name for name, deps in GRAPH.items() if any(_under(d, package) for d in deps)}
    assert users == {ONLY_IN[package]}


# Modules that `loracc --help`, `golden record|check` and `run` on ONNX load: none may import
# torch when it is imported (only inside a function, or for type checkers), nor a module outside
# this set, so a torch-free install runs those commands (tests/e2e/test_torch_free.py runs them).
TORCH_FREE = (
    "loracc",
    "loracc._lazy",
    "loracc._model_types",
    "loracc.api",
    "loracc.api.common",
    "loracc.api.inspect",
    "loracc.arch",
    "loracc.cli",
    "loracc.cli.combine",
    "loracc.cli.common",
    "loracc.cli.golden",
    "loracc.cli.hf",
    "loracc.cli.onnx",
    "loracc.errors",
    "loracc.golden",
    "loracc.golden.artifact",
    "loracc.golden.compare",
    "loracc.golden.file",
    "loracc.golden.hf",
    "loracc.golden.onnx",
    "loracc.io",
    "loracc.io.checkpoint",
    "loracc.io.hub",
    "loracc.io.inputs",
    "loracc.io.layout",
    "loracc.io.npz",
    "loracc.io.onnx_model",
    "loracc.io.ort",
    "loracc.io.output",
    "loracc.io.peft",
    "loracc.io.peft_config",
    "loracc.io.peft_keys",
    "loracc.io.peft_params",
    "loracc.io.replicated",
    "loracc.io.safetensors",
    "loracc.ir",
    "loracc.lower",
    "loracc.lower.combine_methods",
    "loracc.lower.onnx",
    "loracc.lower.onnx.slots",
    "loracc.runner",
    "loracc.weights",
)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(name: str) -> set[str]:
    """What ``name`` imports when it is imported: module-level statements, not those in
    functions or under ``if TYPE_CHECKING``."""
    path = MODULES[name]
    found: set[str] = set()
    body = list(ast.parse(path.read_text(), str(path)).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            body += node.body + node.orelse
        elif isinstance(node, ast.Try):
            body += node.body + node.orelse + node.finalbody
        else:
            found |= _imported_names(node, _package(name, path))
    return found


def test_torch_free_modules_import_no_torch() -> None:
    assert set(TORCH_FREE) <= MODULES.keys()
    wrong = {
        name: sorted(
            dep
            for dep in _top_level_imports(name)
            if _under(dep, "torch") or (dep in MODULES and dep not in TORCH_FREE)
        )
        for name in TORCH_FREE
    }
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_top_level_reader_sees_torch() -> None:
    """Not vacuous: a module that imports torch at its top is caught; a lazy import is not."""
    assert "torch" in _top_level_imports("loracc.kernels")
    assert "torch" not in _top_level_imports("loracc.golden.hf")
    assert "torch" in GRAPH["loracc.golden.hf"]
