"""kf.DMD on synthetic linear systems with known eigenvalues and fixed point, and its options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import koopfast as kf

LAMBDAS = [0.9, 0.7, complex(0.85 * math.cos(0.3), 0.85 * math.sin(0.3))]  # and the conjugate


def linear_system(n=3000, steps=30, noise=0.0, seed=0, storage=torch.float32):
    """θ_t = θ* + Q M^t z0 (M with eigenvalues LAMBDAS and the conjugate); the recorder and truth."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, 4, generator=gen, dtype=torch.float64)).Q
    a, b = LAMBDAS[2].real, LAMBDAS[2].imag
    m = torch.tensor([[0.9, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, a, -b], [0, 0, b, a]], dtype=torch.float64)
    star = torch.randn(n, generator=gen, dtype=torch.float64)
    z = torch.randn(4, generator=gen, dtype=torch.float64) * 3
    theta = torch.zeros(n)
    rec = kf.TrajectoryRecorder({"theta": theta}, capacity=steps, dtype=storage)
    traj = []
    for _ in range(steps):
        x = star + q @ z
        traj.append(x)
        theta.copy_((x + noise * torch.randn(n, generator=gen, dtype=torch.float64)).float())
        rec.record()
        z = m @ z
    future = [star + q @ torch.linalg.matrix_power(m, k) @ z for k in range(0, 6)]  # θ_T, θ_T+1, ...
    return rec, star, traj, future


def true_eigenvalues():
    return sorted([1.0, *LAMBDAS, LAMBDAS[2].conjugate()], key=lambda c: (complex(c).real, complex(c).imag))


def as_sorted(lam):
    return sorted((complex(x) for x in lam.tolist()), key=lambda c: (c.real, c.imag))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", ["gram", "qr", "randomized"])
def test_noiseless_system_recovers_eigenvalues_fixed_point_and_forecast(method):
    rec, star, traj, future = linear_system()
    kmd = kf.DMD(method, rank=8 if method == "randomized" else None).fit(rec)
    assert kmd.n_modes == 5
    for got, want in zip(as_sorted(kmd.eigenvalues), true_eigenvalues()):
        assert abs(got - complex(want)) < 1e-6
    assert rel(kmd.fixed_point()["theta"], star) < 1e-6  # float32 storage rounding
    assert rel(kmd.forecast(0)["theta"], traj[-1]) < 1e-6
    assert rel(kmd.forecast(3)["theta"], future[2]) < 1e-6
    i = kmd.nearest(1.0)
    assert abs(complex(kmd.eigenvalues[i]) - 1) < 1e-7 and float(kmd.residuals[i]) < 1e-6


def test_methods_agree_and_qr_is_the_most_accurate_on_ill_conditioned_data():
    rec, *_ = linear_system(n=2000, steps=25)
    eig = {
        m: as_sorted(kf.DMD(m, rank=10 if m == "randomized" else None).fit(rec).eigenvalues)
        for m in ("gram", "qr", "randomized")
    }
    for m in ("qr", "randomized"):
        assert max(abs(a - b) for a, b in zip(eig["gram"], eig[m])) < 1e-7


def test_noisy_system_tolerances_and_forward_backward_debiasing():
    """Noise pulls eigenvalues into the unit disc (numerics.md, pitfall 4); forward-backward DMD
    removes that bias. Over 8 seeded trajectories, the mean of |λ| - 0.9 for the 0.9 mode."""
    bias = {"none": [], "forward_backward": []}
    for seed in range(1, 9):
        rec, star, *_ = linear_system(n=2000, steps=40, noise=2e-3, seed=seed)
        for debias in bias:
            kmd = kf.DMD("gram", rank=5, debias=debias).fit(rec)
            assert abs(complex(kmd.eigenvalues[kmd.nearest(1.0)]) - 1) < 1e-4
            assert rel(kmd.fixed_point()["theta"], star) < 2e-3
            bias[debias].append(abs(complex(kmd.eigenvalues[kmd.nearest(0.9)])) - 0.9)
    plain, fb = (sum(v) / len(v) for v in bias.values())
    assert plain < -5e-3, "plain DMD is biased inwards under noise"
    assert abs(fb) < abs(plain) / 5


def test_mode_equals_an_independent_float64_svd_exact_dmd():
    """The authors' exact DMD (Tu et al. 2014), transcribed with NumPy in float64, untruncated."""
    rec, *_ = linear_system(n=1500, steps=20)
    w = np.stack([rec.snapshot(t)["theta"].double().numpy() for t in range(len(rec))], axis=1)
    x, y = w[:, :-1], w[:, 1:]
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    r = int((s > 1e-6 * s[0]).sum())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    lam, vecs = np.linalg.eig(u.T @ y @ vh.T @ np.diag(1 / s))
    kmd = kf.DMD("gram").fit(rec)
    for target in (1.0, 0.7, LAMBDAS[2]):
        i_np = int(np.argmin(np.abs(lam - target)))
        phi_np = (y @ vh.T @ np.diag(1 / s) @ vecs[:, i_np]) / lam[i_np]
        phi = kmd.mode(kmd.nearest(target))["theta"].to(torch.complex128).numpy()
        # same mode up to a complex scale
        scale = np.vdot(phi_np, phi) / np.vdot(phi_np, phi_np)
        assert np.linalg.norm(phi - scale * phi_np) / np.linalg.norm(phi) < 1e-5


def test_matches_pydmd_when_installed():
    pydmd = pytest.importorskip("pydmd")
    rec, *_ = linear_system(n=800, steps=15)
    w = np.stack([rec.snapshot(t)["theta"].double().numpy() for t in range(len(rec))], axis=1)
    ref = pydmd.DMD(svd_rank=5, exact=True).fit(w)
    ours = kf.DMD("gram", rank=5).fit(rec)
    assert (
        max(abs(a - b) for a, b in zip(sorted(ref.eigs, key=lambda c: (c.real, c.imag)), as_sorted(ours.eigenvalues)))
        < 1e-6
    )
    i, j = int(np.argmin(np.abs(ref.eigs - 1))), ours.nearest(1.0)
    theta_ref = (ref.modes[:, i] * ref.amplitudes[i]).real
    assert j == ours.select()[0]
    assert np.linalg.norm(ours.fixed_point()["theta"].double().numpy() - theta_ref) / np.linalg.norm(theta_ref) < 1e-5


def test_disc_selection_sums_the_modes_inside_it():
    rec, star, *_ = linear_system()
    kmd = kf.DMD("gram").fit(rec)
    assert kmd.select(0.05) == [kmd.nearest(1.0)]
    assert sorted(kmd.select(0.2)) == sorted([kmd.nearest(1.0), kmd.nearest(0.9)])
    fp = kmd.fixed_point(disc=0.2)["theta"].double()
    single = kmd.fixed_point()["theta"].double()
    assert rel(fp, star) > rel(single, star)  # the 0.9 mode is not part of θ*: it is added in
    gap = float((kmd.eigenvalues - 1).abs().min())
    with pytest.raises(ValueError, match=r"select: no eigenvalue with \|λ - 1\| < .* \(the nearest is at"):
        kmd.select(gap / 2)


def test_complex_nearest_eigenvalue_takes_its_conjugate_too():
    """A spiral around θ* = 0 whose nearest eigenvalue to 1 is complex: the fixed point uses the
    conjugate pair (a real sum), KMP the magnitude of one of them."""
    n, steps = 400, 30
    gen = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(n, 3, generator=gen, dtype=torch.float64)).Q
    c, s_ = 0.99 * math.cos(0.05), 0.99 * math.sin(0.05)
    m = torch.tensor([[c, -s_, 0], [s_, c, 0], [0, 0, 0.5]], dtype=torch.float64)
    theta, z = torch.zeros(n), torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    rec = kf.TrajectoryRecorder({"theta": theta}, capacity=steps)
    for _ in range(steps):
        theta.copy_((q @ z).float())
        rec.record()
        z = m @ z
    kmd = kf.DMD().fit(rec)
    pair = kmd.select()
    lam = kmd.eigenvalues[pair]
    assert len(pair) == 2 and abs(complex(lam[0]) - complex(lam[1]).conjugate()) < 1e-9
    assert abs(abs(complex(lam[0])) - 0.99) < 1e-6
    kmp = kf.criteria.koopman_magnitude(kmd)
    assert len(kmp.info["modes"]) == 1 and float(kmp.info["eigenvalues"][0].imag) > 0
    mode = kmd.mode(kmp.info["modes"][0])["theta"]
    b = kmd.amplitudes[kmp.info["modes"][0]]
    assert torch.allclose(kmp["theta"], (mode.to(torch.complex128) * b).abs().float(), rtol=1e-5, atol=1e-7)


def test_rank_and_tolerance_are_type_safe():
    rec, *_ = linear_system(n=500, steps=10)
    assert kf.DMD(rank=np.int64(3)).fit(rec).n_modes == 3  # NumPy ints are ints (PyDMD's pitfall)
    assert kf.DMD(rtol=1e-8).fit(rec).n_modes == 5
    assert kf.DMD(rtol=1e-3).fit(rec).n_modes < 5
    with pytest.raises(TypeError, match=r"DMD: expected rank to be an int, got float"):
        kf.DMD(rank=0.9)
    with pytest.raises(TypeError, match=r"DMD: expected rank to be an int, got bool"):
        kf.DMD(rank=True)
    with pytest.raises(ValueError, match=r"DMD: expected rank >= 1, got 0"):
        kf.DMD(rank=0)
    with pytest.raises(ValueError, match=r"DMD: expected rtol to be 'auto' or a float in \(0, 1\), got 5"):
        kf.DMD(rtol=5)
    with pytest.raises(ValueError, match=r"DMD: expected an int rank for method='randomized'"):
        kf.DMD("randomized")
    with pytest.raises(ValueError, match=r"DMD: expected method 'auto', 'gram', 'qr' or 'randomized', got 'svd'"):
        kf.DMD("svd")


def test_errors_before_and_after_fitting():
    rec, *_ = linear_system(n=300, steps=6)
    kmd = kf.DMD()
    with pytest.raises(RuntimeError, match=r"DMD.eigenvalues: not fitted yet; call fit\(recorder\) first"):
        _ = kmd.eigenvalues
    for name in ("rtol_used", "method_used", "result", "recorder"):  # read-only results: one clear error
        with pytest.raises(RuntimeError, match=rf"DMD.{name}: not fitted yet"):
            getattr(kmd, name)
    with pytest.raises(RuntimeError, match=r"DMD.fixed_point: not fitted yet"):
        kmd.fixed_point()
    with pytest.raises(RuntimeError, match=r"DMD.combine: not fitted yet"):
        kmd.combine(torch.ones(6, 1, dtype=torch.float64))
    one = kf.TrajectoryRecorder({"w": torch.ones(3)}, capacity=4)
    one.record()
    with pytest.raises(ValueError, match=r"DMD.fit: expected at least 2 snapshots, got 1"):
        kmd.fit(one)
    with pytest.raises(TypeError, match=r"DMD.fit: expected a koopfast.TrajectoryRecorder, got Tensor"):
        kmd.fit(torch.ones(3))
    kmd.fit(rec)
    with pytest.raises(IndexError, match=r"mode: expected a mode index in \[-5, 5\), got 5"):
        kmd.mode(5)
    growing = kf.TrajectoryRecorder({"w": torch.randn(50)}, capacity=6)
    for _ in range(3):
        growing.record()
    fitted = kf.DMD().fit(growing)
    growing.record()
    with pytest.raises(RuntimeError, match=r"the recorder recorded 1 more snapshots since fit\(\); fit again"):
        fitted.fixed_point()


@pytest.mark.parametrize("method", ["gram", "qr", "randomized"])
def test_forecast_zero_is_the_last_snapshot_even_when_truncated(method):
    """forecast(0) moves the last snapshot by (λ⁰ − 1) = 0: exactly the stored snapshot, also when
    truncation leaves part of it outside the modes' span."""
    rec, *_ = linear_system(noise=1e-3, seed=3)
    kmd = kf.DMD(method, rank=3).fit(rec)
    assert kmd.n_modes == 3
    assert torch.equal(kmd.forecast(0)["theta"], rec.snapshot(-1)["theta"])
    one = kmd.forecast(1)["theta"]
    assert 0 < rel(one, rec.snapshot(-1)["theta"]) < 0.05  # moved, by a step's worth


def test_results_are_a_frozen_dataclass():
    import dataclasses

    rec, *_ = linear_system(n=500, steps=12)
    kmd = kf.DMD().fit(rec)
    res = kmd.result
    assert isinstance(res, kf.dmd.DMDResult) and dataclasses.is_dataclass(res)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.rtol = 0.5
    assert res.method == kmd.method_used and res.rtol == kmd.rtol_used
    assert res.coeffs.shape == (12, kmd.n_modes) and res.n_snapshots == 12
    # every mode is the combination of the snapshots its coefficients give
    assert torch.allclose(kmd.mode(0)["theta"], kmd.combine(res.coeffs[:, :1])[0])


def test_auto_method_uses_the_gram_while_it_resolves_the_spectrum():
    rec, *_ = linear_system(noise=1e-3, seed=2)  # noise fills every direction: well conditioned
    eig = torch.linalg.eigvalsh(rec.gram)
    assert float(eig[0] / eig[-1]) > 1e-12
    assert kf.DMD().fit(rec).method_used == "gram"
    assert kf.DMD("qr").fit(rec).method_used == "qr"
    noiseless, *_ = linear_system()  # rank 5 + rounding: the Gram cannot see the rounding directions
    assert kf.DMD().fit(noiseless).method_used == "qr"


def test_auto_rtol_cuts_only_at_a_cliff_into_the_storage_rounding():
    eps = 2.4e-7
    cliff = torch.tensor([1.0, 1e-2, 1e-4, 5e-9, 4e-9, 3e-9], dtype=torch.float64)  # noiseless data
    smooth = torch.logspace(0, -7.5, 60, dtype=torch.float64)  # real training: no cliff
    assert kf.dmd.auto_rtol(cliff, eps) == eps
    assert kf.dmd.auto_rtol(smooth, eps) == 60 * torch.finfo(torch.float64).eps
    assert kf.dmd.auto_rtol(smooth[:10], eps) == 10 * torch.finfo(torch.float64).eps  # all above the rounding
    rec, *_ = linear_system()
    assert kf.DMD().fit(rec).rtol_used == rec.storage_epsilon  # the noiseless system: 5 modes, as tested above
