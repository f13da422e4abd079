"""Float reductions whose result does not depend on the thread count."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_BLOCK = 1 << 14  # below torch's parallel grain size (32768): each block is summed by one thread


def sq_norm(t: Tensor) -> float:
    """Σ x² in float64, the same whatever the thread count: sums of fixed 16K-element blocks, then
    their exactly rounded sum (math.fsum). (A plain ``t.square().sum()`` splits the sum among the
    threads, so its last bits depend on how many there are.)"""
    v = t.reshape(-1).to(torch.float64)
    pad = (-v.numel()) % _BLOCK
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    return math.fsum(v.view(-1, _BLOCK).square().sum(1).cpu().tolist())
