"""Magnitude: |θ|, the baseline every other criterion is compared with."""

from __future__ import annotations

import torch
from torch import Tensor

from koopfast._params import ParamSource, named_prunable


def magnitude(model_or_params: ParamSource) -> dict[str, Tensor]:
    """|θ| for each prunable parameter (conv and linear weights and biases of a model, or the
    given named tensors): new tensors shaped like the parameters, on their devices.

    For masks alone, ``kf.masks.global_topk(params, sparsity, by="abs")`` gives the same masks
    without materialising |θ|.
    """
    params = named_prunable(model_or_params, fn="koopfast.criteria.magnitude")
    with torch.no_grad():
        return {name: p.detach().abs() for name, p in params.items()}
