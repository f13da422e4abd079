"""The result of :func:`gradient_flow`: the operands for one model state, and the scores and
masks of any measure computed from them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from koopfast import _distributed as kf_dist
from koopfast import masks as kf_masks
from koopfast.criteria.gradflow.measures import GradientMeasure, Nvidia, measure_of
from koopfast.prunable import ALONG_DIM_0, Units
from koopfast.scores import ScoreMap

__all__ = ["GradientFlow", "GradientFlowScores", "Granularity"]

Granularity = Literal["unstructured", "filter"]


class GradientFlowScores(ScoreMap):
    """Scores of one gradient-flow measure: name -> Tensor like the parameter (unstructured) or
    weight name -> Tensor[out_units] (filter), higher = keep.

    Attributes:
        criterion: the measure's name (e.g. ``"grasp"``), as ``measure``.
        measure, granularity, variant: how the scores were computed.
        source: ``"weights"`` or ``"bn"`` (BatchNorm channels scoring their layer's filters).
    """

    measure: str
    granularity: str
    variant: str
    source: str

    def __init__(
        self,
        scores: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = (),
        *,
        criterion: str = "",
        granularity: str = "unstructured",
        variant: str = "abs",
        source: str = "weights",
    ) -> None:
        super().__init__(scores, criterion=criterion)
        self.measure = criterion
        self.granularity = granularity
        self.variant = variant
        self.source = source


@dataclass
class GradientFlow:
    """The operands of the gradient-flow measures for one model state (see the package docstring):
    copies of θ as it was scored, ḡ, and optionally Hḡ and E[g²], keyed by parameter name.

    With ``source="bn"`` the scored tensors are BatchNorm scales γ keyed by their layer's weight
    name (``bn_scales`` maps it to γ's name), and ``shifts`` holds the same operands (θ, ḡ, E[g²];
    no Hḡ) of the BatchNorm shifts β, for the ``nvidia`` measure."""

    params: dict[str, Tensor]
    grad: dict[str, Tensor]
    hg: dict[str, Tensor] | None = None
    grad_sq: dict[str, Tensor] | None = None
    bn_scales: dict[str, str] = field(default_factory=dict)  # source="bn": weight name -> BN γ name
    units: dict[str, Units | None] = field(default_factory=dict)  # per name: how entries form output units
    batches: int = 0
    samples: float = 0.0
    fd_step: float | None = None  # the finite-difference step used for Hḡ
    fd_error: float | None = None  # its self-check's estimate of Hḡ's relative error (fd_step="auto")
    shifts: GradientFlow | None = None  # source="bn": the BatchNorm shifts β, keyed by weight name
    preset: str | None = None  # the preset that set every option, if any

    def scores(
        self,
        measure: str,
        granularity: Granularity = "unstructured",
        *,
        variant: str = "abs",
        init: dict[str, Tensor] | None = None,
    ) -> GradientFlowScores:
        """Materialised scores of ``measure`` (one of ``ALL_MEASURES``): name -> Tensor like the
        parameter (unstructured), or weight name -> Tensor[out_units] (filter).

        ``variant``: "abs" (default); "tfo" for loss_preservation per filter, |Σθg| instead of
        Σ|θg|; "init" for biased_loss_preservation, |θ − θ₀| |θ g| with θ₀ = ``init[name]`` (the
        parameters at initialization; the authors' ``--use_init``)."""
        fn = f"koopfast.criteria.GradientFlow.scores({measure!r})"
        chosen = self._measure(measure, variant, granularity, fn)
        if self.bn_scales and granularity != "filter":
            raise ValueError(f"{fn}: BatchNorm-scale operands (source='bn') score filters: use granularity='filter'")
        if chosen.variant == "init":
            _check_init(init, self.params, fn)
        elif init is not None:
            raise ValueError(f"{fn}: init= is used by variant 'init' only")
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, theta in self.params.items():
                units = self.units.get(name, ALONG_DIM_0 if theta.dim() else None)
                if granularity == "filter" and not (self.bn_scales or _has_units(theta, units)):
                    continue
                theta0 = None if init is None else init[name]
                if not kf_dist.any_dtensor([theta]):
                    out[name] = self._score(chosen, granularity, name, theta, units, theta0)
                    continue
                # Shard(0): each process scores its rows (whole units), returned as a DTensor
                if granularity == "filter":
                    assert units is not None  # filters are scored only where there are units
                    if units.dim != 0:
                        raise ValueError(
                            f"{fn}: per-unit scores of {name!r} need its units along dim 0 to score sharded "
                            f"(Shard(0)) rows locally, but its units are along dim {units.dim}"
                        )
                b = self._operand(chosen, name)
                local = _scored(
                    chosen,
                    granularity,
                    kf_dist.local(theta),
                    None if b is None else kf_dist.local(b),
                    units,
                    None if theta0 is None else kf_dist.local(theta0),
                )
                shape = theta.shape if granularity == "unstructured" else theta.shape[:1]
                layout = kf_dist.resolve([theta], None, fn)
                assert layout is not None  # a DTensor always has a layout
                out[name] = layout.wrap(local, theta, shape)
        source = "bn" if self.bn_scales else "weights"
        return GradientFlowScores(
            out, criterion=chosen.name, granularity=granularity, variant=chosen.variant, source=source
        )

    def masks(
        self, measure: str, sparsity: float, *, scope: Literal["global", "layerwise"] = "global"
    ) -> dict[str, Tensor]:
        """Unstructured masks of a measure, with the score computed inside the selection kernel from
        (θ, g), (θ, Hg) or (θ, E[g²]): nothing N-sized is materialised but the masks."""
        fn = f"koopfast.criteria.GradientFlow.masks({measure!r})"
        chosen = self._measure(measure, "abs", "unstructured", fn)
        if self.bn_scales:
            raise ValueError(f"{fn}: BatchNorm-scale operands (source='bn') score filters, not weights")
        operands: dict[str, Tensor | tuple[Tensor, Tensor]]
        if chosen.operand is None:
            operands = {n: p.detach() for n, p in self.params.items()}
        else:
            operands = {n: (p.detach(), self._required_operand(chosen, n)) for n, p in self.params.items()}
        if scope == "global":
            masks = kf_masks.global_topk(operands, sparsity, by=chosen.fused)
            assert isinstance(masks, dict)  # dict scores: dict masks
            return masks
        if scope == "layerwise":
            masks = kf_masks.layerwise_topk(operands, sparsity, by=chosen.fused)
            assert isinstance(masks, dict)  # dict scores: dict masks
            return masks
        raise ValueError(f"{fn}: expected scope 'global' or 'layerwise', got {scope!r}")

    def _score(
        self,
        chosen: GradientMeasure,
        granularity: str,
        name: str,
        theta: Tensor,
        units: Units | None,
        theta0: Tensor | None,
    ) -> Tensor:
        score = _scored(chosen, granularity, theta, self._operand(chosen, name), units, theta0)
        if isinstance(chosen, Nvidia):  # + the shift's Fisher, channel by channel
            shift = self.shifts
            assert shift is not None and shift.grad_sq is not None  # _measure checked them
            score = score + _scored(chosen, granularity, shift.params[name], shift.grad_sq[name], units, None)
        return score

    def _operand(self, chosen: GradientMeasure, name: str) -> Tensor | None:
        if chosen.operand is None:
            return None
        return self._required_operand(chosen, name)

    def _required_operand(self, chosen: GradientMeasure, name: str) -> Tensor:
        """``chosen``'s operand of ``name``, for a measure that has one."""
        assert chosen.operand is not None  # measures without an operand score θ alone
        operands = {"grad": self.grad, "hg": self.hg, "grad_sq": self.grad_sq}[chosen.operand]
        assert operands is not None  # _measure checked that it was computed
        return operands[name]

    def _measure(self, measure: str, variant: str, granularity: str, fn: str) -> GradientMeasure:
        chosen = measure_of(measure, variant, fn)
        if granularity not in ("unstructured", "filter"):
            raise ValueError(f"{fn}: expected granularity 'unstructured' or 'filter', got {granularity!r}")
        if chosen.needs_hg and self.hg is None:
            raise ValueError(f"{fn}: needs Hg: compute the operands with gradient_flow(..., hvp='exact')")
        if chosen.operand == "grad_sq" and self.grad_sq is None:
            raise ValueError(f"{fn}: needs E[g²]: compute the operands with gradient_flow(..., fisher=True)")
        if isinstance(chosen, Nvidia) and (self.shifts is None or self.shifts.grad_sq is None):
            raise ValueError(
                f"{fn}: needs the BatchNorm shifts' E[g²]: compute the operands with gradient_flow(..., "
                "source='bn', fisher=True)"
            )
        return chosen


def _has_units(theta: Tensor, units: Units | None) -> bool:
    """Weights (2+ dims) have output units; biases and other vectors follow their layer's units."""
    return units is not None and theta.dim() >= 2 and units.count(theta.shape) > 0


def _scored(
    chosen: GradientMeasure,
    granularity: str,
    theta: Tensor,
    b: Tensor | None,
    units: Units | None,
    theta0: Tensor | None,
) -> Tensor:
    if granularity == "unstructured":
        return chosen.elementwise(theta, b, theta0)
    assert units is not None  # per-unit scores only of tensors with units
    rows0 = None if theta0 is None else units.rows(theta0)
    return chosen.per_unit(units.rows(theta), None if b is None else units.rows(b), rows0)


def _check_init(init: dict[str, Tensor] | None, params: dict[str, Tensor], fn: str) -> None:
    if not isinstance(init, dict):
        raise ValueError(f"{fn}: variant 'init' needs init= a dict name -> the parameter at initialization")
    missing = [n for n in params if n not in init]
    if missing:
        raise ValueError(f"{fn}: init= lacks the parameters {missing[:3]}")
    wrong = [n for n in params if tuple(init[n].shape) != tuple(params[n].shape)]
    if wrong:
        raise ValueError(f"{fn}: init= has other shapes than the parameters for {wrong[:3]}")
