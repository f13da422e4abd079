"""Semi-structured N:M masks: in every group of M consecutive weights along a layer's input
dimension, keep the N with the largest scores (2:4 is what sparse tensor cores accelerate).

From any koopfast score (magnitude, Wanda, gradient flow, Koopman) or by a score computed inside
the kernel from the weights (``by="abs"``) or two operands (``by="abs_product"`` with (θ, g)):
one pass per tensor, exactly N kept in every group, ties keep the lower input index; the
masks are ordinary bool masks that :func:`koopfast.masks.apply_` and :class:`koopfast.masks.Masked`
take. :func:`to_semi_structured` turns 2:4-masked Linear weights into
``torch.sparse.SparseSemiStructuredTensor`` where the device supports it.

The input dimension: dim 1 of a Linear (or any 2-D) weight ``[out, in]``; dim 0 of a Hugging
Face ``Conv1D`` weight ``[in, out]`` (pass ``model`` so that its layout is known); for a
convolution ``[out, in, kh, kw]`` the flattened ``in·kh·kw`` entries of each output channel, in
memory order (NVIDIA's ASP permutes convolutions so that groups run along ``in``; not done here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from koopfast import ops
from koopfast._types import BINARY_SCORES, UNARY_SCORES, ScoreBy
from koopfast.prunable import prunable

__all__ = ["nm_masks", "to_semi_structured"]


def nm_masks(
    scores: Mapping[str, Tensor | tuple[Tensor, Tensor]],
    n: int = 2,
    m: int = 4,
    *,
    by: ScoreBy = "value",
    model: nn.Module | None = None,
) -> dict[str, Tensor]:
    """N:M masks (True = keep) shaped like each score tensor, for every tensor of 2+ dimensions.

    Args:
        scores: ``dict[name, Tensor]`` (higher = keep), or pairs ``(a, b)`` for the two-operand
            ``by`` values, as :func:`koopfast.masks.global_topk` takes them.
        n, m: keep ``n`` of every ``m`` consecutive entries along the input dimension (a trailing
            group of r < m entries, when ``m`` does not divide it, keeps min(n, r)).
        by: 'value' (scores as given), 'abs', 'product', 'abs_product', 'square_times_abs'.
        model: the model the names belong to, to group Hugging Face ``Conv1D`` weights along
            their input dimension (dim 0); without it every tensor is grouped along dim 1.
    """
    fn = "koopfast.masks.nm_masks"
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"{fn}: expected scores as a non-empty dict of tensors, got {type(scores).__name__}")
    if by not in UNARY_SCORES + BINARY_SCORES:
        raise ValueError(f"{fn}: expected by to be one of {UNARY_SCORES + BINARY_SCORES}, got {by!r}")
    input_dim_0 = _conv1d_names(model) if model is not None else set()
    names: list[str] = []
    a: list[Tensor] = []
    b: list[Tensor] = []
    shapes: list[torch.Size] = []
    for name, v in scores.items():
        pair: Any = v if by in BINARY_SCORES else (v, None)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], Tensor)):
            want = "a pair of tensors (a, b)" if by in BINARY_SCORES else "a tensor"
            raise TypeError(f"{fn}: expected {name!r} to be {want} for by={by!r}, got {type(v).__name__}")
        x: Tensor = pair[0]
        y: object = pair[1]
        shapes.append(x.shape)
        if x.dim() < 2:
            raise ValueError(
                f"{fn}: expected weights of 2+ dimensions (N:M groups run along a layer's inputs), got {name!r} of "
                f"shape {list(x.shape)}"
            )
        names.append(name)
        a.append(_as_rows(x.detach(), name in input_dim_0))
        if y is not None:
            if not isinstance(y, Tensor) or y.shape != x.shape:
                raise ValueError(f"{fn}: expected the operands of {name!r} to have one shape")
            b.append(_as_rows(y.detach(), name in input_dim_0))
    try:
        masks, nan = ops.nm_masks(a, b, by, n, m)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{fn}: {exc}") from exc
    if int(nan[0]) >= 0:
        raise ValueError(f"{fn}: expected scores without NaN, got NaN in {names[int(nan[0])]!r}")
    out = {}
    for name, mask, shape in zip(names, masks, shapes):
        if name in input_dim_0:
            mask = mask.t()
        out[name] = mask.reshape(shape).contiguous()
    return out


def _as_rows(t: Tensor, input_dim_0: bool) -> Tensor:
    """``t`` as [outputs, inputs]: a view for Linear and Conv1D weights, a reshape for others."""
    if input_dim_0:
        return t.t()
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # explicit: a shard may hold no rows


def _conv1d_names(model: nn.Module) -> set[str]:
    return {name for name, e in prunable(model).items() if e.units is not None and e.units.dim == 1}


def to_semi_structured(model: nn.Module, masks: Mapping[str, Tensor]) -> list[str]:
    """Replaces the weights of ``model``'s Linear layers that have a 2:4 mask in ``masks`` by
    ``torch.sparse.to_sparse_semi_structured(weight * mask)`` (sparse tensor cores: CUDA, compute
    capability 8.0+, float16/bfloat16 weights); returns the names replaced. Raises before changing
    anything if a mask is not 2:4 along the inputs or the device cannot hold the format."""
    fn = "koopfast.masks.to_semi_structured"
    modules = dict(model.named_modules())
    plan = []
    for name, mask in masks.items():
        module_name, _, attr = name.rpartition(".")
        layer = modules.get(module_name)
        if attr != "weight" or not isinstance(layer, nn.Linear):
            raise ValueError(f"{fn}: expected masks of Linear weights, got {name!r}")
        w = layer.weight
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"{fn}: expected a bool mask shaped like {name!r} {list(w.shape)}, got {mask.dtype} {list(mask.shape)}"
            )
        if w.shape[1] % 4 or bool((mask.reshape(w.shape[0], -1, 4).sum(-1) > 2).any()):
            raise ValueError(f"{fn}: expected {name!r}'s mask to keep at most 2 of every 4 inputs (2:4)")
        if w.device.type != "cuda" or torch.cuda.get_device_capability(w.device) < (8, 0):
            raise RuntimeError(
                f"{fn}: the semi-structured sparse format needs a CUDA device of compute capability 8.0 or newer; "
                f"{name!r} is on {w.device}"
            )
        if w.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"{fn}: expected float16 or bfloat16 weights for 2:4 sparse kernels, got {w.dtype}")
        plan.append((layer, w, mask))
    from torch.sparse import to_sparse_semi_structured

    for layer, w, mask in plan:
        layer.weight = nn.Parameter(to_sparse_semi_structured(w.detach() * mask), requires_grad=False)
    return list(masks)
