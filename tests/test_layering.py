"""Layer boundaries: no koopfast module reads another module's or object's private state.

Every module of the koopfast package is parsed (ast), and these are violations:

- an access ``x._name`` (read, write or delete; dunders such as ``__dict__`` aside) where ``x`` is
  not ``self`` or ``cls``, unless ``_name`` is an attribute the enclosing class itself sets on
  ``self`` (a class may read its own private fields on another instance: ``__copy__``,
  ``__eq__``);
- ``getattr``/``setattr``/``hasattr``/``delattr`` with a constant underscore name, on the same terms;
- ``from koopfast.<m> import _name`` where ``_name`` is not a module (underscore *modules* such as
  koopfast._probe are internal helpers that may be imported; their underscore names may not).

Torch's own internals are reached only through koopfast/_torch_compat.py: the allow-list below,
each entry with its reason. The test lists every violation in one message.
"""

from __future__ import annotations

import ast
import pathlib

import koopfast

PACKAGE = pathlib.Path(koopfast.__file__).parent
ADAPTER = "_torch_compat.py"

# (file relative to the package, attribute) -> why torch leaves no public way.
ALLOWED: dict[tuple[str, str], str] = {
    (ADAPTER, "_BatchNorm"): "torch's only common base of BatchNorm1d/2d/3d, SyncBatchNorm and the lazy variants",
    (ADAPTER, "_NormBase"): "torch's only common base of the normalizations that may track running statistics",
    (ADAPTER, "_ConvNd"): "torch's only common base of Conv1d/2d/3d and ConvTranspose1d/2d/3d",
    (ADAPTER, "_ConvTransposeNd"): "torch's only common base of ConvTranspose1d/2d/3d",
    (ADAPTER, "_tensor_name"): (
        "torch.nn.utils.prune's methods name their tensor only there (apply_mask and remove read it); "
        "koopfast.prune builds torch's pruned state without torch's transient all-ones mask"
    ),
    (ADAPTER, "_foreach_mul_"): "torch's fused multi-tensor kernel, the baseline of the mask benchmarks",
    (ADAPTER, "_foreach_copy_"): "torch's fused multi-tensor copy, restoring benchmark inputs",
}

ATTR_FUNCTIONS = ("getattr", "setattr", "hasattr", "delattr")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_fields(cls: ast.ClassDef) -> set[str]:
    """Attributes a class sets on self (or cls) in its own body."""
    return {
        node.attr
        for node in ast.walk(cls)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("self", "cls")
    }


def _is_module(package_path: str, name: str) -> bool:
    base = PACKAGE.parent.joinpath(*package_path.split("."), name)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


class _Checker(ast.NodeVisitor):
    def __init__(self, rel: str):
        self.rel = rel
        self.found: list[tuple[str, int, str, str]] = []  # (file, line, attribute, what)
        self.fields: list[set[str]] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.fields.append(_own_fields(node))
        self.generic_visit(node)
        self.fields.pop()

    def _check(self, node: ast.AST, owner: ast.AST, attr: str, what: str) -> None:
        if not _private(attr):
            return
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            return
        if any(attr in f for f in self.fields):
            return
        self.found.append((self.rel, node.lineno, attr, what))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check(node, node.value, node.attr, f"{ast.unparse(node.value)}.{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Name) and f.id in ATTR_FUNCTIONS and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                self._check(node, node.args[0], name.value, f"{f.id}({ast.unparse(node.args[0])}, {name.value!r})")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and (module == "koopfast" or module.startswith("koopfast.")):
            for alias in node.names:
                if _private(alias.name) and not _is_module(module, alias.name):
                    self.found.append((self.rel, node.lineno, alias.name, f"from {module} import {alias.name}"))
        self.generic_visit(node)


def violations() -> list[tuple[str, int, str, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        checker = _Checker(rel)
        checker.visit(ast.parse(path.read_text(), filename=str(path)))
        out += [v for v in checker.found if (v[0], v[2]) not in ALLOWED]
    return out


def test_no_module_reads_private_state_of_another():
    found = violations()
    listing = "\n".join(f"  koopfast/{rel}:{line}: {what}" for rel, line, _, what in found)
    assert not found, (
        f"{len(found)} reads of private state outside koopfast/{ADAPTER} (use a public interface, or name "
        f"torch's internal in {ADAPTER} with the reason):\n{listing}"
    )


def test_allow_list_entries_are_used_and_only_in_the_adapter():
    """An entry that matches nothing is stale; every entry is the adapter's, with a reason."""
    used = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        checker = _Checker(path.relative_to(PACKAGE).as_posix())
        checker.visit(ast.parse(path.read_text()))
        used |= {(rel, attr) for rel, _, attr, _ in checker.found}
    assert set(ALLOWED) <= used, f"stale allow-list entries: {sorted(set(ALLOWED) - used)}"
    assert all(rel == ADAPTER and reason for (rel, _), reason in ALLOWED.items())


def test_the_checker_finds_each_kind_of_violation():
    source = """
from koopfast.masks.topk import _hidden
from koopfast import _probe
class A:
    def __init__(self):
        self._mine = 1
    def copy(self, other):
        return other._mine + self._x + other.__dict__.__len__()
def f(obj):
    obj._state = 2
    return getattr(obj, "_other", None), obj.public
"""
    checker = _Checker("example.py")
    checker.visit(ast.parse(source))
    assert sorted(attr for _, _, attr, _ in checker.found) == ["_hidden", "_other", "_state"]
