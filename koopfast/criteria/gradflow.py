"""Gradient-flow criteria (Lubana & Dick, ICLR 2021): operands g and Hg, then any measure.

``gradient_flow(model, loss_fn, batches)`` accumulates, over all batches and with constant memory
(one running sum per parameter, no per-batch copies):

* ḡ, the gradient of the loss averaged over the batches (weighted by batch size, so a
  mean-reduced loss over several batches gives exactly the gradient of one big batch);
* optionally E[g_b²] over batches (for the Fisher measure);
* optionally Hḡ, the Hessian of the averaged loss times ḡ, as the authors compute it: ḡ first,
  then H_b ḡ batch by batch (not the average of H_b g_b). ``hvp="exact"`` uses double
  backpropagation (a second-order graph per batch: exact, memory ≈ 2-3 × a training step; run
  with PyTorch's math attention backend, so SDPA transformers work); ``hvp="finite_difference"``
  uses (∇L(θ + hḡ) − ∇L(θ − hḡ)) / 2h, two ordinary backward passes per batch with no
  second-order graph. Its step is chosen by a self-check on the first batch (steps h₀·10⁻ᵏ, the
  one whose difference to the next is smallest) that raises when even the best step's estimated
  error exceeds ``fd_tol`` (5 %): no silent garbage where the gradient has kinks within every
  step. Measured on float32 models built from configs (4 layers, width 128, 4 batches of 8;
  bench/RESULTS.md, "Hḡ on transformers"), true relative error at the chosen step against a
  float64 double-backward reference: GPT-2, BERT, Llama (GQA) 1.2e-4, ViT 2.2e-4 (the estimates
  1.9-8.3× above); nn.TransformerEncoder with ReLU: 6.3e-2, estimate 7.8e-2, refused. On the
  model-zoo's smaller configs (tests/zoo): 5e-5 to 1.4e-3, ResNet and MobileNetV2 included.
  Float64 models: ~1e-10.

The measures, per parameter θ_i (unstructured) or per output unit f (``granularity="filter"``,
aggregated as in the authors' code):

=========================== ===================== ===================================
measure                     unstructured          per filter
=========================== ===================== ===================================
magnitude                   |θ|                   ‖θ_f‖₂
loss_preservation           |θ g|                 Σ |θ g|      (variant "tfo": |Σ θ g|)
biased_loss_preservation    θ² |g|                Σ θ² |g|
gradient_norm_preservation  |θ Hg|                |θ_fᵀ (Hg)_f|
grasp                       θ Hg (signed)         θ_fᵀ (Hg)_f
fisher                      θ² E[g²]              Σ θ² E[g²]
=========================== ===================== ===================================

Higher scores are kept; GraSP's signed scores mean the most negative θᵀHg is pruned first, as in
GraSP. Unstructured masks can come straight from the operands, scores never materialised:
``GradientFlow.masks`` hands (θ, g) or (θ, Hg) to the selection kernel.

Data-parallel scoring (``process_group``, or a ``DistributedDataParallel`` model): every process
holds the whole model and iterates its own batches; every process gets the result of one process
on all of them. The batch-weighted sums are all-reduced: ḡ and the counts first (one all-reduce of
N floats, 2N with ``fisher``), then each process sums its own w_b H_b ḡ with the global ḡ and
those are all-reduced (N floats).

Sharded parameters (FSDP2's ``fully_shard``: DTensor ``Shard(0)``, detected): FSDP all-gathers θ
for each forward pass and reduce-scatters gradients in ``.backward()``, so ḡ comes from one
``backward()`` per batch and each process keeps its rows; Hḡ by finite differences only (each
process moves its rows of θ; double backpropagation does not reach sharded parameters), no Fisher
(only the sum of the processes' gradients exists). Every process must pass the same number of
batches (each backward pass is collective); the results are DTensors placed like the parameters.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from koopfast import _distributed as kf_dist
from koopfast import masks as kf_masks
from koopfast._reduce import sq_norm
from koopfast.prunable import ALONG_DIM_0, ParamSource, Units, entries, units_of

__all__ = [
    "GradientFlow",
    "biased_loss_preservation",
    "cross_entropy",
    "fisher",
    "gradient_flow",
    "gradient_norm_preservation",
    "grasp",
    "loss_preservation",
]

Measure = Literal[
    "magnitude", "loss_preservation", "biased_loss_preservation", "gradient_norm_preservation", "grasp", "fisher"
]
Granularity = Literal["unstructured", "filter"]
Hvp = Literal["exact", "finite_difference"]
LossFn = Callable[[nn.Module, Any], Tensor]

MEASURES: tuple[str, ...] = (
    "magnitude",
    "loss_preservation",
    "biased_loss_preservation",
    "gradient_norm_preservation",
    "grasp",
    "fisher",
)
_NEEDS_HG = ("gradient_norm_preservation", "grasp")
# How the selection kernel computes each unstructured measure from (a, b) operands.
_FUSED = {
    "magnitude": ("abs", "theta", None),
    "loss_preservation": ("abs_product", "theta", "grad"),
    "biased_loss_preservation": ("square_times_abs", "theta", "grad"),
    "gradient_norm_preservation": ("abs_product", "theta", "hg"),
    "grasp": ("product", "theta", "hg"),
    "fisher": ("square_times_abs", "theta", "grad_sq"),
}


FD_TOLERANCE = 5e-2  # default fd_tol: the largest estimated relative error of a finite-difference Hḡ accepted
FD_RUNGS = 6  # steps h₀ · 10⁻ᵏ, k = 0..5, tried by the finite-difference self-check


def cross_entropy(temperature: float = 1.0) -> LossFn:
    """loss_fn for (inputs, targets) batches: cross-entropy of model(inputs) / temperature (GraSP's
    code uses 200, the gradient-flow authors' g a temperature of 5)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"koopfast.criteria.cross_entropy: expected a positive temperature, got {temperature!r}")

    def loss_fn(model: nn.Module, batch) -> Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs) / temperature, targets)

    return loss_fn


@dataclass
class GradientFlow:
    """The operands of the gradient-flow measures for one model state (see the module docstring):
    copies of θ as it was scored, ḡ, and optionally Hḡ and E[g²], keyed by parameter name."""

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

    def scores(self, measure: Measure, granularity: Granularity = "unstructured", *, variant: str = "abs"):
        """Materialised scores: dict name -> Tensor like the parameter (unstructured), or weight name
        -> Tensor[out_units] (filter)."""
        fn = f"koopfast.criteria.GradientFlow.scores({measure!r})"
        self._check(measure, granularity, fn)
        if variant not in ("abs", "tfo"):
            raise ValueError(f"{fn}: expected variant 'abs' or 'tfo', got {variant!r}")
        if variant == "tfo" and measure != "loss_preservation":
            raise ValueError(f"{fn}: variant 'tfo' applies to loss_preservation only")
        if self.bn_scales and granularity != "filter":
            raise ValueError(f"{fn}: BatchNorm-scale operands (source='bn') score filters: use granularity='filter'")
        out = {}
        with torch.no_grad():
            for name, theta in self.params.items():
                units = self.units.get(name, ALONG_DIM_0 if theta.dim() else None)
                if granularity == "filter" and not (self.bn_scales or _has_units(theta, units)):
                    continue
                b = self._operand(name, measure)
                if not kf_dist.any_dtensor([theta]):
                    out[name] = _score(measure, granularity, variant, theta, b, units)
                    continue
                # Shard(0): each process scores its rows (whole units), returned as a DTensor
                if granularity == "filter" and units.dim != 0:
                    raise ValueError(
                        f"{fn}: per-unit scores of {name!r} need its units along dim 0 to score sharded (Shard(0)) "
                        f"rows locally, but its units are along dim {units.dim}"
                    )
                local = _score(
                    measure, granularity, variant, theta.to_local(), None if b is None else b.to_local(), units
                )
                shape = theta.shape if granularity == "unstructured" else theta.shape[:1]
                out[name] = _shard_layout(theta).wrap(local, theta, shape)
        return out

    def masks(self, measure: Measure, sparsity: float, *, scope: Literal["global", "layerwise"] = "global"):
        """Unstructured masks of a measure, with the score computed inside the selection kernel from
        (θ, g), (θ, Hg) or (θ, E[g²]): nothing N-sized is materialised but the masks."""
        fn = f"koopfast.criteria.GradientFlow.masks({measure!r})"
        self._check(measure, "unstructured", fn)
        if self.bn_scales:
            raise ValueError(f"{fn}: BatchNorm-scale operands (source='bn') score filters, not weights")
        by, _, second = _FUSED[measure]
        if second is None:
            operands = {n: p.detach() for n, p in self.params.items()}
        else:
            operands = {n: (p.detach(), self._operand(n, measure)) for n, p in self.params.items()}
        if scope == "global":
            return kf_masks.global_topk(operands, sparsity, by=by)
        if scope == "layerwise":
            return kf_masks.layerwise_topk(operands, sparsity, by=by)
        raise ValueError(f"{fn}: expected scope 'global' or 'layerwise', got {scope!r}")

    def _operand(self, name: str, measure: str) -> Tensor | None:
        key = _FUSED[measure][2]
        if key is None:
            return None
        return {"grad": self.grad, "hg": self.hg, "grad_sq": self.grad_sq}[key][name]

    def _check(self, measure: str, granularity: str, fn: str) -> None:
        if measure not in MEASURES:
            raise ValueError(f"{fn}: expected a measure among {MEASURES}, got {measure!r}")
        if granularity not in ("unstructured", "filter"):
            raise ValueError(f"{fn}: expected granularity 'unstructured' or 'filter', got {granularity!r}")
        if measure in _NEEDS_HG and self.hg is None:
            raise ValueError(f"{fn}: needs Hg: compute the operands with gradient_flow(..., hvp='exact')")
        if measure == "fisher" and self.grad_sq is None:
            raise ValueError(f"{fn}: needs E[g²]: compute the operands with gradient_flow(..., fisher=True)")


def _has_units(theta: Tensor, units: Units | None) -> bool:
    """Weights (2+ dims) have output units; biases and other vectors follow their layer's units."""
    return units is not None and theta.dim() >= 2 and units.count(theta.shape) > 0


def _score(
    measure: str, granularity: str, variant: str, theta: Tensor, b: Tensor | None, units: Units | None
) -> Tensor:
    if granularity == "unstructured":
        if measure == "magnitude":
            return theta.abs()
        if measure in ("loss_preservation", "gradient_norm_preservation"):
            return (theta * b).abs()
        if measure == "biased_loss_preservation":
            return theta * theta * b.abs()
        if measure == "grasp":
            return theta * b
        return theta * theta * b  # fisher
    rows = units.rows(theta)
    other = None if b is None else units.rows(b)
    if measure == "magnitude":
        return rows.norm(dim=1)
    if measure == "loss_preservation":
        return (rows * other).sum(1).abs() if variant == "tfo" else (rows * other).abs().sum(1)
    if measure == "biased_loss_preservation":
        return (rows * rows * other.abs()).sum(1)
    if measure == "gradient_norm_preservation":
        return (rows * other).sum(1).abs()
    if measure == "grasp":
        return (rows * other).sum(1)
    return (rows * rows * other).sum(1)  # fisher


# ---- computing the operands ----------------------------------------------------------------------


def gradient_flow(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable,
    *,
    hvp: Hvp | None = None,
    fisher: bool = False,
    params: ParamSource | None = None,
    source: Literal["weights", "bn"] = "weights",
    eval_mode: bool = True,
    fd_step: float | Literal["auto"] = "auto",
    fd_tol: float = FD_TOLERANCE,
    process_group=None,
) -> GradientFlow:
    """ḡ over ``batches`` (and Hḡ with ``hvp``, E[g²] with ``fisher``) for the model's prunable
    tensors (:mod:`koopfast.prunable`: linear, convolutional and attention-projection weights and
    biases; or ``params``).

    Args:
        model: the network; put in eval mode while scoring if ``eval_mode`` (the authors' choice:
            BatchNorm uses running statistics), every module's mode restored afterwards. With
            ``eval_mode=False`` the forward passes run in training mode and the BatchNorm running
            statistics they update are restored afterwards: scoring never changes the model.
        loss_fn: ``loss_fn(model, batch) -> scalar`` loss, mean-reduced over the batch.
        batches: any iterable of batches (iterated once, twice with ``hvp``); batch sizes, used as
            weights, are read from the first tensor in each batch (1 if there is none).
        hvp: None, "exact" (double backpropagation) or "finite_difference" (two backward passes).
            The exact passes run with PyTorch's math attention backend (the fused
            ``scaled_dot_product_attention`` kernels have no second derivative), so transformers
            with their default SDPA attention work; the result is the same function's Hessian.
        fisher: also accumulate E[g_b²] over batches (per-batch gradients, not per-sample).
        params: which tensors to score instead of the model's prunable ones.
        source: "weights", or "bn" to score BatchNorm scales γ: each conv/linear layer directly
            followed by a BatchNorm is scored through that BatchNorm's γ (per-filter measures keyed
            by the layer's weight name).
        fd_step: the finite-difference step h, or "auto" (the default): a self-check on the first
            batch tries h_k = h₀·10⁻ᵏ, k = 0..5 (h₀ = ε^(1/3) (1 + ‖θ‖) / ‖ḡ‖, ε that of the
            parameters' dtype), estimates the relative error of each step from its difference to
            the next, and uses the step with the smallest estimate (``GradientFlow.fd_step``,
            ``fd_error``). Costs 12 backward passes of one batch. A given float skips the check.
        fd_tol: with ``fd_step="auto"``, the largest estimated relative error of Hḡ accepted;
            above it ValueError is raised (the gradient is not smooth enough at θ for finite
            differences, typically ReLU kinks crossed by every step: use hvp="exact").
        process_group: data-parallel scoring: a process group (or "default" for the default one)
            whose processes each hold the same model (replicated, as with DDP) and pass their own
            ``batches``. Every process gets the single-process result on all processes' batches
            (``batches`` and ``samples`` are the totals); a process may have no batches. Every
            process must call this with the same arguments but ``batches``. A ``model`` wrapped in
            ``DistributedDataParallel`` is unwrapped (``loss_fn`` gets ``model.module``, names are
            the module's; DDP's gradient hooks do not fire) and uses ``model.process_group`` unless
            one is given. Communication: all-reduces of N floats for ḡ (2N with ``fisher``) and N
            for Hḡ, N the scored elements. FSDP2-sharded (DTensor) parameters need no group (see the
            module docstring: hvp "finite_difference" or None, the same number of batches on every
            process, FSDP's default gradient averaging). If ``loss_fn`` raises on one process,
            the others may wait forever in a collective.
    """
    fn = "koopfast.criteria.gradient_flow"
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
    if fd_step != "auto" and (isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)) or not fd_step > 0):
        raise ValueError(f"{fn}: expected fd_step 'auto' or a positive float, got {fd_step!r}")
    if isinstance(fd_tol, bool) or not isinstance(fd_tol, (int, float)) or not fd_tol > 0:
        raise ValueError(f"{fn}: expected fd_tol to be a positive float, got {fd_tol!r}")
    bn_scales: dict[str, str] = {}
    if source == "bn":
        bn_scales = _bn_pairs(model, fn)
        named = dict(model.named_parameters())
        scored = {w: named[g] for w, g in bn_scales.items()}
        units = dict.fromkeys(scored, ALONG_DIM_0)
    else:
        chosen = entries(params if params is not None else model, fn=fn)
        scored = {n: e.tensor for n, e in chosen.items()}
        units = {n: e.units for n, e in chosen.items()}
    for name, p in scored.items():
        if not p.requires_grad:
            raise ValueError(f"{fn}: expected parameters that require grad, got {name!r} with requires_grad=False")
    if hvp is not None and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # iterated twice: ḡ first, then H ḡ
    layout = kf_dist.resolve(list(scored.values()), process_group, fn)
    step_used = error = None
    with _scoring_mode(model, eval_mode):
        if layout is not None and layout.sharded:  # FSDP2: backward() passes (see _sharded_operands)
            grad, hg, n_batches, samples, step_used, error = _sharded_operands(
                model, loss_fn, batches, scored, hvp, fisher, fd_step, fd_tol, layout, fn
            )
            grad_sq = None
        else:
            grad, grad_sq, n_batches, samples = _mean_gradient(model, loss_fn, batches, scored, fisher, layout, fn)
            hg = None
            if hvp == "exact":
                hg = _hvp_exact(model, loss_fn, batches, scored, grad, samples, layout, fn)
            elif hvp == "finite_difference":
                run = _replicated_fd_sums(model, loss_fn, scored, grad, fn)
                hg, step_used, error = _finite_difference(
                    run, batches, scored, grad, samples, fd_step, fd_tol, layout, fn
                )
    return GradientFlow(
        params={n: p.detach().clone() for n, p in scored.items()},  # θ as scored: the model may train on
        grad=grad,
        hg=hg,
        grad_sq=grad_sq,
        bn_scales=bn_scales,
        units=units,
        batches=n_batches,
        samples=samples,
        fd_step=step_used,
        fd_error=error,
    )


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Eval mode (or train mode kept) for the scoring passes; afterwards every module's own mode and
    every BatchNorm's running statistics are as they were."""
    modes = [(m, m.training) for m in model.modules()]
    stats = [
        (buf, buf.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for buf, saved in stats:
                buf.copy_(saved)


def _batch_size(batch) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, Tensor) and item.dim():
                return int(item.shape[0])
    return 1


def _loss(model, loss_fn, batch, fn) -> Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{fn}: expected loss_fn to return a scalar loss (mean over the batch), got {got}")
    if not loss.requires_grad:
        raise ValueError(f"{fn}: expected a loss that depends on the parameters (it does not require grad)")
    return loss.reshape(())


def _grads(loss: Tensor, params: dict[str, Tensor], fn: str, create_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
    unused = [n for n, g in zip(params, grads) if g is None]
    if unused:
        raise ValueError(f"{fn}: expected the loss to depend on every scored parameter, but not on {unused[:3]}")
    return list(grads)


def _all_reduce_sums(tensors: list[Tensor], layout: kf_dist.Layout | None) -> None:
    """Sum each tensor over the layout's processes, in place: one flat all-reduce per dtype, in the
    order the dtypes first appear (the same on every process: the parameters are replicated)."""
    if layout is None or layout.world == 1:
        return
    device = kf_dist.comm_device(layout)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = kf_dist.all_reduce(torch.cat([t.reshape(-1).to(device) for t in group]), layout)
            for t, piece in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(piece.view_as(t))


def _mean_gradient(model, loss_fn, batches, params, fisher, layout, fn):
    total = {
        n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
        for n, p in params.items()
    }
    total_sq = {n: torch.zeros_like(t) for n, t in total.items()} if fisher else None
    samples, count = 0.0, 0
    for batch in batches:
        w = _batch_size(batch)
        if w == 0:  # no samples: nothing to add (its mean loss would be NaN)
            continue
        grads = _grads(_loss(model, loss_fn, batch, fn), params, fn)
        with torch.no_grad():
            for (name, acc), g in zip(total.items(), grads):
                acc.add_(g.to(acc.dtype), alpha=w)
                if total_sq is not None:
                    total_sq[name].add_(g.to(acc.dtype).square(), alpha=w)
        samples += w
        count += 1
    if layout is not None:  # every process calls this, with or without batches of its own
        counts = torch.tensor([samples, count], dtype=torch.float64)
        _all_reduce_sums([*total.values(), *(total_sq.values() if total_sq is not None else ()), counts], layout)
        samples, count = float(counts[0]), int(counts[1])
    if count == 0:
        where = "" if layout is None else f" on any of the {layout.world} processes"
        raise ValueError(f"{fn}: expected at least one batch with samples, got none{where}")
    with torch.no_grad():
        grad = {n: (t / samples).to(params[n].dtype) for n, t in total.items()}
        grad_sq = None if total_sq is None else {n: (t / samples).to(params[n].dtype) for n, t in total_sq.items()}
    return grad, grad_sq, count, samples


def _hvp_exact(model, loss_fn, batches, params, grad, samples, layout, fn):
    # The fused attention kernels (flash, memory-efficient, CPU flash) have no double backward; the
    # math backend computes the same attention with ordinary, twice-differentiable operations.
    with sdpa_kernel([SDPBackend.MATH]):
        return _hvp_exact_passes(model, loss_fn, batches, params, grad, samples, layout, fn)


def _hvp_exact_passes(model, loss_fn, batches, params, grad, samples, layout, fn):
    total = {n: torch.zeros_like(g) for n, g in grad.items()}
    vec = [grad[n] for n in params]
    for batch in batches:
        w = _batch_size(batch)
        if w == 0:  # no samples: nothing to add (its mean loss would be NaN)
            continue
        grads = _grads(_loss(model, loss_fn, batch, fn), params, fn, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec))
        try:
            hv = torch.autograd.grad(dot, list(params.values()), allow_unused=True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{fn}: double backward failed ({str(exc).splitlines()[0]}); use hvp='finite_difference' for "
                "models whose operations have no second derivative (its self-check measures its accuracy)"
            ) from exc
        with torch.no_grad():
            for (_, acc), h in zip(total.items(), hv):
                if h is not None:  # piecewise-linear paths have zero curvature
                    acc.add_(h, alpha=w)
    _all_reduce_sums(list(total.values()), layout)
    return {n: t / samples for n, t in total.items()}


# ---- finite-difference Hḡ --------------------------------------------------------------------------


def _replicated_fd_sums(model, loss_fn, params, grad, fn):
    """run(h, batches): Σ_b w_b (∇L_b(θ + hḡ) − ∇L_b(θ − hḡ)) over the given batches, and Σ_b w_b."""

    def run(h: float, batches) -> tuple[dict[str, Tensor], float]:
        total = {n: torch.zeros_like(g) for n, g in grad.items()}
        samples = 0.0
        originals = {n: p.data for n, p in params.items()}
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for n, p in params.items():
                        p.data = originals[n] + sign * h * grad[n]
                for batch in batches:
                    w = _batch_size(batch)
                    if w == 0:
                        continue
                    grads = _grads(_loss(model, loss_fn, batch, fn), params, fn)
                    with torch.no_grad():
                        for (_, acc), g in zip(total.items(), grads):
                            acc.add_(g, alpha=sign * w)
                    samples += w if sign > 0 else 0.0
        finally:
            for n, p in params.items():
                p.data = originals[n]  # the very same tensors: exactly restored
        return total, samples

    return run


def _global_sums(values: list[float], layout: kf_dist.Layout | None) -> list[float]:
    """Sums over the processes of per-process partial sums (norms of local rows, or of local
    batches' results), so that every process takes the same decision."""
    if layout is None or layout.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=kf_dist.comm_device(layout))
    return kf_dist.all_reduce(t, layout).tolist()


def _sq_norm(tensors: Iterable[Tensor]) -> float:
    """Σ x² over the tensors (this process's rows of sharded ones), independent of the thread count."""
    return math.fsum(sq_norm(kf_dist.local(t).detach()) for t in tensors)


def _finite_difference(run, batches, params, grad, samples, step, tol, layout, fn):
    """Hḡ ≈ (∇L(θ + hḡ) − ∇L(θ − hḡ)) / 2h with the step given, or chosen by the self-check
    (see gradient_flow's ``fd_step``). Returns (Hḡ, the step, the estimated relative error or None)."""
    sharded = layout is not None and layout.sharded
    # θ and ḡ: replicated (the same on every process) or sharded rows (summed over the processes)
    theta_sq, g_sq = _global_sums([_sq_norm(params.values()), _sq_norm(grad.values())], layout if sharded else None)
    if g_sq == 0:  # the global ḡ: the same decision on every process
        return {n: torch.zeros_like(g) for n, g in grad.items()}, None, None
    error = None
    if step == "auto":
        eps = max(torch.finfo(p.dtype).eps for p in params.values())
        h0 = eps ** (1 / 3) * (1 + math.sqrt(theta_sq)) / math.sqrt(g_sq)
        step, error = _self_check(run, list(batches)[:1], h0, layout, fn)
        if error > tol:
            raise ValueError(
                f"{fn}: finite-difference Hḡ failed its self-check: the best of the steps {h0:.3g}·10^-k (k = 0.."
                f"{FD_RUNGS - 1}) differs from the next by {error:.3g} relative, more than fd_tol={tol:g}; the "
                "gradient is not smooth at these parameters on this scale (ReLU-like kinks, or rounding). Use "
                "hvp='exact', or pass fd_step= (and check the result against hvp='exact' yourself)"
            )
    total, _ = run(step, batches)
    if not sharded:  # replicated: each process summed its own batches (sharded: FSDP's backward did)
        _all_reduce_sums(list(total.values()), layout)
    return {n: t / (2 * step * samples) for n, t in total.items()}, float(step), error


def _self_check(run, first: list, h0: float, layout, fn) -> tuple[float, float]:
    """The step of smallest estimated error among h₀·10⁻ᵏ on the first batch (every process's first
    batch: norms summed over the processes). The estimate for h_k is ‖d_k − d_(k+1)‖ / ‖d_(k+1)‖ with
    d the difference quotients: in the truncation regime (error ∝ h²) it is d_k's error."""
    steps = [h0 * 10.0**-k for k in range(FD_RUNGS)]
    previous = None
    partial = []
    for h in steps:
        sums, _ = run(h, first)
        current = {n: t / (2 * h) for n, t in sums.items()}
        if previous is not None:
            diff = _sq_norm(previous[n] - current[n] for n in current)
            partial += [diff, _sq_norm(current.values())]
        previous = current
    totals = _global_sums(partial, layout)
    errors = []
    for diff, norm in zip(totals[::2], totals[1::2]):
        errors.append(0.0 if diff == 0 else (math.sqrt(diff / norm) if norm > 0 else math.inf))
    best = min(range(len(errors)), key=errors.__getitem__)
    return steps[best], errors[best]


def _bn_pairs(model: nn.Module, fn: str) -> dict[str, str]:
    """Conv/linear weight name -> the γ of the affine BatchNorm registered right after that layer
    (among leaf modules, in registration order: the order of nn.Sequential and most blocks)."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    pairs: dict[str, str] = {}
    for (layer_name, layer), (bn_name, bn) in itertools.pairwise(leaves):
        units = units_of(layer, "weight")
        if (
            units is not None
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.affine
            and bn.num_features == units.count(layer.weight.shape)
        ):
            pairs[f"{layer_name}.weight" if layer_name else "weight"] = f"{bn_name}.weight"
    if not pairs:
        raise ValueError(f"{fn}: source='bn' needs conv/linear layers each followed by an affine BatchNorm; found none")
    return pairs


# ---- the named criteria: thin wrappers --------------------------------------------------------------


def _named(measure: str, hvp_default: str | None = None):
    def criterion(
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable,
        *,
        granularity: Granularity = "unstructured",
        hvp: Hvp | None = hvp_default,
        **kwargs,
    ) -> dict[str, Tensor]:
        variant = kwargs.pop("variant", "abs")
        flow = gradient_flow(model, loss_fn, batches, hvp=hvp, fisher=measure == "fisher", **kwargs)
        return flow.scores(measure, granularity, variant=variant)

    criterion.__name__ = measure
    return criterion


loss_preservation = _named("loss_preservation")
loss_preservation.__doc__ = """|θ ⊙ ḡ| (SNIP-style); per filter Σ|θg|, or |Σθg| with variant="tfo" (Taylor first order).
Keyword arguments (``process_group`` included) as in :func:`gradient_flow`; returns dict name -> scores."""
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


# ---- sharded parameters (FSDP2) -----------------------------------------------------------------------


def _shard_layout(t: Tensor) -> kf_dist.Layout:
    return kf_dist.resolve([t], None, "koopfast.criteria.GradientFlow.scores")


def _sharded_operands(model, loss_fn, batches, params, hvp, fisher, fd_step, fd_tol, layout, fn):
    """ḡ (and Hḡ by finite differences) for DTensor Shard(0) parameters, FSDP2's layout.

    FSDP's parameters are all-gathered for the forward pass and their gradients reduce-scattered
    by ``.backward()`` (``torch.autograd.grad`` never reaches the sharded parameters), so each batch
    is one ``backward()`` of w_b × loss, and each process reads its rows of ``.grad``: FSDP has
    already averaged them over the processes (its default), so × P gives Σ_r w_b,r g_b,r. Every
    backward pass is collective: every process must pass the same number of batches. The model's
    ``.grad`` are restored afterwards."""
    if hvp == "exact":
        raise ValueError(
            f"{fn}: hvp='exact' needs double backpropagation, which FSDP-sharded (DTensor) parameters do not "
            "support; use hvp='finite_difference'"
        )
    if fisher:
        raise ValueError(
            f"{fn}: fisher=True needs each process's own per-batch gradients; with sharded (DTensor) parameters "
            "backward() only yields their sum over the processes"
        )
    batches = list(batches)
    empty = sum(_batch_size(b) == 0 for b in batches)
    gathered = kf_dist.all_gather_ints([len(batches), empty], layout)
    if any(e for _, e in gathered):
        raise ValueError(
            f"{fn}: with sharded (DTensor) parameters every batch needs samples (each backward pass is "
            f"collective), got batches without any on ranks {[r for r, (_, e) in enumerate(gathered) if e]}"
        )
    counts = [c for c, _ in gathered]
    if len(set(counts)) != 1:
        raise ValueError(
            f"{fn}: with sharded (DTensor) parameters every process must pass the same number of batches (each "
            f"backward pass is collective), got {counts} by rank"
        )
    if counts[0] == 0:
        raise ValueError(f"{fn}: expected at least one batch, got none on any of the {layout.world} processes")
    everything = list(model.parameters())
    saved = [p.grad for p in everything]
    try:
        total, samples = _sharded_sums(model, loss_fn, batches, params, everything, 1.0, layout, fn)
        grad = {n: t / samples for n, t in total.items()}
        hg = step = error = None
        if hvp == "finite_difference":
            run = _sharded_fd_sums(model, loss_fn, params, everything, grad, layout, fn)
            hg, step, error = _finite_difference(run, batches, params, grad, samples, fd_step, fd_tol, layout, fn)
    finally:
        for p, g in zip(everything, saved):
            p.grad = g
    wrap = {n: (lambda t, p=p: layout.wrap(t.to(p.dtype), p)) for n, p in params.items()}
    grad = {n: wrap[n](t) for n, t in grad.items()}
    hg = None if hg is None else {n: wrap[n](t) for n, t in hg.items()}
    return grad, hg, counts[0] * layout.world, samples, step, error


def _sharded_sums(model, loss_fn, batches, params, everything, sign, layout, fn):
    """Σ over every process's batches of w_b g_b, this process's rows (float32/float64), and Σ w_b."""
    total = {
        n: torch.zeros_like(p.to_local(), dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
        for n, p in params.items()
    }
    samples = 0.0
    for batch in batches:
        w = _batch_size(batch)
        for p in everything:
            p.grad = None
        (_loss(model, loss_fn, batch, fn) * w).backward()
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is None:
                    raise ValueError(
                        f"{fn}: expected the loss to depend on every scored parameter, but not on {name!r}"
                    )
                total[name].add_(kf_dist.local(p.grad).to(total[name].dtype), alpha=sign * layout.world)
        samples += w
    count = torch.tensor([samples], dtype=torch.float64, device=kf_dist.comm_device(layout))
    return total, float(kf_dist.all_reduce(count, layout))


def _sharded_fd_sums(model, loss_fn, params, everything, grad, layout, fn):
    """run(h, batches) for sharded parameters (see ``_replicated_fd_sums``): each process moves its
    rows of θ, and FSDP's backward passes sum the gradients over every process's batches."""
    locals_ = {n: p.to_local() for n, p in params.items()}

    def run(h: float, batches) -> tuple[dict[str, Tensor], float]:
        originals = {n: t.detach().clone() for n, t in locals_.items()}
        total = {n: torch.zeros_like(g) for n, g in grad.items()}
        samples = 0.0
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for n, t in locals_.items():
                        t.copy_(originals[n] + sign * h * grad[n].to(t.dtype))
                part, samples = _sharded_sums(model, loss_fn, batches, params, everything, sign, layout, fn)
                for n in total:
                    total[n] += part[n]
        finally:
            with torch.no_grad():
                for n, t in locals_.items():
                    t.copy_(originals[n])  # exactly restored
        return total, samples

    return run
