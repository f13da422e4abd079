"""Estimating the operands ḡ, E[g²] and Hḡ with one strategy for where the parameters live:
:class:`Replicated` (one process, or data parallel) or :class:`Sharded` (FSDP2), chosen from the
parameters; the finite-difference Hḡ is the same code for both."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn

from koopfast import _distributed as kf_dist
from koopfast.criteria.gradflow._finite_difference import Estimator, finite_difference
from koopfast.criteria.gradflow._replicated import Replicated
from koopfast.criteria.gradflow._sharded import Sharded

if TYPE_CHECKING:
    from koopfast.criteria.gradflow.api import LossFn

__all__ = ["Operands", "estimate", "every_parameter"]


@dataclass
class Operands:
    grad: dict[str, Tensor]
    grad_sq: dict[str, Tensor] | None
    hg: dict[str, Tensor] | None
    batches: int
    samples: float
    fd_step: float | None = None
    fd_error: float | None = None


def every_parameter(model: nn.Module, scored: dict[str, Tensor]) -> dict[str, Tensor]:
    """``scored`` and then every other parameter of the model that requires grad (BatchNorm
    included), each tensor once: the vector ḡ of the authors' Hḡ."""
    out = dict(scored)
    seen = {id(t) for t in scored.values()}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            out[name] = p
            seen.add(id(p))
    return out


def estimate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[object],
    scored: dict[str, Tensor],
    *,
    hvp: str | None,
    fisher: bool,
    fd_step: float | Literal["auto"],
    fd_tol: float,
    layout: kf_dist.Layout | None,
    fn: str,
    vector: dict[str, Tensor] | None = None,
) -> Operands:
    """ḡ (and E[g²], Hḡ) of ``scored``. ``vector``: the tensors spanning ḡ in Hḡ = H ḡ (a superset
    of ``scored``, in which case ḡ is taken over all of them and only the scored parts are kept);
    None: ``scored`` itself."""
    span = scored if vector is None else vector
    if layout is not None and layout.sharded:
        estimator = Sharded(model, loss_fn, span, layout, fn)
        estimator.check(hvp, fisher)
        batches = list(batches)
        with estimator.grads_kept():
            result = _run(estimator, batches, hvp, fisher, fd_step, fd_tol, fn)
    else:
        result = _run(Replicated(model, loss_fn, span, layout, fn), batches, hvp, fisher, fd_step, fd_tol, fn)
    if span is not scored:
        keep = list(scored)
        result.grad = {n: result.grad[n] for n in keep}
        result.grad_sq = None if result.grad_sq is None else {n: result.grad_sq[n] for n in keep}
        result.hg = None if result.hg is None else {n: result.hg[n] for n in keep}
    return result


def _run(
    estimator: Estimator,
    batches: Iterable[object],
    hvp: str | None,
    fisher: bool,
    fd_step: float | Literal["auto"],
    fd_tol: float,
    fn: str,
) -> Operands:
    estimator.check(hvp, fisher)
    grad, grad_sq, count, samples = estimator.mean_gradient(batches, fisher)
    hg: dict[str, Tensor] | None = None
    step: float | None = None
    error: float | None = None
    if hvp == "exact":
        assert isinstance(estimator, Replicated)  # Sharded.check refused hvp='exact'
        hg = estimator.exact_hvp(batches, grad, samples)
    elif hvp == "finite_difference":
        hg, step, error = finite_difference(estimator, batches, grad, samples, fd_step, fd_tol, fn)
    grad = estimator.wrap(grad)
    hg = None if hg is None else estimator.wrap(hg)
    return Operands(grad, grad_sq, hg, count, samples, step, error)
