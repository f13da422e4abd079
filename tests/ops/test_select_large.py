"""The sampled fast path of the CPU select, and index math past 2^31 elements."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast import reference

SAMPLED = 1 << 21  # well above the CPU select's sampling threshold (2^18)
SAMPLE_SIZE = 8192
SAMPLE_RUN = 16


def sampled_positions(n: int) -> torch.Tensor:
    """The positions the CPU select samples (csrc/select/select_cpu.cpp, sample_guess): a white-box
    copy, so that tests can plant values exactly where the sample looks. Runs of SAMPLE_RUN
    consecutive positions, one at a random place in each of m / SAMPLE_RUN equal strata."""
    m = min(SAMPLE_SIZE, n // 32) // SAMPLE_RUN * SAMPLE_RUN
    runs = m // SAMPLE_RUN
    stratum = n // runs
    rng, out = 0x9E3779B97F4A7C15, []
    for j in range(runs):
        rng = (rng * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        start = j * stratum + (rng >> 33) % (stratum - SAMPLE_RUN + 1)
        out.extend(range(start, start + SAMPLE_RUN))
    return torch.tensor(out)


def check(a, b, score, k):
    threshold, stats = kf.ops.select_threshold(a, b, score, k)
    ref_threshold, ref_stats = reference.select_threshold(a, b, score, k)
    assert stats.tolist() == ref_stats.tolist() and torch.equal(threshold, ref_threshold)
    masks = kf.ops.topk_mask(a, b, score, threshold, stats)
    assert all(torch.equal(m, r) for m, r in zip(masks, reference.topk_mask(a, b, score, threshold, stats)))


@pytest.mark.parametrize("score", ["abs", "product", "value"])
def test_sampled_path_matches_reference(score):
    a = [torch.randn(SAMPLED // 2), torch.randn(1000, SAMPLED // 2000).t(), torch.randn(77)]
    b = [torch.randn(x.shape) for x in a] if score == "product" else []
    n = sum(x.numel() for x in a)
    for k in (1, 17, n // 10, n // 2, n - 5, n):
        check(a, b, score, k)


def test_sampled_path_float64_and_ties():
    pool = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    a = [pool[torch.randint(3, (SAMPLED,))], torch.randn(SAMPLED, dtype=torch.float64)]
    for k in (5, SAMPLED // 3, SAMPLED, 2 * SAMPLED - 1):
        check(a, [], "abs", k)


@pytest.mark.parametrize(("planted", "elsewhere"), [(10.0, 1.0), (0.0, 1.0)], ids=["guess-too-high", "guess-too-low"])
def test_a_sample_that_lies_still_gives_the_exact_answer(planted, elsewhere):
    """Values planted exactly at the sampled positions make the guessed range miss the target;
    the select must move to the right side of it and still be exact."""
    n = SAMPLED + 12345
    x = torch.full((n,), elsewhere)
    x[sampled_positions(n)] = planted
    x += torch.rand(n) * 1e-3 * (x == elsewhere)  # distinct values outside the sample
    check([x], [], "value", n // 2)


@pytest.mark.slow
def test_one_tensor_of_more_than_2_31_elements():
    m = (1 << 31) // 3 + 2
    x = torch.arange(3.0).reshape(3, 1).expand(3, m)  # 3m > 2^31 elements, stride-0 rows
    k = m + 5
    threshold, stats = kf.ops.select_threshold([x], [], "value", k)
    assert threshold.item() == 1.0 and stats.tolist() == [m, m, 5, -1]
    (mask,) = kf.ops.topk_mask([x], [], "value", threshold, stats)
    assert mask.shape == x.shape
    assert bool(mask[2].all()) and not bool(mask[0].any())
    assert bool(mask[1, :5].all()) and not bool(mask[1, 5:].any())


@pytest.mark.slow
def test_more_than_2_31_elements_over_many_tensors():
    base = torch.randperm(1 << 24).float()  # distinct values 0 .. 2^24 - 1
    copies = 130  # 130 * 2^24 > 2^31 elements; the same storage repeated
    a = [base] * copies
    k = copies * 1000 + 7  # the 1001st largest value, held by every tensor: 7 of its ties kept
    threshold, stats = kf.ops.select_threshold(a, [], "abs", k)
    value = float((1 << 24) - 1 - 1000)
    assert threshold.item() == value and stats.tolist() == [copies * 1000, copies, 7, -1]
    masks = kf.ops.topk_mask(a, [], "abs", threshold, stats)
    where = int(torch.nonzero(base == value))
    for i, mask in enumerate(masks):
        assert int(mask.sum()) == 1000 + (i < 7)
        assert bool(mask[where]) == (i < 7)


# The filtering first pass of float32 selection (csrc/select/filter_cpu.cpp) keeps the scores of the
# sampled range and selects among them; too many kept scores (ties, a lying sample) hand over to the
# histogram passes. Each case below takes one of those paths.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_filter_pass_with_few_distinct_values_hands_over_to_the_histogram_passes(dtype):
    pool = torch.tensor([0.25, 0.5, 0.75], dtype=dtype)
    a = [pool[torch.randint(3, (SAMPLED,))], torch.randn(SAMPLED // 3).to(dtype)]
    n = sum(x.numel() for x in a)
    for k in (5, SAMPLED // 3, SAMPLED // 2, SAMPLED, n - 1):
        check(a, [], "abs", k)


def test_filter_pass_kept_scores_numerous_enough_to_be_filtered_again():
    """2^23 scores: the kept few percent exceed the sampling threshold themselves."""
    a = [torch.randn(1 << 23)]
    for k in (1 << 22, (1 << 23) // 10):
        check(a, [], "abs", k)


@pytest.mark.parametrize("score", ["abs", "product", "abs_product", "square_times_abs", "value"])
def test_filter_pass_every_score_kind_with_strided_and_narrow_tensors(score):
    g = torch.Generator().manual_seed(3)
    a = [
        torch.randn(SAMPLED // 2, generator=g),
        torch.randn(2000, 300, generator=g).t(),  # strided: scores computed into blocks first
        torch.randn(SAMPLED // 4, generator=g).to(torch.bfloat16),
        torch.randn(13, generator=g),  # shorter than a vector
    ]
    binary = score in ("product", "abs_product", "square_times_abs")
    b = [torch.randn(x.shape, generator=g).to(x.dtype) for x in a] if binary else []
    n = sum(x.numel() for x in a)
    for k in (1, n // 7, n // 2, n - 3):
        check(a, b, score, k)


def test_filter_pass_infinities_signed_zeros_and_nan():
    x = torch.randn(SAMPLED)
    x[::1000] = float("inf")
    x[1::1000] = -float("inf")
    x[2::3] = 0.0
    x[5::7] = -0.0
    n = x.numel()
    for k in (1, n // 1000, n // 2, n - n // 1000 + 5, n):
        check([x], [], "value", k)
        check([x], [], "abs", k)
    y = torch.randn(SAMPLED)
    y[SAMPLED - 2] = float("nan")  # the NaN sits in the last vector of the pass
    _, stats = kf.ops.select_threshold([torch.randn(SAMPLED), y, torch.full((3,), float("nan"))], [], "abs", 10)
    assert stats[3].item() == 1
