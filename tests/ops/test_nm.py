"""nm_masks (semi-structured N:M masks) against its reference twin on every device: exact, for
every group, with ties, odd sizes, strides, every dtype and score kind; NaN reported."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast import reference

from conftest import DEVICES

SCORES = ["value", "abs", "product", "abs_product", "square_times_abs"]
BINARY = {"product", "abs_product", "square_times_abs"}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def check(a, b, score, n, m):
    masks, status = kf.ops.nm_masks(a, b, score, n, m)
    ref, ref_status = reference.nm_masks([x.cpu() for x in a], [y.cpu() for y in b], score, n, m)
    assert status.tolist() == ref_status.tolist() == [-1]
    for mask, r, x in zip(masks, ref, a):
        assert mask.dtype == torch.bool and mask.shape == x.shape and mask.is_contiguous() and mask.device == x.device
        assert torch.equal(mask.cpu(), r), (score, n, m, x.shape)
        cols = x.shape[1]
        for c0 in range(0, cols, m):  # exactly min(n, group size) kept in every group
            assert (mask[:, c0 : c0 + m].sum(1) == min(n, len(range(c0, min(c0 + m, cols))))).all()
    return masks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_matches_the_reference_for_every_dtype_and_score(device, dtype, score):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 16), (1, 5), (3, 13), (0, 8), (4, 0)]
    a = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    b = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes] if score in BINARY else []
    for n, m in [(2, 4), (4, 8), (1, 1), (0, 4), (3, 3), (5, 16)]:
        check(a, b, score, n, m)


@pytest.mark.parametrize("m", [2, 4, 8, 32])
def test_ties_keep_the_lower_column_and_every_group_keeps_exactly_n(device, m):
    g = torch.Generator().manual_seed(1)
    few_values = torch.randint(-2, 3, (9, 4 * m + 3), generator=g).double().to(device)
    few_values[0] = 0.0
    few_values[1, ::2] = -0.0  # -0 and +0 are one value
    masks = check([few_values], [], "abs", m // 2, m)
    assert masks[0][0, :m].tolist() == [True] * (m // 2) + [False] * (m - m // 2)


def test_non_contiguous_views_and_a_conv1d_style_transpose(device):
    w = torch.randn(12, 10, device=device, dtype=torch.float64)
    check([w.t(), w[::2, 1:], w.t()[:, ::3]], [], "value", 2, 4)


def test_float64_selection_is_exact_where_float32_would_tie(device):
    x = torch.tensor([[1.0, 1.0 + 2**-40, 1.0, 1.0]], dtype=torch.float64, device=device)
    masks, _ = kf.ops.nm_masks([x], [], "value", 1, 4)
    assert masks[0].tolist() == [[False, True, False, False]]


def test_nan_scores_are_reported_by_tensor_index(device):
    x = torch.randn(3, 8, device=device)
    y = x.clone()
    y[2, 5] = float("nan")
    _, status = kf.ops.nm_masks([x, y, y], [], "abs", 2, 4)
    assert status.tolist() == [1]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([torch.zeros(4)], [], "abs", 2, 4), "2-D"),
        (([torch.zeros(2, 4)], [], "abs", 5, 4), "expected n"),
        (([torch.zeros(2, 4)], [], "abs", -1, 4), "expected n"),
        (([torch.zeros(2, 4)], [], "abs", 0, 0), "expected m"),
        (([torch.zeros(2, 4)], [], "abs", 1, 2000), "expected m"),
        (([torch.zeros(2, 4)], [torch.zeros(2, 4)], "abs", 2, 4), "empty"),
        (([torch.zeros(2, 4, dtype=torch.int32)], [], "abs", 2, 4), "float"),
        (([], [], "abs", 2, 4), "non-empty"),
    ],
)
def test_bad_arguments_raise_naming_the_op(args, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        kf.ops.nm_masks(*args)
    assert "nm_masks" in str(info.value)


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs CUDA")
def test_cpu_and_cuda_masks_are_equal():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(257, 1031, generator=g)
    cpu, _ = kf.ops.nm_masks([w], [], "abs", 2, 4)
    gpu, _ = kf.ops.nm_masks([w.cuda()], [], "abs", 2, 4)
    assert torch.equal(cpu[0], gpu[0].cpu())
