"""Probe data for the spline criteria: batches, forward passes in eval mode, region codes from hooks.

A probe is one input batch (a tensor whose first dimension is the batch) or a re-iterable of
batches (a list, a DataLoader); a batch may be a tuple ``(inputs, ...)``, as a DataLoader yields,
of which the first element is fed to the model. Batches are moved to the model's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from koopfast import ops
from koopfast.prunable import is_hf_conv1d

Probe = Tensor | Iterable[Tensor | Sequence[Tensor]]


def check_probe(probe: Probe, *, fn: str) -> None:
    """TypeError for a probe that is neither a tensor nor re-iterable (a generator would be empty
    the second time it is read)."""
    if isinstance(probe, Tensor):
        return
    if not isinstance(probe, Iterable) or isinstance(probe, (str, bytes)):
        raise TypeError(f"{fn}: expected probe to be a tensor or an iterable of batches, got {type(probe).__name__}")
    if iter(probe) is probe:
        raise TypeError(
            f"{fn}: expected probe to be a tensor or a re-iterable of batches (a list, a DataLoader), "
            f"got the one-shot iterator {type(probe).__name__}"
        )


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def iter_batches(probe: Probe, device: torch.device, *, fn: str) -> Iterator[Tensor]:
    """The probe's input tensors on `device`; ValueError if there is none with a sample in it."""
    batches = [probe] if isinstance(probe, Tensor) else probe
    seen = 0
    for i, batch in enumerate(batches):
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{fn}: expected probe batch {i} to be a tensor (or a tuple starting with one), got {type(x).__name__}"
            )
        if x.dim() == 0:
            raise ValueError(f"{fn}: expected probe batch {i} to have a batch dimension, got a 0-dim tensor")
        if x.shape[0] == 0:
            continue
        seen += 1
        yield x.to(device)
    if seen == 0:
        raise ValueError(f"{fn}: expected probe data with at least one sample, got an empty probe")


def first_batch(probe: Probe, device: torch.device, *, fn: str) -> Tensor:
    return next(iter_batches(probe, device, fn=fn))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() and no_grad, the previous train/eval modes of every module restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


class HookError(ValueError):
    """An error raised by one of koopfast's own hooks during a probe pass: passed on as it is."""


def run_model(model: nn.Module, x: Tensor, *, fn: str, batch: Tensor | None = None) -> Any:
    """model(x), with the model's own error turned into one that names the probe batch (``batch``,
    if x is a part of it)."""
    try:
        return model(x)
    except HookError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shape = list((x if batch is None else batch).shape)
        raise ValueError(
            f"{fn}: expected probe batches that the model accepts, got a batch of shape {shape} "
            f"({x.dtype}); the model raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


@contextlib.contextmanager
def forward_hooks(hooks: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- region codes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeSet:
    """The region codes of one layer's units over the probe: int64 ``codes [units, words]`` (one
    block of words per probe batch, each padded with zero bits) and ``bits``, the number of real
    bits per unit. Zero padding never counts in a distance between two code sets of one probe."""

    codes: Tensor
    bits: int

    @property
    def units(self) -> int:
        return self.codes.shape[0]


def unit_dim(module: nn.Module) -> int:
    """The dimension of a module's output that indexes its units: features last for a linear
    layer, channels (dim 1) for convolutions and BatchNorm."""
    return -1 if isinstance(module, nn.Linear) or is_hf_conv1d(module) else 1


def record_codes(
    model: nn.Module, targets: dict[str, nn.Module], probe: Probe, *, fn: str, calls: list[str] | None = None
) -> dict[str, CodeSet]:
    """Runs the whole probe through the model in eval mode and packs the sign of each target
    module's output into region codes on the output's device. Nothing else is kept: memory is one
    bit per unit, position and probe sample. ``calls``, if given, receives the name of each target
    at every run of it, in the order they run (a detector that sums per-layer values in float32
    needs the authors' order)."""
    blocks: dict[str, list[Tensor]] = {name: [] for name in targets}
    bits = dict.fromkeys(targets, 0)

    def hook_for(name: str, module: nn.Module) -> Callable[..., None]:
        dim = unit_dim(module)

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, Tensor) or output.dim() < 2:
                got = f"shape {list(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
                raise HookError(
                    f"{fn}: expected module {name!r} to output a batch of units (a tensor, at least 2-D), got {got}"
                )
            codes = ops.sign_codes(output.detach(), dim)
            blocks[name].append(codes)
            bits[name] += output.numel() // max(output.shape[dim], 1)
            if calls is not None:
                calls.append(name)

        return hook

    device = model_device(model)
    with eval_mode(model), forward_hooks({m: hook_for(n, m) for n, m in targets.items()}):
        for x in iter_batches(probe, device, fn=fn):
            run_model(model, x, fn=fn)
    out = {}
    for name, parts in blocks.items():
        if not parts:
            raise ValueError(f"{fn}: expected module {name!r} to run during the model's forward pass, but it never did")
        units = {p.shape[0] for p in parts}
        if len(units) != 1:
            raise ValueError(
                f"{fn}: expected module {name!r} to output the same number of units for every batch, "
                f"got {sorted(units)}"
            )
        out[name] = CodeSet(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], bits[name])
    return out
