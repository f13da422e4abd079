"""Structured masks: whole output units (rows of Linear weights, output channels of convolutions).

Criteria that score units (filter norms, gradient-flow per-filter scores, spline redundancy)
hand over ``dict[weight name, Tensor[units]]``; :func:`structured_topk` keeps the best units,
over all layers or per layer, and expands the choice to weight-shaped masks and to the bias of
the same layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from koopfast.masks.topk import _layerwise, _Operands, _resolve_keep

__all__ = ["structured_topk"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class _Layer:
    """A scored weight: its output-unit dimension, its groups, and its bias if any."""

    def __init__(
        self, name: str, weight: Tensor, bias_name: str | None, bias: Tensor | None, transposed: bool, groups: int
    ):
        self.name, self.weight, self.bias_name, self.bias = name, weight, bias_name, bias
        self.transposed, self.groups = transposed, groups

    @property
    def units(self) -> int:
        if self.weight.dim() == 0:
            return 1
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    def expand(self, unit_mask: Tensor) -> Tensor:
        """The weight-shaped mask keeping the weights of the kept units."""
        w = self.weight
        if w.dim() <= 1:
            return unit_mask.reshape(w.shape).clone()
        trailing = [1] * (w.dim() - 1)
        if not self.transposed:
            return unit_mask.view(-1, *trailing).expand(w.shape).contiguous()
        # ConvTranspose weight: [in, out / groups, *kernel]; output unit g * (out / groups) + j is
        # column j of the rows of group g.
        g = self.groups
        per_group = unit_mask.view(g, 1, w.shape[1], *trailing[1:])
        grouped = per_group.expand(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        return grouped.reshape(w.shape).contiguous()


def _layers(model_or_params, names: list[str], fn: str) -> list[_Layer]:
    out = []
    if isinstance(model_or_params, nn.Module):
        for name in names:
            # Attributes rather than named_parameters(): a layer pruned by torch.nn.utils.prune
            # keeps its (masked) weight as a plain attribute.
            prefix, _, attr = name.rpartition(".")
            try:
                module = model_or_params.get_submodule(prefix)
            except AttributeError:
                module = None
            weight = getattr(module, attr, None) if module is not None else None
            if not isinstance(weight, Tensor):
                raise ValueError(f"{fn}: expected score names among the model's parameter names, got unknown {name!r}")
            bias = getattr(module, "bias", None) if attr == "weight" else None
            bias_name = f"{prefix}.bias" if prefix else "bias"
            transposed = isinstance(module, _TRANSPOSED)
            groups = getattr(module, "groups", 1) if transposed else 1
            out.append(_Layer(name, weight, bias_name if isinstance(bias, Tensor) else None, bias, transposed, groups))
        return out
    if not isinstance(model_or_params, Mapping):
        raise TypeError(f"{fn}: expected a model or a dict of named parameters, got {type(model_or_params).__name__}")
    params = dict(model_or_params)
    for name in names:
        if name not in params:
            raise ValueError(f"{fn}: expected score names among the parameter names, got unknown {name!r}")
        prefix, dot, attr = name.rpartition(".")
        bias_name = f"{prefix}{dot}bias" if attr == "weight" else None
        bias = params.get(bias_name) if bias_name else None
        out.append(_Layer(name, params[name], bias_name if isinstance(bias, Tensor) else None, bias, False, 1))
    return out


def structured_topk(
    scores: Mapping[str, Tensor],
    model_or_params: nn.Module | Mapping[str, Tensor],
    sparsity: float | Mapping[str, float] | None = None,
    *,
    keep: int | None = None,
    scope: Literal["global", "layerwise"] = "global",
    include_bias: bool = True,
) -> dict[str, Tensor]:
    """Masks that keep or prune whole output units, chosen from per-unit scores (higher = keep).

    An output unit is a row of a Linear weight, an output channel of a Conv weight (dim 0) or of
    a ConvTranspose weight (dim 1, per group). With a model, the layer type decides; with a dict
    of named tensors, units are along dim 0 and ``<prefix>.bias`` is the bias of
    ``<prefix>.weight``.

    ``scope="global"`` keeps exactly ``round((1 - sparsity) * U)`` of the U units of all scored
    layers together (or exactly ``keep`` units); ``scope="layerwise"`` keeps
    ``round((1 - s) * units)`` per layer, with ``s`` the common ``sparsity`` or
    ``sparsity[name]`` (unnamed layers keep everything). Ties go to the first layer in order,
    then the lowest unit index (see :func:`koopfast.masks.global_topk`).

    Args:
        scores: ``dict[weight name, Tensor[units]]`` of floating-point unit scores.
        model_or_params: the model, or a dict of its named parameters.
        sparsity: fraction of units to prune, in [0, 1) (per name for "layerwise").
        keep: number of units to keep overall ("global" only), instead of ``sparsity``.
        scope: "global" or "layerwise".
        include_bias: also return the mask of each scored weight's bias, when it has one.

    Returns:
        ``dict[name, bool Tensor]``: for each scored weight a mask of its shape (contiguous, on
        the weight's device), followed by its bias mask (``[units]``) when included.

    Raises:
        ValueError: unknown names, scores whose length is not the number of units, NaN scores,
            sparsity out of range, ``keep`` with "layerwise".
        TypeError: scores that are not floating-point tensors.
    """
    fn = "koopfast.masks.structured_topk"
    if scope not in ("global", "layerwise"):
        raise ValueError(f"{fn}: expected scope to be 'global' or 'layerwise', got {scope!r}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"{fn}: expected scores to be a dict of per-unit score tensors, got {type(scores).__name__}")
    if not scores:
        raise ValueError(f"{fn}: expected at least one score tensor, got none")
    names = [str(k) for k in scores]
    layers = _layers(model_or_params, names, fn)
    for layer in layers:
        s = scores[layer.name]
        if not isinstance(s, Tensor):
            raise TypeError(f"{fn}: expected {layer.name!r} to be a tensor of unit scores, got {type(s).__name__}")
        if s.dim() != 1 or s.numel() != layer.units:
            raise ValueError(
                f"{fn}: expected {layer.name!r} to hold one score per output unit, shape [{layer.units}], "
                f"got shape {list(s.shape)}"
            )
    unit_masks = _select_units({layer.name: scores[layer.name] for layer in layers}, sparsity, keep, scope, fn)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            unit_mask = unit_masks[layer.name].to(layer.weight.device)
            out[layer.name] = layer.expand(unit_mask)
            if include_bias and layer.bias_name is not None and layer.bias.shape == (layer.units,):
                out[layer.bias_name] = unit_mask.clone()
    return out


def _select_units(unit_scores: dict[str, Tensor], sparsity, keep, scope: str, fn: str) -> dict[str, Tensor]:
    """Bool unit masks: the global or per-layer top units (the selection of global_topk / layerwise_topk)."""
    operands = _Operands(unit_scores, "value", fn)
    if scope == "global":
        if operands.numel == 0:
            raise ValueError(f"{fn}: expected at least one output unit, got layers without any")
        return operands.pack(operands.topk(_resolve_keep(operands.numel, sparsity, keep, fn)))
    if keep is not None:
        raise ValueError(f"{fn}: expected keep only with scope='global', got keep={keep} with scope='layerwise'")
    if sparsity is None:
        raise ValueError(f"{fn}: expected a sparsity for scope='layerwise', got none")
    return operands.pack(_layerwise(operands, sparsity, fn))
