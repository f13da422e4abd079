"""Typed wrappers of the ``torch.ops.koopfast`` operators, with their fake (meta) kernels.

Each wrapper is a one-line call of the registered op; schemas live in csrc/registration.cpp and
pure-PyTorch twins with identical signatures in :mod:`koopfast.reference`. Inputs are never
modified, except the targets of ``apply_masks`` (declared mutable in its schema). Fake kernels
compute output metadata only, so every op works under ``torch.compile(fullgraph=True)``,
``torch.export`` and FakeTensor tracing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from koopfast._op_rules import bits_per_unit, compute_dtype
from koopfast._types import ScoreBy

__all__ = [
    "NUM_SELECT_STATS",
    "hamming_distance",
    "nm_masks",
    "pairwise_hamming",
    "select_threshold",
    "select_threshold_per_tensor",
    "sign_codes",
    "topk_mask",
    "topk_mask_per_tensor",
    "trajectory_combine",
    "trajectory_dots",
    "trajectory_ingest",
]

# Layout of the int64 `stats` tensor returned by select_threshold.
NUM_SELECT_STATS = 4
STAT_GREATER, STAT_EQUAL, STAT_TIES_KEPT, STAT_NAN_TENSOR = range(NUM_SELECT_STATS)


# ---- the checks every op shares, before the dispatcher -----------------------------------------------
# The C++ kernels validate their arguments (shapes, dtypes, strides) themselves; two things cannot be
# checked there: integers beyond int64 (the dispatcher rejects them with "Expected a value of type
# 'int'") and tensors on several devices one of which is "meta" (the dispatcher then runs the fake
# kernel, which would return uninitialized tensors or, for in-place ops, do nothing). So the
# wrappers check integers, and the fake kernels (the path meta tensors take) check devices.

_INT64 = (-(2**63), 2**63 - 1)


def _int64(op: str, arg: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"koopfast::{op}: expected {arg} to be an int, got {type(value).__name__}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"koopfast::{op}: expected {arg} within int64 ({_INT64[0]} .. {_INT64[1]}), got {value}")
    return value


def _int64_list(op: str, arg: str, values: Sequence[int]) -> list[int]:
    return [_int64(op, f"{arg}[{i}]", v) for i, v in enumerate(values)]


_Fake = TypeVar("_Fake", bound=Callable[..., Any])


def _register_fake(op: str) -> Callable[[_Fake], _Fake]:
    """``torch.library.register_fake(op)``, typed: torch leaves the decorator it returns unannotated,
    which would make every fake kernel untyped. The registration itself is torch's, unchanged."""
    decorator: Callable[[_Fake], _Fake] = torch.library.register_fake(op)
    return decorator


def _require(condition: bool, message: str) -> None:
    """ValueError, as the C++ checks raise (torch._check would raise RuntimeError)."""
    if not condition:
        raise ValueError(message)


def _one_device(op: str, **tensors: Tensor | list[Tensor] | tuple[Tensor, ...] | None) -> None:
    """ValueError when the tensors (lists of them, single ones or None) are on several devices."""
    first: tuple[torch.device, str] | None = None
    for arg, value in tensors.items():
        items: Sequence[Tensor | None] = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(items):
            if t is None:
                continue
            where = f"{arg}[{i}]" if isinstance(value, (list, tuple)) else arg
            if first is None:
                first = (t.device, where)
            elif t.device != first[0]:
                raise ValueError(
                    f"koopfast::{op}: expected every tensor on one device, got {first[0]} ({first[1]}) and "
                    f"{t.device} ({where})"
                )


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
    result: tuple[Tensor, Tensor] = torch.ops.koopfast.select_threshold.default(
        list(a), list(b), score, _int64("select_threshold", "k", k)
    )
    return result


@_register_fake("koopfast::select_threshold")
def _select_threshold_fake(a: list[Tensor], b: list[Tensor], score: str, k: int) -> tuple[Tensor, Tensor]:
    _require(len(a) > 0, "koopfast::select_threshold: expected a to be a non-empty list of tensors")
    _one_device("select_threshold", a=a, b=b)
    threshold = a[0].new_empty((), dtype=compute_dtype(a))
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
    result: list[Tensor] = torch.ops.koopfast.topk_mask.default(list(a), list(b), score, threshold, stats)
    return result


@_register_fake("koopfast::topk_mask")
def _topk_mask_fake(a: list[Tensor], b: list[Tensor], score: str, threshold: Tensor, stats: Tensor) -> list[Tensor]:
    _one_device("topk_mask", a=a, b=b, threshold=threshold, stats=stats)
    return [torch.empty_like(t, dtype=torch.bool, memory_format=torch.contiguous_format) for t in a]


def select_threshold_per_tensor(
    a: Sequence[Tensor], b: Sequence[Tensor], score: ScoreBy, k: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """:func:`select_threshold` of each tensor alone, all tensors in one call (layerwise selection).

    Args:
        a, b, score: as in :func:`select_threshold` (empty tensors allowed). The compute dtype is
            that of the whole list: float64 if any ``a[i]`` is float64, else float32.
        k: one count per tensor, ``0 <= k[i] <= a[i].numel()``.

    Returns:
        ``thresholds``: 1-D ``[len(a)]`` of the compute dtype, the ``k[i]``-th largest score of
        ``a[i]`` (+inf where ``k[i] == 0``). ``stats``: int64 ``[len(a), 4]``, row i as
        :func:`select_threshold`'s stats for ``a[i]`` alone: scores greater, equal (for
        ``k[i] == 0``: the number equal to +inf), ties kept, and 0 if ``a[i]`` holds a NaN score
        (then the rest of the row is undefined) or -1.
    """
    op = "select_threshold_per_tensor"
    result: tuple[Tensor, Tensor] = torch.ops.koopfast.select_threshold_per_tensor.default(
        list(a), list(b), score, _int64_list(op, "k", k)
    )
    return result


@_register_fake("koopfast::select_threshold_per_tensor")
def _select_threshold_per_tensor_fake(
    a: list[Tensor], b: list[Tensor], score: str, k: list[int]
) -> tuple[Tensor, Tensor]:
    _require(len(a) > 0, "koopfast::select_threshold_per_tensor: expected a to be a non-empty list of tensors")
    _one_device("select_threshold_per_tensor", a=a, b=b)
    thresholds = a[0].new_empty((len(a),), dtype=compute_dtype(a))
    stats = a[0].new_empty((len(a), NUM_SELECT_STATS), dtype=torch.int64)
    return thresholds, stats


def topk_mask_per_tensor(
    a: Sequence[Tensor], b: Sequence[Tensor], score: ScoreBy, thresholds: Tensor, stats: Tensor
) -> list[Tensor]:
    """Bool masks of each tensor's own top ``k[i]`` scores, given
    ``select_threshold_per_tensor(a, b, score, k)``'s outputs: ``mask[i]`` (``a[i]``'s shape,
    contiguous) is True where the score exceeds ``thresholds[i]``, plus for the first
    ``stats[i, 2]`` scores of ``a[i]`` equal to it in flat index order: exactly ``k[i]`` True."""
    result: list[Tensor] = torch.ops.koopfast.topk_mask_per_tensor.default(list(a), list(b), score, thresholds, stats)
    return result


@_register_fake("koopfast::topk_mask_per_tensor")
def _topk_mask_per_tensor_fake(
    a: list[Tensor], b: list[Tensor], score: str, thresholds: Tensor, stats: Tensor
) -> list[Tensor]:
    _one_device("topk_mask_per_tensor", a=a, b=b, thresholds=thresholds, stats=stats)
    return [torch.empty_like(t, dtype=torch.bool, memory_format=torch.contiguous_format) for t in a]


# ---- parameter trajectories ------------------------------------------------------------------------

INGEST_SELF_DOT, INGEST_ANCHOR_DOT = 0, 1  # positions after the dot_slots entries


def trajectory_ingest(
    params: Sequence[Tensor], snapshots: Tensor, slot: int, dot_slots: Sequence[int], anchor: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Writes one snapshot of ``params`` into ``snapshots[slot]`` and returns its Gram row.

    Args:
        params: tensors (any float dtype, shapes and strides) on the buffer's device, holding N
            elements in all, flattened in list order.
        snapshots: [capacity, N] float32/bfloat16/float16, contiguous; row ``slot`` is overwritten
            with round(θ - anchor) (the difference in float64, rounded through float32).
        slot: row to write. dot_slots: rows to take inner products with (not ``slot``).
        anchor: optional float32 [N]: rows hold deltas against it.

    Returns:
        ``dots``: float64 [len(dot_slots) + 2]: <new row, snapshots[s]> for s in dot_slots, then
        <new row, new row>, then <anchor, new row> (0 without anchor). ``status``: int64 [1], -1, or
        the index of the first tensor of params holding a NaN/Inf (or a value beyond the storage
        dtype's range): then dots are 0 and row ``slot`` is unspecified (write into a free row;
        other rows are never touched).
    """
    op = "trajectory_ingest"
    result: tuple[Tensor, Tensor] = torch.ops.koopfast.trajectory_ingest.default(
        list(params), snapshots, _int64(op, "slot", slot), _int64_list(op, "dot_slots", dot_slots), anchor
    )
    return result


@_register_fake("koopfast::trajectory_ingest")
def _trajectory_ingest_fake(
    params: list[Tensor], snapshots: Tensor, slot: int, dot_slots: list[int], anchor: Tensor | None
) -> tuple[Tensor, Tensor]:
    _one_device("trajectory_ingest", params=params, snapshots=snapshots, anchor=anchor)
    dots = snapshots.new_empty((len(dot_slots) + 2,), dtype=torch.float64)
    return dots, snapshots.new_empty((1,), dtype=torch.int64)


def trajectory_combine(snapshots: Tensor, coeffs: Tensor, anchor: Tensor | None, wide: bool = False) -> Tensor:
    """Weighted sums of snapshot rows: ``out[j] = sum_t coeffs[t, j] * (anchor + snapshots[t])``.

    Args:
        snapshots: [capacity, N] float32/bfloat16/float16. coeffs: [capacity, m] float64 or
            complex128 on the same device (rows of zeros are not read). anchor: optional float32 [N].
        wide: float64/complex128 output instead of float32/complex64.

    Returns:
        [m, N], accumulated in float64, real or complex like ``coeffs``, on the buffer's device.
    """
    result: Tensor = torch.ops.koopfast.trajectory_combine.default(snapshots, coeffs, anchor, wide)
    return result


@_register_fake("koopfast::trajectory_combine")
def _trajectory_combine_fake(snapshots: Tensor, coeffs: Tensor, anchor: Tensor | None, wide: bool = False) -> Tensor:
    _one_device("trajectory_combine", snapshots=snapshots, coeffs=coeffs, anchor=anchor)
    if coeffs.is_complex():
        dtype = torch.complex128 if wide else torch.complex64
    else:
        dtype = torch.float64 if wide else torch.float32
    return snapshots.new_empty((coeffs.shape[1], snapshots.shape[1]), dtype=dtype)


def trajectory_dots(snapshots: Tensor, vectors: Tensor, anchor: Tensor | None) -> Tensor:
    """Inner products of every snapshot row with every vector, accumulated in float64.

    Args:
        snapshots: [capacity, N] float32/bfloat16/float16. vectors: [m, N] float32/float64.
        anchor: optional float32 [N].

    Returns:
        float64 [capacity, m] = <snapshots[t], vectors[j]>, with one more row <anchor, vectors[j]>
        when an anchor is given, on the buffer's device.
    """
    result: Tensor = torch.ops.koopfast.trajectory_dots.default(snapshots, vectors, anchor)
    return result


@_register_fake("koopfast::trajectory_dots")
def _trajectory_dots_fake(snapshots: Tensor, vectors: Tensor, anchor: Tensor | None) -> Tensor:
    _one_device("trajectory_dots", snapshots=snapshots, vectors=vectors, anchor=anchor)
    rows = snapshots.shape[0] + (1 if anchor is not None else 0)
    return snapshots.new_empty((rows, vectors.shape[0]), dtype=torch.float64)


# ---- region codes ------------------------------------------------------------------------------------

CODE_WORD_BITS = 64  # bits per int64 word of a code set


def sign_codes(x: Tensor, dim: int) -> Tensor:
    """Bit-packed signs 1[x > 0] of pre-activations: the region codes of the units along ``dim``.

    Args:
        x: float16/bfloat16/float32/float64 (NaN gives 0, as ``x > 0``) or bool, at least 1-D, any
            strides (a layout that no reshape can view as [outer, units, inner] is copied first).
        dim: the unit dimension (channels of a BatchNorm output: 1; features of a linear output: -1).

    Returns:
        int64 codes ``[units, words]`` on x's device, ``units = x.shape[dim]``,
        ``words = ceil(bits / 64)``, ``bits = x.numel() / units``. Bit j of row u is
        ``x[o, u, i] > 0`` with ``j = o * inner + i`` (o over the dims before ``dim``, i over those
        after, row-major), stored in word ``j // 64`` at bit ``j % 64``; bits past the last are 0.
    """
    result: Tensor = torch.ops.koopfast.sign_codes.default(x, _int64("sign_codes", "dim", dim))
    return result


@_register_fake("koopfast::sign_codes")
def _sign_codes_fake(x: Tensor, dim: int) -> Tensor:
    _require(x.dim() >= 1, "koopfast::sign_codes: expected x to have at least one dimension")
    _require(-x.dim() <= dim < x.dim(), f"koopfast::sign_codes: expected dim in [{-x.dim()}, {x.dim()}), got {dim}")
    words = (bits_per_unit(x.shape, dim) + CODE_WORD_BITS - 1) // CODE_WORD_BITS
    return x.new_empty((x.shape[dim], words), dtype=torch.int64)


def hamming_distance(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """Per unit (row), the number of bits in which code set ``a[i]`` differs from ``b[i]``.

    Args:
        a: non-empty list of int64 code matrices ``[units_i, words_i]`` (any strides), one device.
        b: ``[]`` (then the distance is to all-zero codes: the number of set bits of each row), or
            one tensor per ``a[i]`` with its shape.

    Returns:
        One int64 tensor ``[units_i]`` per ``a[i]``, on a's device: popcount of ``a[i] ^ b[i]``
        summed over each row's words (all 64 bits of every word count).
    """
    result: list[Tensor] = torch.ops.koopfast.hamming_distance.default(list(a), list(b))
    return result


@_register_fake("koopfast::hamming_distance")
def _hamming_distance_fake(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    _require(len(a) > 0, "koopfast::hamming_distance: expected a to be a non-empty list of code tensors")
    _one_device("hamming_distance", a=a, b=b)
    return [t.new_empty((t.shape[0],), dtype=torch.int64) for t in a]


def pairwise_hamming(codes: Tensor) -> Tensor:
    """All-pairs Hamming distances between the units (rows) of one int64 code matrix
    ``[units, words]``: int64 ``[units, units]`` on its device, symmetric, zero diagonal."""
    result: Tensor = torch.ops.koopfast.pairwise_hamming.default(codes)
    return result


@_register_fake("koopfast::pairwise_hamming")
def _pairwise_hamming_fake(codes: Tensor) -> Tensor:
    _require(codes.dim() == 2, f"koopfast::pairwise_hamming: expected 2-D codes [units, words], got {codes.dim()}-D")
    return codes.new_empty((codes.shape[0], codes.shape[0]), dtype=torch.int64)


# ---- masks ------------------------------------------------------------------------------------------
# Packed format: ceil(n / 8) uint8 bytes; bit i of byte j is element 8j + i of the mask in logical
# (row-major) order: numpy.packbits(mask.ravel(), bitorder="little").


def pack_masks(masks: Sequence[Tensor]) -> list[Tensor]:
    """Bool masks (any shapes and strides, one device) -> packed masks: 1-D contiguous uint8
    tensors of ``ceil(mask.numel() / 8)`` bytes on the masks' device; bits past the end are 0."""
    result: list[Tensor] = torch.ops.koopfast.pack_masks.default(list(masks))
    return result


@_register_fake("koopfast::pack_masks")
def _pack_masks_fake(masks: list[Tensor]) -> list[Tensor]:
    _one_device("pack_masks", masks=masks)
    return [m.new_empty(((m.numel() + 7) // 8,), dtype=torch.uint8) for m in masks]


def unpack_masks(packed: Sequence[Tensor], numels: Sequence[int]) -> list[Tensor]:
    """Packed masks (1-D uint8 of ``ceil(numels[i] / 8)`` bytes, one device) -> 1-D contiguous
    bool masks of ``numels[i]`` elements on that device (reshape them to the tensors' shapes)."""
    result: list[Tensor] = torch.ops.koopfast.unpack_masks.default(
        list(packed), _int64_list("unpack_masks", "numels", numels)
    )
    return result


@_register_fake("koopfast::unpack_masks")
def _unpack_masks_fake(packed: list[Tensor], numels: list[int]) -> list[Tensor]:
    _one_device("unpack_masks", packed=packed)
    return [p.new_empty((n,), dtype=torch.bool) for p, n in zip(packed, numels)]


def count_masks(masks: Sequence[Tensor], numels: Sequence[int]) -> Tensor:
    """int64[len(masks)] on the masks' device: the number of True elements of each mask.

    ``masks[i]`` is bool with ``numels[i]`` elements (any shape and strides), or packed (1-D
    uint8 of ``ceil(numels[i] / 8)`` bytes; bits past ``numels[i]`` are ignored).
    """
    result: Tensor = torch.ops.koopfast.count_masks.default(list(masks), _int64_list("count_masks", "numels", numels))
    return result


@_register_fake("koopfast::count_masks")
def _count_masks_fake(masks: list[Tensor], numels: list[int]) -> Tensor:
    _one_device("count_masks", masks=masks)
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
    index = _int64_list("apply_masks", "mask_index", mask_index)
    torch.ops.koopfast.apply_masks.default(list(targets), list(masks), index)


@_register_fake("koopfast::apply_masks")
def _apply_masks_fake(targets: list[Tensor], masks: list[Tensor], mask_index: list[int]) -> None:
    _one_device("apply_masks", targets=targets, masks=masks)
    return None


# ---- semi-structured (N:M) masks --------------------------------------------------------------------


def nm_masks(a: Sequence[Tensor], b: Sequence[Tensor], score: ScoreBy, n: int, m: int) -> tuple[list[Tensor], Tensor]:
    """N:M masks: in every group of ``m`` consecutive columns of each 2-D ``a[i]`` ([rows, cols],
    any strides), True for the ``n`` largest scores (score kinds and compute dtype as
    :func:`select_threshold`); a trailing group of r < m columns keeps min(n, r); among equal scores
    the lower column is kept, so every group keeps exactly that many.

    Returns ``(masks, nan_tensor)``: bool [rows, cols] contiguous masks on a's device, and int64[1]
    holding the index of the first tensor with a NaN score (its masks are then unspecified) or -1.
    """
    out: tuple[list[Tensor], Tensor] = torch.ops.koopfast.nm_masks.default(
        list(a), list(b), score, _int64("nm_masks", "n", n), _int64("nm_masks", "m", m)
    )
    return out


@_register_fake("koopfast::nm_masks")
def _nm_masks_fake(a: list[Tensor], b: list[Tensor], score: str, n: int, m: int) -> tuple[list[Tensor], Tensor]:
    _require(len(a) > 0, "koopfast::nm_masks: expected a to be a non-empty list of tensors")
    _one_device("nm_masks", a=a, b=b)
    for i, t in enumerate(a):
        _require(t.dim() == 2, f"koopfast::nm_masks: expected a[{i}] to be 2-D [rows, cols], got shape {list(t.shape)}")
    masks = [t.new_empty(t.shape, dtype=torch.bool) for t in a]
    return masks, a[0].new_empty((1,), dtype=torch.int64)
