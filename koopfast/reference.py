"""Pure-PyTorch twins of the ``torch.ops.koopfast`` operators, with identical signatures.

Straightforward and slow on purpose (they concatenate, sort and loop): the specification that
tests compare the kernels against, and the baseline in benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from koopfast._op_rules import bits_per_unit, compute_dtype, score_values
from koopfast.ops import CODE_WORD_BITS, NUM_SELECT_STATS

__all__ = [
    "hamming_distance",
    "nm_masks",
    "pairwise_hamming",
    "scores_of",
    "select_threshold",
    "select_threshold_per_tensor",
    "sign_codes",
    "stored_values",
    "topk_mask",
    "topk_mask_per_tensor",
    "trajectory_combine",
    "trajectory_dots",
    "trajectory_ingest",
    "unpack_codes",
]


def scores_of(a: Sequence[Tensor], b: Sequence[Tensor], score: str) -> list[Tensor]:
    """The flattened scores of each tensor pair, in the ops' compute dtype, -0 turned into +0."""
    cd = compute_dtype(a)
    return [score_values(x, b[i] if b else None, score, cd) for i, x in enumerate(a)]


def select_threshold(a: Sequence[Tensor], b: Sequence[Tensor], score: str, k: int) -> tuple[Tensor, Tensor]:
    scores = scores_of(a, b, score)
    stats = torch.zeros(NUM_SELECT_STATS, dtype=torch.int64, device=a[0].device)
    nan = [i for i, s in enumerate(scores) if bool(torch.isnan(s).any())]
    if nan:
        stats[3] = nan[0]
        return torch.full((), float("nan"), dtype=scores[0].dtype, device=a[0].device), stats
    flat = torch.cat(scores)
    threshold = torch.sort(flat, descending=True).values[k - 1]
    n_greater = int((flat > threshold).sum())
    stats[0] = n_greater
    stats[1] = int((flat == threshold).sum())
    stats[2] = k - n_greater
    stats[3] = -1
    return threshold, stats


def topk_mask(a: Sequence[Tensor], b: Sequence[Tensor], score: str, threshold: Tensor, stats: Tensor) -> list[Tensor]:
    ties_left = int(stats[2])
    masks = []
    for x, s in zip(a, scores_of(a, b, score)):
        eq = s == threshold
        rank = torch.cumsum(eq.to(torch.int64), 0)  # 1-based rank of each tie within this tensor
        masks.append(((s > threshold) | (eq & (rank <= ties_left))).reshape(x.shape))
        ties_left = max(ties_left - int(eq.sum()), 0)
    return masks


# ---- parameter trajectories ------------------------------------------------------------------------


def _select_sorted(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """select_threshold's (threshold, stats) for one flat NaN-free score tensor and k >= 1."""
    threshold = torch.sort(s, descending=True).values[k - 1]
    n_greater = int((s > threshold).sum())
    stats = torch.tensor([n_greater, int((s == threshold).sum()), k - n_greater, -1], dtype=torch.int64)
    return threshold, stats


def select_threshold_per_tensor(
    a: Sequence[Tensor], b: Sequence[Tensor], score: str, k: Sequence[int]
) -> tuple[Tensor, Tensor]:
    scores = scores_of(a, b, score)  # the compute dtype of the whole list
    inf = torch.tensor(float("inf"), dtype=scores[0].dtype)
    thresholds, rows = [], []
    for s, kt in zip(scores, k):
        s = s.cpu()
        if bool(torch.isnan(s).any()):
            thresholds.append(torch.tensor(float("nan"), dtype=s.dtype))
            rows.append(torch.tensor([0, 0, 0, 0]))
        elif kt == 0:
            thresholds.append(inf)
            rows.append(torch.tensor([0, int((s == inf).sum()), 0, -1]))
        else:
            threshold, stats = _select_sorted(s, kt)
            thresholds.append(threshold)
            rows.append(stats)
    device = a[0].device
    return torch.stack(thresholds).to(device), torch.stack(rows).to(device)


def topk_mask_per_tensor(
    a: Sequence[Tensor], b: Sequence[Tensor], score: str, thresholds: Tensor, stats: Tensor
) -> list[Tensor]:
    masks = []
    for i, (x, s) in enumerate(zip(a, scores_of(a, b, score))):
        eq = s == thresholds[i]
        rank = torch.cumsum(eq.to(torch.int64), 0)
        masks.append(((s > thresholds[i]) | (eq & (rank <= int(stats[i, 2])))).reshape(x.shape))
    return masks


def stored_values(params: Sequence[Tensor], storage: torch.dtype, anchor: Tensor | None) -> Tensor:
    """The row trajectory_ingest stores: round(θ - anchor), difference in float64, through float32."""
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in params])
    if anchor is not None:
        flat = flat - anchor.to(torch.float64)
    return flat.to(torch.float32).to(storage)


def trajectory_ingest(
    params: Sequence[Tensor], snapshots: Tensor, slot: int, dot_slots: Sequence[int], anchor: Tensor | None
) -> tuple[Tensor, Tensor]:
    stored = stored_values(params, snapshots.dtype, anchor)
    status = torch.full((1,), -1, dtype=torch.int64, device=snapshots.device)
    start = 0
    for i, p in enumerate(params):
        segment = stored[start : start + p.numel()].to(torch.float64)
        start += p.numel()
        if not (bool(torch.isfinite(p.to(torch.float64)).all()) and bool(torch.isfinite(segment).all())):
            status[0] = i  # row `slot` is unspecified then: this twin leaves it as it was
            return torch.zeros(len(dot_slots) + 2, dtype=torch.float64, device=snapshots.device), status
    row = stored.to(torch.float64)
    dots = [torch.dot(row, snapshots[s].to(torch.float64)) for s in dot_slots]
    dots.append(torch.dot(row, row))
    dots.append(torch.dot(row, anchor.to(torch.float64)) if anchor is not None else row.new_zeros(()))
    snapshots[slot] = stored
    return torch.stack(dots), status


def trajectory_combine(snapshots: Tensor, coeffs: Tensor, anchor: Tensor | None, wide: bool = False) -> Tensor:
    full = snapshots.to(torch.float64)
    if anchor is not None:
        full = full + anchor.to(torch.float64)
    out = coeffs.transpose(0, 1) @ full.to(coeffs.dtype)
    if coeffs.is_complex():
        return out.to(torch.complex128 if wide else torch.complex64)
    return out.to(torch.float64 if wide else torch.float32)


def trajectory_dots(snapshots: Tensor, vectors: Tensor, anchor: Tensor | None) -> Tensor:
    rows = snapshots.to(torch.float64)
    if anchor is not None:
        rows = torch.cat([rows, anchor.to(torch.float64)[None]])
    return rows @ vectors.to(torch.float64).transpose(0, 1)


# ---- region codes: everything unpacked to bool ---------------------------------------------------------


def sign_bits(x: Tensor, dim: int) -> Tensor:
    """The unpacked codes: bool ``[units, bits]``, row u = ``(x > 0)`` of unit u in bit order."""
    positive = x if x.dtype == torch.bool else x > 0
    return positive.movedim(dim, 0).reshape(x.shape[dim], bits_per_unit(x.shape, dim))


def unpack_codes(codes: Tensor, bits: int | None = None) -> Tensor:
    """bool ``[units, words * 64]`` (or the first ``bits`` columns): bit k of word w at column 64w + k."""
    shifts = torch.arange(CODE_WORD_BITS, device=codes.device)
    unpacked = ((codes.unsqueeze(-1) >> shifts) & 1).bool().reshape(codes.shape[0], codes.shape[1] * CODE_WORD_BITS)
    return unpacked if bits is None else unpacked[:, :bits]


def sign_codes(x: Tensor, dim: int) -> Tensor:
    flags = sign_bits(x, dim)
    units, bits = flags.shape
    words = (bits + CODE_WORD_BITS - 1) // CODE_WORD_BITS
    padded = torch.zeros(units, words * CODE_WORD_BITS, dtype=torch.int64, device=x.device)
    padded[:, :bits] = flags.to(torch.int64)
    shifts = torch.arange(CODE_WORD_BITS, device=x.device)
    # Distinct powers of two: the sum is the bitwise or; bit 63 wraps to the sign bit as intended.
    return (padded.reshape(units, words, CODE_WORD_BITS) << shifts).sum(-1)


def hamming_distance(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    out = []
    for i, x in enumerate(a):
        bits = unpack_codes(x)
        other = unpack_codes(b[i]) if b else torch.zeros_like(bits)
        out.append((bits != other).sum(1))
    return out


def pairwise_hamming(codes: Tensor) -> Tensor:
    bits = unpack_codes(codes)
    return (bits.unsqueeze(1) != bits.unsqueeze(0)).sum(-1)


# ---- masks ------------------------------------------------------------------------------------------

__all__ += ["apply_masks", "count_masks", "pack_masks", "unpack_masks"]

_BIT_WEIGHTS = [1 << i for i in range(8)]


def pack_masks(masks: Sequence[Tensor]) -> list[Tensor]:
    out = []
    for m in masks:
        flat = m.reshape(-1).to(torch.int64)
        pad = (-flat.numel()) % 8
        bits = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int64, device=m.device)
        out.append((bits * weights).sum(1).to(torch.uint8))
    return out


def unpack_masks(packed: Sequence[Tensor], numels: Sequence[int]) -> list[Tensor]:
    out = []
    for p, n in zip(packed, numels):
        weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int64, device=p.device)
        bits = (p.to(torch.int64).reshape(-1, 1) & weights) != 0
        out.append(bits.reshape(-1)[:n].clone())
    return out


def count_masks(masks: Sequence[Tensor], numels: Sequence[int]) -> Tensor:
    counts = []
    for m, n in zip(masks, numels):
        bools = unpack_masks([m], [n])[0] if m.dtype == torch.uint8 else m.reshape(-1)
        counts.append(int(bools.sum()))
    device = masks[0].device if masks else None
    return torch.tensor(counts, dtype=torch.int64, device=device)


def apply_masks(targets: Sequence[Tensor], masks: Sequence[Tensor], mask_index: Sequence[int]) -> None:
    for t, j in zip(targets, mask_index):
        m = masks[j]
        keep = unpack_masks([m], [t.numel()])[0].reshape(t.shape) if m.dtype == torch.uint8 else m
        t.copy_(torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)))


def nm_masks(a: Sequence[Tensor], b: Sequence[Tensor], score: str, n: int, m: int) -> tuple[list[Tensor], Tensor]:
    """Per group of m columns: a stable descending sort of its scores keeps the first n (ties: the
    lower column first); a trailing group of r < m keeps min(n, r)."""
    scores = scores_of(a, b, score)
    status = torch.full((1,), -1, dtype=torch.int64, device=a[0].device)
    masks = []
    for i, (x, s) in enumerate(zip(a, scores)):
        rows, cols = x.shape
        s = s.reshape(rows, cols)
        if bool(torch.isnan(s).any()) and int(status[0]) < 0:
            status[0] = i
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=x.device)
        for c0 in range(0, cols, m):
            group = s[:, c0 : c0 + m]
            keep = min(n, group.shape[1])
            order = torch.sort(group, dim=1, descending=True, stable=True).indices[:, :keep]
            mask[:, c0 : c0 + m] = torch.zeros_like(group, dtype=torch.bool).scatter_(1, order, True)
        masks.append(mask)
    return masks, status
