"""Per-unit scores from unstructured ones: any criterion can drive structured pruning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from koopfast.prunable import ParamSource, aliases, entries, prunable

Reduction = Literal["sum", "mean", "l2", "max"]
REDUCTIONS = ("sum", "mean", "l2", "max")


def per_unit(
    scores: Mapping[str, Tensor], model_or_params: ParamSource, *, reduction: Reduction = "sum"
) -> dict[str, Tensor]:
    """``dict[weight name -> Tensor[units]]``: each weight's unstructured scores (shaped like the
    weight: KMP, |θ ⊙ g|, ...) reduced over the entries of each output unit, units as
    :mod:`koopfast.prunable` defines them (rows of a Linear weight, columns of a Hugging Face
    ``Conv1D``, output channels of a convolution). Biases and other tensors without units of their
    own are left out (structured masks follow the weight's units). ``reduction``: "sum" (default:
    the gradient-flow authors' per-filter aggregation), "mean", "l2" or "max". Names may be
    aliases of tied parameters; the result is keyed as ``scores`` is."""
    fn = "koopfast.criteria.per_unit"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"{fn}: expected scores as a dict of score tensors, got {type(scores).__name__}")
    if isinstance(model_or_params, nn.Module):
        known = prunable(model_or_params, embeddings=True)
        canonical = aliases(model_or_params)
        layout = {name: known.get(canonical.get(name, name)) for name in scores}
    else:
        given = entries(model_or_params, fn=fn)
        layout = {name: given.get(name) for name in scores}
    unknown = [n for n, e in layout.items() if e is None]
    if unknown:
        raise ValueError(f"{fn}: expected score names among the prunable tensors, got unknown {unknown}")
    out = {}
    with torch.no_grad():
        for name, s in scores.items():
            e = layout[name]
            assert e is not None  # unknown names raised above
            if not e.scored_per_unit:
                continue
            if not isinstance(s, Tensor) or s.shape != e.tensor.shape:
                got = list(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(
                    f"{fn}: expected the scores of {name!r} shaped like it, {list(e.tensor.shape)}, got {got}"
                )
            rows = e.unit_rows(s.detach())
            if reduction == "sum":
                out[name] = rows.sum(1)
            elif reduction == "mean":
                out[name] = rows.mean(1)
            elif reduction == "l2":
                out[name] = rows.norm(dim=1)
            else:
                out[name] = rows.amax(1)
    return out
