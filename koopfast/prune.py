"""A faster drop-in for torch.nn.utils.prune's magnitude pruning.

``import koopfast.prune as prune`` can replace ``from torch.nn.utils import prune``:
:func:`global_unstructured`, :func:`l1_unstructured` and :func:`ln_structured` (and the
:class:`L1Unstructured` / :class:`LnStructured` methods) choose their masks with koopfast's exact
selection kernel, and leave the module in the state torch.nn.utils.prune leaves it in: the
parameter moved to ``<name>_orig``, a float ``<name>_mask`` buffer of the parameter's dtype,
``<name> = <name>_orig * <name>_mask`` recomputed by a forward pre-hook that is a torch pruning
method (``CustomFromMask``, ``L1Unstructured``, ``LnStructured`` or a ``PruningContainer`` of them),
so ``prune.remove``, ``prune.is_pruned``, iterative pruning and state dicts work as with torch.
Everything else is torch.nn.utils.prune's own, re-exported.

For the lean representation (weights zeroed in place, no ``_orig`` copy, no float mask, no
forward hook), use :func:`koopfast.masks.global_topk` with :class:`koopfast.masks.Masked`.

Semantics, as torch's: ``amount`` is the number (int) or fraction (float, of the entries not yet
pruned) of entries to prune; a float amount prunes ``round(amount * n)``. Pruning a module
again considers only the entries its mask still keeps (mask == 1).

Documented differences from torch.nn.utils.prune (docs/robustness.md has them as a table):

- ties: among entries with equal ``|score|`` at the threshold, the ones pruned are the last in
  (parameter order, flat index) order; torch.topk's choice among ties is unspecified. Without
  ties the masks are identical.
- NaN scores raise ValueError naming the tensor (torch ranks NaN above everything); a pruned
  entry whose weight is ±inf has the score NaN (inf * 0), like its torch weight.
- :func:`global_unstructured` makes no concatenated copy of the scores (extra memory: the bool
  masks, then what the module state itself needs), works past 2^31 elements, accepts a
  generator of parameters, requires each importance score to have its parameter's shape, and
  raises ValueError (torch: TypeError) for tensors on several devices. The ``mask`` attribute of
  its ``CustomFromMask`` hooks is the ``<name>_mask`` buffer itself, not a slice of one
  concatenated float vector (torch keeps that vector alive as well).
- integer importance scores are ranked in float64 (exact below 2^53, as torch ranks them);
  bool and complex scores raise TypeError (torch.abs rejects them too); ``LnStructured`` needs
  floating-point scores, as torch's norm does.
- a (module, name) pair listed twice counts twice in the budget and its masks compose, as in torch.
- the pruning-method objects (``L1Unstructured``, ``LnStructured``) work on their own
  (``compute_mask``, ``prune``) and pickle as torch's classes: a model pruned here loads where
  koopfast is not installed.
- other pruning methods given to :func:`global_unstructured` (``RandomUnstructured``, custom
  ones) run torch's own implementation.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any, SupportsIndex

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as _torch_prune

from koopfast import ops
from koopfast._torch_compat import pruned_tensor_name, set_pruned_tensor_name
from koopfast.masks.selection import Selection

# torch.nn.utils.prune's own, re-exported so that this module is a drop-in.
BasePruningMethod = _torch_prune.BasePruningMethod
PruningContainer = _torch_prune.PruningContainer
Identity = _torch_prune.Identity
RandomUnstructured = _torch_prune.RandomUnstructured
RandomStructured = _torch_prune.RandomStructured
CustomFromMask = _torch_prune.CustomFromMask
identity = _torch_prune.identity
random_unstructured = _torch_prune.random_unstructured
random_structured = _torch_prune.random_structured
custom_from_mask = _torch_prune.custom_from_mask
remove = _torch_prune.remove
is_pruned = _torch_prune.is_pruned

__all__ = [
    "BasePruningMethod",
    "CustomFromMask",
    "Identity",
    "L1Unstructured",
    "LnStructured",
    "PruningContainer",
    "RandomStructured",
    "RandomUnstructured",
    "custom_from_mask",
    "global_unstructured",
    "identity",
    "is_pruned",
    "l1_unstructured",
    "ln_structured",
    "random_structured",
    "random_unstructured",
    "remove",
]


def _nparams_to_prune(amount: float, n: int, fn: str) -> int:
    """torch's rule: an int amount is a count (at most n), a float a fraction rounded."""
    if isinstance(amount, numbers.Integral):
        if amount > n:
            raise ValueError(f"{fn}: expected amount <= {n} (the number of entries left to prune), got {amount}")
        return int(amount)
    return round(amount * n)


def _check_float(t: Tensor, name: str, fn: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{fn}: expected {name} to be a floating-point tensor, got {t.dtype}")


def _magnitude_scores(t: Tensor, name: str, fn: str) -> Tensor:
    """Scores for koopfast's kernel: floating-point tensors as they are, integer ones (torch accepts
    them) in float64, exact below 2^53; bool and complex raise TypeError, as torch.abs does."""
    if t.is_floating_point():
        return t
    if t.dtype in (torch.bool,) or t.is_complex():
        raise TypeError(f"{fn}: expected {name} to be a real (floating-point or integer) tensor, got {t.dtype}")
    return t.to(torch.float64)


class _PicklesAsTorch:
    """Pickled as torch.nn.utils.prune's own class of the same name: the state (amount, n, dim,
    the tensor name) is the same, and the mask is already computed, so a model pruned with
    koopfast.prune loads where koopfast is not installed."""

    _torch_args: Callable[[], tuple[object, ...]]  # each subclass's torch constructor arguments

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, tuple[object, ...], dict[str, Any]]:
        torch_class = getattr(_torch_prune, type(self).__name__)
        return (torch_class, self._torch_args(), dict(self.__dict__))


class L1Unstructured(_PicklesAsTorch, _torch_prune.L1Unstructured):
    """torch's L1Unstructured with the mask chosen by koopfast's exact selection kernel.

    Prunes the ``amount`` entries of smallest ``|t|``; among ties, the last in flat order. Usable
    on its own (``compute_mask``, ``prune``) as torch's is; pickles as torch's class.
    """

    def _torch_args(self) -> tuple[object, ...]:
        return (self.amount,)

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        fn = "koopfast.prune.L1Unstructured"
        scores = _magnitude_scores(t, "the importance scores", fn)
        n = t.nelement()
        nprune = _nparams_to_prune(self.amount, n, fn)
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if nprune != 0:
            selection = Selection([scores.detach()], "abs", fn, names=[pruned_tensor_name(self) or "t"])
            keep = selection.topk(n - nprune)[0]
            mask.masked_fill_(~keep.view(mask.shape), 0)
        return mask


class LnStructured(_PicklesAsTorch, _torch_prune.LnStructured):
    """torch's LnStructured with the kept channels chosen by koopfast's exact selection kernel.

    Keeps the channels (along ``dim``) of largest L``n`` norm; among ties, the lowest indices.
    """

    def _torch_args(self) -> tuple[object, ...]:
        return (self.amount, self.n, self.dim)

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        fn = "koopfast.prune.LnStructured"
        if t.dim() <= 1:
            raise ValueError(
                f"{fn}: expected a tensor of at least 2 dimensions (channels along dim), got shape {list(t.shape)}"
            )
        if self.dim >= t.dim() or self.dim < -t.dim():
            raise IndexError(f"{fn}: expected dim in [{-t.dim()}, {t.dim() - 1}], got {self.dim}")
        _check_float(t, "the importance scores", fn)
        channels = t.shape[self.dim]
        nprune = _nparams_to_prune(self.amount, channels, fn)
        if nprune == 0:
            return default_mask
        dim = self.dim % t.dim()
        norm = torch.norm(t.detach(), p=self.n, dim=[d for d in range(t.dim()) if d != dim])
        label = f"the L{self.n} norms of {pruned_tensor_name(self) or 't'}"
        keep = Selection([norm], "value", fn, names=[label]).topk(channels - nprune)[0]
        mask = torch.zeros_like(t)
        index = [slice(None)] * t.dim()
        index[dim] = keep
        mask[tuple(index)] = 1
        mask *= default_mask.to(dtype=mask.dtype)
        return mask


def l1_unstructured(module: nn.Module, name: str, amount: float, importance_scores: Tensor | None = None) -> nn.Module:
    """torch.nn.utils.prune.l1_unstructured, with the mask from koopfast's selection kernel."""
    L1Unstructured.apply(module, name, amount=amount, importance_scores=importance_scores)  # type: ignore[no-untyped-call]  # torch leaves apply unannotated
    return module


def ln_structured(
    module: nn.Module, name: str, amount: float, n: float | str, dim: int, importance_scores: Tensor | None = None
) -> nn.Module:
    """torch.nn.utils.prune.ln_structured, with the kept channels from koopfast's selection kernel."""
    LnStructured.apply(module, name, amount, n, dim, importance_scores=importance_scores)  # type: ignore[no-untyped-call]  # torch leaves apply unannotated
    return module


def global_unstructured(
    parameters: Iterable[tuple[nn.Module, str]],
    pruning_method: type[_torch_prune.BasePruningMethod],
    importance_scores: dict[tuple[nn.Module, str], Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """torch.nn.utils.prune.global_unstructured without a concatenated copy of the scores.

    Args:
        parameters: iterable of ``(module, name)`` pairs (a generator is fine).
        pruning_method: ``L1Unstructured`` (torch's or this module's) runs on koopfast's kernel;
            any other method runs torch.nn.utils.prune.global_unstructured itself.
        importance_scores: ``dict[(module, name), Tensor]`` shaped like the parameters; the
            parameters' current values where missing.
        kwargs: the pruning method's arguments, e.g. ``amount`` (int: entries to prune; float in
            [0, 1]: the fraction of the entries still unpruned).

    The ``round(amount * n)`` (or ``amount``) entries of smallest ``|score|`` among the n entries
    not yet pruned in all the parameters together are pruned; the module ends in
    torch.nn.utils.prune's state (see the module documentation for the differences).
    """
    fn = "koopfast.prune.global_unstructured"
    if not isinstance(parameters, Iterable):
        raise TypeError(
            f"{fn}: expected parameters to be an iterable of (module, name) pairs, got {type(parameters).__name__}"
        )
    parameters = list(parameters)
    importance_scores = importance_scores if importance_scores is not None else {}
    if not isinstance(importance_scores, dict):
        raise TypeError(f"{fn}: expected importance_scores to be a dict, got {type(importance_scores).__name__}")
    if pruning_method not in (_torch_prune.L1Unstructured, L1Unstructured):
        _torch_prune.global_unstructured(parameters, pruning_method, importance_scores=importance_scores, **kwargs)
        return
    method = pruning_method(**kwargs)  # validates amount as torch does
    if not parameters:
        raise ValueError(f"{fn}: expected at least one (module, name) pair, got none")

    names: list[str] = []
    scores: list[Tensor] = []
    defaults: list[Tensor | None] = []
    for i, pair in enumerate(parameters):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], nn.Module)):
            raise TypeError(f"{fn}: expected parameters[{i}] to be a (module, name) pair, got {pair!r}")
        module, name = pair
        label = f"parameters[{i}] ({type(module).__name__}.{name})"
        t = getattr(module, name)
        default = getattr(module, name + "_mask", None)
        if default is None and not isinstance(t, nn.Parameter):
            raise TypeError(f"{fn}: expected {label} to be an nn.Parameter (or already pruned), got {type(t).__name__}")
        s = importance_scores.get((module, name), t)
        if not isinstance(s, Tensor) or s.shape != t.shape:
            got = list(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(
                f"{fn}: expected the importance scores of {label} to have its shape {list(t.shape)}, got {got}"
            )
        names.append(label)
        scores.append(_magnitude_scores(s, f"the importance scores of {label}", fn).detach())
        defaults.append(None if default is None else default.detach())

    with torch.no_grad():
        unpruned = [None if d is None else d == 1 for d in defaults]
        n = sum(s.numel() if u is None else int(u.sum()) for s, u in zip(scores, unpruned))
        keep = n - _nparams_to_prune(method.amount, n, fn)
        masks = _keep_among_unpruned(scores, unpruned, defaults, names, keep, fn)
        final = [
            m if d is None or u is None else d.masked_fill(u & ~m, 0) for m, d, u in zip(masks, defaults, unpruned)
        ]
    reparametrized: set[tuple[int, str]] = set()
    for (module, name), mask, default in zip(parameters, final, defaults):
        key = (id(module), name)
        if default is None and key not in reparametrized:
            _reparametrize(module, name, mask)
        else:  # pruned before (or listed twice, as torch allows): torch composes the masks
            _torch_prune.custom_from_mask(module, name, mask=mask)  # type: ignore[no-untyped-call]  # unannotated in torch
        reparametrized.add(key)


def _reparametrize(module: nn.Module, name: str, mask: Tensor) -> None:
    """What ``custom_from_mask(module, name, mask)`` does to a parameter pruned for the first time,
    without its transient all-ones mask and product: ``<name>_orig``, a ``<name>_mask`` buffer
    (the bool mask in the parameter's dtype and layout), ``<name>`` recomputed by a
    ``CustomFromMask`` forward pre-hook whose ``mask`` is that buffer.

    Only public ``nn.Module`` calls (``register_*``, ``delattr``, which removes a parameter or a
    buffer by name) and the one torch internal every pruning method needs, its tensor name
    (:mod:`koopfast._torch_compat`). A failure restores the module as it was."""
    orig = getattr(module, name)
    method = _torch_prune.CustomFromMask(mask=None)
    set_pruned_tensor_name(method, name)
    module.register_parameter(name + "_orig", orig)
    delattr(module, name)  # the parameter: `name` becomes the plain attribute the hook recomputes
    try:
        buffer = torch.empty_like(orig, requires_grad=False).copy_(mask)
        method.mask = buffer
        module.register_buffer(name + "_mask", buffer)
        setattr(module, name, method.apply_mask(module))  # type: ignore[no-untyped-call]  # unannotated in torch
        module.register_forward_pre_hook(method)
    except Exception:
        if name + "_mask" in dict(module.named_buffers(recurse=False)):
            delattr(module, name + "_mask")
        if hasattr(module, name):
            delattr(module, name)
        delattr(module, name + "_orig")
        module.register_parameter(name, orig)
        raise


def _keep_among_unpruned(
    scores: Sequence[Tensor],
    unpruned: Sequence[Tensor | None],
    defaults: Sequence[Tensor | None],
    names: list[str],
    keep: int,
    fn: str,
) -> list[Tensor]:
    """Bool masks keeping the ``keep`` largest ``|score|`` among the unpruned entries.

    Unpruned = all entries of a tensor without a mask, else where its mask == 1. Entries
    already pruned get the score 0 through a second operand (the mask itself when it is a 0/1
    float mask of the scores' dtype, else a 0/1 copy; a stride-0 ones tensor where there is no
    mask), and are never kept: when the threshold is 0, the zero-score ties are handed to the
    unpruned entries in order.
    """
    if all(u is None for u in unpruned):
        return Selection(list(scores), "abs", fn, names=names).topk(keep)
    pairs = []
    for s, u, d in zip(scores, unpruned, defaults):
        if u is None:
            b = torch.ones((), dtype=s.dtype, device=s.device).expand(s.shape)
        elif d is not None and d.dtype == s.dtype and bool(((d == 0) | u).all()):  # d is None only where u is
            b = d
        else:
            b = u.to(s.dtype)
        pairs.append((s, b))
    operands = Selection(pairs, "abs_product", fn, names=names)
    if keep == 0:
        return operands.topk(0)
    threshold, stats = operands.select(keep)
    if float(threshold) > 0:
        return ops.topk_mask(operands.a, operands.b, "abs_product", threshold, stats)
    masks: list[Tensor] = []
    remaining = keep - int(stats[ops.STAT_GREATER])
    for s, b, u in zip(operands.a, operands.b, unpruned):
        score = (s * b).abs()
        m = (score > 0).contiguous()
        zero = score == 0 if u is None else (score == 0) & u
        count = int(zero.sum())
        if remaining >= count:
            m |= zero
            remaining -= count
        elif remaining > 0:
            m.view(-1)[zero.reshape(-1).nonzero()[:remaining, 0]] = True
            remaining = 0
        masks.append(m)
    return masks
