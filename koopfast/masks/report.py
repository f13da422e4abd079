"""Sparsity reports: kept and pruned entries per tensor and in total, as data and as a table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from koopfast import ops
from koopfast.masks.packed import MaskLike, PackedMask
from koopfast.masks.training import Masked
from koopfast.prunable import prunable

__all__ = ["LayerSparsity", "SparsityReport", "report"]


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    total: int
    kept: int

    @property
    def pruned(self) -> int:
        return self.total - self.kept

    @property
    def sparsity(self) -> float:
        """Fraction pruned (0 for an empty tensor)."""
        return self.pruned / self.total if self.total else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor rows in order, and totals. ``str(report)`` is the table."""

    layers: tuple[LayerSparsity, ...]

    @property
    def total(self) -> int:
        return sum(r.total for r in self.layers)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.layers)

    @property
    def pruned(self) -> int:
        return self.total - self.kept

    @property
    def sparsity(self) -> float:
        return self.pruned / self.total if self.total else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): ``layers`` (name, shape, total, kept, pruned, sparsity) and totals."""
        rows = [dict(asdict(r), shape=list(r.shape), pruned=r.pruned, sparsity=r.sparsity) for r in self.layers]
        return {
            "layers": rows,
            "total": self.total,
            "kept": self.kept,
            "pruned": self.pruned,
            "sparsity": self.sparsity,
        }

    def table(self) -> str:
        headers = ["tensor", "shape", "kept", "total", "sparsity"]
        body = [
            [r.name, str(list(r.shape)), str(r.kept), str(r.total), f"{100 * r.sparsity:.2f}%"] for r in self.layers
        ]
        footer = ["total", "", str(self.kept), str(self.total), f"{100 * self.sparsity:.2f}%"]
        widths = [max(len(h), *(len(row[i]) for row in [*body, footer])) for i, h in enumerate(headers)]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(headers), rule, *(line(row) for row in body), rule, line(footer)])

    def __str__(self) -> str:
        return self.table()


def _from_masks(masks: Mapping[str, MaskLike], fn: str) -> SparsityReport:
    names: list[str] = []
    tensors: list[Tensor] = []
    numels: list[int] = []
    shapes: list[tuple[int, ...]] = []
    for name, m in masks.items():
        if isinstance(m, PackedMask):
            tensors.append(m.bits)
            shape = m.shape
        elif isinstance(m, Tensor) and m.dtype == torch.bool:
            tensors.append(m)
            shape = m.shape
        else:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"{fn}: expected mask {name!r} to be a bool tensor or a PackedMask, got {got}")
        names.append(str(name))
        shapes.append(tuple(shape))
        numels.append(shape.numel())
    kept = [0] * len(tensors)
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    for idx in groups.values():  # one count per device, bool and packed masks together
        counts = ops.count_masks([tensors[i] for i in idx], [numels[i] for i in idx]).tolist()
        for i, c in zip(idx, counts):
            kept[i] = c
    return SparsityReport(tuple(LayerSparsity(n, s, t, k) for n, s, t, k in zip(names, shapes, numels, kept)))


def _from_model(model: nn.Module) -> SparsityReport:
    """The model's prunable tensors (:mod:`koopfast.prunable`): kept = entries of the
    torch.nn.utils.prune mask (``<name>_mask``) that are nonzero if the layer has one, else nonzero
    entries of the tensor. A tied tensor is one row, under its canonical name."""
    rows: list[LayerSparsity] = []
    for entry in prunable(model).values():
        assert entry.module_name is not None and entry.attr is not None, "a model's entries name their module"
        module = model.get_submodule(entry.module_name)
        mask = getattr(module, f"{entry.attr}_mask", None)
        if isinstance(mask, Tensor):  # torch.nn.utils.prune: named as the attribute the mask computes
            name, t = (f"{entry.module_name}.{entry.attr}" if entry.module_name else entry.attr), mask
        else:
            name, t = entry.name, entry.tensor
        rows.append(LayerSparsity(name, tuple(t.shape), t.numel(), int(torch.count_nonzero(t.detach()))))
    return SparsityReport(tuple(rows))


def report(source: Mapping[str, MaskLike] | Masked | nn.Module) -> SparsityReport:
    """Per-tensor and total sparsity of masks, of a :class:`~koopfast.masks.Masked` model, or of a model.

    Args:
        source: ``dict[name, mask]`` of bool tensors and :class:`PackedMask` es (counted by one
            kernel call per device); a :class:`~koopfast.masks.Masked` (its masks); or a model
            (its prunable tensors, :mod:`koopfast.prunable`: the nonzero entries of each
            torch.nn.utils.prune ``<name>_mask`` buffer where there is one, else of the tensor).

    Returns:
        A :class:`SparsityReport`: ``layers`` (name, shape, total, kept, pruned, sparsity) and
        totals; ``str(r)`` or ``r.table()`` is a printable table, ``r.as_dict()`` plain data.
    """
    fn = "koopfast.masks.report"
    if isinstance(source, Masked):
        return _from_masks(source.masks, fn)
    if isinstance(source, nn.Module):
        return _from_model(source)
    if isinstance(source, Mapping):
        return _from_masks(source, fn)
    raise TypeError(f"{fn}: expected a dict of masks, a Masked model or a model, got {type(source).__name__}")
