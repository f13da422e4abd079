"""Operand estimator for replicated parameters: every process (or the only one) holds the whole
model and iterates its own batches; batch-weighted sums are all-reduced."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from koopfast import _distributed as kf_dist
from koopfast.criteria.gradflow._passes import (
    accumulator,
    all_reduce_sums,
    batch_size,
    checked_loss,
    gradients,
)

if TYPE_CHECKING:
    from koopfast.criteria.gradflow.api import LossFn


class Replicated:
    """ḡ, E[g²], exact Hḡ and finite-difference sums of ``params`` (each process's own batches)."""

    # the norms of θ and ḡ are the same on every process: nothing to sum
    norm_layout: kf_dist.Layout | None = None

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], layout: kf_dist.Layout | None, fn: str
    ) -> None:
        self.model, self.loss_fn, self.params, self.layout, self.fn = model, loss_fn, params, layout, fn

    def check(self, hvp: str | None, fisher: bool) -> None:
        """Replicated parameters support every operand."""

    def mean_gradient(
        self, batches: Iterable[object], fisher: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, int, float]:
        """(ḡ, E[g²] or None, batches counted, samples), over every process's batches."""
        total = {n: accumulator(p) for n, p in self.params.items()}
        total_sq = {n: torch.zeros_like(t) for n, t in total.items()} if fisher else None
        samples, count = 0.0, 0
        for batch in batches:
            w = batch_size(batch)
            if w == 0:  # no samples: nothing to add (its mean loss would be NaN)
                continue
            grads = gradients(checked_loss(self.model, self.loss_fn, batch, self.fn), self.params, self.fn)
            with torch.no_grad():
                for (name, acc), g in zip(total.items(), grads):
                    acc.add_(g.to(acc.dtype), alpha=w)
                    if total_sq is not None:
                        total_sq[name].add_(g.to(acc.dtype).square(), alpha=w)
            samples += w
            count += 1
        if self.layout is not None:  # every process calls this, with or without batches of its own
            counts = torch.tensor([samples, count], dtype=torch.float64)
            sums = [*total.values(), *(total_sq.values() if total_sq is not None else ()), counts]
            all_reduce_sums(sums, self.layout)
            samples, count = float(counts[0]), int(counts[1])
        if count == 0:
            where = "" if self.layout is None else f" on any of the {self.layout.world} processes"
            raise ValueError(f"{self.fn}: expected at least one batch with samples, got none{where}")
        with torch.no_grad():
            dtypes = {n: p.dtype for n, p in self.params.items()}
            grad = {n: (t / samples).to(dtypes[n]) for n, t in total.items()}
            grad_sq = None if total_sq is None else {n: (t / samples).to(dtypes[n]) for n, t in total_sq.items()}
        return grad, grad_sq, count, samples

    def exact_hvp(self, batches: Iterable[object], grad: dict[str, Tensor], samples: float) -> dict[str, Tensor]:
        """Σ_b w_b H_b ḡ / Σ_b w_b by double backpropagation, one batch at a time. The fused
        attention kernels (flash, memory-efficient, CPU flash) have no double backward; the math
        backend computes the same attention with ordinary, twice-differentiable operations."""
        with sdpa_kernel([SDPBackend.MATH]):
            return self._exact_hvp(batches, grad, samples)

    def _exact_hvp(self, batches: Iterable[object], grad: dict[str, Tensor], samples: float) -> dict[str, Tensor]:
        params, fn = self.params, self.fn
        total = {n: torch.zeros_like(g) for n, g in grad.items()}
        vec = [grad[n] for n in params]
        for batch in batches:
            w = batch_size(batch)
            if w == 0:
                continue
            grads = gradients(checked_loss(self.model, self.loss_fn, batch, fn), params, fn, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vec))
            assert isinstance(dot, Tensor)  # at least one scored tensor (entries() refuses none)
            try:
                hv = torch.autograd.grad(dot, list(params.values()), allow_unused=True)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"{fn}: double backward failed ({str(exc).splitlines()[0]}); use hvp='finite_difference' for "
                    "models whose operations have no second derivative (its self-check measures its accuracy)"
                ) from exc
            with torch.no_grad():
                for acc, h in zip(total.values(), hv):
                    if h is not None:  # piecewise-linear paths have zero curvature
                        acc.add_(h, alpha=w)
        all_reduce_sums(list(total.values()), self.layout)
        return {n: t / samples for n, t in total.items()}

    def fd_sums(self, h: float, batches: Iterable[object], grad: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
        """Σ_b w_b (∇L_b(θ + hḡ) − ∇L_b(θ − hḡ)) over this process's given batches, and Σ_b w_b."""
        params, fn = self.params, self.fn
        total = {n: torch.zeros_like(g) for n, g in grad.items()}
        samples = 0.0
        originals = {n: p.data for n, p in params.items()}
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for n, p in params.items():
                        p.data = originals[n] + sign * h * grad[n]
                for batch in batches:
                    w = batch_size(batch)
                    if w == 0:
                        continue
                    grads = gradients(checked_loss(self.model, self.loss_fn, batch, fn), params, fn)
                    with torch.no_grad():
                        for acc, g in zip(total.values(), grads):
                            acc.add_(g, alpha=sign * w)
                    samples += w if sign > 0 else 0.0
        finally:
            for n, p in params.items():
                p.data = originals[n]  # the very same tensors: exactly restored
        return total, samples

    def reduce_fd_sums(self, total: dict[str, Tensor]) -> None:
        """Each process summed its own batches: add them up."""
        all_reduce_sums(list(total.values()), self.layout)

    def wrap(self, operands: dict[str, Tensor]) -> dict[str, Tensor]:
        return operands
