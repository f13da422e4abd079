"""ScoreAccumulator: k steps add up to the sum of k single steps, gradient accumulation gives the
scores of the whole batch, and a bad step changes nothing already held."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import koopfast as kf


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 6, generator=g), torch.randint(3, (10,), generator=g)


def _expected(model, batches, kind):
    """Reference: per step, the importance from a fresh full-batch gradient, summed in float64."""
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            t = p.detach().double() * p.grad.double()
            total[n] += {"taylor": t.abs(), "fisher": p.grad.double() ** 2, "taylor_squared": t**2}[kind]
    return total


@pytest.mark.parametrize("kind", ["taylor", "fisher", "taylor_squared"])
def test_k_steps_equal_the_sum_of_k_single_steps(kind):
    model = _model()
    batches = [_batch(s) for s in range(4)]
    ref = _expected(model, batches, kind)
    acc = kf.criteria.ScoreAccumulator(model, kind)
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        acc.update()
    scores = acc.scores()
    assert scores.steps == 4 and scores.kind == kind
    for n, r in ref.items():
        torch.testing.assert_close(scores[n].double(), r, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_scores_the_whole_batch_through_the_optimizer_hook():
    whole, split = _model(), _model()
    x, y = _batch(0)
    opt_w = torch.optim.SGD(whole.parameters(), lr=0.0)
    opt_s = torch.optim.SGD(split.parameters(), lr=0.0)
    with (
        kf.criteria.ScoreAccumulator(whole, "taylor", optimizer=opt_w) as a,
        kf.criteria.ScoreAccumulator(split, "taylor", optimizer=opt_s) as b,
    ):
        for _ in range(2):
            opt_w.zero_grad()
            nn.functional.cross_entropy(whole(x), y).backward()
            opt_w.step()
            opt_s.zero_grad()
            for part in (slice(0, 4), slice(4, 10)):  # micro-batches, loss weighted by their share
                (nn.functional.cross_entropy(split(x[part]), y[part]) * (len(range(10)[part]) / 10)).backward()
            opt_s.step()
    sa, sb = a.scores(), b.scores()
    assert sa.steps == sb.steps == 2
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], rtol=1e-5, atol=1e-7)
    opt_w.step()  # closed: the hook is gone
    assert a.scores().steps == 2


def test_a_non_finite_gradient_changes_nothing():
    model = _model()
    acc = kf.criteria.ScoreAccumulator(model, "fisher")
    x, y = _batch(1)
    nn.functional.cross_entropy(model(x), y).backward()
    acc.update()
    before = acc.scores()
    model[2].weight.grad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ScoreAccumulator.update.*'2.weight'"):
        acc.update()
    after = acc.scores()
    assert after.steps == 1 and all(torch.equal(before[n], after[n]) for n in before)


def test_scores_are_copies_and_reset_clears():
    model = _model()
    acc = kf.criteria.ScoreAccumulator(model)
    x, y = _batch(2)
    nn.functional.cross_entropy(model(x), y).backward()
    acc.update()
    s = acc.scores()
    acc.update()
    assert not torch.equal(s["0.weight"], acc.scores()["0.weight"])
    acc.reset()
    assert acc.scores().steps == 0 and all(float(t.abs().sum()) == 0 for t in acc.scores().values())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"ScoreAccumulator.*kind"):
        kf.criteria.ScoreAccumulator(_model(), "hessian")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ScoreAccumulator.*optimizer"):
        kf.criteria.ScoreAccumulator(_model(), optimizer=object())  # type: ignore[arg-type]
