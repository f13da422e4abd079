"""Rules the operators, their reference twins and the Python-side paths share, in one place.

The C++ kernels implement these rules; :mod:`koopfast.ops` (fake kernels), :mod:`koopfast.reference`
(the pure-PyTorch twins) and production code that must agree with the kernels bit for bit (the
multi-process selection in :mod:`koopfast.masks.sharded`) take them from here, so that none of them
depends on another's private helpers, and production code does not depend on the reference twins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["bits_per_unit", "compute_dtype", "score_values"]


def compute_dtype(a: Sequence[Tensor]) -> torch.dtype:
    """The dtype scores are computed and compared in: float64 if any operand is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in a) else torch.float32


def score_values(x: Tensor, y: Tensor | None, by: str, dtype: torch.dtype) -> Tensor:
    """The flattened scores of one operand (pair), computed in ``dtype`` as the kernels compute them:
    'value' a, 'abs' |a|, 'product' a·b, 'abs_product' |a·b|, 'square_times_abs' a²·|b|; -0 turned
    into +0 (the kernels compare order-preserving keys, in which -0 and +0 would differ)."""
    x = x.reshape(-1).to(dtype)
    y = y.reshape(-1).to(dtype) if y is not None else None
    if by == "value":
        s = x.clone()
    elif by == "abs":
        s = x.abs()
    elif by == "product":
        s = x * _second(y, by)
    elif by == "abs_product":
        s = (x * _second(y, by)).abs()
    elif by == "square_times_abs":
        s = (x * x) * _second(y, by).abs()
    else:
        raise ValueError(f"unknown score {by!r}")
    return torch.where(s == 0, torch.zeros_like(s), s)


def _second(y: Tensor | None, by: str) -> Tensor:
    """The second operand of a two-operand score; callers pass one with every such score."""
    assert y is not None, f"score {by!r} needs a second operand"
    return y


def bits_per_unit(shape: Sequence[int], dim: int) -> int:
    """The number of code bits of each unit along ``dim`` of a tensor of ``shape`` (sign_codes):
    the product of every other dimension."""
    dim = dim + len(shape) if dim < 0 else dim
    bits = 1
    for i, s in enumerate(shape):
        if i != dim:
            bits = bits * s
    return bits
