"""Importance accumulated during ordinary training: |θ ⊙ g| (Taylor), g² (Fisher) or θ²g², summed
over optimizer steps into one float32 buffer per tensor.

The gradient of a *step* is read when the step happens — from an optimizer step pre-hook, or when
the training loop calls :meth:`ScoreAccumulator.update` — never per backward pass: with gradient
accumulation, ``p.grad`` then holds the whole step's gradient (the sum over its micro-batches), so
the scores do not depend on how a batch was split; with DDP it is the all-reduced gradient, the
same on every rank; with FSDP2 it is this rank's shard of it (DTensor), and so are the buffers.
Nothing per batch is copied: each update is one fused multiply-add into the buffers.

Per-backward hooks (``Tensor.register_hook``) would see each micro-batch's gradient instead, and
|θ ⊙ Σ g_i| ≠ Σ |θ ⊙ g_i|: they are not used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from koopfast import _distributed as kd
from koopfast.prunable import ParamSource, named_tensors
from koopfast.scores import ScoreMap

__all__ = ["AccumulatedScores", "ScoreAccumulator"]

Kind = Literal["taylor", "fisher", "taylor_squared"]
KINDS = ("taylor", "fisher", "taylor_squared")


class AccumulatedScores(ScoreMap):
    """Scores summed over ``steps`` optimizer steps (divide by ``steps`` for a mean)."""

    kind: str
    steps: int

    def __init__(
        self, scores: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = (), *, kind: str = "taylor", steps: int = 0
    ):
        super().__init__(scores, criterion=f"accumulated {kind}")
        self.kind, self.steps = kind, steps


class ScoreAccumulator:
    """Sums an importance over training steps, one buffer per tensor (float32, like the tensor).

    ``kind``: ``"taylor"`` |θ ⊙ g| (Molchanov et al., 2019, first-order Taylor), ``"fisher"`` g²
    (the empirical Fisher diagonal of each step's mean gradient), ``"taylor_squared"`` θ²g² (the
    squared Taylor term, LLM-Pruner's element-wise first-order importance squared).

    Usage: ``acc = ScoreAccumulator(model, "taylor", optimizer=opt)`` then train as usual; each
    ``opt.step()`` first adds the current gradients (a pre-hook; steps of parameters without a
    gradient add nothing to them). Without ``optimizer``, call :meth:`update` after the backward
    passes of a step. :meth:`scores` returns the sums; :meth:`close` removes the hook.

    Which tensors: a model's prunable tensors (:func:`koopfast.prunable.prunable`), or the named
    tensors given.
    """

    def __init__(
        self,
        model_or_params: ParamSource,
        kind: Kind = "taylor",
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        fn = "koopfast.criteria.ScoreAccumulator"
        if kind not in KINDS:
            raise ValueError(f"{fn}: expected kind to be one of {KINDS}, got {kind!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{fn}: expected optimizer to be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.kind: Kind = kind
        self._params = named_tensors(model_or_params, fn=fn)
        for name, p in self._params.items():
            if not p.is_floating_point():
                raise TypeError(f"{fn}: expected floating-point tensors, got {name!r} of {p.dtype}")
        with torch.no_grad():
            self._sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in self._params.items()}
        self.steps = 0
        self._handle = None
        if optimizer is not None:
            self._handle = optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        """Adds this step's importance from every tensor's current ``.grad`` (None: nothing)."""
        for name, p in self._params.items():
            g = p.grad
            if g is None:
                continue
            if not bool(torch.isfinite(kd.local(g)).all()):
                # checked before any buffer changes: a step with a NaN/Inf gradient (an fp16 overflow the
                # scaler will skip) must not poison the sums already held
                raise ValueError(
                    f"koopfast.criteria.ScoreAccumulator.update: the gradient of {name!r} holds NaN or Inf; "
                    "nothing was added (call update() only for steps the optimizer takes)"
                )
        for name, p in self._params.items():
            g = p.grad
            if g is None:
                continue
            s, g = self._sums[name], g.float()
            if self.kind == "fisher":
                s.addcmul_(g, g)
                continue
            t = p.detach().float() * g
            if self.kind == "taylor":
                s.add_(t.abs_())
            else:
                s.addcmul_(t, t)
        self.steps += 1

    def scores(self) -> AccumulatedScores:
        """The sums so far (copies: training on does not change them)."""
        return AccumulatedScores({name: s.clone() for name, s in self._sums.items()}, kind=self.kind, steps=self.steps)

    def reset(self) -> None:
        with torch.no_grad():
            for s in self._sums.values():
                s.zero_()
        self.steps = 0

    def close(self) -> None:
        """Removes the optimizer hook (the sums stay readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> ScoreAccumulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
