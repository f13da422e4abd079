"""The sampled fast path of the CPU select, and index math past 2^31 elements."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast import reference

SAMPLED = 1 << 21  # well above the CPU select's sampling threshold (2^18)
SAMPLE_SIZE = 8192


def sampled_positions(n: int) -> torch.Tensor:
    """The positions the CPU select samples (csrc/select/select_cpu.cpp, sample_guess): a white-box
    copy, so that tests can plant values exactly where the sample looks."""
    m = min(SAMPLE_SIZE, n)
    stratum = n // m
    rng, out = 0x9E3779B97F4A7C15, []
    for j in range(m):
        rng = (rng * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append(j * stratum + (rng >> 33) % stratum)
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
