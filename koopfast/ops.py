"""Typed wrappers of the ``torch.ops.koopfast`` operators, with their fake (meta) kernels.

Each wrapper is a one-line call of the registered op; schemas live in csrc/registration.cpp and
pure-PyTorch twins with identical signatures in :mod:`koopfast.reference`. Inputs are never
modified, except the targets of ``apply_masks`` (declared mutable in its schema). Fake kernels
compute output metadata only, so every op works under ``torch.compile(fullgraph=True)``,
``torch.export`` and FakeTensor tracing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from koopfast._types import ScoreBy

__all__ = ["NUM_SELECT_STATS", "select_threshold", "topk_mask"]

# Layout of the int64 `stats` tensor returned by select_threshold.
NUM_SELECT_STATS = 4
STAT_GREATER, STAT_EQUAL, STAT_TIES_KEPT, STAT_NAN_TENSOR = range(NUM_SELECT_STATS)


def _compute_dtype(a: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in a) else torch.float32


# ---- threshold selection ---------------------------------------------------------------------------


def select_threshold(a: Sequence[Tensor], b: Sequence[Tensor], score: ScoreBy, k: int) -> tuple[Tensor, Tensor]:
    """The k-th largest score over every element of every tensor in ``a``, without concatenating.

    Args:
        a: non-empty list of float16/bfloat16/float32/float64 tensors of any shapes and strides,
            all on one device.
        b: ``[]`` for ``score`` in {'value', 'abs'}; for 'product', 'abs_product' and
            'square_times_abs' one tensor per ``a[i]`` with its shape and dtype.
        score: 'value' a, 'abs' |a|, 'product' a·b, 'abs_product' |a·b|, 'square_times_abs'
            a²·|b|, computed in float64 if any ``a[i]`` is float64, else float32.
        k: 1 <= k <= total number of elements.

    Returns:
        ``threshold``: 0-dim tensor of the compute dtype on a's device, the k-th largest score
        (-0 reported as +0). ``stats``: int64[4] on a's device: number of scores greater than
        the threshold, number equal to it, how many of those equal ones the top k keeps, and the
        index of the first tensor holding a NaN score (-1 if none; then the rest is undefined).
    """
    return torch.ops.koopfast.select_threshold.default(list(a), list(b), score, k)


@torch.library.register_fake("koopfast::select_threshold")
def _select_threshold_fake(a, b, score, k):
    torch._check(len(a) > 0, lambda: "koopfast::select_threshold: expected a to be a non-empty list of tensors")
    threshold = a[0].new_empty((), dtype=_compute_dtype(a))
    stats = a[0].new_empty((NUM_SELECT_STATS,), dtype=torch.int64)
    return threshold, stats


def topk_mask(
    a: Sequence[Tensor], b: Sequence[Tensor], score: ScoreBy, threshold: Tensor, stats: Tensor
) -> list[Tensor]:
    """Bool masks of the top k scores, given ``select_threshold(a, b, score, k)``'s outputs.

    ``mask[i]`` has ``a[i]``'s shape (contiguous, on a's device) and is True where the score
    exceeds the threshold, plus for the first ``stats[2]`` scores equal to it in (tensor index,
    flat index) order: exactly k True in total, whatever the device or thread count.
    """
    return torch.ops.koopfast.topk_mask.default(list(a), list(b), score, threshold, stats)


@torch.library.register_fake("koopfast::topk_mask")
def _topk_mask_fake(a, b, score, threshold, stats):
    return [torch.empty_like(t, dtype=torch.bool, memory_format=torch.contiguous_format) for t in a]


# ---- masks ------------------------------------------------------------------------------------------
# Packed format: ceil(n / 8) uint8 bytes; bit i of byte j is element 8j + i of the mask in logical
# (row-major) order: numpy.packbits(mask.ravel(), bitorder="little").


def pack_masks(masks: Sequence[Tensor]) -> list[Tensor]:
    """Bool masks (any shapes and strides, one device) -> packed masks: 1-D contiguous uint8
    tensors of ``ceil(mask.numel() / 8)`` bytes on the masks' device; bits past the end are 0."""
    return torch.ops.koopfast.pack_masks.default(list(masks))


@torch.library.register_fake("koopfast::pack_masks")
def _pack_masks_fake(masks):
    return [m.new_empty(((m.numel() + 7) // 8,), dtype=torch.uint8) for m in masks]


def unpack_masks(packed: Sequence[Tensor], numels: Sequence[int]) -> list[Tensor]:
    """Packed masks (1-D uint8 of ``ceil(numels[i] / 8)`` bytes, one device) -> 1-D contiguous
    bool masks of ``numels[i]`` elements on that device (reshape them to the tensors' shapes)."""
    return torch.ops.koopfast.unpack_masks.default(list(packed), list(numels))


@torch.library.register_fake("koopfast::unpack_masks")
def _unpack_masks_fake(packed, numels):
    return [p.new_empty((n,), dtype=torch.bool) for p, n in zip(packed, numels)]


def count_masks(masks: Sequence[Tensor], numels: Sequence[int]) -> Tensor:
    """int64[len(masks)] on the masks' device: the number of True elements of each mask.

    ``masks[i]`` is bool with ``numels[i]`` elements (any shape and strides), or packed (1-D
    uint8 of ``ceil(numels[i] / 8)`` bytes; bits past ``numels[i]`` are ignored).
    """
    return torch.ops.koopfast.count_masks.default(list(masks), list(numels))


@torch.library.register_fake("koopfast::count_masks")
def _count_masks_fake(masks, numels):
    if not masks:
        return torch.empty((0,), dtype=torch.int64)
    return masks[0].new_empty((len(masks),), dtype=torch.int64)


def apply_masks(targets: Sequence[Tensor], masks: Sequence[Tensor], mask_index: Sequence[int]) -> None:
    """In place, in one pass: set to +0 every element of ``targets[i]`` where
    ``masks[mask_index[i]]`` is False (also a NaN, an infinity or -0 there); kept elements are
    untouched.

    Args:
        targets: float16/bfloat16/float32/float64 tensors of any shapes and strides on one
            device (parameters, gradients, optimizer states, ...), not sharing memory, without
            internal overlap. Leaf tensors that require grad need ``torch.no_grad()``.
        masks: bool tensors shaped like the targets they serve, or packed masks (1-D uint8 of
            ``ceil(target.numel() / 8)`` bytes); on the targets' device. One mask may serve many
            targets (a parameter, its gradient and its optimizer states).
        mask_index: for each target, the index of its mask in ``masks``.
    """
    torch.ops.koopfast.apply_masks.default(list(targets), list(masks), list(mask_index))


@torch.library.register_fake("koopfast::apply_masks")
def _apply_masks_fake(targets, masks, mask_index):
    return None
