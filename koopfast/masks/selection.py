"""The selection object: scores unpacked into the selection kernels' operands, with their names.

:func:`koopfast.masks.global_topk` and :func:`koopfast.masks.layerwise_topk` are the user-facing
selections; :class:`Selection` is the layer under them for code that builds its own scores
(:mod:`koopfast.prune`, :func:`koopfast.masks.structured_topk`, criteria with fused operands):
it validates the scores once, names every tensor in error messages, and runs the exact
selection (:func:`koopfast.ops.select_threshold` + :func:`koopfast.ops.topk_mask`) on them.
:func:`keep_count` and :func:`resolve_keep` are the one rule for how many entries a sparsity or a
``keep`` argument means.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor

from koopfast import ops
from koopfast._types import BINARY_SCORES, UNARY_SCORES, ScoreBy

__all__ = ["Operand", "Scores", "Selection", "keep_count", "resolve_keep"]

Operand = Tensor | tuple[Tensor, Tensor]
Scores = Mapping[str, Operand] | Sequence[Operand]


def keep_count(n: int, sparsity: float, *, fn: str = "koopfast.masks.keep_count") -> int:
    """round((1 - sparsity) * n): how many of n scores a mask of this sparsity keeps."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{fn}: expected sparsity to be a float in [0, 1), got {type(sparsity).__name__}")
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(f"{fn}: expected sparsity in [0, 1), got {sparsity!r}")
    return round((1.0 - sparsity) * n)


def resolve_keep(n: int, sparsity: float | None, keep: int | None, fn: str = "koopfast.masks.resolve_keep") -> int:
    """The number of the n entries to keep, from exactly one of ``sparsity`` (see :func:`keep_count`)
    and ``keep`` (an int in [0, n]); ``fn`` names the caller in the errors."""
    if (sparsity is None) == (keep is None):
        raise ValueError(
            f"{fn}: expected exactly one of sparsity and keep, got {'both' if keep is not None else 'neither'}"
        )
    if sparsity is not None:
        return keep_count(n, sparsity, fn=fn)
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"{fn}: expected keep to be an int, got {type(keep).__name__}")
    if not 0 <= keep <= n:
        raise ValueError(f"{fn}: expected keep in [0, {n}] (the number of score elements), got {keep}")
    return keep


def _is_score_by(by: object) -> TypeGuard[ScoreBy]:
    return by in UNARY_SCORES + BINARY_SCORES


class Selection:
    """Scores as the selection kernels take them: lists ``a`` (and ``b`` for two-operand scores).

    Args:
        scores: ``dict[name, Tensor]`` or a list of tensors; pairs ``(a, b)`` for the two-operand
            ``by`` values (see :func:`koopfast.masks.global_topk`).
        by: how the score is computed from the operands.
        fn: the public function on whose behalf errors are raised (it prefixes their messages).
        names: the tensors' names in messages, instead of the dict keys / ``scores[i]``.

    Attributes:
        keys: the dict keys (or list positions) of the scores, in order; ``names``: their names
            in messages; ``a``, ``b``: the detached operands (``b`` empty for one-operand
            scores); ``by``, ``fn``; ``numel``: the number of score elements.

    Raises:
        ValueError: unknown ``by``, no tensors, meta tensors, a ``names`` list of another length.
        TypeError: containers or operands of the wrong type.
    """

    def __init__(self, scores: Scores, by: ScoreBy | str, fn: str, *, names: Sequence[str] | None = None) -> None:
        if not _is_score_by(by):
            raise ValueError(f"{fn}: expected by to be one of {UNARY_SCORES + BINARY_SCORES}, got {by!r}")
        if isinstance(scores, Mapping):
            self.keys: list[Any] = list(scores.keys())
            self.names = [str(k) for k in self.keys]
            values = list(scores.values())
        elif isinstance(scores, Sequence) and not isinstance(scores, (str, Tensor)):
            self.keys = list(range(len(scores)))
            self.names = [f"scores[{i}]" for i in self.keys]
            values = list(scores)
        else:
            raise TypeError(
                f"{fn}: expected scores to be a dict of tensors or a list of tensors, got {type(scores).__name__}"
            )
        if not values:
            raise ValueError(f"{fn}: expected at least one score tensor, got none")
        if names is not None:
            if len(names) != len(values):
                raise ValueError(f"{fn}: expected {len(values)} names, one per score tensor, got {len(names)}")
            self.names = [str(n) for n in names]
        self.is_mapping = isinstance(scores, Mapping)
        self.fn = fn
        self.by: ScoreBy = by
        binary = by in BINARY_SCORES
        self.a: list[Tensor] = []
        self.b: list[Tensor] = []
        for name, v in zip(self.names, values):
            if binary:
                if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(t, Tensor) for t in v)):
                    raise TypeError(
                        f"{fn}: expected {name!r} to be a pair of tensors (a, b) for by={by!r}, got {type(v).__name__}"
                    )
                self.a.append(v[0].detach())
                self.b.append(v[1].detach())
            else:
                if not isinstance(v, Tensor):
                    raise TypeError(f"{fn}: expected {name!r} to be a tensor for by={by!r}, got {type(v).__name__}")
                self.a.append(v.detach())
        self.numel = sum(t.numel() for t in self.a)
        for i, name in enumerate(self.names):
            if self.a[i].is_meta or (binary and self.b[i].is_meta):
                raise ValueError(f"{fn}: expected score tensors that hold values, got {name!r} on the meta device")

    @classmethod
    def from_scores(
        cls, scores: Scores, by: ScoreBy | str = "value", *, fn: str, names: Sequence[str] | None = None
    ) -> Selection:
        """The same as the constructor, with ``by`` defaulting to 'value'."""
        return cls(scores, by, fn, names=names)

    def rename(self, exc: Exception) -> Exception:
        """The op's error with a[i] / b[i] replaced by the caller's names."""

        def name(m: re.Match[str]) -> str:
            i = int(m.group(2))
            suffix = "" if m.group(1) == "a" else " (second operand)"
            whole: str = m.group(0)
            return f"{self.names[i]!r}{suffix}" if i < len(self.names) else whole

        msg = re.sub(r"^koopfast::\w+: ", "", str(exc).split("\n")[0])
        return type(exc)(f"{self.fn}: " + re.sub(r"\b([ab])\[(\d+)\]", name, msg))

    def select(self, k: int) -> tuple[Tensor, Tensor]:
        """``select_threshold``'s (threshold, stats) for the top k (1 <= k <= numel); NaN raises."""
        try:
            threshold, stats = ops.select_threshold(self.a, self.b, self.by, k)
        except (ValueError, TypeError) as exc:
            raise self.rename(exc) from None
        # One small read (a sync on CUDA): NaN must raise, never be silently kept or dropped.
        nan_tensor = int(stats[ops.STAT_NAN_TENSOR])
        if nan_tensor >= 0:
            raise ValueError(f"{self.fn}: expected scores without NaN, got NaN in {self.names[nan_tensor]!r}")
        return threshold, stats

    def topk(self, k: int) -> list[Tensor]:
        """Masks keeping exactly k entries over all tensors."""
        threshold, stats = self.select(max(k, 1))  # k == 0 still checks for NaN
        if k == 0:
            return [torch.zeros_like(t, dtype=torch.bool, memory_format=torch.contiguous_format) for t in self.a]
        return ops.topk_mask(self.a, self.b, self.by, threshold, stats)

    def subset(self, i: int) -> Selection:
        """The i-th tensor (pair) alone."""
        return Selection([(self.a[i], self.b[i])] if self.b else [self.a[i]], self.by, self.fn, names=[self.names[i]])

    def pack(self, masks: list[Tensor]) -> dict[Any, Tensor] | list[Tensor]:
        """Masks (one per tensor, in order) in the structure of the scores: a dict or a list."""
        return dict(zip(self.keys, masks)) if self.is_mapping else masks

    def check_distinct(self) -> None:
        """ValueError when one tensor is listed twice (a tied parameter under two names would
        count twice in a budget)."""
        seen: dict[tuple[object, ...], str] = {}
        for t, name in zip(self.a, self.names):
            if type(t) not in (Tensor, torch.nn.Parameter) or t.is_meta or t.numel() == 0:
                continue  # DTensors, meta and empty tensors hold no storage of their own to compare
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key in seen:
                raise ValueError(
                    f"{self.fn}: expected each tensor once, got the same tensor as {seen[key]!r} and {name!r} (a "
                    "tied parameter is one entry: pass it under one name)"
                )
            seen[key] = name
