"""Which tensors of a model are pruned, and what their output units are: one definition for all of koopfast.

Every criterion, the recorder, the masks and the reports take their tensors from :func:`prunable`
when given a model, so a model is read the same way everywhere.

**The default rule.** Included: the weight and the bias of every linear and convolutional layer:
``nn.Linear`` (and its subclasses, such as the ``out_proj`` of ``nn.MultiheadAttention``),
``nn.Conv1d/2d/3d`` (grouped and depthwise included), ``nn.ConvTranspose1d/2d/3d``, Hugging Face
transformers' ``Conv1D`` (GPT-2's attention and MLP layers, weight stored ``[in, out]``), and the
input projections of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight`` when
the key and value sizes differ, and ``in_proj_bias``). Left out, each with the reason
:func:`coverage` reports: normalization scales and shifts (BatchNorm, LayerNorm, RMSNorm, ...),
embedding tables (included with ``embeddings=True``) and every tensor tied to one (an LM head that
shares the token embedding *is* the embedding table), ``nn.MultiheadAttention``'s ``bias_k`` /
``bias_v``, and parameters that belong to no such layer (positional embeddings, class tokens,
custom modules: pass a dict of named tensors to score those).

**Tied tensors.** A parameter reachable under several names (tied embeddings, a module used twice)
is one entry, named as ``model.named_parameters()`` names it (the *canonical* name); its other
names are *aliases*, accepted wherever koopfast takes a parameter name (masks, score dicts), and
a tensor is never counted twice in a budget.

**Output units.** A unit is one output feature of a layer: what structured pruning removes and
what per-unit ("filter") scores are computed over. ``Units.dim`` is the tensor dimension that
indexes them: 0 for Linear and convolution weights (``[out, in / groups, *kernel]``), biases and
``nn.MultiheadAttention``'s projections; 1 for Hugging Face ``Conv1D`` (``[in, out]``) and for
embedding tables (``[tokens, features]``); for a transposed convolution (``[in, out / groups,
*kernel]``) unit ``g · (out / groups) + j`` is column ``j`` of the rows of group ``g``. A bias
follows the units of its weight (``Prunable.bias`` names it).

With a dict of named tensors instead of a model, every tensor is taken as given, units are along
dim 0 (for tensors of 2+ dimensions; a 1-D tensor is its own units) and ``<prefix>.bias`` is the
bias of ``<prefix>.weight``. Wherever koopfast takes a model's tensors (criteria, the recorder,
``gradient_flow(params=...)``), it also takes the result of :func:`prunable` itself, units
included: ``kf.criteria.magnitude(kf.prunable.prunable(model, embeddings=True))`` opts in to the
embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from koopfast._torch_compat import CONV, CONV_TRANSPOSE, NORMALIZATION

__all__ = ["Coverage", "Prunable", "Units", "aliases", "coverage", "prunable", "units_of"]

ParamSource = nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]

_LINEAR_LIKE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear)
_CONV = CONV
_EMBEDDINGS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
_NORMS: tuple[type[nn.Module], ...] = (
    NORMALIZATION,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
_MHA_INPUTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")


@dataclass(frozen=True)
class Units:
    """How a tensor's entries group into output units (see the module docstring).

    ``dim`` indexes the units; ``groups`` > 1 only for grouped transposed convolutions, whose
    ``dim`` = 1 holds ``units / groups`` of them per group of rows."""

    dim: int
    groups: int = 1

    def count(self, shape: torch.Size | tuple[int, ...]) -> int:
        return int(shape[self.dim]) * self.groups

    def rows(self, t: Tensor) -> Tensor:
        """``t`` as ``[units, entries per unit]`` (a view where the layout allows, else a copy)."""
        n = self.count(t.shape)
        if self.groups == 1:
            return t.movedim(self.dim, 0).reshape(n, -1)
        g = self.groups
        grouped = t.reshape(g, t.shape[0] // g, *t.shape[1:])  # [g, in / g, out / g, *kernel]
        return grouped.movedim(2, 1).reshape(n, -1)

    def expand(self, unit_mask: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The contiguous tensor of ``shape`` that holds each unit's value of ``unit_mask`` in all
        of that unit's entries."""
        shape = torch.Size(shape)
        if self.groups == 1:
            view = [1] * len(shape)
            view[self.dim] = shape[self.dim]
            return unit_mask.reshape(view).expand(shape).contiguous()
        g = self.groups
        per_group = unit_mask.reshape(g, 1, shape[1], *([1] * (len(shape) - 2)))
        return per_group.expand(g, shape[0] // g, *shape[1:]).reshape(shape).contiguous()


ALONG_DIM_0 = Units(0)


@dataclass(frozen=True)
class Prunable:
    """One prunable tensor of a model: its canonical name, the tensor, its output units (None for
    a 0-dim tensor), the name of the bias that follows its units (for a weight that has one), its
    aliases, the layer it belongs to (``"Linear 'fc1'"``), and that layer's module name and the
    attribute the tensor stands for (``"weight"`` also for torch.nn.utils.prune's ``weight_orig``).
    The last three are None for a tensor given in a dict."""

    name: str
    tensor: Tensor
    units: Units | None
    bias: str | None = None
    aliases: tuple[str, ...] = ()
    layer: str | None = None
    module_name: str | None = None
    attr: str | None = None

    @property
    def scored_per_unit(self) -> bool:
        """Whether per-unit scores cover this tensor itself: weights (2+ dims) with at least one
        unit. Biases and other vectors follow their layer's units."""
        t = self.tensor
        return self.units is not None and t.dim() >= 2 and self.units.count(t.shape) > 0

    def unit_rows(self, like: Tensor) -> Tensor:
        """``like`` (a tensor shaped as this one, e.g. its scores) as [units, entries per unit]."""
        if self.units is None:
            raise ValueError(f"koopfast.prunable.Prunable.unit_rows: {self.name!r} (0-dim) has no output units")
        return self.units.rows(like)


@dataclass(frozen=True)
class Coverage:
    """What :func:`prunable` takes from a model (``included``, in parameter order) and what it
    leaves out (``excluded``: canonical name -> reason)."""

    included: dict[str, Prunable]
    excluded: dict[str, str]

    def table(self) -> str:
        rows = [(n, "included", p.layer or "") for n, p in self.included.items()]
        rows += [(n, "left out", why) for n, why in self.excluded.items()]
        width = max((len(r[0]) for r in rows), default=4)
        return "\n".join(f"{n.ljust(width)}  {state:8s}  {why}" for n, state, why in rows)

    def __str__(self) -> str:
        return self.table()


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer storing its weight as [in, out] (``nf`` = out).
    Recognized by its class name and layout, without importing transformers."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _is_norm(module: nn.Module) -> bool:
    # Model libraries define their own (LlamaRMSNorm, T5LayerNorm): recognized by name as well.
    return isinstance(module, _NORMS) or "Norm" in type(module).__name__


def units_of(module: nn.Module, attr: str) -> Units | None:
    """The output units of ``getattr(module, attr)`` if it is a weight or bias that the default rule
    prunes (or an embedding table), else None."""
    t = getattr(module, attr, None)
    if not isinstance(t, Tensor) or t.dim() == 0:
        return None
    if isinstance(module, nn.MultiheadAttention):
        return ALONG_DIM_0 if attr in _MHA_INPUTS else None
    if attr not in ("weight", "bias"):
        return None
    if attr == "bias":
        is_layer = isinstance(module, (*_LINEAR_LIKE, _CONV)) or is_hf_conv1d(module)
        return ALONG_DIM_0 if is_layer and t.dim() == 1 else None
    if isinstance(module, CONV_TRANSPOSE):
        groups = module.groups
        assert isinstance(groups, int)  # typed Tensor | Module (nn.Module.__getattr__); convs hold an int
        return Units(1, groups)
    if isinstance(module, (*_LINEAR_LIKE, _CONV)):
        return ALONG_DIM_0
    if is_hf_conv1d(module):
        return Units(1)
    if isinstance(module, _EMBEDDINGS):
        return Units(1)
    return None


def _bias_attr(module: nn.Module, attr: str) -> str | None:
    partner = {"weight": "bias", "in_proj_weight": "in_proj_bias"}.get(attr)
    if partner is None or units_of(module, partner) is None:
        return None
    return partner


def _pruned_by_torch(module: nn.Module, attr: str) -> str:
    """torch.nn.utils.prune moves a parameter X to ``X_orig`` (with an ``X_mask`` buffer and ``X``
    recomputed from both): ``X_orig`` is then the tensor that stands for X."""
    if attr.endswith("_orig") and isinstance(getattr(module, f"{attr[:-5]}_mask", None), Tensor):
        return attr[:-5]
    return attr


def _describe(module_name: str, module: nn.Module) -> str:
    return f"{type(module).__name__} {module_name!r}"


def aliases(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter (aliases included) -> its canonical name."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def coverage(model: nn.Module, *, embeddings: bool = False, include_bias: bool = True) -> Coverage:
    """The default rule applied to ``model``: what is included and what is left out, and why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"koopfast.prunable.coverage: expected an nn.Module, got {type(model).__name__}")
    canonical = {id(p): n for n, p in model.named_parameters()}
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module_name, module, _pruned_by_torch(module, attr)))
            names.setdefault(id(p), []).append(prefix + attr)
    included: dict[str, Prunable] = {}
    excluded: dict[str, str] = {}
    for name, p in model.named_parameters():
        found = owners[id(p)]
        others = tuple(n for n in dict.fromkeys(names[id(p)]) if n != name)
        embedding = next(((n, m) for n, m, a in found if isinstance(m, _EMBEDDINGS) and a == "weight"), None)
        layer = next(((n, m, a) for n, m, a in found if units_of(m, a) is not None), None)
        why = None
        if embedding is not None and not embeddings:
            tied = "" if len(found) == 1 else f" (tied: also {', '.join(others)})"
            why = f"embedding table of {_describe(*embedding)}{tied}: include with embeddings=True"
        elif layer is None:
            module_name, module, attr = found[0]
            if _is_norm(module):
                why = f"normalization parameter of {_describe(module_name, module)}"
            elif isinstance(module, nn.MultiheadAttention):
                why = f"{attr} of {_describe(module_name, module)} (attention bias added to keys/values)"
            else:
                why = (
                    f"{attr} of {_describe(module_name, module)}: not a weight or bias of a linear, "
                    "convolutional or attention-projection layer"
                )
        elif not include_bias and layer[2].endswith("bias"):
            why = "a bias (include_bias=False)"
        if why is not None:
            excluded[name] = why
            continue
        if embedding is not None:  # embeddings=True: units of the table, whatever shares it
            module_name, module, attr = embedding[0], embedding[1], "weight"
        else:
            assert layer is not None  # why is set whenever no layer was found
            module_name, module, attr = layer
        bias_attr = _bias_attr(module, attr) if include_bias else None
        bias_name = None
        if bias_attr is not None:
            bias_name = canonical.get(id(getattr(module, bias_attr)))
        included[name] = Prunable(
            name=name,
            tensor=p,
            units=units_of(module, attr),
            bias=bias_name,
            aliases=others,
            layer=_describe(module_name, module),
            module_name=module_name,
            attr=attr,
        )
    # A weight's bias is named only if it is itself included (not tied to an excluded tensor).
    for name, entry in list(included.items()):
        if entry.bias is not None and entry.bias not in included:
            included[name] = dataclasses.replace(entry, bias=None)
    return Coverage(included, excluded)


def prunable(model: nn.Module, *, embeddings: bool = False, include_bias: bool = True) -> dict[str, Prunable]:
    """The tensors ``model`` prunes by the default rule, canonical name -> :class:`Prunable`, in
    ``model.named_parameters()`` order."""
    return coverage(model, embeddings=embeddings, include_bias=include_bias).included


def entries(source: ParamSource, *, fn: str, include_bias: bool = True) -> dict[str, Prunable]:
    """The tensors to score: a model's prunable tensors, or the named tensors given, taken as they
    are. Raises ValueError naming ``fn`` when there is nothing to score or when a dict lists one
    tensor under two names (it would count twice)."""
    if isinstance(source, nn.Module):
        out = prunable(source, include_bias=include_bias)
        if not out:
            raise ValueError(
                f"{fn}: expected a model with linear, convolutional or attention layers to score, got "
                f"{type(source).__name__} without any (pass a dict of named tensors to choose them yourself)"
            )
        return out
    if isinstance(source, Mapping) and source and all(isinstance(v, Prunable) for v in source.values()):
        return dict(source)  # prunable(model, ...)'s entries: their units and bias links as they are
    if isinstance(source, Mapping):
        given = dict(source)
    else:
        try:
            given = dict(source)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{fn}: expected a model, a dict of named tensors or (name, tensor) pairs, got {type(source).__name__}"
            ) from exc
    if not given:
        raise ValueError(f"{fn}: expected at least one named tensor, got none")
    seen: dict[int, str] = {}
    for name, t in given.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: expected {name!r} to be a tensor, got {type(t).__name__}")
        if id(t) in seen:
            raise ValueError(
                f"{fn}: expected each tensor once, got the same tensor as {seen[id(t)]!r} and {name!r} "
                "(a tied parameter is one entry: pass it under one name)"
            )
        seen[id(t)] = name
    out = {}
    for name, t in given.items():
        prefix, dot, attr = str(name).rpartition(".")
        bias = f"{prefix}{dot}bias" if attr == "weight" else None
        has_bias = bias in given and given[bias].dim() == 1 and t.dim() >= 1 and given[bias].shape[0] == t.shape[0]
        out[name] = Prunable(name, t, ALONG_DIM_0 if t.dim() >= 1 else None, bias if has_bias else None)
    return out


def named_tensors(source: ParamSource, *, fn: str, include_bias: bool = True) -> dict[str, Tensor]:
    """:func:`entries`' tensors, by name."""
    return {n: e.tensor for n, e in entries(source, fn=fn, include_bias=include_bias).items()}


def resolve_names(model: nn.Module, names: Iterable[str], *, fn: str, what: str = "names") -> list[str]:
    """Canonical names for ``names`` (aliases accepted). Raises ValueError for a name that is not a
    parameter of ``model`` and for two names of one tensor."""
    known = aliases(model)
    out: list[str] = []
    first: dict[str, str] = {}
    unknown = []
    for n in names:
        c = known.get(str(n))
        if c is None:
            unknown.append(str(n))
            continue
        if c in first:
            raise ValueError(
                f"{fn}: expected one entry per tensor, got {first[c]!r} and {n!r}, two names of the tied "
                f"parameter {c!r}"
            )
        first[c] = str(n)
        out.append(c)
    if unknown:
        raise ValueError(f"{fn}: expected {what} among the model's parameter names, got unknown {sorted(unknown)}")
    return out
