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


def _select_per_tensor_samples(device: str) -> list[tuple]:
    out = []
    for a, b, score, _ in _select_samples(device):
        k = [min(t.numel(), 2 + i) for i, t in enumerate(a)]
        out.append((a, b, score, k))
        out.append((a, b, score, [0] * len(a)))
    empty = torch.empty(0, device=device)
    out.append(([empty, torch.ones(3, device=device)], [], "value", [0, 2]))  # an empty tensor; ties
    return out


def _mask_per_tensor_samples(device: str) -> list[tuple]:
    out = []
    for a, b, score, k in _select_per_tensor_samples(device):
        thresholds, stats = kf.ops.select_threshold_per_tensor(a, b, score, k)
        out.append((a, b, score, thresholds, stats))
    return out


def _trajectory_buffers(device: str):
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(3, 4, generator=g).to(device), torch.randn(5, generator=g).to(device).half()]
    n = sum(p.numel() for p in params)
    out = []
    for dtype, anchor in [(torch.float32, None), (torch.bfloat16, torch.randn(n, generator=g).to(device))]:
        out.append((params, torch.randn(4, n, generator=g).to(device=device, dtype=dtype), anchor))
    return out


def _ingest_samples(device: str) -> list[tuple]:
    return [(params, snapshots, 2, [0, 3], anchor) for params, snapshots, anchor in _trajectory_buffers(device)]


def _combine_samples(device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _, snapshots, anchor in _trajectory_buffers(device):
        out.append((snapshots, torch.randn(4, 2, dtype=torch.float64, generator=g).to(device), anchor, False))
        out.append((snapshots, torch.randn(4, 1, dtype=torch.complex128, generator=g).to(device), anchor, True))
    return out


def _dots_samples(device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(4)
    return [
        (snapshots, torch.randn(3, snapshots.shape[1], generator=g).to(device), anchor)
        for _, snapshots, anchor in _trajectory_buffers(device)
    ]


def _sign_codes_samples(device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 7, 3, generator=g).to(device)  # 63 bits per unit along dim 1
    return [
        (x, 1),
        (x.to(memory_format=torch.channels_last), 1),
        (x.double().transpose(0, 2), -1),
        (torch.randn(130, 4, generator=g).to(device).half(), 1),
        (torch.randn(2, 33, generator=g).to(device).bfloat16() > 0, 0),
    ]


def _codes(device: str, units: int, words: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (units, words), generator=g, dtype=torch.int64).to(device)


def _hamming_samples(device: str) -> list[tuple]:
    a = [_codes(device, 5, 3, 1), _codes(device, 1, 70, 2), _codes(device, 4, 9, 3)[:, ::2]]
    b = [_codes(device, *x.shape, 4) for x in a]
    return [(a, b), (a, [])]


def _pairwise_samples(device: str) -> list[tuple]:
    return [(_codes(device, 17, 5, 5),), (_codes(device, 3, 40, 6)[:, 1::3],), (_codes(device, 1, 1, 7),)]


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


def _nm_samples(device: str) -> list[tuple]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 8, generator=g).to(device)
    b = torch.randn(6, 8, generator=g).to(device)
    return [
        ([w], [], "abs", 2, 4),
        ([w.t(), w[:, :7].double()], [], "value", 1, 3),  # strided, a trailing partial group, float64
        ([w.half()], [b.half()], "abs_product", 4, 8),
    ]


SAMPLES: dict[str, Callable[[str], list[tuple]]] = {
    "nm_masks": _nm_samples,
    "select_threshold": _select_samples,
    "topk_mask": _mask_samples,
    "select_threshold_per_tensor": _select_per_tensor_samples,
    "topk_mask_per_tensor": _mask_per_tensor_samples,
    "trajectory_ingest": _ingest_samples,
    "trajectory_combine": _combine_samples,
    "trajectory_dots": _dots_samples,
    "sign_codes": _sign_codes_samples,
    "hamming_distance": _hamming_samples,
    "pairwise_hamming": _pairwise_samples,
    "pack_masks": _pack_samples,
    "unpack_masks": _unpack_samples,
    "count_masks": _count_samples,
    "apply_masks": _apply_samples,
}
