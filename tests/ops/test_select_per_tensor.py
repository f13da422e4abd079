"""select_threshold_per_tensor and topk_mask_per_tensor against their reference twins, on every device.

Each tensor is selected alone (its own k, its own ties), all tensors in one call; results must
agree exactly with the twin and with select_threshold/topk_mask run on each tensor by itself.
"""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast import reference

SCORES = ["value", "abs", "product", "abs_product", "square_times_abs"]
BINARY = {"product", "abs_product", "square_times_abs"}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CHUNK = 1 << 16  # csrc/common/chunks.h
SAMPLED = 1 << 18  # the CPU select samples tensors of this size (from 2^14 on, where the sample is narrow)
OWN_THREADS = 1 << 20  # the CPU op selects tensors from this size on with all threads


def check(a, b, score, k):
    thresholds, stats = kf.ops.select_threshold_per_tensor(a, b, score, k)
    cpu = lambda xs: [x.cpu() for x in xs]  # noqa: E731
    ref_thresholds, ref_stats = reference.select_threshold_per_tensor(cpu(a), cpu(b), score, k)
    assert thresholds.device == a[0].device and stats.device == a[0].device
    assert thresholds.dtype == ref_thresholds.dtype and thresholds.shape == (len(a),)
    assert stats.tolist() == ref_stats.tolist(), (score, k)
    assert torch.equal(thresholds.cpu(), ref_thresholds)
    masks = kf.ops.topk_mask_per_tensor(a, b, score, thresholds, stats)
    ref_masks = reference.topk_mask_per_tensor(cpu(a), cpu(b), score, ref_thresholds, ref_stats)
    for m, r, x, kt in zip(masks, ref_masks, a, k):
        assert m.dtype == torch.bool and m.shape == x.shape and m.is_contiguous() and m.device == x.device
        assert torch.equal(m.cpu(), r) and int(m.sum()) == kt
    return thresholds, stats, masks


def operands(shapes, dtype, device, score, gen):
    a = [(torch.randn(s, generator=gen) * 0.05).to(dtype).to(device) for s in shapes]
    b = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes] if score in BINARY else []
    return a, b


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_matches_reference_with_empty_tensors_k_0_and_k_numel(device, dtype, score):
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 5), (0,), (1,), (17, 1, 3), (CHUNK + 1,), (2, CHUNK // 2 - 1), (), (0, 4)]
    a, b = operands(shapes, dtype, device, score, gen)
    for rule in (lambda n: n // 3, lambda n: 0, lambda n: n, lambda n: min(n, 1), lambda n: max(n - 1, 0)):
        check(a, b, score, [rule(numel(s)) for s in shapes])


def test_each_row_equals_select_threshold_of_that_tensor_alone(device):
    gen = torch.Generator().manual_seed(4)
    shapes = [(SAMPLED + 3,), (OWN_THREADS + 5,), (300, 200), (9,)]
    a, _ = operands(shapes, torch.float32, device, "abs", gen)
    k = [SAMPLED // 10, OWN_THREADS // 2, 7, 9]
    thresholds, stats, masks = check(a, [], "abs", k)
    for t, (x, kt) in enumerate(zip(a, k)):
        thr, st = kf.ops.select_threshold([x], [], "abs", kt)
        assert torch.equal(thresholds[t], thr) and stats[t].tolist() == st.tolist()
        assert torch.equal(masks[t], kf.ops.topk_mask([x], [], "abs", thr, st)[0])


def test_ties_are_kept_in_flat_order_per_tensor(device):
    a = [torch.ones(5, device=device), torch.zeros(3, 4, device=device), torch.ones(CHUNK + 2, device=device)]
    k = [2, 5, CHUNK + 1]
    _, stats, masks = check(a, [], "value", k)
    assert stats.tolist() == [[0, 5, 2, -1], [0, 12, 5, -1], [0, CHUNK + 2, CHUNK + 1, -1]]
    assert masks[0].tolist() == [True, True, False, False, False]
    assert masks[1].flatten().tolist() == [True] * 5 + [False] * 7
    assert bool(masks[2][:-1].all()) and not bool(masks[2][-1])


def test_k_0_counts_infinite_scores_and_keeps_none(device):
    inf = float("inf")
    a = [torch.tensor([inf, 1.0, inf], device=device), torch.tensor([2.0, -inf], device=device)]
    thresholds, stats, _ = check(a, [], "value", [0, 0])
    assert thresholds.tolist() == [inf, inf] and stats.tolist() == [[0, 2, 0, -1], [0, 0, 0, -1]]
    _, stats, masks = check(a, [], "value", [1, 2])
    assert stats.tolist() == [[0, 2, 1, -1], [1, 1, 1, -1]] and masks[0].tolist() == [True, False, False]


def test_non_contiguous_and_binary_operands(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 30, generator=gen).to(device)
    g = torch.randn(30, 40, generator=gen).to(device)
    a = [x.t(), x[::2, 1::3], torch.randn(SAMPLED + 11, generator=gen).to(device)[::1]]
    b = [g, g.t()[::2, 1::3], torch.randn(2 * SAMPLED + 22, generator=gen).to(device)[::2]]
    for score in ("product", "square_times_abs"):
        check(a, b, score, [100, 33, SAMPLED // 3])


def test_mixed_dtypes_compute_in_float64_for_the_whole_list(device):
    gen = torch.Generator().manual_seed(6)
    a = [torch.randn(50, generator=gen).to(device), torch.randn(20, generator=gen).double().to(device)]
    b = [torch.randn(50, generator=gen).to(device), torch.randn(20, generator=gen).double().to(device)]
    thresholds, _, _ = check(a, b, "product", [10, 5])
    assert thresholds.dtype == torch.float64


def test_nan_is_reported_per_tensor(device):
    a = [torch.tensor([1.0, 2.0], device=device), torch.tensor([float("nan"), 1.0], device=device)]
    for k in ([1, 1], [0, 0]):
        _, stats = kf.ops.select_threshold_per_tensor(a, [], "abs", k)
        assert stats[:, 3].tolist() == [-1, 0]
    if a[0].device.type == "cpu":
        thresholds, stats = kf.ops.select_threshold_per_tensor(a, [], "abs", [1, 1])
        with pytest.raises(ValueError, match=r"expected stats\[1\] of NaN-free scores, got stats\[1\] reporting NaN"):
            kf.ops.topk_mask_per_tensor(a, [], "abs", thresholds, stats)


def test_results_do_not_depend_on_the_thread_count():
    pool = torch.tensor([1.0, 2.0, 3.0])
    a = [pool[torch.randint(3, (n,))] for n in (OWN_THREADS + 3, SAMPLED + 1, CHUNK * 3 + 11, 1000, 10)]
    k = [x.numel() // 2 for x in a]
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            thr, stats = kf.ops.select_threshold_per_tensor(a, [], "value", k)
            results.append((thr.tolist(), stats.tolist(), kf.ops.topk_mask_per_tensor(a, [], "value", thr, stats)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert r[0] == results[0][0] and r[1] == results[0][1]
        assert all(torch.equal(x, y) for x, y in zip(r[2], results[0][2]))


def test_compiles_fullgraph(device):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def top(x, y):
        thresholds, stats = kf.ops.select_threshold_per_tensor([x, y], [], "abs", [3, 4])
        return kf.ops.topk_mask_per_tensor([x, y], [], "abs", thresholds, stats)

    x, y = torch.randn(20, device=device), torch.randn(6, 2, device=device)
    eager = kf.ops.topk_mask_per_tensor(
        [x, y], [], "abs", *kf.ops.select_threshold_per_tensor([x, y], [], "abs", [3, 4])
    )
    assert all(torch.equal(m, e) for m, e in zip(top(x, y), eager))


def test_errors_name_the_op_the_argument_and_what_came(device):
    x = torch.randn(4, device=device)
    op = "select_threshold_per_tensor"
    with pytest.raises(ValueError, match=rf"{op}: expected a to be a non-empty list of tensors, got an empty list"):
        kf.ops.select_threshold_per_tensor([], [], "abs", [])
    with pytest.raises(ValueError, match=rf"{op}: expected k to hold one count per tensor of a \(2\), got 1"):
        kf.ops.select_threshold_per_tensor([x, x], [], "abs", [1])
    with pytest.raises(
        ValueError, match=rf"{op}: expected k\[1\] in \[0, 3\] \(the number of elements of a\[1\]\), got 4"
    ):
        kf.ops.select_threshold_per_tensor([x, x[:3]], [], "abs", [1, 4])
    with pytest.raises(ValueError, match=rf"{op}: expected k\[0\] in \[0, 4\] .*got -1"):
        kf.ops.select_threshold_per_tensor([x], [], "abs", [-1])
    with pytest.raises(TypeError, match=rf"{op}: expected k\[0\] to be an int, got float"):
        kf.ops.select_threshold_per_tensor([x], [], "abs", [1.0])
    thresholds, stats = kf.ops.select_threshold_per_tensor([x, x], [], "abs", [1, 2])
    op = "topk_mask_per_tensor"
    with pytest.raises(TypeError, match=rf"{op}: expected thresholds to be Float"):
        kf.ops.topk_mask_per_tensor([x, x], [], "abs", thresholds.double(), stats)
    with pytest.raises(ValueError, match=rf"{op}: expected thresholds to have shape \[2\] .*got \[1\]"):
        kf.ops.topk_mask_per_tensor([x, x], [], "abs", thresholds[:1], stats)
    with pytest.raises(ValueError, match=rf"{op}: expected stats to have shape \[2, 4\], got \[2, 3\]"):
        kf.ops.topk_mask_per_tensor([x, x], [], "abs", thresholds, stats[:, :3])


def test_tensors_filtered_together_in_one_pass_each_with_its_own_range(device):
    """The CPU op samples every tensor of 2^14 elements or more, filters all of them in one pass
    (each against its own sampled range) and selects among each tensor's kept scores: tensors of
    different scales, ties, infinities, strides and dtypes side by side, k from 0 to numel."""
    gen = torch.Generator().manual_seed(11)
    pool = torch.tensor([0.5, 1.5, 2.5])
    a = [
        torch.randn(1 << 14, generator=gen) * 1e-3,
        torch.randn(3 * CHUNK + 5, generator=gen) * 10.0,  # a chunk shared with its neighbours
        pool[torch.randint(3, (CHUNK,), generator=gen)],  # the kept scores exceed the cap: histogram
        torch.randn(300, 700, generator=gen).t(),  # strided
        torch.randn(1 << 15, generator=gen).to(torch.bfloat16).float(),
        torch.cat([torch.full((100,), float("inf")), torch.randn(1 << 15, generator=gen)]),
        torch.randn(100, generator=gen),  # not sampled
    ]
    a = [x.to(device) for x in a]
    rules = (lambda n: n // 10, lambda n: n // 2, lambda n: 0, lambda n: n, lambda n: 1, lambda n: n - 1, lambda n: 100)
    for rule in rules:
        check(a, [], "abs", [min(rule(x.numel()), x.numel()) for x in a])
    check(a, [torch.randn(x.shape, generator=gen).to(device) for x in a], "product", [x.numel() // 3 for x in a])
    nan = [x.clone() for x in a]
    nan[1][CHUNK + 7] = float("nan")
    nan[3][5, 2] = float("nan")
    _, stats = kf.ops.select_threshold_per_tensor(nan, [], "abs", [x.numel() // 2 for x in a])
    assert stats[:, 3].tolist() == [-1, 0, -1, 0, -1, -1, -1]
