"""Size limits of the code base: no function longer than 80 lines, no ``guft_jax`` module longer
than 500 lines, and no assignment to another module's attribute (a module-level setting changed
from outside).

Run ``python tools/code_scan.py``: prints each violation and exits 1 if there is any.
``tests/test_code_scan.py`` runs it.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUNCTION_DIRS = ("guft_jax", "experiments", "benchmarks")
MODULE_DIR = "guft_jax"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# Where another module's attributes must not be assigned: the package, its benchmarks and tests.
ASSIGN_DIRS = ("guft_jax", "experiments", "benchmarks", "tests")


def _files(dirs):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, str, int]]:
    """``(file:line, name, lines)`` of every function or method over ``limit`` lines."""
    out = []
    for p in _files(FUNCTION_DIRS):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((f"{p.relative_to(ROOT)}:{node.lineno}", node.name, n))
    return out


def long_modules(limit: int = MAX_MODULE_LINES) -> list[tuple[str, int]]:
    """``(file, lines)`` of every ``guft_jax`` module over ``limit`` lines."""
    out = []
    for p in _files((MODULE_DIR,)):
        n = len(p.read_text().splitlines())
        if n > limit:
            out.append((str(p.relative_to(ROOT)), n))
    return out


def _module_aliases(tree: ast.Module) -> set[str]:
    """Names bound to an imported ``guft_jax`` module (``import guft_jax.ops as ops``,
    ``from guft_jax import ops``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("guft_jax"):
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("guft_jax"):
            for a in node.names:
                names.add(a.asname or a.name)
    return names


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def foreign_assignments() -> list[tuple[str, str]]:
    """``(file:line, target)`` where code assigns to (or ``monkeypatch``es) an attribute or item
    of an imported ``guft_jax`` module."""
    out = []
    for p in _files(ASSIGN_DIRS):
        tree = ast.parse(p.read_text(), str(p))
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                targets = [t for t in targets if isinstance(t, ast.Attribute | ast.Subscript)]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("setattr", "setitem")
                and _root_name(node.func.value) == "monkeypatch"
                and node.args
            ):
                targets = [node.args[0]]
            for t in targets:
                if _root_name(t) in aliases:
                    out.append((f"{p.relative_to(ROOT)}:{node.lineno}", ast.unparse(t)))
    return out


def main() -> int:
    bad = 0
    for where, name, n in long_functions():
        print(f"function {name} is {n} lines (> {MAX_FUNCTION_LINES}): {where}")
        bad += 1
    for where, n in long_modules():
        print(f"module {where} is {n} lines (> {MAX_MODULE_LINES})")
        bad += 1
    for where, target in foreign_assignments():
        print(f"assignment to another module's setting {target}: {where}")
        bad += 1
    print(f"code scan: {bad} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
