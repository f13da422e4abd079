"""Pure-PyTorch twins of the ``torch.ops.koopfast`` operators, with identical signatures.

Straightforward and slow on purpose (they concatenate, sort and loop): the specification that
tests compare the kernels against, and the baseline in benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from koopfast.ops import CODE_WORD_BITS, NUM_SELECT_STATS, _bits_per_unit, _compute_dtype

__all__ = [
    "hamming_distance",
    "pairwise_hamming",
    "scores_of",
    "select_threshold",
    "sign_codes",
    "topk_mask",
    "unpack_codes",
]


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


# ---- region codes: everything unpacked to bool ---------------------------------------------------------


def sign_bits(x: Tensor, dim: int) -> Tensor:
    """The unpacked codes: bool ``[units, bits]``, row u = ``(x > 0)`` of unit u in bit order."""
    positive = x if x.dtype == torch.bool else x > 0
    return positive.movedim(dim, 0).reshape(x.shape[dim], _bits_per_unit(x.shape, dim))


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
