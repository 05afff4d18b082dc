"""Code-health rules of the project (docs/design.md, "Layers"), checked on the source tree."""

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flatminima"
MAX_BODY_LINES = 80


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring excluded."""
    body = fn.body
    if (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    return fn.end_lineno - body[0].lineno + 1


def test_no_function_body_over_80_lines():
    long = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _body_lines(node) > MAX_BODY_LINES
    ]
    assert not long, "split these functions by job:\n" + "\n".join(long)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _import_graph() -> dict[str, set[str]]:
    """Subpackage -> subpackages it imports (module-level and function-level imports)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path, tree in _modules():
        rel = path.relative_to(SRC.parent).with_suffix("")
        here = _package(".".join(rel.parts))
        if here in ("cli", "__main__", "commands"):
            continue  # the command layer may import anything
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("flatminima."):
                    there = _package(name)
                    if there and there != here and not there.startswith("_"):
                        graph[here].add(there)
    return graph


def test_no_import_cycle_between_subpackages():
    graph = _import_graph()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "import cycles between subpackages:\n" + "\n".join(sorted(set(cycles)))


def test_layers_import_only_downwards():
    graph = _import_graph()
    leaves = {"optim", "models", "data"}
    for pkg in leaves:
        assert not graph.get(pkg, set()), f"{pkg} must not import {sorted(graph[pkg])}"
    assert graph.get("flatness", set()) <= {"optim"}, graph.get("flatness")


def test_argparse_only_in_the_command_layer():
    users = [
        str(path.relative_to(SRC))
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            n == "argparse"
            for n in (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
        )
        and not (path.name == "cli.py" and path.parent == SRC)
        and "commands" not in path.relative_to(SRC).parts
    ]
    assert not users, f"argparse outside the command layer: {sorted(set(users))}"
