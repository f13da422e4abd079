"""The application layer (the `koopfast` command: cli, demo, study, plots, the digits loader and
the benchmark families) sits on top of the library and is never imported by it: the library
imports no matplotlib, tqdm or scikit-learn, and a change to a benchmark cannot break pruning."""

from __future__ import annotations

import ast
import pathlib

import koopfast

PACKAGE = pathlib.Path(koopfast.__file__).parent
APP = ("koopfast.cli", "koopfast.demo", "koopfast.study", "koopfast.plots", "koopfast._digits", "koopfast.benchmarks")
ENTRY = {"__main__.py"}  # `python -m koopfast` runs the command line


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_app(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in APP)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_the_library_never_imports_the_application_layer():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        if _is_app(name) or path.name in ENTRY:
            continue
        for line, imported in _imports(ast.parse(path.read_text(), str(path))):
            if _is_app(imported):
                violations.append(f"{path.relative_to(PACKAGE)}:{line} imports {imported}")
    assert not violations, "library modules import the application layer:\n  " + "\n  ".join(violations)


def test_the_checker_sees_an_import():
    tree = ast.parse("from koopfast.benchmarks import harness\nimport koopfast.plots")
    assert [n for _, n in _imports(tree) if _is_app(n)] == [
        "koopfast.benchmarks",
        "koopfast.benchmarks.harness",
        "koopfast.plots",
    ]
