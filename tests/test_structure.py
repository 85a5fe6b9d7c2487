"""The package's shape: no import circles, `--help` without torch, modules of a readable size."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import COMMANDS

import qpissa

PACKAGE = Path(__file__).resolve().parent.parent / "qpissa"
MAX_LINES = 400  # STYLE.md rule 2: modules under ~400 lines
LAZY_IMPORTERS = {"cli"}  # its handlers import the modules that do the work: --help stays torch-free


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def _qpissa_imports(node: ast.AST, modules: set[str]) -> set[str]:
    """The qpissa modules that `import` statements under `node` name (`from qpissa import x` included)."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            found |= {alias.name.split(".")[1] for alias in child.names if alias.name.startswith("qpissa.")}
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            if child.module.startswith("qpissa."):
                found.add(child.module.split(".")[1])
            elif child.module == "qpissa":
                found |= {alias.name for alias in child.names if alias.name in modules}
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the qpissa modules it imports anywhere: module level, functions, TYPE_CHECKING blocks."""
    modules = _modules()
    return {name: _qpissa_imports(tree, set(modules)) - {name, "__init__"} for name, tree in modules.items()}


def _module_map() -> dict[str, bool]:
    """The module map in `qpissa.__doc__`: module name -> marked torch-free (`*`)."""
    entries = [line.split()[0] for line in qpissa.__doc__.splitlines() if line.startswith("    ")]
    return {entry.rstrip("*"): entry.endswith("*") for entry in entries}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path `a -> b -> ... -> a`, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph.get(name, ())):
            found = visit(target, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    return next((found for name in sorted(graph) if (found := visit(name, []))), None)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = _import_graph()
    assert {"settings", "options"} <= graph["cli"] and "convert" in graph["cli"]  # module and function level
    assert "convert_output" in graph["convert"]  # `from qpissa import convert_output`
    assert {"recipe", "runtime"} <= graph["memory"]  # under TYPE_CHECKING


def test_no_import_circles() -> None:
    cycle = _cycle(_import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_qpissa_modules_are_imported_at_module_level() -> None:
    """A function-level import of a qpissa module would hide a circle; only the CLI defers its imports."""
    modules = _modules()
    deferred = []
    for name, tree in modules.items():
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef) and name not in LAZY_IMPORTERS:
                deferred += [
                    f"{name}.{function.name}: {target}" for target in _qpissa_imports(function, set(modules))
                ]
    assert deferred == []


def test_help_never_imports_torch() -> None:
    script = (
        "import json, sys\n"
        "from qpissa.cli import main\n"
        "loaded = {}\n"
        f"for argv in [['--help']] + [[command, '--help'] for command in {COMMANDS!r}]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    loaded[' '.join(argv)] = 'torch' in sys.modules\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(loaded) == len(COMMANDS) + 1  # every command's help ran: the check is not vacuous
    assert not any(loaded.values()), f"--help imported torch: {loaded}"


def test_the_module_map_names_real_modules() -> None:
    mapped = _module_map()
    assert len(mapped) > 30 and set(mapped) <= set(_modules()), set(mapped) - set(_modules())


def test_modules_marked_torch_free_import_no_heavy_library() -> None:
    light = [name for name, torch_free in _module_map().items() if torch_free]
    assert {"cli", "settings", "options", "recipe", "artifacts"} <= set(light)
    heavy = ("torch", "transformers", "peft", "bitsandbytes", "datasets")
    script = (
        "import importlib, json, sys\n"
        f"for name in {light!r}:\n"
        "    importlib.import_module('qpissa' if name == '__init__' else 'qpissa.' + name)\n"
        f"print(json.dumps([library for library in {heavy!r} if library in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda path: path.name)
def test_modules_stay_readable(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it along its jobs (STYLE.md rule 2)"
