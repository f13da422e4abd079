"""Sample inputs for every registered koopfast op, used by opcheck and the registration meta-test.

Every op registered under ``koopfast::`` must have an entry here (tests/test_registration.py
fails otherwise). Each entry maps a device to a list of argument tuples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import koopfast as kf


def _select_samples(device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    a = [
        torch.randn(7, 5, generator=g).to(device),
        torch.randn(3, generator=g).to(device),
        torch.randn(4, 6, generator=g).to(device).t(),
    ]
    b = [torch.randn(x.shape, generator=g).to(device) for x in a]
    return [
        (a, [], "abs", 10),
        (a, b, "abs_product", 1),
        ([a[0].double()], [], "value", 35),
        ([a[1].half(), a[0].bfloat16()], [b[1].half(), b[0].bfloat16()], "square_times_abs", 3),
    ]


def _mask_samples(device: str) -> list[tuple]:
    out = []
    for a, b, score, k in _select_samples(device):
        threshold, stats = kf.ops.select_threshold(a, b, score, k)
        out.append((a, b, score, threshold, stats))
    return out


# ---- masks ------------------------------------------------------------------------------------------


def _bool_masks(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [
        (torch.rand(7, 5, generator=g) < 0.4).to(device),
        (torch.rand(3, generator=g) < 0.5).to(device),
        (torch.rand(6, 4, generator=g) < 0.5).to(device).t(),  # non-contiguous
        torch.ones(0, 2, dtype=torch.bool, device=device),
    ]


def _pack_samples(device: str) -> list[tuple]:
    return [(_bool_masks(device),), ([_bool_masks(device)[2]],)]


def _unpack_samples(device: str) -> list[tuple]:
    masks = _bool_masks(device)
    return [(kf.ops.pack_masks(masks), [m.numel() for m in masks])]


def _count_samples(device: str) -> list[tuple]:
    masks = _bool_masks(device)
    packed = kf.ops.pack_masks(masks)
    return [(masks, [m.numel() for m in masks]), ([packed[0], masks[1]], [35, 3])]


def _apply_samples(device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(3)
    masks = _bool_masks(device)
    packed = kf.ops.pack_masks(masks)
    targets = [torch.randn(m.shape, generator=g).to(device) for m in masks]
    grads = [torch.randn(m.shape, generator=g).to(device).to(torch.bfloat16) for m in masks[:2]]
    return [
        (targets, masks, [0, 1, 2, 3]),
        (targets[:2] + grads, packed[:2], [0, 1, 0, 1]),
        ([torch.randn(6, 4, generator=g).double().to(device).t()], [masks[2]], [0]),
    ]


SAMPLES: dict[str, Callable[[str], list[tuple]]] = {
    "select_threshold": _select_samples,
    "topk_mask": _mask_samples,
    "pack_masks": _pack_samples,
    "unpack_masks": _unpack_samples,
    "count_masks": _count_samples,
    "apply_masks": _apply_samples,
}
