"""Gradient-flow criteria (Lubana & Dick, ICLR 2021): operands g and Hg, then any measure.

``gradient_flow(model, loss_fn, batches)`` accumulates, over all batches and with constant memory
(one running sum per parameter, no per-batch copies):

* ḡ, the gradient of the loss averaged over the batches (weighted by batch size, so a
  mean-reduced loss over several batches gives exactly the gradient of one big batch);
* optionally E[g_b²] over batches (for the Fisher measure);
* optionally Hḡ, the Hessian of the averaged loss times ḡ, as the authors compute it: ḡ first,
  then H_b ḡ batch by batch (not the average of H_b g_b). ``hvp="exact"`` uses double
  backpropagation (a second-order graph per batch: exact, memory ≈ 2-3 × a training step);
  ``hvp="finite_difference"`` uses (∇L(θ + hḡ) − ∇L(θ − hḡ)) / 2h, two ordinary backward passes
  per batch with no second-order graph: exact for quadratic losses, accurate to O(h²) for smooth
  ones (measured: 1e-11 relative for float64 models, ReLU ones included; 6e-5 for a float32 tanh
  MLP), and unreliable where the loss has kinks within h of θ: float32 ReLU networks need h small
  against the kinks and large against rounding, and may have no such h (one small convnet was off
  by 100 %). Compare with hvp="exact" on your model before relying on it.

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

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from koopfast import _distributed as kf_dist
from koopfast import masks as kf_masks
from koopfast._params import PRUNABLE_LAYERS, ParamSource, named_prunable

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
    units: dict[str, str] = field(default_factory=dict)  # bn source: weight name -> BN γ name
    batches: int = 0
    samples: float = 0.0

    def scores(self, measure: Measure, granularity: Granularity = "unstructured", *, variant: str = "abs"):
        """Materialised scores: dict name -> Tensor like the parameter (unstructured), or weight name
        -> Tensor[out_units] (filter)."""
        fn = f"koopfast.criteria.GradientFlow.scores({measure!r})"
        self._check(measure, granularity, fn)
        if variant not in ("abs", "tfo"):
            raise ValueError(f"{fn}: expected variant 'abs' or 'tfo', got {variant!r}")
        if variant == "tfo" and measure != "loss_preservation":
            raise ValueError(f"{fn}: variant 'tfo' applies to loss_preservation only")
        if self.units and granularity != "filter":
            raise ValueError(f"{fn}: BatchNorm-scale operands (source='bn') score filters: use granularity='filter'")
        out = {}
        with torch.no_grad():
            for name, theta in self.params.items():
                if granularity == "filter" and not (self.units or _has_units(theta)):
                    continue
                b = self._operand(name, measure)
                if not kf_dist.any_dtensor([theta]):
                    out[name] = _score(measure, granularity, variant, theta, b)
                    continue
                # Shard(0): each process scores its rows (whole units), returned as a DTensor
                local = _score(measure, granularity, variant, theta.to_local(), None if b is None else b.to_local())
                shape = theta.shape if granularity == "unstructured" else theta.shape[:1]
                out[name] = _shard_layout(theta).wrap(local, theta, shape)
        return out

    def masks(self, measure: Measure, sparsity: float, *, scope: Literal["global", "layerwise"] = "global"):
        """Unstructured masks of a measure, with the score computed inside the selection kernel from
        (θ, g), (θ, Hg) or (θ, E[g²]): nothing N-sized is materialised but the masks."""
        fn = f"koopfast.criteria.GradientFlow.masks({measure!r})"
        self._check(measure, "unstructured", fn)
        if self.units:
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


def _has_units(theta: Tensor) -> bool:
    """Weights (2+ dims) have output units; biases and other vectors follow their layer's units."""
    return theta.dim() >= 2 and theta.shape[0] > 0


def _score(measure: str, granularity: str, variant: str, theta: Tensor, b: Tensor | None) -> Tensor:
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
    rows = theta.reshape(theta.shape[0], -1)
    other = None if b is None else b.reshape(b.shape[0], -1)
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
    fd_step: float | None = None,
    process_group=None,
) -> GradientFlow:
    """ḡ over ``batches`` (and Hḡ with ``hvp``, E[g²] with ``fisher``) for the model's prunable
    parameters (conv and linear weights and biases, or ``params``).

    Args:
        model: the network; put in eval mode while scoring if ``eval_mode`` (the authors' choice:
            BatchNorm uses running statistics), restored afterwards.
        loss_fn: ``loss_fn(model, batch) -> scalar`` loss, mean-reduced over the batch.
        batches: any iterable of batches (iterated once, twice with ``hvp``); batch sizes, used as
            weights, are read from the first tensor in each batch (1 if there is none).
        hvp: None, "exact" (double backpropagation) or "finite_difference" (two backward passes).
        fisher: also accumulate E[g_b²] over batches (per-batch gradients, not per-sample).
        params: which tensors to score instead of the conv/linear weights and biases.
        source: "weights", or "bn" to score BatchNorm scales γ: each conv/linear layer directly
            followed by a BatchNorm is scored through that BatchNorm's γ (per-filter measures keyed
            by the layer's weight name).
        fd_step: the finite-difference step h (default: ε^(1/3) (1 + ‖θ‖) / ‖ḡ‖, ε that of the
            parameters' dtype).
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
    units: dict[str, str] = {}
    if source == "bn":
        units = _bn_pairs(model, fn)
        named = dict(model.named_parameters())
        scored = {w: named[g] for w, g in units.items()}
    else:
        scored = named_prunable(params if params is not None else model, fn=fn)
    for name, p in scored.items():
        if not p.requires_grad:
            raise ValueError(f"{fn}: expected parameters that require grad, got {name!r} with requires_grad=False")
    if hvp is not None and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # iterated twice: ḡ first, then H ḡ
    layout = kf_dist.resolve(list(scored.values()), process_group, fn)

    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        if layout is not None and layout.sharded:  # FSDP2: backward() passes (see _sharded_operands)
            grad, hg, n_batches, samples = _sharded_operands(
                model, loss_fn, batches, scored, hvp, fisher, fd_step, layout, fn
            )
            grad_sq = None
        else:
            grad, grad_sq, n_batches, samples = _mean_gradient(model, loss_fn, batches, scored, fisher, layout, fn)
            hg = None
            if hvp == "exact":
                hg = _hvp_exact(model, loss_fn, batches, scored, grad, samples, layout, fn)
            elif hvp == "finite_difference":
                hg = _hvp_finite_difference(model, loss_fn, batches, scored, grad, samples, fd_step, layout, fn)
    finally:
        model.train(was_training)
    return GradientFlow(
        params={n: p.detach().clone() for n, p in scored.items()},  # θ as scored: the model may train on
        grad=grad,
        hg=hg,
        grad_sq=grad_sq,
        units=units,
        batches=n_batches,
        samples=samples,
    )


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
        raise ValueError(f"{fn}: expected at least one batch, got none{where}")
    with torch.no_grad():
        grad = {n: (t / samples).to(params[n].dtype) for n, t in total.items()}
        grad_sq = None if total_sq is None else {n: (t / samples).to(params[n].dtype) for n, t in total_sq.items()}
    return grad, grad_sq, count, samples


def _hvp_exact(model, loss_fn, batches, params, grad, samples, layout, fn):
    total = {n: torch.zeros_like(g) for n, g in grad.items()}
    vec = [grad[n] for n in params]
    for batch in batches:
        w = _batch_size(batch)
        grads = _grads(_loss(model, loss_fn, batch, fn), params, fn, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec))
        try:
            hv = torch.autograd.grad(dot, list(params.values()), allow_unused=True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{fn}: double backward failed ({exc}); use hvp='finite_difference' for models whose "
                "operations have no second derivative"
            ) from exc
        with torch.no_grad():
            for (_, acc), h in zip(total.items(), hv):
                if h is not None:  # piecewise-linear paths have zero curvature
                    acc.add_(h, alpha=w)
    _all_reduce_sums(list(total.values()), layout)
    return {n: t / samples for n, t in total.items()}


def _hvp_finite_difference(model, loss_fn, batches, params, grad, samples, step, layout, fn):
    with torch.no_grad():
        theta_norm = math.sqrt(sum(float(p.double().square().sum()) for p in params.values()))
        g_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grad.values()))
    if g_norm == 0:  # the global ḡ: the same decision on every process
        return {n: torch.zeros_like(g) for n, g in grad.items()}
    if step is None:
        eps = max(torch.finfo(p.dtype).eps for p in params.values())
        step = eps ** (1 / 3) * (1 + theta_norm) / g_norm
    total = {n: torch.zeros_like(g) for n, g in grad.items()}
    originals = {n: p.data for n, p in params.items()}
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for n, p in params.items():
                    p.data = originals[n] + sign * step * grad[n]
            for batch in batches:
                w = _batch_size(batch)
                grads = _grads(_loss(model, loss_fn, batch, fn), params, fn)
                with torch.no_grad():
                    for (_, acc), g in zip(total.items(), grads):
                        acc.add_(g, alpha=sign * w)
    finally:
        for n, p in params.items():
            p.data = originals[n]  # the very same tensors: exactly restored
    _all_reduce_sums(list(total.values()), layout)
    return {n: t / (2 * step * samples) for n, t in total.items()}


def out_units(layer: nn.Module) -> int:
    """Output units of a conv/linear layer (dim 1 of a transposed convolution's weight)."""
    return layer.weight.shape[1] if isinstance(layer, nn.modules.conv._ConvTransposeNd) else layer.weight.shape[0]


def _bn_pairs(model: nn.Module, fn: str) -> dict[str, str]:
    """Conv/linear weight name -> the γ of the affine BatchNorm registered right after that layer
    (among leaf modules, in registration order: the order of nn.Sequential and most blocks)."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    pairs: dict[str, str] = {}
    for (layer_name, layer), (bn_name, bn) in itertools.pairwise(leaves):
        if (
            isinstance(layer, PRUNABLE_LAYERS)
            and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.affine
            and bn.num_features == out_units(layer)
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


def _sharded_operands(model, loss_fn, batches, params, hvp, fisher, fd_step, layout, fn):
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
    counts = [c[0] for c in kf_dist.all_gather_ints([len(batches)], layout)]
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
        hg = None
        if hvp == "finite_difference":
            hg = _sharded_finite_difference(
                model, loss_fn, batches, params, everything, grad, samples, fd_step, layout, fn
            )
    finally:
        for p, g in zip(everything, saved):
            p.grad = g
    wrap = {n: (lambda t, p=p: layout.wrap(t.to(p.dtype), p)) for n, p in params.items()}
    grad = {n: wrap[n](t) for n, t in grad.items()}
    hg = None if hg is None else {n: wrap[n](t) for n, t in hg.items()}
    return grad, hg, counts[0] * layout.world, samples


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


def _sharded_finite_difference(model, loss_fn, batches, params, everything, grad, samples, step, layout, fn):
    """(∇L(θ + hḡ) − ∇L(θ − hḡ)) / 2h with each process moving its rows of θ (see
    ``_hvp_finite_difference``); norms are summed over the processes."""
    with torch.no_grad():
        sums = torch.tensor(
            [
                sum(float(p.to_local().double().square().sum()) for p in params.values()),
                sum(float(g.double().square().sum()) for g in grad.values()),
            ],
            dtype=torch.float64,
            device=kf_dist.comm_device(layout),
        )
        theta_norm, g_norm = (math.sqrt(float(v)) for v in kf_dist.all_reduce(sums, layout))
    if g_norm == 0:
        return {n: torch.zeros_like(g) for n, g in grad.items()}
    if step is None:
        eps = max(torch.finfo(p.dtype).eps for p in params.values())
        step = eps ** (1 / 3) * (1 + theta_norm) / g_norm
    locals_ = {n: p.to_local() for n, p in params.items()}
    originals = {n: t.detach().clone() for n, t in locals_.items()}
    total = {n: torch.zeros_like(g) for n, g in grad.items()}
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for n, t in locals_.items():
                    t.copy_(originals[n] + sign * step * grad[n].to(t.dtype))
            part, _ = _sharded_sums(model, loss_fn, batches, params, everything, sign, layout, fn)
            for n in total:
                total[n] += part[n]
    finally:
        with torch.no_grad():
            for n, t in locals_.items():
                t.copy_(originals[n])  # exactly restored
    return {n: t / (2 * step * samples) for n, t in total.items()}
