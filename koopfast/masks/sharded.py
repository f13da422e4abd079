"""Exact global top-k over tensors spread across processes: the same masks as one process.

Radix selection on order-preserving integer keys of the scores, 16 bits per level (2 levels for
float32 scores, 4 for float64): each process histograms the digits of its candidates, one
all-reduce of 65536 counts sums the histograms, and every process walks the same sum to the same
digit. The threshold, the count above it and the count equal to it are therefore global and
identical everywhere. Ties at the threshold are kept in single-process order, (tensor, flat
index): every process's count of ties per tensor is gathered (one int per tensor), the quota is
filled in that order, and each process's share goes to the ``topk_mask`` kernel, which keeps the
first ties of its tensors in their order. Nothing N-sized is communicated or concatenated; scores
are computed per chunk of at most 2^24 elements (the extra memory), never stored.

Communication per call: 2 (float32) or 4 (float64) all-reduces of 512 KiB, a few scalars, and an
all-gather of one int per local tensor: independent of N.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from koopfast import _distributed as kd
from koopfast import ops
from koopfast._op_rules import score_values
from koopfast._types import ScoreBy

__all__ = ["sharded_topk"]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_CHUNK = 1 << 24


def sharded_topk(
    a: list[Tensor], b: list[Tensor], by: ScoreBy, k: int, layout: kd.Layout, names: list[str], fn: str
) -> list[Tensor]:
    """Masks of this process's tensors (``a``, ``b``: local pieces) keeping the k largest scores over
    every process's tensors, ties by single-process order (see the module docstring)."""
    device = kd.comm_device(layout)
    wide = torch.tensor([any(t.dtype == torch.float64 for t in a)], dtype=torch.int64, device=device)
    kd.all_reduce(wide, layout)
    cd = torch.float64 if int(wide) else torch.float32
    bits = 64 if cd == torch.float64 else 32

    prefix, remaining, greater = None, k, 0
    for shift in range(bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        counter = _Histogram(a[0].device if a else device)
        nan_at = -1
        for i, (x, y) in enumerate(_pairs(a, b)):
            for xc, yc in _chunks(x, y):
                s = _scores(xc, yc, by, cd)
                if prefix is None and nan_at < 0 and bool(torch.isnan(s).any()):
                    nan_at = i  # the first level reads every score: NaN is found there
                keys = _keys(s)
                if prefix is not None:
                    keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefix]
                digits = keys >> shift
                counter.add(digits + (_BINS // 2) if prefix is None else digits & (_BINS - 1))
        hist = counter.counts()
        if prefix is None:
            _raise_on_nan(nan_at, layout, names, fn)
            if k == 0:
                return [torch.zeros_like(t, dtype=torch.bool, memory_format=torch.contiguous_format) for t in a]
        hist = kd.all_reduce(hist.to(device), layout).cpu()
        above = hist.flip(0).cumsum(0).flip(0)  # above[d] = count of digits >= d
        digit = int((above >= remaining).nonzero().max())
        beyond = int(above[digit + 1]) if digit + 1 < _BINS else 0
        greater += beyond
        remaining -= beyond
        value = digit - _BINS // 2 if prefix is None else digit
        prefix = value if prefix is None else (prefix << _DIGIT_BITS) + value

    assert prefix is not None, "the loop runs at least two levels"
    threshold = _from_key(prefix, cd)
    local_ties = [_count_equal(x, y, by, cd, threshold) for x, y in _pairs(a, b)]
    ties_by_rank = kd.all_gather_ints(local_ties, layout)
    quota, mine = remaining, 0
    for r, i in layout.segment_order(ties_by_rank):
        take = min(ties_by_rank[r][i], quota)
        quota -= take
        if r == layout.rank:
            mine += take
    if not a:
        return []
    local_a = [t.to(cd) for t in a]
    local_b = [t.to(cd) for t in b]
    stats = torch.tensor([greater, sum(local_ties), mine, -1], dtype=torch.int64, device=a[0].device)
    thr = torch.tensor(threshold, dtype=cd, device=a[0].device)
    return ops.topk_mask(local_a, local_b, by, thr, stats)


class _Histogram:
    """Digit counts; small tensors' digits are batched so that each bincount (65536 bins) covers
    at least 2^20 digits: a model's many small tensors cost no more than one large one."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros(_BINS, dtype=torch.int64, device=device)
        self.pending: list[Tensor] = []
        self.size = 0

    def add(self, digits: Tensor) -> None:
        self.pending.append(digits)
        self.size += digits.numel()
        if self.size >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.total += torch.bincount(torch.cat(self.pending), minlength=_BINS)
        self.pending, self.size = [], 0

    def counts(self) -> Tensor:
        self._flush()
        return self.total


def _pairs(a: list[Tensor], b: list[Tensor]) -> Iterator[tuple[Tensor, Tensor | None]]:
    return zip(a, b) if b else ((x, None) for x in a)


def _chunks(x: Tensor, y: Tensor | None) -> Iterator[tuple[Tensor, Tensor | None]]:
    x = x.reshape(-1)
    y = None if y is None else y.reshape(-1)
    for n0 in range(0, x.numel(), _CHUNK):
        yield x[n0 : n0 + _CHUNK], None if y is None else y[n0 : n0 + _CHUNK]


def _scores(x: Tensor, y: Tensor | None, by: ScoreBy, cd: torch.dtype) -> Tensor:
    """The scores exactly as the kernels compute them."""
    return score_values(x, y, by, cd)


def _keys(s: Tensor) -> Tensor:
    """Order-preserving signed int64 keys of float scores (larger score, larger key)."""
    if s.dtype == torch.float64:
        k = s.view(torch.int64)
        return torch.where(k < 0, k ^ 0x7FFFFFFFFFFFFFFF, k)
    k = s.view(torch.int32).to(torch.int64)
    return torch.where(k < 0, k ^ 0x7FFFFFFF, k)


def _from_key(key: int, cd: torch.dtype) -> float:
    if cd == torch.float64:
        bits = key if key >= 0 else key ^ 0x7FFFFFFFFFFFFFFF
        return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def _raise_on_nan(nan_at: int, layout: kd.Layout, names: list[str], fn: str) -> None:
    """Every process raises the same error if any process holds a NaN score."""
    for r, (i,) in enumerate(kd.all_gather_ints([nan_at], layout)):
        if i >= 0:
            where = f"{names[i]!r}" if r == layout.rank else f"tensor {i} of rank {r}"
            raise ValueError(f"{fn}: expected scores without NaN, got NaN in {where} (rank {r})")


def _count_equal(x: Tensor, y: Tensor | None, by: ScoreBy, cd: torch.dtype, threshold: float) -> int:
    return sum(int((_scores(xc, yc, by, cd) == threshold).sum()) for xc, yc in _chunks(x, y))
