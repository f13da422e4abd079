"""Magnitude: |θ| (or ‖θ_f‖ per output unit), the baseline every other criterion is compared with."""

from __future__ import annotations

from typing import Literal

import torch

from koopfast.prunable import ParamSource, entries
from koopfast.scores import ScoreMap


def magnitude(
    model_or_params: ParamSource, *, granularity: Literal["unstructured", "filter"] = "unstructured", p: int = 2
) -> ScoreMap:
    """Scores of each prunable tensor (a model's, by :mod:`koopfast.prunable`'s rule, or the given
    named tensors), on their devices, keyed by canonical name.

    ``granularity="unstructured"``: |θ|, shaped like the parameter. ``"filter"``: ‖θ_f‖_p per output
    unit (p = 2 is the gradient-flow authors' "mag_based", p = 1 their "l1") of each weight (2+
    dimensions; biases follow their layer's units), ``Tensor[units]`` keyed by name; units as
    :class:`koopfast.prunable.Units` defines them (rows of a Linear weight, columns of a
    Hugging Face ``Conv1D``, output channels of a convolution). For masks alone,
    ``kf.masks.global_topk(params, sparsity, by="abs")`` needs no materialised |θ|.
    """
    fn = "koopfast.criteria.magnitude"
    if granularity not in ("unstructured", "filter"):
        raise ValueError(f"{fn}: expected granularity 'unstructured' or 'filter', got {granularity!r}")
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"{fn}: expected p to be 1 or 2, got {p!r}")
    params = entries(model_or_params, fn=fn)
    with torch.no_grad():
        if granularity == "unstructured":
            return ScoreMap({name: e.tensor.detach().abs() for name, e in params.items()}, criterion="magnitude")
        per_unit = {
            name: e.unit_rows(e.tensor.detach()).norm(p=p, dim=1) for name, e in params.items() if e.scored_per_unit
        }
        return ScoreMap(per_unit, criterion=f"magnitude (filter, p={p})")
