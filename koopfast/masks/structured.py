"""Structured masks: whole output units (rows of Linear weights, output channels of convolutions).

Criteria that score units (filter norms, gradient-flow per-filter scores, spline redundancy)
hand over ``dict[weight name, Tensor[units]]``; :func:`structured_topk` keeps the best units,
over all layers or per layer, and expands the choice to weight-shaped masks and to the bias of
the same layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from koopfast.masks.topk import _layerwise, _Operands, _resolve_keep
from koopfast.prunable import ALONG_DIM_0, Prunable, Units, aliases, entries, prunable, units_of

__all__ = ["structured_topk"]


class _Layer:
    """A scored weight: its output units, and its bias if any."""

    def __init__(self, name: str, weight: Tensor, units: Units, bias_name: str | None, bias: Tensor | None):
        self.name, self.weight, self.unit_layout = name, weight, units
        self.bias_name, self.bias = bias_name, bias

    @property
    def units(self) -> int:
        return 1 if self.weight.dim() == 0 else self.unit_layout.count(self.weight.shape)

    def expand(self, unit_mask: Tensor) -> Tensor:
        """The weight-shaped mask keeping the weights of the kept units."""
        if self.weight.dim() == 0:
            return unit_mask.reshape(()).clone()
        return self.unit_layout.expand(unit_mask, self.weight.shape)


def _layers(model_or_params, names: list[str], fn: str) -> list[_Layer]:
    if isinstance(model_or_params, nn.Module):
        return _model_layers(model_or_params, names, fn)
    if not isinstance(model_or_params, Mapping):
        raise TypeError(f"{fn}: expected a model or a dict of named parameters, got {type(model_or_params).__name__}")
    given = entries(model_or_params, fn=fn)
    out = []
    for name in names:
        if name not in given:
            raise ValueError(f"{fn}: expected score names among the parameter names, got unknown {name!r}")
        e = given[name]
        bias = given[e.bias].tensor if e.bias is not None else None
        out.append(_Layer(name, e.tensor, e.units or ALONG_DIM_0, e.bias, bias))
    return out


def _model_layers(model: nn.Module, names: list[str], fn: str) -> list[_Layer]:
    """Scored weights of a model, looked up by canonical name, alias, or (for a layer pruned by
    torch.nn.utils.prune, whose weight is then a plain attribute) attribute path."""
    lookup: dict[str, Prunable] = {}
    for e in prunable(model, embeddings=True).values():
        path = f"{e.module_name}.{e.attr}" if e.module_name else e.attr
        for key in (e.name, *e.aliases, path):
            lookup.setdefault(key, e)
    canonical = aliases(model)
    out, seen = [], {}
    for name in names:
        e = lookup.get(name)
        if e is not None:
            module = model.get_submodule(e.module_name)
            weight, units = getattr(module, e.attr), e.units
        else:  # a parameter outside the default rule (a BatchNorm scale, ...): units along dim 0
            prefix, _, attr = name.rpartition(".")
            try:
                module = model.get_submodule(prefix)
            except AttributeError:
                module = None
            weight = getattr(module, attr, None) if module is not None else None
            if not isinstance(weight, Tensor):
                raise ValueError(f"{fn}: expected score names among the model's parameter names, got unknown {name!r}")
            units = units_of(module, attr) or ALONG_DIM_0
        key = canonical.get(name, e.name if e is not None else name)
        if key in seen:
            raise ValueError(
                f"{fn}: expected one score per tensor, got {seen[key]!r} and {name!r}, two names of the tied "
                f"parameter {key!r}"
            )
        seen[key] = name
        bias_name = e.bias if e is not None else None
        bias = model.get_parameter(bias_name) if bias_name is not None else None
        out.append(_Layer(name, weight, units, bias_name, bias))
    return out


def structured_topk(
    scores: Mapping[str, Tensor],
    model_or_params: nn.Module | Mapping[str, Tensor],
    sparsity: float | Mapping[str, float] | None = None,
    *,
    keep: int | None = None,
    scope: Literal["global", "layerwise"] = "global",
    include_bias: bool = True,
    warn_normalization: bool = True,
) -> dict[str, Tensor]:
    """Masks that keep or prune whole output units, chosen from per-unit scores (higher = keep).

    Output units are those of :mod:`koopfast.prunable`: a row of a Linear weight, an output channel
    of a Conv weight (dim 0) or of a ConvTranspose weight (dim 1, per group), a column of a Hugging
    Face ``Conv1D`` weight (``[in, out]``), a row of ``nn.MultiheadAttention``'s ``in_proj_weight``.
    With a model, the layer decides (and an alias of a tied parameter names it); with a dict of
    named tensors, units are along dim 0 and ``<prefix>.bias`` is the bias of ``<prefix>.weight``.

    Layers are chosen independently: units whose outputs are summed (residual connections) or
    that feed a normalization layer are not coupled here, and the normalization layer after a
    pruned unit is not masked (in eval mode a BatchNorm turns a zeroed unit into a constant). For
    coupled units use :func:`koopfast.structure.coupled_masks`.

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
        warn_normalization: warn (UserWarning) when the model has BatchNorm layers of a scored
            layer's width, whose channels these masks leave unmasked (see above).

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
    if isinstance(model_or_params, nn.Module) and warn_normalization:
        _warn_about_normalization(model_or_params, layers, fn)
    unit_masks = _select_units({layer.name: scores[layer.name] for layer in layers}, sparsity, keep, scope, fn)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            unit_mask = unit_masks[layer.name].to(layer.weight.device)
            out[layer.name] = layer.expand(unit_mask)
            if include_bias and layer.bias_name is not None and layer.bias.shape == (layer.units,):
                out[layer.bias_name] = unit_mask.clone()
    return out


def _warn_about_normalization(model: nn.Module, layers: list[_Layer], fn: str) -> None:
    widths = {layer.units for layer in layers}
    batchnorm = nn.modules.batchnorm._BatchNorm
    bns = [n for n, m in model.named_modules() if isinstance(m, batchnorm) and m.num_features in widths]
    if bns:
        warnings.warn(
            f"{fn}: these masks choose each layer's units on its own and leave the model's BatchNorm layers "
            f"({bns[0]!r} and {len(bns) - 1} more) unmasked: in eval mode a BatchNorm after a pruned unit still "
            "outputs its shift, and layers added by a residual connection may keep different channels. "
            "koopfast.structure.coupled_masks(model, example_inputs, scores, sparsity) masks coupled channel "
            "groups and their normalization layers (warn_normalization=False silences this)",
            UserWarning,
            stacklevel=3,
        )


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
