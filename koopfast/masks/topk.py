"""Masks from scores: exact global and layerwise top-k selection.

Scores are "higher = keep". They come as ``dict[name, Tensor]`` (or a list of tensors); with
``by`` set to a two-operand score, each value is a pair ``(a, b)`` and the score (for example
|θ·g|) is computed inside the kernel, never materialised. Masks are bool tensors of the same
structure, shapes and device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, overload

import torch
from torch import Tensor

from koopfast import _distributed as kd
from koopfast import ops
from koopfast._types import ScoreBy
from koopfast.masks.selection import Operand, Scores, Selection, keep_count, resolve_keep
from koopfast.masks.sharded import sharded_topk

__all__ = ["global_topk", "layerwise", "layerwise_topk"]


@overload
def global_topk(
    scores: Mapping[str, Operand],
    sparsity: float | None = None,
    *,
    keep: int | None = None,
    by: ScoreBy = "value",
    process_group: Any = None,
) -> dict[str, Tensor]: ...
@overload
def global_topk(
    scores: Sequence[Operand],
    sparsity: float | None = None,
    *,
    keep: int | None = None,
    by: ScoreBy = "value",
    process_group: Any = None,
) -> list[Tensor]: ...
def global_topk(
    scores: Scores,
    sparsity: float | None = None,
    *,
    keep: int | None = None,
    by: ScoreBy = "value",
    process_group: Any = None,
) -> dict[str, Tensor] | list[Tensor]:
    """Masks keeping the top scores over all tensors together (one global threshold).

    Exactly ``round((1 - sparsity) * N)`` entries are kept over the N entries of all tensors (or
    exactly ``keep``, if given instead of ``sparsity``). Ties at the threshold are resolved by
    position: the first tensor in order, then the lowest flat index, wins; the result is the
    same on any device and thread count. No concatenated copy is made: extra memory is a few
    histograms, one counter per 64K-element chunk and, on CPU, the float32 scores of a sampled
    range (about 3 % of the entries at 10^8, never more than a quarter of them).

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
    operands = Selection(scores, by, fn)
    operands.check_distinct()
    layout = kd.resolve(operands.a, process_group, fn)
    if layout is not None:
        return _sharded(operands, sparsity, keep, layout, fn)
    n = operands.numel
    if n == 0:
        raise ValueError(f"{fn}: expected at least one score element, got only empty tensors")
    return operands.pack(operands.topk(resolve_keep(n, sparsity, keep, fn)))


@overload
def layerwise_topk(
    scores: Mapping[str, Operand], sparsity: float | Mapping[str, float], *, by: ScoreBy = "value"
) -> dict[str, Tensor]: ...
@overload
def layerwise_topk(
    scores: Sequence[Operand], sparsity: float | Mapping[str, float], *, by: ScoreBy = "value"
) -> list[Tensor]: ...
def layerwise_topk(
    scores: Scores, sparsity: float | Mapping[str, float], *, by: ScoreBy = "value"
) -> dict[str, Tensor] | list[Tensor]:
    """Masks keeping the top scores of each tensor separately.

    Each tensor of n entries keeps exactly ``round((1 - s) * n)``, with ``s`` the common
    ``sparsity`` or, if a dict is given, ``sparsity[name]`` (tensors not named keep everything).
    Ties are broken by flat index. Arguments, errors and results as in :func:`global_topk`.
    """
    fn = "koopfast.masks.layerwise_topk"
    operands = Selection(scores, by, fn)
    return operands.pack(layerwise(operands, sparsity, fn))


def layerwise(operands: Selection, sparsity: float | Mapping[str, float], fn: str) -> list[Tensor]:
    """Each tensor's own top round((1 - s) n) (s: common, or per name with 0 for names not given).

    The selection under :func:`layerwise_topk` (and ``structured_topk(scope="layerwise")``): masks
    in the order of ``operands``' tensors, all tensors in two op calls; ``fn`` names the caller in the errors.
    """
    if isinstance(sparsity, Mapping):
        unknown = set(map(str, sparsity)) - set(operands.names)
        if unknown:
            raise ValueError(f"{fn}: expected sparsity keys among the score names, got unknown {sorted(unknown)}")
    keep: list[int] = []
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


def _sharded(
    operands: Selection, sparsity: float | None, keep: int | None, layout: kd.Layout, fn: str
) -> dict[Any, Tensor] | list[Tensor]:
    like = operands.a
    a = [kd.local(t) for t in operands.a]
    b = [kd.local(t) for t in operands.b]
    devices = {t.device for t in a + b}
    if len(devices) > 1:
        raise ValueError(f"{fn}: expected every local score tensor on one device, got {sorted(map(str, devices))}")
    local_n = torch.tensor([sum(t.numel() for t in a)], dtype=torch.int64, device=kd.comm_device(layout))
    n = int(kd.all_reduce(local_n, layout))
    if n == 0:
        raise ValueError(f"{fn}: expected at least one score element over all processes, got only empty tensors")
    masks = sharded_topk(a, b, operands.by, resolve_keep(n, sparsity, keep, fn), layout, operands.names, fn)
    return operands.pack([layout.wrap(m, t) for m, t in zip(masks, like)])
