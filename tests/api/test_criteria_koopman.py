"""KMP and KGP (kf.criteria.koopman_magnitude / koopman_gradient) against what they should equal."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf


def gradient_descent_on_a_quadratic(decays, steps, n=3000, seed=0):
    """L(θ) = ½ (θ - θ*)ᵀ H (θ - θ*), H = Q diag(h) Qᵀ; θ_{t+1} = θ_t - η ∇L(θ_t) with 1 - η h = decays."""
    gen = torch.Generator().manual_seed(seed)
    r = len(decays)
    q = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q
    eta = 0.1
    h = (1 - torch.tensor(decays, dtype=torch.float64)) / eta
    star = torch.randn(n, generator=gen, dtype=torch.float64)
    theta64 = star + q @ (torch.randn(r, generator=gen, dtype=torch.float64) * 5)
    theta = torch.zeros(n)

    def grad(x):
        return q @ (h * (q.T @ (x - star)))

    rec = kf.TrajectoryRecorder({"theta": theta}, capacity=steps)
    for _ in range(steps):
        theta.copy_(theta64.float())
        rec.record()
        theta64 = theta.double() - eta * grad(theta.double())
    return rec, theta.double(), grad(theta.double())


def top(x, sparsity):
    k = round((1 - sparsity) * x.numel())
    return set(torch.topk(x.reshape(-1).double(), k).indices.tolist())


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_kmp_equals_magnitude_pruning_on_a_converged_trajectory(method):
    rec, last, _ = gradient_descent_on_a_quadratic([0.3, 0.2, 0.4], steps=40)
    kmp = kf.criteria.koopman_magnitude(kf.DMD(method).fit(rec))
    assert abs(complex(kmp.info["eigenvalues"][0]) - 1) < 1e-6
    assert float(kmp.info["residuals"][0]) < 1e-4 and float(kmp.info["distance"][0]) < 1e-6
    for s in (0.5, 0.8, 0.9):
        assert top(kmp["theta"], s) == top(last.abs(), s)


def test_kgp_matches_gradient_pruning_for_gradient_descent_on_a_quadratic():
    rec, last, g = gradient_descent_on_a_quadratic([0.9, 0.8, 0.95, 0.85], steps=20)
    kgp = kf.criteria.koopman_gradient(kf.DMD("gram").fit(rec))
    expected = (last * g).abs()
    corr = torch.corrcoef(torch.stack([kgp["theta"].double(), expected]))[0, 1]
    assert float(corr) > 0.99999
    for s in (0.5, 0.8, 0.9):
        overlap = len(top(kgp["theta"], s) & top(expected, s)) / round((1 - s) * expected.numel())
        assert overlap > 0.995  # only near-ties at the threshold flip (float32 snapshots)
    assert len(kgp.info["modes"]) == 5  # all modes take part


def test_kmp_and_magnitude_differ_before_convergence_and_disc_option():
    rec, last, _ = gradient_descent_on_a_quadratic([0.99, 0.98, 0.97], steps=15)
    kmd = kf.DMD("gram").fit(rec)
    kmp = kf.criteria.koopman_magnitude(kmd)
    assert len(top(kmp["theta"], 0.9) & top(last.abs(), 0.9)) < 0.95 * round(0.1 * last.numel())
    disc = kf.criteria.koopman_magnitude(kmd, disc=0.015)
    assert len(disc.info["modes"]) == 2  # λ = 1 and λ = 0.99
    fp = kmd.fixed_point(disc=0.015)["theta"]
    assert torch.allclose(disc["theta"], fp.abs())


def test_scores_are_plain_tensors_shaped_like_the_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    rec = kf.TrajectoryRecorder(net, capacity=5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        loss = net(torch.randn(16, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record()
    kmd = kf.DMD().fit(rec)
    for scores in (kf.criteria.koopman_magnitude(kmd), kf.criteria.koopman_gradient(kmd)):
        assert list(scores) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        for name, p in net.named_parameters():
            assert scores[name].shape == p.shape and scores[name].dtype == torch.float32
        masks = kf.masks.global_topk(scores, 0.5)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * 38)


def test_errors():
    with pytest.raises(
        TypeError, match=r"koopfast.criteria.koopman_magnitude: expected a fitted koopfast.DMD, got dict"
    ):
        kf.criteria.koopman_magnitude({})
    with pytest.raises(RuntimeError, match=r"DMD.result: not fitted yet"):
        kf.criteria.koopman_gradient(kf.DMD())
