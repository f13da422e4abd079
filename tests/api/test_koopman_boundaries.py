"""The Koopman stack's layer boundaries (issue 14): DMD and the Koopman criteria read the recorder
and the DMD through their public interfaces only, so snapshot storage lives in trajectory.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import koopfast

ROOT = Path(koopfast.__file__).parent
MODULES = ["dmd.py", "criteria/koopman.py", "criteria/shrinkbench.py"]


def private_reads(source: str) -> list[str]:
    """``x._name`` where x is not ``self`` (dunder names aside)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id == "self"):
                found.append(f"line {node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize("module", MODULES)
def test_no_private_attribute_of_another_object_is_read(module):
    assert private_reads((ROOT / module).read_text()) == []


def test_the_check_catches_a_private_read():
    assert private_reads("def f(rec):\n    return rec._snapshots\n") == ["line 2: ._snapshots"]
