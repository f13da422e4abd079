"""Spline redundancy: prune units whose hyperplanes (nearly) duplicate another unit's.

You, Balestriero et al. (TMLR 2022, arXiv 2101.02338) read each unit of a conv/linear (+ BatchNorm)
+ ReLU layer as a hyperplane that splits the layer's input space; the units of a layer together
partition it. Units whose hyperplanes nearly coincide add almost nothing to the partition, and
the paper prunes them ("spline pruning", layerwise or global). Its exact node-to-node measure is
not public: this module is a **reconstruction** (docs/papers.md, section 3) with two measures:

- ``"angle"`` (parameter space): BatchNorm folded into each unit (w~ = (gamma/s) w,
  b~ = gamma (b - mu)/s + beta, s = sqrt(var + eps)); distance 1 - |cos| between the units'
  [w~; b~] vectors (a unit and its negation define the same hyperplane).
- ``"hamming"`` (data space): the normalized Hamming distance between two units' on/off codes
  over the probe data, min(d, M - d) / M for d differing bits out of M: a unit whose codes are the
  complement of another's draws the same boundary through the data (the counterpart of |cos|).

Each unit's redundancy is its distance to its nearest neighbour in the same layer. Removal is
greedy: the unit with the smallest nearest-neighbour distance goes first (within each layer for
``policy="layerwise"``, over all layers for ``"global"``), then the nearest neighbours of the
remaining units are recomputed. Units that shape no boundary go before all others: those whose
folded weights are all zero (a constant pre-activation) and, with a probe, those that never switch
on the probe data (always on or always off). Not done: merging a removed unit's outgoing weights
into its near-duplicate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from koopfast import ops
from koopfast._probe import CodeSet, Probe, check_probe, first_batch, model_device, record_codes
from koopfast._spline_layers import SplineLayer, registered_spline_layers, traced_spline_layers, unit_major_weight
from koopfast.masks import keep_count, structured_topk
from koopfast.prunable import is_hf_conv1d
from koopfast.scores import ScoreMap

__all__ = ["SplineScores", "fold_batchnorm", "spline_redundancy"]

Measure = Literal["angle", "hamming"]
Policy = Literal["layerwise", "global"]
MEASURES: tuple[str, ...] = ("angle", "hamming")
POLICIES: tuple[str, ...] = ("layerwise", "global")

FLAT_SCORE = -1.0  # below every distance (distances lie in [0, 1]): removed first
_NO_NEIGHBOUR = 2.0  # internal: a unit alone in its layer ranks after every real distance


def fold_batchnorm(layer: nn.Module, bn: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Each unit's hyperplane with its BatchNorm (in eval mode) folded in, in float64.

    Returns ``(weight, bias)``: ``weight`` shaped like ``layer.weight`` and ``bias [units]`` such
    that ``bn(layer(x))`` in eval mode equals the layer's own operation with these parameters:
    w~ = (gamma/s) w, b~ = gamma (b - mu)/s + beta with s = sqrt(running_var + eps) (gamma = 1 and
    beta = 0 without affine parameters, b = 0 without a bias). Without ``bn``: the layer's own
    weight and bias.

    Raises:
        ValueError: a BatchNorm of another size, one without running statistics, or non-finite
            folded parameters.
    """
    w, b = _fold(layer, bn, "koopfast.criteria.fold_batchnorm", "the BatchNorm")
    return (w.t() if is_hf_conv1d(layer) else w), b


def _fold(layer: nn.Module, bn: nn.Module | None, fn: str, what: str) -> tuple[Tensor, Tensor]:
    """Folded weight with the output units first ([out, ...]) and bias [out]."""
    w = unit_major_weight(layer).detach().double()
    units = w.shape[0]
    bias = getattr(layer, "bias", None)
    b = bias.detach().double() if isinstance(bias, Tensor) else w.new_zeros(units)
    if bn is not None:
        if bn.num_features != units:
            raise ValueError(
                f"{fn}: expected {what} to have {units} features (the layer's units), got {bn.num_features}"
            )
        running_mean, running_var = _optional_tensor(bn, "running_mean"), _optional_tensor(bn, "running_var")
        if running_mean is None or running_var is None:
            raise ValueError(
                f"{fn}: expected {what} to track running statistics (its eval-mode output is then an affine map "
                "of the layer's), got track_running_stats=False"
            )
        eps: float = bn.eps  # type: ignore[assignment]  # nn.Module.__getattr__ types every attribute as Tensor | Module
        scale = torch.rsqrt(running_var.detach().double() + eps)
        gamma, beta = _optional_tensor(bn, "weight"), _optional_tensor(bn, "bias")
        if gamma is not None:
            scale = scale * gamma.detach().double()
        b = (b - running_mean.detach().double()) * scale
        if beta is not None:
            b = b + beta.detach().double()
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise ValueError(f"{fn}: expected finite folded weights and biases, got NaN or Inf (from {what})")
    return w, b


def _optional_tensor(module: nn.Module, name: str) -> Tensor | None:
    """A tensor attribute that may be None (a BatchNorm without affine parameters or statistics)."""
    value = getattr(module, name)
    assert value is None or isinstance(value, Tensor), f"{name} is a tensor or None"
    return value


class SplineScores(ScoreMap):
    """Per-unit redundancy scores, ``dict[weight name -> float64 Tensor[units]]`` (higher = keep),
    with the greedy removal behind them.

    ``scores[name][k]`` is unit k's distance to its nearest remaining neighbour at the step the
    greedy removal reached it; ``-1`` for units that shape no boundary (removed first), ``inf``
    for the last unit of a layer. Along the removal order the scores never decrease, so a top-k
    on them keeps what the greedy removal keeps, up to ties; ``ranks`` gives the order exactly.

    Attributes:
        measure, policy: as given to :func:`spline_redundancy`.
        ranks: ``dict[name -> int64 Tensor[units]]``, the step at which each unit is removed
            (0 = first): within its layer for ``"layerwise"``, over all layers for ``"global"``.
        flat: ``dict[name -> bool Tensor[units]]``, units that shape no boundary (all-zero folded
            weights, or never switching on the probe data).
        on_fraction: ``dict[name -> float64 Tensor[units]]``, the fraction of probe bits (samples x
            positions) where each unit is on; None without a probe.
        distances: ``dict[name -> float64 Tensor[units, units]]``, the pairwise distances N(k, k')
            of the measure (the diagonal is inf).
        bn_names: ``dict[name -> str | None]``, the BatchNorm folded into each layer.
        skipped: ``dict[layer name -> reason]``, the linear and convolutional layers not scored
            because the method does not describe their partition (the classifier, activations
            that are not ReLU-like, residual sums before the activation, no activation).
    """

    def __init__(
        self,
        scores: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = (),
        *,
        measure: str = "angle",
        policy: str = "layerwise",
        ranks: dict[str, Tensor] | None = None,
        flat: dict[str, Tensor] | None = None,
        on_fraction: dict[str, Tensor] | None = None,
        distances: dict[str, Tensor] | None = None,
        bn_names: dict[str, str | None] | None = None,
        skipped: dict[str, str] | None = None,
    ):
        super().__init__(scores, criterion="spline_redundancy")
        self.measure, self.policy = measure, policy
        self.ranks, self.flat, self.on_fraction = ranks or {}, flat or {}, on_fraction
        self.distances, self.bn_names = distances or {}, bn_names or {}
        self.skipped = skipped or {}

    def masks(self, model: nn.Module, sparsity: float) -> dict[str, Tensor]:
        """Structured masks (:func:`koopfast.masks.structured_topk`) that prune exactly the units
        :meth:`prune_units` names, chosen by the greedy order (per layer or over all layers, as
        the scores' policy): whole rows/channels of each scored weight, its bias, and the scale and
        shift of the BatchNorm folded into it (in eval mode a BatchNorm would otherwise turn a
        zeroed unit into a constant, nonzero output)."""
        order = {name: r.to(torch.float64) for name, r in self.ranks.items()}  # removed later = kept
        scope: Literal["global", "layerwise"] = "layerwise" if self.policy == "layerwise" else "global"
        masks = structured_topk(order, model, sparsity, scope=scope, warn_normalization=False)  # masked below
        named = dict(model.named_parameters())
        for name, bn in self.bn_names.items():
            if bn is None:
                continue
            units = masks[name].reshape(masks[name].shape[0], -1).all(1)
            for part in ("weight", "bias"):
                if f"{bn}.{part}" in named:
                    masks[f"{bn}.{part}"] = units.clone()
        return masks

    def prune_units(self, sparsity: float) -> dict[str, Tensor]:
        """The units to prune at this sparsity, following the greedy order: int64 indices per
        weight name, in removal order. Layerwise: ``n - round((1 - sparsity) n)`` units of each
        layer of n units; global: ``N - round((1 - sparsity) N)`` units over all N."""
        fn = "koopfast.criteria.SplineScores.prune_units"
        if self.policy == "layerwise":
            return {
                name: torch.argsort(r)[: r.numel() - keep_count(r.numel(), sparsity, fn=fn)]
                for name, r in self.ranks.items()
            }
        total = sum(r.numel() for r in self.ranks.values())
        cut = total - keep_count(total, sparsity, fn=fn)
        return {name: torch.argsort(r)[: int((r < cut).sum())] for name, r in self.ranks.items()}


def spline_redundancy(
    model: nn.Module,
    probe: Probe | None = None,
    measure: Measure = "angle",
    policy: Policy = "layerwise",
) -> SplineScores:
    """Spline redundancy scores of every hidden conv/linear unit (a documented reconstruction; see
    the module docstring), with the greedy removal order.

    Args:
        model: a module with ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers, each optionally followed by
            a BatchNorm (with running statistics) that consumes its output. Scored are the layers
            whose pre-activation goes into a ReLU-like activation (ReLU, leaky ReLU, PReLU) and
            nothing else: the partition the method describes. The others are listed in
            ``skipped`` with the reason: the classifier (its pre-activation is the model's
            output), GELU/ReLU6/SiLU/tanh activations, no activation, or a residual sum before the
            activation (a probe follows the data flow; without one, the next registered module
            decides).
        probe: input data: a batch tensor or a re-iterable of batches (tuples ``(x, ...)`` allowed),
            run in eval mode. With a probe, BatchNorms are paired with layers by following the data
            (a forward pass on two samples), units that never switch on the probe are flagged, and
            ``measure="hamming"`` is possible. Without one, pairing follows registration order
            (the next module with parameters after a layer, if it is a BatchNorm of matching
            size) and the last layer is taken to be the classifier.
        measure: ``"angle"`` (parameter space) or ``"hamming"`` (codes over the probe).
        policy: ``"layerwise"`` (each layer ranked on its own) or ``"global"`` (one ranking).

    Returns:
        :class:`SplineScores`: ``dict[weight name -> float64 Tensor[units]]`` on CPU, plus
        ``ranks``, ``flat``, ``on_fraction``, ``distances`` and ``prune_units(sparsity)``.

    Raises:
        ValueError: unknown measure or policy, ``"hamming"`` without a probe, a model without
            hidden conv/linear layers, an empty probe, probe batches the model rejects, a paired
            BatchNorm without running statistics.
        TypeError: a probe that is not a tensor or a re-iterable of batches.
    """
    fn = "koopfast.criteria.spline_redundancy"
    if measure not in MEASURES:
        raise ValueError(f"{fn}: expected measure to be one of {MEASURES}, got {measure!r}")
    if policy not in POLICIES:
        raise ValueError(f"{fn}: expected policy to be one of {POLICIES}, got {policy!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
    if probe is None:
        if measure == "hamming":
            raise ValueError(f"{fn}: expected probe data for measure='hamming' (codes over the data), got probe=None")
        traced = registered_spline_layers(model, fn=fn)
        codes = None
    else:
        check_probe(probe, fn=fn)
        traced = traced_spline_layers(model, first_batch(probe, model_device(model), fn=fn), fn=fn)
    layers = traced.layers
    if probe is not None:
        codes = record_codes(model, {u.code_name: u.code_module for u in layers}, probe, fn=fn)

    distances: dict[str, Tensor] = {}
    flat: dict[str, Tensor] = {}
    on_fraction: dict[str, Tensor] | None = None if codes is None else {}
    for unit in layers:
        key = unit.weight_name
        w, b = _folded(unit, fn)
        flat[key] = (w.reshape(w.shape[0], -1) == 0).all(1).cpu()
        if codes is not None:
            code_set = codes[unit.code_name]
            (on,) = ops.hamming_distance([code_set.codes], [])
            on = on.cpu()
            assert on_fraction is not None  # a dict exactly when there are codes
            on_fraction[key] = on.double() / code_set.bits
            flat[key] |= (on == 0) | (on == code_set.bits)
        if measure == "angle":
            distances[key] = _angle_distances(unit.layer, w, b)
        else:
            assert codes is not None  # measure='hamming' requires a probe
            distances[key] = _hamming_distances(codes[unit.code_name])
    scores, ranks = _greedy_removal(distances, flat, joint=policy == "global")
    return SplineScores(
        scores,
        measure=measure,
        policy=policy,
        ranks=ranks,
        flat=flat,
        on_fraction=on_fraction,
        distances=distances,
        bn_names={u.weight_name: u.bn_name for u in layers},
        skipped=dict(traced.skipped),
    )


def _folded(unit: SplineLayer, fn: str) -> tuple[Tensor, Tensor]:
    what = f"layer {unit.name!r}" if unit.bn is None else f"BatchNorm {unit.bn_name!r} (after layer {unit.name!r})"
    return _fold(unit.layer, unit.bn, fn, what)


def _angle_distances(layer: nn.Module, w: Tensor, b: Tensor) -> Tensor:
    """1 - |cos| between the units' [w~; b~] in the layer's full input space (units of different
    groups of a grouped convolution share no input, only the bias coordinate)."""
    units = w.shape[0]
    flat_w = w.reshape(units, -1)
    gram = torch.outer(b, b)
    groups = getattr(layer, "groups", 1)
    per_group = units // groups
    for g in range(groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        gram[rows, rows] += flat_w[rows] @ flat_w[rows].t()
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    dist = (1.0 - cos.abs()).clamp(0.0, 1.0).cpu()
    dist.fill_diagonal_(math.inf)
    return dist


def _hamming_distances(code_set: CodeSet) -> Tensor:
    d = ops.pairwise_hamming(code_set.codes).cpu().double()
    m = float(code_set.bits)
    dist = torch.minimum(d, m - d) / m
    dist.fill_diagonal_(math.inf)
    return dist


def _greedy_removal(
    distances: Mapping[str, Tensor], flat: Mapping[str, Tensor], *, joint: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Scores (distance to the nearest remaining neighbour at removal) and ranks (removal step) of
    the greedy removal: flat units first, then repeatedly the unit with the smallest
    nearest-neighbour distance (ties: the last in (layer, index) order goes first), after which
    the neighbours of the units that pointed to it are recomputed. ``joint``: one removal over all
    layers; otherwise one per layer."""
    names = list(distances)
    if not joint:
        scores: dict[str, Tensor] = {}
        ranks: dict[str, Tensor] = {}
        for name in names:
            s, r = _greedy_removal({name: distances[name]}, {name: flat[name]}, joint=True)
            scores |= s
            ranks |= r
        return scores, ranks
    sizes = [distances[n].shape[0] for n in names]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    score = np.empty(total)
    rank = np.empty(total, dtype=np.int64)
    nearest = np.full(total, np.inf)  # distance to the nearest alive neighbour (inf: removed)
    nearest_idx = np.full(total, -1, dtype=np.int64)
    mats = []
    step = 0
    for li, name in enumerate(names):  # flat units first, in (layer, index) order
        d = distances[name].numpy().copy()
        is_flat = flat[name].numpy()
        for j in np.flatnonzero(is_flat):
            score[offsets[li] + j] = FLAT_SCORE
            rank[offsets[li] + j] = step
            step += 1
        d[is_flat, :] = np.inf
        d[:, is_flat] = np.inf
        mats.append(d)
    for li, d in enumerate(mats):
        alive = np.flatnonzero(~flat[names[li]].numpy())
        if alive.size:
            idx = d[alive].argmin(1)
            nearest[offsets[li] + alive] = np.where(np.isfinite(d[alive, idx]), d[alive, idx], _NO_NEIGHBOUR)
            nearest_idx[offsets[li] + alive] = idx
    layer_of = np.repeat(np.arange(len(names)), sizes)
    while step < total:
        g = total - 1 - int(np.argmin(nearest[::-1]))  # ties: the last one
        li = int(layer_of[g])
        k = g - int(offsets[li])
        d = mats[li]
        value = nearest[g]
        score[g] = math.inf if value == _NO_NEIGHBOUR else value
        rank[g] = step
        step += 1
        nearest[g] = np.inf
        d[k, :] = np.inf
        d[:, k] = np.inf
        lo = int(offsets[li])
        stale = np.flatnonzero((nearest_idx[lo : lo + d.shape[0]] == k) & np.isfinite(nearest[lo : lo + d.shape[0]]))
        if stale.size:
            idx = d[stale].argmin(1)
            best = d[stale, idx]
            nearest[lo + stale] = np.where(np.isfinite(best), best, _NO_NEIGHBOUR)
            nearest_idx[lo + stale] = idx
    scores = {n: torch.from_numpy(score[offsets[i] : offsets[i + 1]].copy()) for i, n in enumerate(names)}
    ranks = {n: torch.from_numpy(rank[offsets[i] : offsets[i + 1]].copy()) for i, n in enumerate(names)}
    return scores, ranks
