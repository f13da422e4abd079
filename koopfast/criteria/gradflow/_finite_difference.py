"""Finite-difference Hḡ ≈ (∇L(θ + hḡ) − ∇L(θ − hḡ)) / 2h with a self-checked step, for any
operand estimator (replicated or sharded: it supplies the gradient sums)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from koopfast.criteria.gradflow._passes import global_sums, squared_norm
from koopfast.criteria.gradflow._replicated import Replicated
from koopfast.criteria.gradflow._sharded import Sharded

Estimator = Replicated | Sharded

FD_TOLERANCE = 5e-2  # default fd_tol: the largest estimated relative error of a finite-difference Hḡ accepted
FD_RUNGS = 6  # steps h₀ · 10⁻ᵏ, k = 0..5, tried by the finite-difference self-check


def finite_difference(
    estimator: Estimator,
    batches: Iterable[object],
    grad: dict[str, Tensor],
    samples: float,
    step: float | Literal["auto"],
    tol: float,
    fn: str,
) -> tuple[dict[str, Tensor], float | None, float | None]:
    """Hḡ with the step given, or chosen by the self-check (see gradient_flow's ``fd_step``).
    Returns (Hḡ, the step, the estimated relative error or None)."""
    params = estimator.params
    theta_sq, g_sq = global_sums([squared_norm(params.values()), squared_norm(grad.values())], estimator.norm_layout)
    if g_sq == 0:  # the global ḡ: the same decision on every process
        return {n: torch.zeros_like(g) for n, g in grad.items()}, None, None
    error: float | None = None
    if step == "auto":
        eps = max(torch.finfo(p.dtype).eps for p in params.values())
        h0 = eps ** (1 / 3) * (1 + math.sqrt(theta_sq)) / math.sqrt(g_sq)
        step, error = self_check(estimator, list(batches)[:1], grad, h0)
        _refuse_above(
            error, tol, f"the best of the steps {h0:.3g}·10^-k (k = 0..{FD_RUNGS - 1}) on the first batch", fn
        )
    total = _quotient_sums(estimator, step, batches, grad)
    if error is not None:
        # The first batch's check says nothing about kinks the step crosses in the other batches
        # (measured: a ReLU convnet passed it at 1.6e-10 while the estimate on four batches was
        # off by 22×): the same comparison with the next step, on all of them.
        finer = _quotient_sums(estimator, step / 10, batches, grad)
        # d_h = total / 2h and d_(h/10) = 10 finer / 2h: their relative difference
        diff, norm = global_sums(
            [squared_norm(total[n] - 10 * finer[n] for n in total), squared_norm(10 * t for t in finer.values())],
            estimator.norm_layout,
        )
        whole = 0.0 if diff == 0 else (math.sqrt(diff / norm) if norm > 0 else math.inf)
        whole = math.inf if math.isnan(whole) else whole
        error = max(error, whole)
        _refuse_above(error, tol, f"the step {step:.3g} on every batch, against {step / 10:.3g}", fn)
    return {n: t / (2 * step * samples) for n, t in total.items()}, float(step), error


def _quotient_sums(
    estimator: Estimator, step: float, batches: Iterable[object], grad: dict[str, Tensor]
) -> dict[str, Tensor]:
    total, _ = estimator.fd_sums(step, batches, grad)
    estimator.reduce_fd_sums(total)  # replicated: each process summed its own batches
    return total


def _refuse_above(error: float, tol: float, what: str, fn: str) -> None:
    if not error <= tol:  # NaN refused too
        raise ValueError(
            f"{fn}: finite-difference Hḡ failed its self-check: {what} differs from the next by {error:.3g} "
            f"relative, more than fd_tol={tol:g}; the gradient is not smooth at these parameters on this scale "
            "(ReLU-like kinks, or rounding). Use hvp='exact', or pass fd_step= (and check the result against "
            "hvp='exact' yourself)"
        )


def self_check(estimator: Estimator, first: list[object], grad: dict[str, Tensor], h0: float) -> tuple[float, float]:
    """The step of smallest estimated error among h₀·10⁻ᵏ on the first batch (every process's first
    batch: norms summed over the processes). The estimate for h_k is ‖d_k − d_(k+1)‖ / ‖d_(k+1)‖ with
    d the difference quotients: in the truncation regime (error ∝ h²) it is d_k's error."""
    steps = [h0 * 10.0**-k for k in range(FD_RUNGS)]
    previous: dict[str, Tensor] | None = None
    partial: list[float] = []
    for h in steps:
        sums, _ = estimator.fd_sums(h, first, grad)
        current = {n: t / (2 * h) for n, t in sums.items()}
        if previous is not None:
            diff = squared_norm(previous[n] - current[n] for n in current)
            partial += [diff, squared_norm(current.values())]
        previous = current
    totals = global_sums(partial, estimator.layout)
    errors: list[float] = []
    for diff, norm in zip(totals[::2], totals[1::2]):
        estimate = 0.0 if diff == 0 else (math.sqrt(diff / norm) if norm > 0 else math.inf)
        errors.append(math.inf if math.isnan(estimate) else estimate)  # NaN/Inf gradients: never the best
    best = min(range(len(errors)), key=errors.__getitem__)
    return steps[best], errors[best]
