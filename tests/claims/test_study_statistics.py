"""koopfast.study's statistics: the Student t interval and the verdicts drawn from it."""

from __future__ import annotations

import math

import pytest

from koopfast import study

pytest.importorskip("scipy")


def test_t_interval_matches_the_textbook_formula():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, low, high = study.t_interval(values)
    sd = math.sqrt(sum((v - 3.5) ** 2 for v in values) / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) from a table, s / √4
    assert mean == 3.5
    assert low == pytest.approx(3.5 - half, rel=1e-12) and high == pytest.approx(3.5 + half, rel=1e-12)


def test_t_interval_of_one_value_is_unbounded_and_of_none_undefined():
    assert study.t_interval([0.3]) == (0.3, -math.inf, math.inf)
    mean, low, high = study.t_interval([])
    assert math.isnan(mean) and low == -math.inf and high == math.inf


def test_identical_values_give_a_zero_width_interval():
    assert study.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(0.1, 0.3, "supported"), (-0.3, -0.1, "not supported"), (-0.1, 0.3, "inconclusive: interval contains 0"),
     (0.0, 0.3, "inconclusive: interval contains 0"), (-math.inf, math.inf, "inconclusive: interval contains 0")],
)  # fmt: skip
def test_verdict_of_a_claim_that_the_quantity_is_positive(low, high, expected):
    assert study.verdict("positive", low, high) == expected


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [(-0.01, 0.01, "supported: interval within ±0.02"), (0.03, 0.05, "not supported: interval outside ±0.02"),
     (-0.05, -0.02, "not supported: interval outside ±0.02"), (-0.01, 0.03, "inconclusive: interval crosses ±0.02")],
)  # fmt: skip
def test_verdict_of_an_equivalence_claim(low, high, expected):
    assert study.verdict("equivalent", low, high, 0.02) == expected


def test_compare_leaves_seeds_without_a_value_out_of_n():
    c = study.compare("x", "paper", "claim", "quantity", "unit", [1.0, None, 2.0, 3.0])
    assert c.n == 3 and c.per_seed == [1.0, None, 2.0, 3.0] and c.mean == 2.0
    assert c.high == pytest.approx(2.0 + 4.302652729911275 / math.sqrt(3))  # t(0.975, 2) · s / √3, s = 1
    assert c.verdict == "inconclusive: interval contains 0"


def test_bad_settings_are_reported():
    with pytest.raises(ValueError, match="expected seeds to be an int >= 2"):
        study.StudyConfig(seeds=1)
    with pytest.raises(ValueError, match="koopman_sparsity"):
        study.StudyConfig(koopman_sparsity=1.0)
    with pytest.raises(ValueError, match="expected kind"):
        study.verdict("bigger", 0.0, 1.0)
    with pytest.raises(ValueError, match="expected studies among"):
        study.run(study.StudyConfig(), ["nope"])
