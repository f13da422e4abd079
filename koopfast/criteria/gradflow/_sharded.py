"""Operand estimator for FSDP2-sharded parameters (DTensor ``Shard(0)``).

FSDP's parameters are all-gathered for the forward pass and their gradients reduce-scattered by
``.backward()`` (``torch.autograd.grad`` never reaches the sharded parameters), so each batch is
one ``backward()`` of w_b × loss, and each process reads its rows of ``.grad``: FSDP has already
averaged them over the processes (its default), so × P gives Σ_r w_b,r g_b,r. Every backward
pass is collective: every process must pass the same number of batches. The model's ``.grad``
are restored afterwards. No exact Hḡ (double backpropagation does not reach sharded parameters)
and no E[g²] (only the sum of the processes' gradients exists)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from koopfast import _distributed as kf_dist
from koopfast.criteria.gradflow._passes import accumulator, batch_size, checked_loss

if TYPE_CHECKING:
    from koopfast.criteria.gradflow.api import LossFn


class Sharded:
    """ḡ and finite-difference sums of sharded ``params``; results are this process's rows."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: dict[str, Tensor], layout: kf_dist.Layout, fn: str
    ) -> None:
        self.model, self.loss_fn, self.params, self.layout, self.fn = model, loss_fn, params, layout, fn
        self.norm_layout = layout  # each process holds some rows: norms are sums over the processes
        self._everything: list[Tensor] = list(model.parameters())
        self._locals = {n: kf_dist.local(p) for n, p in params.items()}  # DTensors: their rows

    @contextlib.contextmanager
    def grads_kept(self) -> Iterator[None]:
        saved = [p.grad for p in self._everything]
        try:
            yield
        finally:
            for p, g in zip(self._everything, saved):
                p.grad = g

    def check(self, hvp: str | None, fisher: bool) -> None:
        """Refuse, before any collective pass, what sharded parameters cannot give."""
        if hvp == "exact":
            raise ValueError(
                f"{self.fn}: hvp='exact' needs double backpropagation, which FSDP-sharded (DTensor) parameters do "
                "not support; use hvp='finite_difference'"
            )
        if fisher:
            raise ValueError(
                f"{self.fn}: fisher=True needs each process's own per-batch gradients; with sharded (DTensor) "
                "parameters backward() only yields their sum over the processes"
            )

    def mean_gradient(
        self, batches: Iterable[object], fisher: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, int, float]:
        fn, layout = self.fn, self.layout
        assert isinstance(batches, Sequence)  # estimate() hands sharded estimators a list
        empty = sum(batch_size(b) == 0 for b in batches)
        gathered = kf_dist.all_gather_ints([len(batches), empty], layout)
        if any(e for _, e in gathered):
            raise ValueError(
                f"{fn}: with sharded (DTensor) parameters every batch needs samples (each backward pass is "
                f"collective), got batches without any on ranks {[r for r, (_, e) in enumerate(gathered) if e]}"
            )
        counts = [c for c, _ in gathered]
        if len(set(counts)) != 1:
            raise ValueError(
                f"{fn}: with sharded (DTensor) parameters every process must pass the same number of batches "
                f"(each backward pass is collective), got {counts} by rank"
            )
        if counts[0] == 0:
            raise ValueError(f"{fn}: expected at least one batch, got none on any of the {layout.world} processes")
        total, samples = self._sums(batches, 1.0)
        return {n: t / samples for n, t in total.items()}, None, counts[0] * layout.world, samples

    def _sums(self, batches: Iterable[object], sign: float) -> tuple[dict[str, Tensor], float]:
        """Σ over every process's batches of w_b g_b, this process's rows (float32/float64), and Σ w_b."""
        total = {n: accumulator(p) for n, p in self.params.items()}
        samples = 0.0
        for batch in batches:
            w = batch_size(batch)
            for p in self._everything:
                p.grad = None
            loss = checked_loss(self.model, self.loss_fn, batch, self.fn) * w
            loss.backward()  # type: ignore[no-untyped-call]  # Tensor.backward is unannotated in torch
            with torch.no_grad():
                for name, p in self.params.items():
                    if p.grad is None:
                        raise ValueError(
                            f"{self.fn}: expected the loss to depend on every scored parameter, but not on {name!r}"
                        )
                    total[name].add_(kf_dist.local(p.grad).to(total[name].dtype), alpha=sign * self.layout.world)
            samples += w
        count = torch.tensor([samples], dtype=torch.float64, device=kf_dist.comm_device(self.layout))
        return total, float(kf_dist.all_reduce(count, self.layout))

    def fd_sums(self, h: float, batches: Iterable[object], grad: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
        """As :meth:`Replicated.fd_sums`, but each process moves its rows of θ, and FSDP's backward
        passes sum the gradients over every process's batches."""
        originals = {n: t.detach().clone() for n, t in self._locals.items()}
        total = {n: torch.zeros_like(g) for n, g in grad.items()}
        samples = 0.0
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for n, t in self._locals.items():
                        t.copy_(originals[n] + sign * h * grad[n].to(t.dtype))
                part, samples = self._sums(batches, sign)
                for n in total:
                    total[n] += part[n]
        finally:
            with torch.no_grad():
                for n, t in self._locals.items():
                    t.copy_(originals[n])  # exactly restored
        return total, samples

    def reduce_fd_sums(self, total: dict[str, Tensor]) -> None:
        """FSDP's backward passes already summed over the processes."""

    def wrap(self, operands: dict[str, Tensor]) -> dict[str, Tensor]:
        """This process's rows as DTensors placed like the parameters."""
        return {n: self.layout.wrap(t.to(self.params[n].dtype), self.params[n]) for n, t in operands.items()}
