"""The code's shape, checked: no import cycle among fittune's modules, strategy decisions asked of the one
module that builds the Strategy, and functions short enough to read at once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fittune"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """fittune modules a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fittune"):
            if node.module == "fittune":
                found.update(a.name for a in node.names)
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fittune."))
    return found


def test_no_import_cycle_among_fittune_modules():
    graph = {name: _imports(tree) & set(_modules()) for name, tree in _modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_strategy_is_decided_in_one_place():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "strategy.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "distributed_type.value" in line or 'parallel == "auto"' in line:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "ask fittune.strategy.Strategy instead:\n" + "\n".join(offenders)


def test_functions_are_short():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"fittune/{name}.py:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_no_sys_exit_in_the_library():
    """Only fittune/entry.py (run_cli, what every entry point calls) exits the process."""
    offenders = [f"{p.name}:{n}" for p in sorted(PACKAGE.glob("*.py")) if p.name != "entry.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "sys.exit(" in line]
    assert not offenders, f"the entry points turn results into exit codes, not the library: {offenders}"


def test_help_and_config_errors_answer_without_importing_torch():
    """Was: 3 s for `train.py --help` (the demo data's path came from fittune.tiny, which imports torch)."""
    probe = ("import runpy, sys\nsys.argv = ['train.py', *sys.argv[1:]]\ntry:\n    runpy.run_path('train.py', "
             "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    for args in (["--help"], ["--train.lr", "fast"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.stderr.strip().splitlines()[-1] == "False", proc.stderr[-2000:]
