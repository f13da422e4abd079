"""``gradient_flow``: the operands of every gradient-flow measure for a model; the named criteria
as thin wrappers; the cross-entropy loss with a temperature."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from koopfast import _distributed as kf_dist
from koopfast.criteria.gradflow._batchnorm import batchnorm_pairs
from koopfast.criteria.gradflow._finite_difference import FD_TOLERANCE
from koopfast.criteria.gradflow._passes import scoring_mode
from koopfast.criteria.gradflow.estimate import estimate, every_parameter
from koopfast.criteria.gradflow.flow import GradientFlow, GradientFlowScores, Granularity
from koopfast.criteria.gradflow.measures import ALL_MEASURES
from koopfast.prunable import ALONG_DIM_0, ParamSource, Units, entries

if TYPE_CHECKING:
    from koopfast.criteria.gradflow.presets import FlowAndPrune

__all__ = [
    "biased_loss_preservation",
    "cross_entropy",
    "fisher",
    "gradient_flow",
    "gradient_norm_preservation",
    "grasp",
    "loss_preservation",
]

Hvp = Literal["exact", "finite_difference"]
LossFn = Callable[[nn.Module, Any], Tensor]
_SHIFT = "\0shift"  # key suffix of a BatchNorm shift β among the scored tensors (never a parameter name)


def cross_entropy(temperature: float = 1.0) -> LossFn:
    """loss_fn for (inputs, targets) batches: cross-entropy of model(inputs) / temperature (GraSP's
    code uses 200, the gradient-flow authors' g a temperature of 5)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"koopfast.criteria.cross_entropy: expected a positive temperature, got {temperature!r}")

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs) / temperature, targets)

    return loss_fn


def gradient_flow(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[object],
    *,
    hvp: Hvp | None = None,
    fisher: bool = False,
    params: ParamSource | None = None,
    source: Literal["weights", "bn"] = "weights",
    eval_mode: bool = True,
    hvp_params: Literal["scored", "all"] = "scored",
    fd_step: float | Literal["auto"] = "auto",
    fd_tol: float = FD_TOLERANCE,
    process_group: Any = None,
    preset: str | FlowAndPrune | None = None,
    measure: str | None = None,
) -> GradientFlow:
    """ḡ over ``batches`` (and Hḡ with ``hvp``, E[g²] with ``fisher``) for the model's prunable
    tensors (:mod:`koopfast.prunable`: linear, convolutional and attention-projection weights and
    biases; or ``params``).

    Args:
        model: the network; put in eval mode while scoring if ``eval_mode`` (the authors' choice:
            BatchNorm uses running statistics), every module's mode restored afterwards. With
            ``eval_mode=False`` the forward passes run in training mode and the BatchNorm running
            statistics they update are restored afterwards: scoring never changes the model.
        loss_fn: ``loss_fn(model, batch) -> scalar`` loss, mean-reduced over the batch (None only
            with a ``preset``, which fixes the loss).
        batches: any iterable of batches (iterated once, twice with ``hvp``); batch sizes, used as
            weights, are read from the first tensor in each batch (1 if there is none).
        hvp: None, "exact" (double backpropagation) or "finite_difference" (two backward passes).
            The exact passes run with PyTorch's math attention backend (the fused
            ``scaled_dot_product_attention`` kernels have no second derivative), so transformers
            with their default SDPA attention work; the result is the same function's Hessian.
        fisher: also accumulate E[g_b²] over batches (per-batch gradients, not per-sample).
        params: which tensors to score instead of the model's prunable ones.
        source: "weights", or "bn" to score BatchNorm scales γ: each conv/linear layer followed by
            an affine BatchNorm (directly, as Conv → BN → ReLU, or after parameter-free
            elementwise modules, as the authors' Conv → ReLU → BN) is scored through that
            BatchNorm's γ (per-filter measures keyed by the layer's weight name); the shifts β get
            ḡ and E[g²] too (``GradientFlow.shifts``, for the ``nvidia`` measure).
        hvp_params: the tensors spanning Hḡ: "scored" (default) differentiates the loss in the
            scored tensors only, so Hḡ is the scored block of the Hessian times the scored part of
            ḡ; "all" uses every parameter that requires grad (BatchNorm included), as the authors'
            code does (imp_estimator.py, ``cal_hg`` over ``model_params``), keeping the scored
            parts. The default keeps the scores a function of the tensors being pruned alone;
            "all" moves GraSP and gradient-norm filter scores by 1-8 % per layer (relative norm) on
            the small BatchNorm convnets of tests/parity (issue 13 reports 6-11 %).
        fd_step: the finite-difference step h, or "auto" (the default): a self-check on the first
            batch tries h_k = h₀·10⁻ᵏ, k = 0..5 (h₀ = ε^(1/3) (1 + ‖θ‖) / ‖ḡ‖, ε that of the
            parameters' dtype), estimates the relative error of each step from its difference to
            the next, and uses the step with the smallest estimate (``GradientFlow.fd_step``,
            ``fd_error``), then confirms it on every batch against h/10 (``fd_error`` is the larger
            of the two estimates). Costs 12 backward passes of one batch and 2 more per batch.
            A given float skips both checks.
        fd_tol: with ``fd_step="auto"``, the largest estimated relative error of Hḡ accepted;
            above it (or when an estimate is NaN) ValueError is raised (the gradient is not
            smooth enough at θ for finite differences, typically ReLU kinks crossed by the
            step in some batch: use hvp="exact").
        process_group: data-parallel scoring: a process group (or "default" for the default one)
            whose processes each hold the same model (replicated, as with DDP) and pass their own
            ``batches``. Every process gets the single-process result on all processes' batches
            (``batches`` and ``samples`` are the totals); a process may have no batches. Every
            process must call this with the same arguments but ``batches``. A ``model`` wrapped in
            ``DistributedDataParallel`` is unwrapped (``loss_fn`` gets ``model.module``, names are
            the module's; DDP's gradient hooks do not fire) and uses ``model.process_group`` unless
            one is given. Communication: all-reduces of N floats for ḡ (2N with ``fisher``) and N
            for Hḡ, N the scored elements. FSDP2-sharded (DTensor) parameters need no group (see the
            package docstring: hvp "finite_difference" or None, the same number of batches on every
            process, FSDP's default gradient averaging). If ``loss_fn`` raises on one process,
            the others may wait forever in a collective.
        preset: None, or "flowandprune" (or a :class:`koopfast.criteria.FlowAndPrune` with other
            sample counts or class numbers): every setting of the authors' released code for
            ``measure``, see :class:`~koopfast.criteria.FlowAndPrune`. ``loss_fn`` must be None and
            ``hvp``, ``fisher``, ``eval_mode``, ``hvp_params`` stay at their defaults: the preset
            sets them.
        measure: with a preset, the measure to be scored (the authors' operands differ by
            measure: temperatures, data, source); without one, it only switches on what the
            measure needs (``hvp="exact"`` for grasp and gradient_norm_preservation unless ``hvp``
            is given, ``fisher`` for fisher and nvidia).
    """
    fn = "koopfast.criteria.gradient_flow"
    if preset is not None:
        from koopfast.criteria.gradflow.presets import preset_named

        if loss_fn is not None:
            raise ValueError(
                f"{fn}: preset={preset!r} fixes the loss (cross-entropy of the logits over its temperatures); "
                "expected loss_fn=None"
            )
        changed = [
            k
            for k, v, d in (
                ("hvp", hvp, None),
                ("fisher", fisher, False),
                ("eval_mode", eval_mode, True),
                ("hvp_params", hvp_params, "scored"),
            )
            if v != d
        ]
        if changed:
            raise ValueError(f"{fn}: preset={preset!r} sets {changed} itself; leave them at their defaults")
        return preset_named(preset, fn).operands(
            model, batches, measure=measure, params=params, source=source, process_group=process_group, fn=fn
        )
    if measure is not None:
        if measure not in ALL_MEASURES:
            raise ValueError(f"{fn}: expected a measure among {ALL_MEASURES}, got {measure!r}")
        if hvp is None and measure in ("grasp", "gradient_norm_preservation"):
            hvp = "exact"
        fisher = fisher or measure in ("fisher", "nvidia")
    if loss_fn is None:
        raise TypeError(f"{fn}: expected loss_fn to be callable as loss_fn(model, batch), got None (no preset)")
    return operands(
        model,
        loss_fn,
        batches,
        hvp=hvp,
        fisher=fisher,
        params=params,
        source=source,
        eval_mode=eval_mode,
        hvp_params=hvp_params,
        fd_step=fd_step,
        fd_tol=fd_tol,
        process_group=process_group,
        fn=fn,
    )


def operands(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[object],
    *,
    hvp: Hvp | None,
    fisher: bool,
    params: ParamSource | None,
    source: Literal["weights", "bn"],
    eval_mode: bool,
    hvp_params: Literal["scored", "all"],
    fd_step: float | Literal["auto"],
    fd_tol: float,
    process_group: Any,
    fn: str,
    hvp_loss_fn: LossFn | None = None,
    hvp_batches: Iterable[object] | None = None,
) -> GradientFlow:
    """``gradient_flow`` once its options are settled (presets call it too): ``hvp_loss_fn`` and
    ``hvp_batches``, if given, are the loss and data of Hḡ (and of its own ḡ) instead of
    ``loss_fn`` and ``batches``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, DistributedDataParallel):  # replicated: score the module, in DDP's group
        if process_group is None:
            process_group = model.process_group
        model = model.module
    if not callable(loss_fn):
        raise TypeError(f"{fn}: expected loss_fn to be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if hvp not in (None, "exact", "finite_difference"):
        raise ValueError(f"{fn}: expected hvp None, 'exact' or 'finite_difference', got {hvp!r}")
    if source not in ("weights", "bn"):
        raise ValueError(f"{fn}: expected source 'weights' or 'bn', got {source!r}")
    if hvp_params not in ("scored", "all"):
        raise ValueError(f"{fn}: expected hvp_params 'scored' or 'all', got {hvp_params!r}")
    if fd_step != "auto" and (isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)) or not fd_step > 0):
        raise ValueError(f"{fn}: expected fd_step 'auto' or a positive float, got {fd_step!r}")
    if isinstance(fd_tol, bool) or not isinstance(fd_tol, (int, float)) or not fd_tol > 0:
        raise ValueError(f"{fn}: expected fd_tol to be a positive float, got {fd_tol!r}")
    bn_scales: dict[str, str] = {}
    shifts: dict[str, Tensor] = {}
    scored: dict[str, Tensor]
    units: dict[str, Units | None]
    if source == "bn":
        pairs = batchnorm_pairs(model, fn)
        named = dict(model.named_parameters())
        bn_scales = {w: bn.scale for w, bn in pairs.items()}
        scored = {w: named[bn.scale] for w, bn in pairs.items()}
        shifts = {w + _SHIFT: named[bn.shift] for w, bn in pairs.items() if bn.shift in named}
        units = dict.fromkeys(scored, ALONG_DIM_0)
    else:
        chosen = entries(params if params is not None else model, fn=fn)
        scored = {n: e.tensor for n, e in chosen.items()}
        units = {n: e.units for n, e in chosen.items()}
    for name, p in scored.items():
        if not p.requires_grad:
            raise ValueError(f"{fn}: expected parameters that require grad, got {name!r} with requires_grad=False")
    separate_hvp = hvp is not None and (hvp_loss_fn is not None or hvp_batches is not None)
    if hvp is not None and hvp_batches is None and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # iterated twice: ḡ first, then H ḡ
    layout = kf_dist.resolve(list(scored.values()), process_group, fn)
    gradient_of = {**scored, **shifts}  # β: ḡ and E[g²] only, never part of Hḡ's vector
    hvp_apart = hvp is not None and (separate_hvp or bool(shifts))  # Hḡ in a pass of its own
    first_hvp = None if hvp_apart else hvp
    with scoring_mode(model, eval_mode):
        first = estimate(
            model,
            loss_fn,
            batches,
            gradient_of,
            hvp=first_hvp,
            fisher=fisher,
            fd_step=fd_step,
            fd_tol=fd_tol,
            layout=layout,
            fn=fn,
            vector=every_parameter(model, gradient_of) if hvp_params == "all" and first_hvp else None,
        )
        second = first
        if hvp_apart:
            second = estimate(
                model,
                hvp_loss_fn or loss_fn,
                batches if hvp_batches is None else hvp_batches,
                scored,
                hvp=hvp,
                fisher=False,
                fd_step=fd_step,
                fd_tol=fd_tol,
                layout=layout,
                fn=fn,
                vector=every_parameter(model, scored) if hvp_params == "all" else None,
            )
    flow = GradientFlow(
        params={n: p.detach().clone() for n, p in scored.items()},  # θ as scored: the model may train on
        grad={n: first.grad[n] for n in scored},
        hg=None if second.hg is None else {n: second.hg[n] for n in scored},
        grad_sq=None if first.grad_sq is None else {n: first.grad_sq[n] for n in scored},
        bn_scales=bn_scales,
        units=units,
        batches=first.batches,
        samples=first.samples,
        fd_step=second.fd_step,
        fd_error=second.fd_error,
    )
    if shifts:
        flow.shifts = GradientFlow(
            params={n[: -len(_SHIFT)]: p.detach().clone() for n, p in shifts.items()},
            grad={n[: -len(_SHIFT)]: first.grad[n] for n in shifts},
            grad_sq=None if first.grad_sq is None else {n[: -len(_SHIFT)]: first.grad_sq[n] for n in shifts},
            units=dict.fromkeys(scored, ALONG_DIM_0),
            batches=first.batches,
            samples=first.samples,
        )
    return flow


# ---- the named criteria: thin wrappers --------------------------------------------------------------


def _named(measure: str, hvp_default: Hvp | None = None) -> Callable[..., GradientFlowScores]:
    def criterion(
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[object],
        *,
        granularity: Granularity = "unstructured",
        hvp: Hvp | None = hvp_default,
        **kwargs: Any,
    ) -> GradientFlowScores:
        variant = kwargs.pop("variant", "abs")
        flow = gradient_flow(model, loss_fn, batches, hvp=hvp, fisher=measure == "fisher", **kwargs)
        return flow.scores(measure, granularity, variant=variant)

    criterion.__name__ = measure
    criterion.__qualname__ = measure
    return criterion


loss_preservation = _named("loss_preservation")
loss_preservation.__doc__ = """|θ ⊙ ḡ| (SNIP-style); per filter Σ|θg|, or |Σθg| with variant="tfo" (Taylor first order).
Keyword arguments (``process_group`` included) as in :func:`gradient_flow`; returns GradientFlowScores."""
biased_loss_preservation = _named("biased_loss_preservation")
biased_loss_preservation.__doc__ = (
    """θ² |ḡ| ("biased towards removing small-magnitude parameters"); per filter the sum."""
)
gradient_norm_preservation = _named("gradient_norm_preservation", "exact")
gradient_norm_preservation.__doc__ = """|θ ⊙ Hḡ| (the authors' proposal); per filter |θ_fᵀ(Hḡ)_f|.
hvp="exact" (default) or "finite_difference"."""
grasp = _named("grasp", "exact")
grasp.__doc__ = """θ ⊙ Hḡ, signed: the most negative is pruned first (GraSP); per filter θ_fᵀ(Hḡ)_f.
Use loss_fn=kf.criteria.cross_entropy(temperature=200) for GraSP's temperature on the logits."""
fisher = _named("fisher")
fisher.__doc__ = """θ² E[g_b²] over batches; per filter the sum."""
