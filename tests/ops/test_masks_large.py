"""Index math past 2^31 elements in the mask kernels (CPU): one tensor, and many tensors."""

from __future__ import annotations

import re

import pytest
import torch

import koopfast as kf

BIG = (1 << 31) + 4136  # > 2^31 elements, a multiple of 8


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) / 2**20


@pytest.mark.slow
def test_pack_count_unpack_one_mask_of_more_than_2_31_elements():
    m = BIG // 3 + 5
    mask = torch.tensor([True, False, True]).reshape(3, 1).expand(3, m)  # stride 0: no memory
    n = mask.numel()
    (packed,) = kf.ops.pack_masks([mask])
    assert packed.numel() == (n + 7) // 8
    assert kf.ops.count_masks([packed], [n]).tolist() == [2 * m]
    assert kf.ops.count_masks([mask], [n]).tolist() == [2 * m]
    # bit i is element i of the flattened mask: True below m, False in [m, 2m), True from 2m
    for i in (0, m - 1, m, 2 * m - 1, 2 * m, n - 1):
        assert bool((int(packed[i // 8]) >> (i % 8)) & 1) == (i < m or i >= 2 * m), i
    (unpacked,) = kf.ops.unpack_masks([packed], [n])
    assert bool(unpacked[:m].all()) and not bool(unpacked[m : 2 * m].any()) and bool(unpacked[2 * m :].all())


@pytest.mark.slow
def test_apply_to_one_tensor_of_more_than_2_31_elements():
    if available_gib() < 10:
        pytest.skip("needs about 5 GiB of free memory")
    pattern = torch.tensor([True, False, False, True, True, False, True, False])
    mask = pattern.expand(BIG // 8, 8)  # stride 0 along the rows
    x = torch.ones(BIG // 8, 8, dtype=torch.bfloat16)  # 4.3 GB
    for given in (mask, kf.ops.pack_masks([mask])[0]):
        x.fill_(1.0)
        kf.ops.apply_masks([x], [given], [0])
        edges = torch.tensor([0, (1 << 31) // 8 - 1, (1 << 31) // 8, BIG // 8 - 1])  # both sides of element 2^31
        rows = torch.cat([edges, torch.randint(BIG // 8, (100_000,))])
        assert torch.equal(x[rows], pattern.to(x.dtype).expand(len(rows), 8))


@pytest.mark.slow
def test_more_than_2_31_elements_over_many_tensors():
    base = torch.rand(1 << 24) < 0.25
    copies = 130  # 130 * 2^24 > 2^31 elements: views of one storage
    masks = [base] * copies
    numels = [base.numel()] * copies
    packed = kf.ops.pack_masks(masks)
    assert all(torch.equal(p, packed[0]) for p in packed)
    counts = kf.ops.count_masks(packed, numels)
    assert counts.tolist() == [int(base.sum())] * copies
    x = torch.randn(1 << 24)
    kf.ops.apply_masks([x], packed[-1:], [0])  # the last mask's table entries sit past 2^31 elements
    assert torch.equal(x != 0, base)
