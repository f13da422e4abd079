"""Keeping pruned entries exactly zero through training, without a forward hook or a weight copy.

torch.nn.utils.prune keeps ``weight_orig`` and a float mask per tensor and recomputes
``weight = weight_orig * mask`` before every forward. :class:`Masked` instead zeroes the pruned
entries of the parameters themselves once, and then keeps them zero at the two moments they
could change: gradients are masked before the optimizer uses them, and after each optimizer step
the parameters and the optimizer's per-parameter states (momentum, Adam moments, ...) are
re-masked in one fused pass. Masks are held bit-packed: 1/32 of a float32 mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from koopfast import _distributed as kd
from koopfast.masks.apply import fused_apply, match_masks
from koopfast.masks.packed import PackedMask, pack

__all__ = ["Masked"]

GradMasking = Literal["step", "backward"]


class Masked:
    """Keep the pruned entries of ``model``'s parameters exactly zero through training.

    On construction the parameters named in ``masks`` (and, with an optimizer, their optimizer
    states) are masked in place. Then:

    - gradients are masked before they are used: with ``grads="step"`` (the default with an
      optimizer) all of them in one fused pass when ``optimizer.step()`` starts; with
      ``grads="backward"`` (the default without one) each as soon as backward has accumulated
      it, so that gradient clipping and logging see masked gradients too;
    - with an optimizer, after every ``optimizer.step()`` the parameters and every optimizer
      state tensor shaped like its parameter are re-masked in one fused pass, so that pruned
      entries stay +0 whatever the optimizer does (weight decay, momentum from before pruning,
      optimizers that are not elementwise).

    Forward passes run the plain model: no hook, no copy of the weights; masks are stored
    packed (8 per byte) on the parameters' devices.

    Args:
        model: the model whose parameters are pruned.
        masks: ``dict[parameter name, mask]``, a subset of ``model.named_parameters()``: bool
            tensors (True = keep) or :class:`PackedMask` es, on the parameters' devices.
        optimizer: the optimizer that trains ``model``, if any.
        grads: when gradients are masked, "step" or "backward" (see above).

    Use :meth:`remove` (or a ``with`` block) to detach the hooks; the parameters stay pruned.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, Tensor | PackedMask],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        grads: GradMasking | None = None,
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
        names, params, mask_tensors = match_masks(model, masks, fn)
        if not names:
            raise ValueError(f"{fn}: expected at least one mask, got none")
        self._fn = fn
        self._names = names
        self._params = params
        self._optimizer = optimizer
        self._grads: GradMasking = grads
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
        self._handles: list = []
        if optimizer is not None:
            self._apply_to_states()
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_()))
            if grads == "step":
                self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.mask_grads()))
        if grads == "backward":
            for i, p in enumerate(params):
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))

    @property
    def masks(self) -> dict[str, PackedMask]:
        """The masks, packed, keyed by parameter name (for DTensor parameters: this process's rows)."""
        return dict(self._packed)

    @property
    def grads(self) -> GradMasking:
        return self._grads

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

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        kept = sum(m.count() for m in self._packed.values())
        total = sum(m.numel for m in self._packed.values())
        return (
            f"Masked({len(self._names)} tensors, {kept}/{total} kept, grads={self._grads!r}, "
            f"optimizer={type(self._optimizer).__name__ if self._optimizer else None})"
        )

    # ---- internals ----------------------------------------------------------------------------------

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
        out = []
        state = self._optimizer.state
        for i, (name, p) in enumerate(zip(self._names, self._params)):
            for key, v in state.get(p, {}).items():
                if isinstance(v, Tensor) and v is not p and v.shape == p.shape and v.is_floating_point():
                    out.append((f"{name} (optimizer state {key!r})", v, i))
        return out

    def _grad_hook(self, i: int):
        name, bits = self._names[i], self._bits[i : i + 1]

        def hook(p: Tensor) -> None:
            if p.grad is not None:
                fused_apply([p.grad], [f"{name}.grad"], bits, [name], [0], self._fn)

        return hook
