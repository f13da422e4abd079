"""What every operand estimator shares: batch sizes, checked losses and gradients, sums over
processes, and the scoring mode that leaves the model as it was."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from koopfast import _distributed as kf_dist
from koopfast._reduce import sq_norm
from koopfast._torch_compat import NORMALIZATION


def batch_size(batch: object) -> int:
    """The batch's weight: the length of its first tensor with dimensions (1 if there is none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, Tensor) and item.dim():
                return int(item.shape[0])
    return 1


def checked_loss(model: nn.Module, loss_fn: Callable[[nn.Module, Any], object], batch: object, fn: str) -> Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{fn}: expected loss_fn to return a scalar loss (mean over the batch), got {got}")
    if not loss.requires_grad:
        raise ValueError(f"{fn}: expected a loss that depends on the parameters (it does not require grad)")
    return loss.reshape(())


def gradients(loss: Tensor, params: dict[str, Tensor], fn: str, create_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
    unused = [n for n, g in zip(params, grads) if g is None]
    if unused:
        raise ValueError(f"{fn}: expected the loss to depend on every scored parameter, but not on {unused[:3]}")
    return list(grads)


def accumulator(p: Tensor) -> Tensor:
    """A zero running sum for a parameter (its local rows if sharded): float32, float64 kept."""
    local = kf_dist.local(p)
    return torch.zeros_like(local, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)


def all_reduce_sums(tensors: list[Tensor], layout: kf_dist.Layout | None) -> None:
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
            for t, piece in zip(group, torch.split(flat, [t.numel() for t in group])):
                t.copy_(piece.view_as(t))


def global_sums(values: list[float], layout: kf_dist.Layout | None) -> list[float]:
    """Sums over the processes of per-process partial sums, so that every process takes the same
    decision (None: this process's values)."""
    if layout is None or layout.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=kf_dist.comm_device(layout))
    return kf_dist.all_reduce(t, layout).tolist()


def squared_norm(tensors: Iterable[Tensor]) -> float:
    """Σ x² over the tensors (this process's rows of sharded ones), independent of the thread count."""
    return math.fsum(sq_norm(kf_dist.local(t).detach()) for t in tensors)


@contextlib.contextmanager
def scoring_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Eval mode (or train mode kept) for the scoring passes; afterwards every module's own mode and
    every BatchNorm's running statistics are as they were."""
    modes = [(m, m.training) for m in model.modules()]
    stats = [
        (buf, buf.clone())
        for m in model.modules()
        if isinstance(m, NORMALIZATION) and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if isinstance(buf, Tensor)  # None where the statistic is not kept
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
