"""Applying masks in place: pruned entries of many tensors set to +0 in one fused pass."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from koopfast import _distributed as kd
from koopfast import ops
from koopfast.masks.packed import MaskLike, PackedMask
from koopfast.prunable import resolve_names

__all__ = ["apply_"]

# What masks apply to, and the masks in the same structure (see :func:`match_masks`).
Targets = nn.Module | Mapping[str, Tensor] | Sequence[Tensor] | Tensor
Masks = Mapping[str, MaskLike] | Sequence[MaskLike] | MaskLike
_T = TypeVar("_T", bound=Targets)


def _mask_tensor(mask: object, target: Tensor, name: str, fn: str) -> Tensor:
    """The tensor the kernel takes for one mask: a bool tensor, or the bytes of a packed one."""
    if isinstance(mask, PackedMask):
        if mask.shape != target.shape:
            raise ValueError(
                f"{fn}: expected the mask of {name!r} to have its shape {list(target.shape)}, "
                f"got a PackedMask of shape {list(mask.shape)}"
            )
        return mask.bits
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{fn}: expected the mask of {name!r} to be a tensor or a PackedMask, got {type(mask).__name__}"
        )
    return mask


def match_masks(target: Targets, masks: Masks, fn: str) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """(names, tensors, mask tensors) of the tensors of ``target`` that ``masks`` names.

    target: a model (masks keyed by parameter names, a subset of them; an alias of a tied parameter
    names it, and two names of one parameter raise), a dict of tensors (masks
    keyed by a subset of its keys), a list of tensors (a list of masks, one each) or one tensor.
    """
    if isinstance(target, (nn.Module, Mapping)):
        tensors = dict(target.named_parameters()) if isinstance(target, nn.Module) else dict(target)
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"{fn}: expected masks as a dict keyed by {'parameter' if isinstance(target, nn.Module) else 'tensor'} "
                f"names, got {type(masks).__name__}"
            )
        if isinstance(target, nn.Module):  # aliases of tied parameters name their canonical tensor
            names = resolve_names(target, masks, fn=fn, what="mask names")
        else:
            unknown = [k for k in masks if k not in tensors]
            if unknown:
                raise ValueError(
                    f"{fn}: expected mask names among the tensor names, got unknown {sorted(map(str, unknown))}"
                )
            names = [str(k) for k in masks]
        chosen = [tensors[k] for k in names]
        given: list[object] = list(masks.values())
    elif isinstance(target, Tensor):
        names, chosen, given = ["tensor"], [target], [masks]
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if not isinstance(masks, Sequence) or isinstance(masks, (str, Tensor)) or len(masks) != len(target):
            got = f"{len(masks)} masks" if isinstance(masks, Sequence) else type(masks).__name__
            raise ValueError(f"{fn}: expected a list of {len(target)} masks, one per tensor, got {got}")
        names, chosen, given = [f"tensors[{i}]" for i in range(len(target))], list(target), list(masks)
    else:
        raise TypeError(
            f"{fn}: expected a model, a dict of tensors, a list of tensors or a tensor, got {type(target).__name__}"
        )
    for name, t in zip(names, chosen):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: expected {name!r} to be a tensor, got {type(t).__name__}")
    mask_tensors = [_mask_tensor(m, t, n, fn) for m, t, n in zip(given, chosen, names)]
    return names, chosen, mask_tensors


def fused_apply(
    targets: Sequence[Tensor],
    target_names: Sequence[str],
    masks: Sequence[Tensor],
    mask_names: Sequence[str],
    mask_index: Sequence[int],
    fn: str,
) -> None:
    """One ``apply_masks`` call per device, under no_grad, with the op's errors in the caller's names.

    The op validates all its arguments before writing anything; with tensors on several devices,
    the masks of later devices are checked here first, so a failing call changes nothing.
    """
    # DTensor shards (FSDP2): each process zeroes its local rows with its local rows of the masks.
    targets = [kd.local(t) for t in targets]
    masks = [kd.local(m) for m in masks]
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t.device, []).append(i)
    if len(groups) > 1:
        _precheck(targets, target_names, masks, mask_index, fn)
    with torch.no_grad():
        for idx in groups.values():
            used = sorted({mask_index[i] for i in idx})
            local = {j: k for k, j in enumerate(used)}
            try:
                ops.apply_masks(
                    [targets[i] for i in idx], [masks[j] for j in used], [local[mask_index[i]] for i in idx]
                )
            except (ValueError, TypeError) as exc:
                names = {"targets": [target_names[i] for i in idx], "masks": [mask_names[j] for j in used]}
                raise rename(exc, fn, names) from None


def _precheck(
    targets: Sequence[Tensor],
    target_names: Sequence[str],
    masks: Sequence[Tensor],
    mask_index: Sequence[int],
    fn: str,
) -> None:
    """What the op would reject, checked for every device group before any of them is written."""
    for t, name, j in zip(targets, target_names, mask_index):
        m = masks[j]
        if m.device != t.device:
            raise ValueError(f"{fn}: expected the mask of {name!r} on its device {t.device}, got {m.device}")
        if not t.is_floating_point() or t.is_complex():
            raise TypeError(f"{fn}: expected {name!r} to be float16, bfloat16, float32 or float64, got {t.dtype}")
        packed_ok = m.dtype == torch.uint8 and m.dim() == 1 and m.numel() == (t.numel() + 7) // 8
        if not (packed_ok or (m.dtype == torch.bool and m.shape == t.shape)):
            raise ValueError(
                f"{fn}: expected the mask of {name!r} to be bool of shape {list(t.shape)} or packed "
                f"(uint8 of shape [{(t.numel() + 7) // 8}]), got {m.dtype} of shape {list(m.shape)}"
            )


def rename(exc: Exception, fn: str, names: Mapping[str, Sequence[str]]) -> Exception:
    """The op's error with list[i] references replaced by the caller's names."""
    msg = re.sub(r"^koopfast::\w+: ", "", str(exc).split("\n")[0])

    def sub(m: re.Match[str]) -> str:
        arg, i = m.group(1), int(m.group(2))
        if i >= len(names[arg]):
            whole: str = m.group(0)
            return whole
        return repr(names[arg][i]) if arg != "masks" else f"the mask of {names[arg][i]!r}"

    pattern = r"\b(" + "|".join(map(re.escape, names)) + r")\[(\d+)\]"
    return type(exc)(f"{fn}: " + re.sub(pattern, sub, msg))


def apply_(model_or_tensors: _T, masks: Masks) -> _T:
    """Zero the pruned entries of a model's parameters (or of given tensors) in place.

    One fused pass over all tensors (one kernel launch per device), under ``torch.no_grad()``.
    Pruned entries become exactly +0 (also where they held NaN, an infinity or -0); kept entries
    are not touched.

    Args:
        model_or_tensors: a model (``masks`` keyed by parameter names, any subset of them; the alias of a
            tied parameter, such as ``lm_head.weight``, names the tensor once), a
            dict of tensors (``masks`` keyed by a subset of its keys), a list of tensors (a list
            of masks, one each) or a single tensor (a single mask).
        masks: bool tensors (True = keep) shaped like their tensors, :class:`PackedMask` es, or
            packed bytes (1-D uint8, ``ceil(numel / 8)``); on the tensors' devices.

    Returns:
        ``model_or_tensors``.

    Raises:
        ValueError: unknown names, a mask whose shape does not match, masks on another device.
        TypeError: masks that are not bool / packed, tensors that are not floating-point.
    """
    fn = "koopfast.masks.apply_"
    names, tensors, mask_tensors = match_masks(model_or_tensors, masks, fn)
    fused_apply(tensors, names, mask_tensors, names, list(range(len(tensors))), fn)
    return model_or_tensors
