"""Named presets: every setting of a paper's released code in one place.

``gradient_flow(model, None, batches, preset="flowandprune", measure=...)`` computes the operands
as Lubana & Dick's released code does (github.com/EkdeepSLubana/flowandprune, read for this;
none of it copied). Where each setting comes from:

=================================== ============================================== =====================
setting                             flowandprune                                   koopfast default
=================================== ============================================== =====================
loss                                ``imp_estimator.py``: ``nn.CrossEntropyLoss``  any ``loss_fn``
                                    on ``net(inputs) / T``
temperature of ḡ, E[g²]             ``main.py`` ``--T`` default 5                  1 (the loss itself)
temperature of Hḡ (grasp)           ``main.py`` ``--grasp_T`` default 200          1
temperature of Hḡ                   ``main.py``: ``grasp_T = 1`` for               1
(gradient_norm_preservation)        ``grad_preserve``
samples for ḡ, E[g²]                ``main.py`` ``--imp_samples`` 2560;            every batch
                                    ``imp_estimator.cal_grad`` stops once
                                    ``num_data >= num_stop`` (whole batches)
data for Hḡ and its ḡ               ``imp_estimator.grasp_data``: the first        the same batches
                                    ``imp_samples // num_classes`` samples of      as ḡ
                                    each class, one batch per class (``cal_hg``)
Hḡ                                  ``cal_hg``: double backprop of ḡᵀg over         over the scored
                                    every parameter (``model_params``: BatchNorm   tensors only
                                    γ, β too), averaged over the class batches
mode                                ``cal_grad``, ``cal_hg``: ``net.eval()``       eval (the same)
scored tensors                      ``cal_importance_*``: every conv weight        prunable tensors
                                    (``l_params[3*ind]``), per output filter
nvidia                              ``cal_importance_nvidia_fisher``:              (same, source="bn")
                                    γ² E[g_γ²] + β² E[g_β²] per channel
biased_loss with ``--use_init``     ``cal_importance_biased_loss``:                variant "init"
                                    Σ |θ − θ₀| |θ g|                               of the scores
=================================== ============================================== =====================

Why the defaults differ: a temperature changes what is measured (the authors chose theirs per
measure; a new user's loss is their own), a fixed sample count and class-balanced batches are a
data-loading policy (koopfast uses the batches it is given), and Hḡ over the scored tensors keeps
the scores a function of the tensors being pruned (over every parameter, GraSP and
gradient-norm scores move by 1-8 % per layer on the small BatchNorm convnets of tests/parity;
issue 13 saw 6-11 % and changed rankings).

The authors' measure names map onto koopfast's: mag_based → magnitude (filter), l1 →
``kf.criteria.magnitude(p=1)``, loss_based → loss_preservation, tfo → loss_preservation variant
"tfo", biased_loss → biased_loss_preservation (variant "init" with ``--use_init``), grasp → grasp,
grad_preserve → gradient_norm_preservation, fisher → fisher, nvidia → nvidia (source "bn"), bn →
magnitude with source "bn". Their scores are per filter: use ``granularity="filter"``.

Deliberately not reproduced: their ``grasp_data`` stops only once it has seen one sample more of
every class after filling it (and raises StopIteration when the data runs out first); here the
collection stops when every class is full and a ValueError names the classes short of samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from koopfast.criteria.gradflow.api import cross_entropy, operands
from koopfast.criteria.gradflow.flow import GradientFlow
from koopfast.criteria.gradflow.measures import ALL_MEASURES
from koopfast.prunable import ParamSource

__all__ = ["PRESETS", "FlowAndPrune", "preset_named"]


@dataclass(frozen=True)
class FlowAndPrune:
    """The settings of flowandprune (``main.py`` defaults, ``imp_estimator.py`` procedures; see the
    module docstring for the file of each).

    Attributes:
        temperature: of ḡ and E[g²] (``--T``, 5).
        grasp_temperature: of grasp's Hḡ (``--grasp_T``, 200).
        grad_preserve_temperature: of gradient_norm_preservation's Hḡ (1: ``main.py`` sets
            ``grasp_T = 1`` for ``grad_preserve``).
        samples: ``--imp_samples`` (2560 = 20 batches of their 128): ḡ and E[g²] use whole batches
            until this many samples are reached; Hḡ uses ``samples // classes`` of each class.
        classes: ``--num_classes`` (their default 100, set per data set); None: one more than the
            largest label among the first ``samples`` samples.
    """

    temperature: float = 5.0
    grasp_temperature: float = 200.0
    grad_preserve_temperature: float = 1.0
    samples: int = 2560
    classes: int | None = None

    name = "flowandprune"

    def __post_init__(self) -> None:
        fn = "koopfast.criteria.FlowAndPrune"
        for field in ("temperature", "grasp_temperature", "grad_preserve_temperature"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{fn}: expected {field} to be a positive number, got {value!r}")
        for field, low in (("samples", 1), ("classes", 1)):
            value = getattr(self, field)
            if value is None and field == "classes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{fn}: expected {field} to be a positive integer, got {value!r}")

    def hvp_temperature(self, measure: str) -> float:
        return self.grad_preserve_temperature if measure == "gradient_norm_preservation" else self.grasp_temperature

    def operands(
        self,
        model: nn.Module,
        batches: Iterable[object],
        *,
        measure: str | None,
        params: ParamSource | None,
        source: Literal["weights", "bn"],
        process_group: Any,
        fn: str,
    ) -> GradientFlow:
        """The operands of ``measure`` as flowandprune computes them (see :func:`gradient_flow`)."""
        if measure is None or measure not in ALL_MEASURES:
            raise ValueError(
                f"{fn}: preset={self.name!r} needs measure= one of {ALL_MEASURES} (its operands depend on it), "
                f"got {measure!r}"
            )
        if measure == "nvidia":
            source = "bn"
        if iter(batches) is batches:  # an iterator: read once, used for ḡ and for the class batches
            batches = list(batches)
        first = list(_first_samples(batches, self.samples))
        needs_hg = measure in ("grasp", "gradient_norm_preservation")
        common: dict[str, Any] = dict(params=params, source=source, eval_mode=True, fd_step="auto", fd_tol=1.0, fn=fn)
        if not needs_hg:
            flow = operands(
                model,
                cross_entropy(self.temperature),
                first,
                hvp=None,
                fisher=measure in ("fisher", "nvidia"),
                hvp_params="scored",
                process_group=process_group,
                **common,
            )
        else:  # ḡ and Hḡ both from the class batches at the Hḡ temperature (cal_hg)
            classes = self.classes if self.classes is not None else _classes_in(first, fn)
            per_class = _class_batches(batches, classes, self.samples // classes, fn)
            flow = operands(
                model,
                cross_entropy(self.hvp_temperature(measure)),
                per_class,
                hvp="exact",
                fisher=False,
                hvp_params="all",
                process_group=process_group,
                **common,
            )
        flow.preset = self.name
        return flow


PRESETS = {"flowandprune": FlowAndPrune()}


def preset_named(preset: object, fn: str) -> FlowAndPrune:
    if isinstance(preset, FlowAndPrune):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ValueError(f"{fn}: expected preset None, one of {sorted(PRESETS)} or a FlowAndPrune, got {preset!r}")


def _first_samples(batches: Iterable[object], samples: int) -> Iterator[object]:
    """Whole batches until ``samples`` are reached (cal_grad: break once num_data >= num_stop)."""
    seen = 0
    for batch in batches:
        if seen >= samples:
            return
        yield batch
        seen += int(_pair(batch, "batches")[0].shape[0])


def _pair(batch: object, fn: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
        raise ValueError(f"{fn}: preset 'flowandprune' expects (inputs, targets) batches, got {type(batch).__name__}")
    return batch[0], batch[1]


def _classes_in(batches: list[object], fn: str) -> int:
    labels = [_pair(b, fn)[1] for b in batches]
    if not labels:
        raise ValueError(f"{fn}: expected at least one batch with samples, got none")
    return int(torch.cat([y.reshape(-1) for y in labels]).max()) + 1


def _class_batches(batches: Iterable[object], classes: int, per_class: int, fn: str) -> list[tuple[Tensor, Tensor]]:
    """The first ``per_class`` samples of each class, in data order, one batch per class in class
    order (flowandprune's grasp_data and cal_hg)."""
    if per_class < 1:
        raise ValueError(f"{fn}: preset 'flowandprune' needs samples >= classes, got fewer samples than {classes}")
    xs: list[list[Tensor]] = [[] for _ in range(classes)]
    ys: list[list[Tensor]] = [[] for _ in range(classes)]
    full = 0
    for batch in batches:
        inputs, targets = _pair(batch, fn)
        for i, label in enumerate(targets.reshape(-1).tolist()):
            if not 0 <= label < classes:
                raise ValueError(f"{fn}: expected labels in [0, {classes}), got {label}")
            if len(xs[label]) < per_class:
                xs[label].append(inputs[i : i + 1])
                ys[label].append(targets[i : i + 1])
                full += len(xs[label]) == per_class
        if full == classes:
            break
    short = [c for c in range(classes) if len(xs[c]) < per_class]
    if short:
        raise ValueError(
            f"{fn}: preset 'flowandprune' needs {per_class} samples of each of {classes} classes for Hḡ; the data "
            f"runs out short for classes {short[:5]}"
        )
    return [(torch.cat(x), torch.cat(y)) for x, y in zip(xs, ys)]
