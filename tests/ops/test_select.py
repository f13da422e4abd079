"""select_threshold and topk_mask against their float64-exact reference twins, on every device.

Scores are computed in the ops' compute dtype by both sides, so thresholds, counts and masks
must agree exactly, not within a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koopfast as kf
from koopfast import reference

from conftest import DEVICES

SCORES = ["value", "abs", "product", "abs_product", "square_times_abs"]
BINARY = {"product", "abs_product", "square_times_abs"}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CHUNK = 1 << 16  # csrc/common/chunks.h


def check_against_reference(a, b, score, k):
    threshold, stats = kf.ops.select_threshold(a, b, score, k)
    ref_threshold, ref_stats = reference.select_threshold([x.cpu() for x in a], [y.cpu() for y in b], score, k)
    assert threshold.dtype == ref_threshold.dtype
    assert threshold.device == a[0].device and stats.device == a[0].device
    assert stats.tolist() == ref_stats.tolist(), (score, k)
    assert torch.equal(threshold.cpu(), ref_threshold), (threshold, ref_threshold)
    assert not torch.signbit(threshold).item() or threshold.item() != 0, "-0 must be reported as +0"
    masks = kf.ops.topk_mask(a, b, score, threshold, stats)
    ref_masks = reference.topk_mask([x.cpu() for x in a], [y.cpu() for y in b], score, ref_threshold, ref_stats)
    for m, r, x in zip(masks, ref_masks, a):
        assert m.dtype == torch.bool and m.shape == x.shape and m.is_contiguous() and m.device == x.device
        assert torch.equal(m.cpu(), r)
    assert sum(int(m.sum()) for m in masks) == k


def operands(shapes, dtype, device, score, gen):
    a = [(torch.randn(s, generator=gen) * 0.05).to(dtype).to(device) for s in shapes]
    b = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes] if score in BINARY else []
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_matches_reference_over_shapes_and_ranks(device, dtype, score):
    gen = torch.Generator().manual_seed(2)
    shapes = [(3, 5), (1,), (0,), (17, 1, 3), (CHUNK + 1,), (2, CHUNK // 2 - 1), ()]
    a, b = operands(shapes, dtype, device, score, gen)
    n = sum(x.numel() for x in a)
    for k in (1, 2, n // 3, n // 2 + 1, n - 1, n):
        check_against_reference(a, b, score, k)


@pytest.mark.parametrize("size", [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7])
def test_chunk_boundaries(device, size):
    gen = torch.Generator().manual_seed(size)
    a = [torch.randn(size, generator=gen).to(device), torch.randn(5, generator=gen).to(device)]
    for k in (1, size // 2, size + 5):
        check_against_reference(a, [], "abs", k)


def test_non_contiguous_operands(device):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 40, 9, generator=gen).to(device)
    other = torch.randn(9, 40, 6, generator=gen).to(device)
    a = [
        base.transpose(0, 2),  # permuted
        base[:, ::3, 1:],  # sliced with steps
        torch.randn(1, 7, generator=gen).to(device).expand(5, 7),  # stride 0
        torch.randn(2, 3, 4, 5, generator=gen).to(device).to(memory_format=torch.channels_last),
    ]
    b = [
        other,  # contiguous partner of a permuted a
        other.transpose(0, 2)[:, ::3, 1:],
        torch.randn(5, 7, generator=gen).to(device),
        torch.randn(2, 3, 4, 5, generator=gen).to(device).transpose(1, 3).contiguous().transpose(1, 3),
    ]
    n = sum(x.numel() for x in a)
    for score in SCORES:
        for k in (1, n // 4, n):
            check_against_reference(a, b if score in BINARY else [], score, k)


def test_many_strided_dimensions_fall_back_to_a_copy(device):
    x = torch.randn([2] * 10, device=device).permute(*reversed(range(10)))  # 10 non-mergeable dims
    check_against_reference([x], [], "value", 300)


@pytest.mark.parametrize("score", ["value", "abs", "product"])
def test_heavy_ties_zeros_and_infinities(device, score):
    gen = torch.Generator().manual_seed(4)
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf"), 1e-30])
    a = [pool[torch.randint(len(pool), s, generator=gen)].to(device) for s in [(50,), (7, 3), (CHUNK + 3,)]]
    b = [pool[torch.randint(2, 5, x.shape, generator=gen)].to(device) for x in a] if score in BINARY else []
    n = sum(x.numel() for x in a)
    for k in (1, 10, n // 7, n // 2, n - 3, n):
        check_against_reference(a, b, score, k)


def test_all_equal_scores_keep_the_first_in_order(device):
    a = [
        torch.full((5, 4), 0.5, device=device),
        torch.full((3,), -0.5, device=device),
        torch.full((9,), 0.5, device=device),
    ]
    threshold, stats = kf.ops.select_threshold(a, [], "abs", 22)
    assert threshold.item() == 0.5 and stats.tolist() == [0, 32, 22, -1]
    masks = kf.ops.topk_mask(a, [], "abs", threshold, stats)
    assert masks[0].all()
    assert masks[1].tolist() == [True, True, False]  # 20 + 2 = 22: ties go in parameter order
    assert not masks[2].any()
    check_against_reference(a, [], "abs", 22)


def test_negative_and_positive_zero_are_one_value(device):
    a = [torch.tensor([-0.0, 0.0, -0.0, 1.0], device=device)]
    threshold, stats = kf.ops.select_threshold(a, [], "value", 3)
    assert threshold.item() == 0.0 and not torch.signbit(threshold).item()
    assert stats.tolist() == [1, 3, 2, -1]
    assert kf.ops.topk_mask(a, [], "value", threshold, stats)[0].tolist() == [True, True, False, True]


def test_nan_reports_the_first_tensor_holding_one(device):
    a = [
        torch.ones(4, device=device),
        torch.tensor([1.0, float("nan")], device=device),
        torch.tensor([float("nan")], device=device),
    ]
    threshold, stats = kf.ops.select_threshold(a, [], "abs", 2)
    assert torch.isnan(threshold).item() and int(stats[3]) == 1
    # NaN produced by the score itself: inf * 0
    a = [torch.ones(3, device=device), torch.tensor([float("inf")], device=device)]
    b = [torch.ones(3, device=device), torch.tensor([0.0], device=device)]
    assert int(kf.ops.select_threshold(a, b, "abs_product", 1)[1][3]) == 1


def test_mixed_dtypes_compute_in_float64_when_any_is_float64(device):
    a = [
        torch.randn(100, device=device),
        torch.randn(50, device=device).double(),
        torch.randn(30, device=device).half(),
    ]
    threshold, _ = kf.ops.select_threshold(a, [], "abs", 40)
    assert threshold.dtype == torch.float64
    check_against_reference(a, [], "abs", 40)


def test_results_do_not_depend_on_the_thread_count():
    pool = torch.tensor([1.0, 2.0, 3.0])
    a = [pool[torch.randint(3, (CHUNK * 3 + 11,))], pool[torch.randint(3, (1000,))]]
    n = sum(x.numel() for x in a)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            thr, stats = kf.ops.select_threshold(a, [], "value", n // 2)
            results.append(
                (thr.item(), stats.tolist(), [m.clone() for m in kf.ops.topk_mask(a, [], "value", thr, stats)])
            )
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert r[0] == results[0][0] and r[1] == results[0][1]
        assert all(torch.equal(x, y) for x, y in zip(r[2], results[0][2]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_random_lists(data):
    """Random shapes, values with many ties, -0, ±inf; random k and score; every device."""
    n_tensors = data.draw(st.integers(1, 6))
    shapes = [tuple(data.draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))) for _ in range(n_tensors)]
    dtype = data.draw(st.sampled_from(DTYPES))
    score = data.draw(st.sampled_from(SCORES))
    values = st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, -2.0, 0.5, float("inf"), float("-inf")]), st.floats(-1e3, 1e3, width=16)
    )
    a = [
        torch.tensor(data.draw(st.lists(values, min_size=_numel(s), max_size=_numel(s))), dtype=torch.float64)
        .reshape(s)
        .to(dtype)
        for s in shapes
    ]
    b = (
        [
            torch.tensor(data.draw(st.lists(values, min_size=_numel(s), max_size=_numel(s))), dtype=torch.float64)
            .reshape(s)
            .to(dtype)
            for s in shapes
        ]
        if score in BINARY
        else []
    )
    n = sum(x.numel() for x in a)
    if n == 0:
        return
    if any(bool(torch.isnan(s).any()) for s in reference.scores_of(a, b, score)):  # inf*0 etc.
        assert int(kf.ops.select_threshold(a, b, score, 1)[1][3]) >= 0
        return
    k = data.draw(st.integers(1, n))
    for device in DEVICES:
        check_against_reference([x.to(device) for x in a], [y.to(device) for y in b], score, k)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_compiles_fullgraph(device):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def top(x, y, g):
        threshold, stats = kf.ops.select_threshold([x, y], [g, g[: y.shape[0]]], "abs_product", 9)
        return kf.ops.topk_mask([x, y], [g, g[: y.shape[0]]], "abs_product", threshold, stats)

    x, y, g = torch.randn(20, device=device), torch.randn(12, device=device), torch.randn(20, device=device)
    g = g[: x.shape[0]]
    masks = top(x, y, g)
    eager = kf.ops.topk_mask(
        [x, y], [g, g[:12]], "abs_product", *kf.ops.select_threshold([x, y], [g, g[:12]], "abs_product", 9)
    )
    assert all(torch.equal(m, e) for m, e in zip(masks, eager))


# ---- errors -----------------------------------------------------------------------------------------


def test_errors_name_the_op_the_argument_and_what_came(device):
    x = torch.randn(4, device=device)
    with pytest.raises(
        ValueError, match=r"select_threshold: expected a to be a non-empty list of tensors, got an empty list"
    ):
        kf.ops.select_threshold([], [], "abs", 1)
    with pytest.raises(ValueError, match=r"expected score to be one of .*got 'magnitude'"):
        kf.ops.select_threshold([x], [], "magnitude", 1)
    with pytest.raises(ValueError, match=r"expected k in \[1, 4\] .*got 5"):
        kf.ops.select_threshold([x], [], "abs", 5)
    with pytest.raises(ValueError, match=r"expected k in \[1, 4\] .*got 0"):
        kf.ops.select_threshold([x], [], "abs", 0)
    with pytest.raises(ValueError, match=r"expected at least one element in a, got only empty tensors"):
        kf.ops.select_threshold([x[:0]], [], "abs", 1)
    with pytest.raises(TypeError, match=r"expected a\[0\] to be float16, bfloat16, float32 or float64, got Long"):
        kf.ops.select_threshold([torch.ones(3, dtype=torch.long, device=device)], [], "abs", 1)
    with pytest.raises(
        ValueError, match=r"expected b to hold one tensor per tensor of a \(1\) for score 'product', got 0"
    ):
        kf.ops.select_threshold([x], [], "product", 1)
    with pytest.raises(ValueError, match=r"expected b to be empty for the unary score 'abs', got 1 tensors"):
        kf.ops.select_threshold([x], [x], "abs", 1)
    with pytest.raises(ValueError, match=r"expected b\[0\] to have the shape of a\[0\] \[4\], got \[5\]"):
        kf.ops.select_threshold([x], [torch.ones(5, device=device)], "product", 1)
    with pytest.raises(TypeError, match=r"expected b\[0\] to have the dtype of a\[0\] \(Float\), got Double"):
        kf.ops.select_threshold([x], [x.double()], "product", 1)
    threshold, stats = kf.ops.select_threshold([x], [], "abs", 2)
    with pytest.raises(TypeError, match=r"topk_mask: expected threshold to be Float"):
        kf.ops.topk_mask([x], [], "abs", threshold.double(), stats)
    with pytest.raises(ValueError, match=r"topk_mask: expected stats to have shape \[4\], got \[3\]"):
        kf.ops.topk_mask([x], [], "abs", threshold, stats[:3])


def test_mixed_devices_are_rejected():
    if len(DEVICES) < 2:
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match=r"expected all tensors on one device, got a\[0\] on cpu and a\[1\] on cuda"):
        kf.ops.select_threshold([torch.ones(2), torch.ones(2, device="cuda")], [], "abs", 1)


def test_mask_rejects_stats_reporting_nan(device):
    a = [torch.tensor([1.0, float("nan")], device=device)]
    threshold, stats = kf.ops.select_threshold(a, [], "abs", 1)
    with pytest.raises(ValueError, match=r"expected stats of NaN-free scores, got stats reporting NaN in a\[0\]"):
        kf.ops.topk_mask(a, [], "abs", threshold, stats)


@pytest.mark.parametrize("ties_kept", [-1, 3])
def test_mask_rejects_stats_keeping_more_ties_than_there_are(device, ties_kept):
    a = [torch.tensor([1.0, 2.0, 2.0, 3.0], device=device)]
    threshold, stats = kf.ops.select_threshold(a, [], "abs", 2)
    assert stats.tolist()[1:] == [2, 1, -1]  # one of two ties at 2.0 kept
    stats[2] = ties_kept
    with pytest.raises(ValueError, match=rf"expected stats with 0 <= ties kept <= ties, got {ties_kept} and 2"):
        kf.ops.topk_mask(a, [], "abs", threshold, stats)
