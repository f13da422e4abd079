"""Structured pruning that respects coupling, on Torch-Pruning's dependency graph.

Output channels are not independent in real networks: the convolutions whose outputs a residual
connection sums must keep the same channels, and the BatchNorm (or LayerNorm) after a layer
belongs to the same channel. Torch-Pruning (``pip install torch-pruning``, an optional dependency
of koopfast) traces a model into *groups* of coupled channels; this module lets any koopfast
per-unit score decide what the groups keep:

- :func:`channel_groups`: the coupled groups of a model, as koopfast names and units;
- :func:`coupled_masks`: structured masks over groups, selected exactly with koopfast's kernel
  (exactly round((1 - sparsity) · C) of the C group channels kept, ties by position), that also
  mask the normalization layers of pruned channels, so that in eval mode a pruned channel is
  exactly zero everywhere it flows (ResNet shortcuts included);
- :class:`UnitImportance`: a Torch-Pruning importance from koopfast scores, for its pruners;
- :func:`prune_channels`: physical removal (a smaller model) through Torch-Pruning's
  ``MetaPruner`` with that importance, attention heads included (:func:`attention_heads`).

Per-unit scores are ``dict[weight name -> Tensor[units]]`` (``kf.criteria.magnitude(model,
granularity="filter")``, ``GradientFlow.scores(..., "filter")``, :func:`koopfast.criteria.per_unit`
of any unstructured score such as KMP, spline redundancy). A group's channel score is the
reduction ("sum", "mean" or "max") of the scores of the group's layers that have one; groups
without any scored layer are left whole.

Where masks and removal differ: a masked hidden channel of a transformer still counts in its
LayerNorm's mean and variance (as a zero), a removed one does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from koopfast._torch_compat import CONV
from koopfast.masks.topk import global_topk, layerwise_topk
from koopfast.prunable import ALONG_DIM_0, Units, aliases, is_hf_conv1d, units_of

__all__ = [
    "ChannelGroup",
    "ChannelPruning",
    "GroupMember",
    "UnitImportance",
    "attention_heads",
    "channel_groups",
    "coupled_masks",
    "prune_channels",
]

Reduction = Literal["sum", "mean", "max"]
REDUCTIONS = ("sum", "mean", "max")
Normalize = Literal["mean", "max"] | None
NORMALIZERS = (None, "mean", "max")


def _torch_pruning(fn: str) -> Any:
    try:
        import torch_pruning  # untyped: pyproject's mypy overrides ignore its missing type information
    except ImportError as exc:
        raise ImportError(
            f"{fn}: needs Torch-Pruning for the dependency graph: pip install torch-pruning (koopfast's optional "
            "'structure' extra)"
        ) from exc
    return torch_pruning


@dataclass(frozen=True)
class GroupMember:
    """One tensor whose output units are a group's channels: ``name`` (canonical parameter
    name), its ``units``, and ``unit_of_channel`` (int64 [channels]: the unit of this tensor that
    carries each channel of the group)."""

    name: str
    units: Units
    unit_of_channel: Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or pruned together: ``channels`` of them, carried by the output
    units of ``members`` (layer weights and biases, normalization scales and shifts). ``root`` is
    the module Torch-Pruning grouped from."""

    root: str
    channels: int
    members: tuple[GroupMember, ...]


def _check_traceable(model: object, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
    conv1d = [n for n, m in model.named_modules() if is_hf_conv1d(m)]
    if conv1d:
        raise ValueError(
            f"{fn}: expected layers Torch-Pruning's dependency graph knows, got Hugging Face Conv1D layers "
            f"({conv1d[0]!r} and {len(conv1d) - 1} more, as in GPT-2), which it cannot prune; "
            "kf.masks.structured_topk masks their output units"
        )


def _trace(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Iterable[nn.Module],
    output_transform: Callable[[Any], Tensor] | None,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    fn: str,
) -> tuple[Any, Any, list[Any]]:
    tp = _torch_pruning(fn)
    _check_traceable(model, fn)
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example_inputs, output_transform=output_transform, forward_fn=forward_fn
    )
    root_types = [CONV, nn.Linear]
    return tp, graph, graph.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=root_types)


def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_layers: Iterable[nn.Module] = (),
    output_transform: Callable[[Any], Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> list[ChannelGroup]:
    """The groups of coupled output channels of ``model``, traced by Torch-Pruning on
    ``example_inputs``. ``ignored_layers`` (for example the classifier) are not grouped from;
    ``output_transform`` maps the model's output to a tensor (``lambda out: out.logits``) and
    ``forward_fn(model, inputs)`` calls the model, as in Torch-Pruning."""
    fn = "koopfast.structure.channel_groups"
    _, graph, groups = _trace(model, example_inputs, ignored_layers, output_transform, forward_fn, fn)
    return [_group(model, graph, g) for g in groups]


def _group(model: nn.Module, graph: Any, group: Any) -> ChannelGroup:
    module_names = {id(m): n for n, m in model.named_modules()}
    canonical = aliases(model)
    channels = len(group[0].idxs)
    members: list[GroupMember] = []
    seen = set()
    for i, (dep, idxs) in enumerate(group):
        module = dep.target.module
        if id(module) not in module_names or not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        prefix = module_names[id(module)]
        unit_of_channel = torch.full((channels,), -1, dtype=torch.long)
        unit_of_channel[torch.tensor([int(r) for r in group[i].root_idxs])] = torch.tensor([int(j) for j in idxs])
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            name = canonical.get(f"{prefix}.{attr}" if prefix else attr)
            if not isinstance(p, nn.Parameter) or name is None or name in seen:
                continue
            units = units_of(module, attr) or (ALONG_DIM_0 if p.dim() == 1 else None)
            if units is None:
                continue
            seen.add(name)
            members.append(GroupMember(name, units, unit_of_channel))
    root = module_names.get(id(group[0].dep.source.module), type(group[0].dep.source.module).__name__)
    return ChannelGroup(root, channels, tuple(members))


def _check_reduction(reduction: str, normalize: Normalize, fn: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
    if normalize not in NORMALIZERS:
        raise ValueError(f"{fn}: expected normalize to be one of {NORMALIZERS}, got {normalize!r}")


def _normalized(scores: Tensor, normalize: Normalize) -> Tensor:
    """A group's channel scores divided by their mean or max: global ranking then compares each
    channel with its own group, not raw scales (whose differences between layers can make a
    global threshold remove whole layers)."""
    if normalize is None:
        return scores
    scale = scores.mean() if normalize == "mean" else scores.max()
    return scores / scale if float(scale) > 0 else scores


def _channel_scores(
    members: Sequence[GroupMember], unit_scores: Mapping[str, Tensor], channels: int, reduction: str, fn: str
) -> Tensor | None:
    """The group's channel scores: the reduction over its scored members (None if none is)."""
    parts = []
    for m in members:
        s = unit_scores.get(m.name)
        if s is None:
            continue
        if not isinstance(s, Tensor) or s.dim() != 1:
            raise ValueError(f"{fn}: expected {m.name!r} to hold one score per output unit (1-D), got {s!r:.60}")
        covered = m.unit_of_channel >= 0
        if int(m.unit_of_channel.max()) >= s.numel():
            raise ValueError(
                f"{fn}: expected {m.name!r} to hold a score for each of its output units, got {s.numel()} scores"
            )
        part = torch.full((channels,), float("nan"), dtype=torch.float64)
        part[covered] = s.detach().cpu().double()[m.unit_of_channel[covered]]
        parts.append(part)
    if not parts:
        return None
    stacked = torch.stack(parts)
    present = ~stacked.isnan()
    filled = stacked.nan_to_num(0.0)
    if reduction == "sum":
        return filled.sum(0)
    if reduction == "mean":
        return filled.sum(0) / present.sum(0).clamp_min(1)
    return stacked.nan_to_num(-torch.inf).amax(0)


def coupled_masks(
    model: nn.Module,
    example_inputs: Any,
    unit_scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Literal["global", "layerwise"] = "global",
    reduction: Reduction = "sum",
    normalize: Normalize = None,
    ignored_layers: Iterable[nn.Module] = (),
    output_transform: Callable[[Any], Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """Structured masks over coupled channel groups (see the module docstring).

    Every group with at least one scored layer gets channel scores (``reduction`` of its layers'
    unit scores), divided by their mean or max with ``normalize`` (None: raw scores, whose scales
    can differ between layers enough for a global threshold to empty a layer); ``scope="global"``
    keeps exactly ``round((1 - sparsity) · C)`` of the C channels of
    all those groups together, ``"layerwise"`` that fraction of each group (ties: the first group
    in order, then the lowest channel). Every member of a group (weights, biases, BatchNorm and
    LayerNorm scales and shifts) gets the mask of its units.

    Returns:
        ``dict[parameter name, bool Tensor]`` shaped like each parameter, on its device.
    """
    fn = "koopfast.structure.coupled_masks"
    _check_reduction(reduction, normalize, fn)
    if scope not in ("global", "layerwise"):
        raise ValueError(f"{fn}: expected scope to be 'global' or 'layerwise', got {scope!r}")
    if not isinstance(unit_scores, Mapping) or not unit_scores:
        raise ValueError(f"{fn}: expected unit_scores as a non-empty dict of per-unit score tensors")
    canonical = aliases(model)
    unknown = [n for n in unit_scores if n not in canonical]
    if unknown:
        raise ValueError(f"{fn}: expected score names among the model's parameter names, got unknown {unknown}")
    scores = {canonical[n]: s for n, s in unit_scores.items()}
    groups = channel_groups(
        model, example_inputs, ignored_layers=ignored_layers, output_transform=output_transform, forward_fn=forward_fn
    )
    scored = {}
    for i, g in enumerate(groups):
        s = _channel_scores(g.members, scores, g.channels, reduction, fn)
        if s is not None:
            scored[i] = _normalized(s, normalize)
    if not scored:
        raise ValueError(f"{fn}: expected some scored layer in the model's channel groups, got none of {list(scores)}")
    select = global_topk if scope == "global" else layerwise_topk
    keep = select({f"group {i} ({groups[i].root})": s for i, s in scored.items()}, sparsity)
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for (i, _), channel_mask in zip(scored.items(), keep.values()):
        for m in groups[i].members:
            p = params[m.name]
            units = torch.ones(m.units.count(p.shape), dtype=torch.bool)
            covered = m.unit_of_channel >= 0
            units[m.unit_of_channel[covered]] = channel_mask[covered]
            mask = m.units.expand(units.to(p.device), p.shape)
            out[m.name] = out[m.name] & mask if m.name in out else mask
    return out


class UnitImportance:
    """A Torch-Pruning importance (``importance(group) -> Tensor[channels]``) from koopfast
    per-unit scores, for ``torch_pruning.pruner.MetaPruner`` and its relatives.

    Args:
        unit_scores: ``dict[weight name -> Tensor[units]]`` for the model as it is now (aliases of
            tied parameters accepted).
        model: the model the scores belong to.
        reduction: how the scores of a group's layers combine: "sum" (default), "mean" or "max".
        normalize: None (raw scores), "mean" or "max": each group's scores divided by their mean
            or max (Torch-Pruning's own importances divide by the mean), so that a global ranking
            does not remove whole layers whose scores are on a smaller scale (Torch-Pruning then
            refuses to prune that group at all).

    Groups whose layers have no score get None (Torch-Pruning then leaves them whole). Scores
    refer to the model's current channels: compute them again after each pruning step.
    """

    def __init__(
        self,
        unit_scores: Mapping[str, Tensor],
        model: nn.Module,
        *,
        reduction: Reduction = "sum",
        normalize: Normalize = "mean",
    ):
        fn = "koopfast.structure.UnitImportance"
        _check_reduction(reduction, normalize, fn)
        canonical = aliases(model)
        unknown = [n for n in unit_scores if n not in canonical]
        if unknown:
            raise ValueError(f"{fn}: expected score names among the model's parameter names, got unknown {unknown}")
        self._scores = {canonical[n]: s for n, s in unit_scores.items()}
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._reduction = reduction
        self._normalize = normalize

    def __call__(self, group: Any) -> Tensor | None:
        channels = len(group[0].idxs)
        parts = []
        for i, (dep, idxs) in enumerate(group):
            weight = getattr(dep.target.module, "weight", None)
            name = self._names.get(id(weight))
            # Torch-Pruning's pruning functions: prune_out_channels / prune_in_channels of a layer
            if name not in self._scores or getattr(dep.handler, "__name__", "") != "prune_out_channels":
                continue
            part = torch.full((channels,), float("nan"), dtype=torch.float64)
            part[torch.tensor([int(r) for r in group[i].root_idxs])] = (
                self._scores[name].detach().cpu().double()[torch.tensor([int(j) for j in idxs])]
            )
            parts.append(part)
        if not parts:
            return None
        stacked = torch.stack(parts)
        if self._reduction == "max":
            total = stacked.nan_to_num(-torch.inf).amax(0)
        else:
            total = stacked.nan_to_num(0.0).sum(0)
            if self._reduction == "mean":
                total = total / (~stacked.isnan()).sum(0).clamp_min(1)
        return _normalized(total, self._normalize).float()


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{projection: heads}`` for the attention layers of Hugging Face-style models (modules with
    ``q_proj``/``k_proj``/``v_proj`` or ``query``/``key``/``value`` linear children and a
    ``num_attention_heads``/``num_heads`` attribute, ``num_key_value_heads`` for grouped-query
    attention), as Torch-Pruning's ``num_heads`` argument wants it."""
    out: dict[nn.Module, int] = {}
    for module in model.modules():
        heads = getattr(module, "num_attention_heads", getattr(module, "num_heads", None))
        if not isinstance(heads, int):
            continue
        for names in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
            q, k, v = (getattr(module, n, None) for n in names)
            if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear):
                kv = getattr(module, "num_key_value_heads", heads)
                out[q], out[k], out[v] = heads, kv, kv
                break
    return out


@dataclass(frozen=True)
class ChannelPruning:
    """What :func:`prune_channels` removed: parameter counts before and after, and the output
    units of every pruned layer before and after (``{name: (before, after)}``)."""

    params_before: int
    params_after: int
    units: dict[str, tuple[int, int]]

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0


def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    unit_scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    reduction: Reduction = "sum",
    normalize: Normalize = "mean",
    ignored_layers: Sequence[nn.Module] = (),
    output_transform: Callable[[Any], Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    **pruner_options: Any,
) -> ChannelPruning:
    """Physically remove channels (and, with ``num_heads``/``prune_num_heads``, attention heads) from
    ``model`` in place, chosen by koopfast per-unit scores: Torch-Pruning's ``MetaPruner`` with
    :class:`UnitImportance` (``normalize="mean"`` by default, as Torch-Pruning's own importances),
    global ranking over all groups, ``pruning_ratio = sparsity``.

    ``pruner_options`` go to ``MetaPruner`` (``num_heads=attention_heads(model)``,
    ``prune_num_heads=True``, ``head_pruning_ratio``, ``round_to``, ``max_pruning_ratio``, ...).
    Ties at the threshold follow Torch-Pruning (it prunes every channel whose score is at or below
    the threshold, so ties can prune more than asked); :func:`coupled_masks` keeps exact counts.
    """
    fn = "koopfast.structure.prune_channels"
    tp = _torch_pruning(fn)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{fn}: expected sparsity in [0, 1), got {sparsity!r}")
    _check_traceable(model, fn)
    importance = UnitImportance(unit_scores, model, reduction=reduction, normalize=normalize)
    before_units = {n: u for n, m in model.named_modules() if (u := _out_units(m)) is not None}
    before = sum(p.numel() for p in model.parameters())
    options = {"global_pruning": True, **pruner_options}
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=importance,
        pruning_ratio=float(sparsity),
        ignored_layers=list(ignored_layers),
        output_transform=output_transform,
        forward_fn=forward_fn,
        **options,
    )
    pruner.step()
    after_units = {n: _out_units(m) or 0 for n, m in model.named_modules() if n in before_units}
    changed = {n: (before_units[n], after_units[n]) for n in before_units if after_units[n] != before_units[n]}
    return ChannelPruning(before, sum(p.numel() for p in model.parameters()), changed)


def _out_units(module: nn.Module) -> int | None:
    units = units_of(module, "weight")
    weight = getattr(module, "weight", None)
    if units is None or not isinstance(weight, Tensor) or weight.dim() < 2:
        return None
    return units.count(weight.shape)
