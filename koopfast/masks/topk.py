"""Masks from scores: exact global and layerwise top-k selection.

Scores are "higher = keep". They come as ``dict[name, Tensor]`` (or a list of tensors); with
``by`` set to a two-operand score, each value is a pair ``(a, b)`` and the score (for example
|θ·g|) is computed inside the kernel, never materialised. Masks are bool tensors of the same
structure, shapes and device.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from koopfast import _distributed as kd
from koopfast import ops
from koopfast._types import BINARY_SCORES, UNARY_SCORES, ScoreBy
from koopfast.masks.sharded import sharded_topk

__all__ = ["global_topk", "keep_count", "layerwise_topk"]

Operand = Tensor | tuple[Tensor, Tensor]
Scores = Mapping[str, Operand] | Sequence[Operand]


def keep_count(n: int, sparsity: float, *, fn: str = "koopfast.masks.keep_count") -> int:
    """round((1 - sparsity) * n): how many of n scores a mask of this sparsity keeps."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{fn}: expected sparsity to be a float in [0, 1), got {type(sparsity).__name__}")
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(f"{fn}: expected sparsity in [0, 1), got {sparsity!r}")
    return round((1.0 - sparsity) * n)


class _Operands:
    """Scores unpacked into the ops' (a, b) lists, with names for messages."""

    def __init__(self, scores: Scores, by: str, fn: str):
        if by not in UNARY_SCORES + BINARY_SCORES:
            raise ValueError(f"{fn}: expected by to be one of {UNARY_SCORES + BINARY_SCORES}, got {by!r}")
        if isinstance(scores, Mapping):
            self.keys: list = list(scores.keys())
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
        self.is_mapping = isinstance(scores, Mapping)
        self.fn, self.by = fn, by
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

    def rename(self, exc: Exception) -> Exception:
        """The op's error with a[i] / b[i] replaced by the caller's names."""

        def name(m: re.Match) -> str:
            i = int(m.group(2))
            suffix = "" if m.group(1) == "a" else " (second operand)"
            return f"{self.names[i]!r}{suffix}" if i < len(self.names) else m.group(0)

        msg = re.sub(r"^koopfast::\w+: ", "", str(exc).split("\n")[0])
        return type(exc)(f"{self.fn}: " + re.sub(r"\b([ab])\[(\d+)\]", name, msg))

    def select(self, k: int) -> tuple[Tensor, Tensor]:
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

    def subset(self, i: int) -> _Operands:
        """The i-th tensor (pair) alone."""
        one = _Operands([(self.a[i], self.b[i])] if self.b else [self.a[i]], self.by, self.fn)
        one.names = [self.names[i]]
        return one

    def pack(self, masks: list[Tensor]):
        return dict(zip(self.keys, masks)) if self.is_mapping else masks


def _check_distinct(tensors: list[Tensor], names: list[str], fn: str) -> None:
    """A tensor listed twice (a tied parameter under both its names) would count twice in the budget."""
    seen: dict[tuple, str] = {}
    for t, name in zip(tensors, names):
        if type(t) not in (Tensor, torch.nn.Parameter) or t.is_meta or t.numel() == 0:
            continue  # DTensors, meta and empty tensors hold no storage of their own to compare
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            raise ValueError(
                f"{fn}: expected each tensor once, got the same tensor as {seen[key]!r} and {name!r} (a tied "
                "parameter is one entry: pass it under one name)"
            )
        seen[key] = name


def global_topk(
    scores: Scores,
    sparsity: float | None = None,
    *,
    keep: int | None = None,
    by: ScoreBy = "value",
    process_group=None,
):
    """Masks keeping the top scores over all tensors together (one global threshold).

    Exactly ``round((1 - sparsity) * N)`` entries are kept over the N entries of all tensors (or
    exactly ``keep``, if given instead of ``sparsity``). Ties at the threshold are resolved by
    position: the first tensor in order, then the lowest flat index, wins; the result is the
    same on any device and thread count. No concatenated copy is made: extra memory is a few
    histograms and one counter per 64K-element chunk.

    Args:
        scores: ``dict[name, Tensor]`` or list of tensors (any shapes, float dtypes, one device);
            pairs ``(a, b)`` for the two-operand ``by`` values.
        sparsity: fraction to prune, in [0, 1).
        keep: number of entries to keep, in [0, N]; the alternative to ``sparsity``.
        by: how the score is computed from the values: 'value' (the default: values are
            scores), 'abs' |a|, 'product' a·b, 'abs_product' |a·b|, 'square_times_abs' a²·|b|.
        process_group: for scores spread across processes, a ``torch.distributed`` group (or
            "default") whose processes each pass their own tensors (a partition: single-process
            order is rank 0's tensors first). DTensor scores sharded ``Shard(0)`` (FSDP2's layout)
            are detected without it. Every process gets the masks of its own tensors (DTensors for
            DTensor scores), the same as one process computing on all of them: same threshold,
            same kept count, ties in the same order (:mod:`koopfast.masks.sharded`). Every process
            of the group must call, with the same ``sparsity``/``keep`` and ``by``.

    Returns:
        Bool masks in the structure of ``scores`` (dict with the same keys, or list).

    Raises:
        ValueError: sparsity outside [0, 1), keep outside [0, N], no elements, NaN in a score
            (naming the tensor), tensors on different devices or pairs of different shapes, the same
            tensor listed twice (a tied parameter under two names would count twice).
        TypeError: non-floating scores, wrong container types.
    """
    fn = "koopfast.masks.global_topk"
    operands = _Operands(scores, by, fn)
    _check_distinct(operands.a, operands.names, fn)
    layout = kd.resolve(operands.a, process_group, fn)
    if layout is not None:
        return _sharded(operands, sparsity, keep, layout, fn)
    n = operands.numel
    if n == 0:
        raise ValueError(f"{fn}: expected at least one score element, got only empty tensors")
    return operands.pack(operands.topk(_resolve_keep(n, sparsity, keep, fn)))


def layerwise_topk(scores: Scores, sparsity: float | Mapping[str, float], *, by: ScoreBy = "value"):
    """Masks keeping the top scores of each tensor separately.

    Each tensor of n entries keeps exactly ``round((1 - s) * n)``, with ``s`` the common
    ``sparsity`` or, if a dict is given, ``sparsity[name]`` (tensors not named keep everything).
    Ties are broken by flat index. Arguments, errors and results as in :func:`global_topk`.
    """
    fn = "koopfast.masks.layerwise_topk"
    operands = _Operands(scores, by, fn)
    return operands.pack(_layerwise(operands, sparsity, fn))


def _layerwise(operands: _Operands, sparsity: float | Mapping[str, float], fn: str) -> list[Tensor]:
    """Each tensor's own top round((1 - s) n) (s: common, or per name with 0 for names not given),
    all tensors in two op calls."""
    if isinstance(sparsity, Mapping):
        unknown = set(map(str, sparsity)) - set(operands.names)
        if unknown:
            raise ValueError(f"{fn}: expected sparsity keys among the score names, got unknown {sorted(unknown)}")
    keep = []
    for name, a in zip(operands.names, operands.a):
        s = sparsity.get(name, 0.0) if isinstance(sparsity, Mapping) else sparsity
        keep.append(keep_count(a.numel(), s, fn=fn))  # validates s even for an empty tensor
    try:
        thresholds, stats = ops.select_threshold_per_tensor(operands.a, operands.b, operands.by, keep)
    except (ValueError, TypeError) as exc:
        raise operands.rename(exc) from None
    # One small read (a sync on CUDA): NaN must raise, never be silently kept or dropped.
    nan = torch.nonzero(stats[:, ops.STAT_NAN_TENSOR] >= 0).flatten().tolist()
    if nan:
        raise ValueError(f"{fn}: expected scores without NaN, got NaN in {operands.names[nan[0]]!r}")
    return ops.topk_mask_per_tensor(operands.a, operands.b, operands.by, thresholds, stats)


def _sharded(operands: _Operands, sparsity, keep, layout: kd.Layout, fn: str):
    like = operands.a
    a = [kd.local(t) for t in operands.a]
    b = [kd.local(t) for t in operands.b]
    devices = {t.device for t in a + b}
    if len(devices) > 1:
        raise ValueError(f"{fn}: expected every local score tensor on one device, got {sorted(map(str, devices))}")
    n = torch.tensor([sum(t.numel() for t in a)], dtype=torch.int64, device=kd.comm_device(layout))
    n = int(kd.all_reduce(n, layout))
    if n == 0:
        raise ValueError(f"{fn}: expected at least one score element over all processes, got only empty tensors")
    masks = sharded_topk(a, b, operands.by, _resolve_keep(n, sparsity, keep, fn), layout, operands.names, fn)
    return operands.pack([layout.wrap(m, t) for m, t in zip(masks, like)])


def _resolve_keep(n: int, sparsity: float | None, keep: int | None, fn: str) -> int:
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
