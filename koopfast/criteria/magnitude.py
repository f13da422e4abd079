"""Magnitude: |θ| (or ‖θ_f‖ per output unit), the baseline every other criterion is compared with."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from koopfast._params import ParamSource, named_prunable


def magnitude(
    model_or_params: ParamSource, *, granularity: Literal["unstructured", "filter"] = "unstructured", p: int = 2
) -> dict[str, Tensor]:
    """Scores of each prunable parameter (conv and linear weights and biases of a model, or the
    given named tensors), on their devices.

    ``granularity="unstructured"``: |θ|, shaped like the parameter. ``"filter"``: ‖θ_f‖_p per output
    unit (the first dimension; p = 2 is the authors' "mag_based", p = 1 their "l1") of each weight
    (2+ dimensions; biases follow their layer's units), keyed by name. For masks alone,
    ``kf.masks.global_topk(params, sparsity, by="abs")`` needs no materialised |θ|.
    """
    fn = "koopfast.criteria.magnitude"
    if granularity not in ("unstructured", "filter"):
        raise ValueError(f"{fn}: expected granularity 'unstructured' or 'filter', got {granularity!r}")
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"{fn}: expected p to be 1 or 2, got {p!r}")
    params = named_prunable(model_or_params, fn=fn)
    with torch.no_grad():
        if granularity == "unstructured":
            return {name: t.detach().abs() for name, t in params.items()}
        return {
            name: t.detach().reshape(t.shape[0], -1).norm(p=p, dim=1)
            for name, t in params.items()
            if t.dim() >= 2 and t.shape[0] > 0
        }
