"""Keeping pruned entries exactly zero through training, without a forward hook or a weight copy.

torch.nn.utils.prune keeps ``weight_orig`` and a float mask per tensor and recomputes
``weight = weight_orig * mask`` before every forward (and multiplies the gradient by the mask in
backward). :class:`Masked` instead zeroes the pruned entries of the parameters themselves once,
and then keeps them zero where they could change. Passes per training step, counted:

- gradients are masked before the optimizer uses them: one fused pass over every gradient (one
  kernel launch per device) when ``optimizer.step()`` starts;
- for the optimizers in :data:`ZERO_PRESERVING`, nothing else: their updates are elementwise and
  map a pruned entry (θ = +0, masked g = 0, states zero since construction) to θ = +0 again, with
  any weight decay (L2: g + λθ = 0; decoupled: θ(1 - ηλ) = 0), momentum, Nesterov, AMSGrad or
  ``maximize`` (tests/api/test_masks_training.py checks it per optimizer over many steps);
- for any other optimizer (unknown to this rule, or a subclass that may change the update), and
  for a ``step(closure)`` (its gradients are computed inside the step, after the mask), a second
  fused pass after the step re-masks the parameters and every optimizer state shaped like them.

Masks are held bit-packed: 1/32 of a float32 mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from koopfast import _distributed as kd
from koopfast.masks.apply import fused_apply, match_masks
from koopfast.masks.packed import PackedMask, pack

__all__ = ["ZERO_PRESERVING", "Masked"]

GradMasking = Literal["step", "backward"]

# Optimizers (exact types) whose step keeps a pruned entry at +0 when its gradient is masked and its
# states start at zero: every state is a sum of products with the gradient (momentum, moments),
# a maximum of zeros (AMSGrad), and the update is a multiple of those states or of θ itself.
ZERO_PRESERVING: frozenset[type[torch.optim.Optimizer]] = frozenset(
    {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW}
)


class Masked:
    """Keep the pruned entries of ``model``'s parameters exactly zero through training.

    On construction the parameters named in ``masks`` (and, with an optimizer, their optimizer
    states) are masked in place. Then:

    - gradients are masked before they are used: with ``grads="step"`` (the default with an
      optimizer) all of them in one fused pass when ``optimizer.step()`` starts; with
      ``grads="backward"`` (the default without one) each as soon as backward has accumulated
      it, so that gradient clipping and logging see masked gradients too;
    - with an optimizer, after ``optimizer.step()`` the parameters and every optimizer state
      tensor shaped like its parameter are re-masked in one fused pass, so that pruned entries
      stay +0 whatever the optimizer does (weight decay, optimizers that are not elementwise);
      skipped for the optimizers of :data:`ZERO_PRESERVING` with ``grads="step"`` (their step
      cannot make a pruned entry nonzero; see the module docstring), except for a
      ``step(closure)``. Optimizer states present at construction, or loaded later with
      ``optimizer.load_state_dict``, are masked then.

    Forward passes run the plain model: no hook, no copy of the weights; masks are stored
    packed (8 per byte) on the parameters' devices.

    On CPU, prefer ``Adam``/``AdamW(..., fused=True)``: their default loop takes ``torch.sqrt``
    of the second moment every step, and ``torch.sqrt`` runs several times slower on exact zeros
    (a pruned entry's second moment stays exactly zero): +22 % per step over the dense model for
    a 90 %-pruned MLP, against +8 % with ``fused=True`` (bench/RESULTS.md, issue 15).

    Args:
        model: the model whose parameters are pruned.
        masks: ``dict[parameter name, mask]``, a subset of ``model.named_parameters()``: bool
            tensors (True = keep) or :class:`PackedMask` es, on the parameters' devices.
        optimizer: the optimizer that trains ``model``, if any.
        grads: when gradients are masked, "step" or "backward" (see above).
        remask_after_step: force the pass after each step on (True) or off (False; only safe if
            the optimizer keeps zero entries zero, as above); None (the default) decides by the
            rule above.

    Use :meth:`remove` (or a ``with`` block) to detach the hooks; the parameters stay pruned.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, Tensor | PackedMask],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        grads: GradMasking | None = None,
        remask_after_step: bool | None = None,
    ):
        fn = "koopfast.masks.Masked"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected model to be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{fn}: expected optimizer to be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if grads is None:
            grads = "step" if optimizer is not None else "backward"
        if grads not in ("step", "backward"):
            raise ValueError(f"{fn}: expected grads to be 'step' or 'backward', got {grads!r}")
        if grads == "step" and optimizer is None:
            raise ValueError(f"{fn}: expected an optimizer for grads='step' (or grads='backward'), got none")
        if remask_after_step is not None and not isinstance(remask_after_step, bool):
            raise TypeError(
                f"{fn}: expected remask_after_step to be True, False or None, got {type(remask_after_step).__name__}"
            )
        if remask_after_step is None:
            remask_after_step = not (grads == "step" and type(optimizer) in ZERO_PRESERVING)
        names, params, mask_tensors = match_masks(model, masks, fn)
        if not names:
            raise ValueError(f"{fn}: expected at least one mask, got none")
        self._fn = fn
        self._names = names
        self._params = params
        self._optimizer = optimizer
        self._grads: GradMasking = grads
        self._remask_after_step = bool(remask_after_step) and optimizer is not None
        self._remask_this_step = self._remask_after_step
        # Validates shapes, dtypes and devices, and masks the parameters (and states) before any
        # hook exists: a rejected mask leaves the model and optimizer untouched.
        fused_apply(params, names, mask_tensors, names, list(range(len(params))), fn)
        # DTensor (FSDP2) parameters and masks: each process keeps and applies its own rows.
        packed = pack(
            {
                n: kd.local(m) if m.dtype == torch.bool else PackedMask(m, kd.local(p).shape)
                for n, m, p in zip(names, mask_tensors, params)
            }
        )
        self._packed: dict[str, PackedMask] = packed
        self._bits = [packed[n].bits for n in names]
        self._handles: list[RemovableHandle] = []
        if optimizer is not None:
            self._apply_to_states()
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
            self._handles.append(optimizer.register_load_state_dict_post_hook(lambda *_: self._apply_to_states()))
        if grads == "backward":
            for i, p in enumerate(params):
                if p.requires_grad:
                    # torch leaves Tensor.register_post_accumulate_grad_hook unannotated
                    hook = p.register_post_accumulate_grad_hook(self._grad_hook(i))  # type: ignore[no-untyped-call]
                    self._handles.append(hook)

    @property
    def masks(self) -> dict[str, PackedMask]:
        """The masks, packed, keyed by parameter name (for DTensor parameters: this process's rows)."""
        return dict(self._packed)

    @property
    def grads(self) -> GradMasking:
        return self._grads

    @property
    def remask_after_step(self) -> bool:
        """Whether every ``optimizer.step()`` is followed by the re-masking pass (a closure step always is)."""
        return self._remask_after_step

    def apply_(self) -> None:
        """Re-mask the parameters and, with an optimizer, its per-parameter states, in one fused pass."""
        targets, names, index = list(self._params), list(self._names), list(range(len(self._params)))
        if self._optimizer is not None:
            for name, t, i in self._state_tensors():
                targets.append(t)
                names.append(name)
                index.append(i)
        fused_apply(targets, names, self._bits, self._names, index, self._fn)

    def mask_grads(self) -> None:
        """Mask every gradient that exists, in one fused pass."""
        grads = [(p.grad, n, i) for i, (n, p) in enumerate(zip(self._names, self._params)) if p.grad is not None]
        if grads:
            fused_apply(
                [g for g, _, _ in grads],
                [f"{n}.grad" for _, n, _ in grads],
                self._bits,
                self._names,
                [i for _, _, i in grads],
                self._fn,
            )

    def remove(self) -> None:
        """Detach every hook. The parameters keep their pruned (zero) entries."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Masked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        kept = sum(m.count() for m in self._packed.values())
        total = sum(m.numel for m in self._packed.values())
        return (
            f"Masked({len(self._names)} tensors, {kept}/{total} kept, grads={self._grads!r}, "
            f"optimizer={type(self._optimizer).__name__ if self._optimizer else None}, "
            f"remask_after_step={self._remask_after_step})"
        )

    # ---- internals ----------------------------------------------------------------------------------

    def _before_step(self, _optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._grads == "step":
            self.mask_grads()
        # A closure computes gradients inside the step, after this hook: they reach the update unmasked.
        # (torch passes step's own arguments, the optimizer first.)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        self._remask_this_step = self._remask_after_step or closure is not None

    def _after_step(self, *_: object) -> None:
        if self._remask_this_step:
            self.apply_()

    def _apply_to_states(self) -> None:
        states = self._state_tensors()
        if states:
            fused_apply(
                [t for _, t, _ in states],
                [n for n, _, _ in states],
                self._bits,
                self._names,
                [i for _, _, i in states],
                self._fn,
            )

    def _state_tensors(self) -> list[tuple[str, Tensor, int]]:
        """(name, tensor, mask index) of the optimizer states shaped like their parameters."""
        out: list[tuple[str, Tensor, int]] = []
        assert self._optimizer is not None, "only called with an optimizer"
        state = self._optimizer.state
        for i, (name, p) in enumerate(zip(self._names, self._params)):
            for key, v in state.get(p, {}).items():
                if isinstance(v, Tensor) and v is not p and v.shape == p.shape and v.is_floating_point():
                    out.append((f"{name} (optimizer state {key!r})", v, i))
        return out

    def _grad_hook(self, i: int) -> Callable[[Tensor], None]:
        name, bits = self._names[i], self._bits[i : i + 1]

        def hook(p: Tensor) -> None:
            if p.grad is not None:
                fused_apply([p.grad], [f"{name}.grad"], bits, [name], [0], self._fn)

        return hook
