"""Pure-PyTorch twins of the ``torch.ops.koopfast`` operators, with identical signatures.

Straightforward and slow on purpose (they concatenate, sort and loop): the specification that
tests compare the kernels against, and the baseline in benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from koopfast.ops import NUM_SELECT_STATS, _compute_dtype

__all__ = ["scores_of", "select_threshold", "topk_mask"]


def scores_of(a: Sequence[Tensor], b: Sequence[Tensor], score: str) -> list[Tensor]:
    """The flattened scores of each tensor pair, in the ops' compute dtype, -0 turned into +0."""
    cd = _compute_dtype(a)
    out = []
    for i, x in enumerate(a):
        x = x.reshape(-1).to(cd)
        y = b[i].reshape(-1).to(cd) if b else None
        if score == "value":
            s = x.clone()
        elif score == "abs":
            s = x.abs()
        elif score == "product":
            s = x * y
        elif score == "abs_product":
            s = (x * y).abs()
        elif score == "square_times_abs":
            s = (x * x) * y.abs()
        else:
            raise ValueError(f"unknown score {score!r}")
        out.append(torch.where(s == 0, torch.zeros_like(s), s))
    return out


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
