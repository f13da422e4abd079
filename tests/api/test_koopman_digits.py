"""KMP on a real trajectory: an MLP learning scikit-learn's digits, one snapshot per SGD step."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast import _digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The digits MLP's matrices are tiny: one thread trains it several times faster than two
    contended ones (measured 4× on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    split = _digits.load(seed=0)
    model = _digits.mlp((128,), seed=0)
    rec = kf.TrajectoryRecorder(model, capacity=66)
    rec.record()
    _digits.train(model, split, steps=65, seed=0, after_step=lambda i: rec.record())
    return split, model, rec


@pytest.fixture(scope="module")
def late():
    """Steps 3001-3200 of the same MLP: a long window late in training, numerically rank-deficient
    (about 60 of its 199 singular values of X lie below float32's rounding, down to 5e-8 σ₁)."""
    split = _digits.load(seed=0)
    model = _digits.mlp((128,), seed=0)
    opt = _digits.train(model, split, steps=3000, seed=5)
    rec = kf.TrajectoryRecorder(model, capacity=200)
    _digits.train(model, split, steps=200, seed=0, optimizer=opt, after_step=lambda i: rec.record())
    return rec


def their_snapshots(rec) -> torch.Tensor:
    return torch.stack([torch.cat([v.reshape(-1) for v in rec.snapshot(t).values()]) for t in range(len(rec))], 1)


def authors_exact_dmd(w: torch.Tensor) -> tuple[torch.Tensor, complex]:
    """The Koopman pruning authors' exact DMD, in plain float64 torch, untruncated: X = W[:, :-1],
    Y = W[:, 1:], X = UΣV*, Ã = U*YVΣ⁻¹, φ = λ⁻¹ Y V Σ⁻¹ w for λ nearest 1; score |φ|, and λ."""
    w = w.double()
    x, y = w[:, :-1], w[:, 1:]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    lam, vecs = torch.linalg.eig(u.T @ y @ vh.T @ torch.diag(1 / s))
    i = int(torch.argmin((lam - 1).abs()))
    phi = (y @ vh.T @ torch.diag(1 / s)).to(torch.complex128) @ vecs[:, i] / lam[i]
    return phi.abs(), complex(lam[i])


def assert_same_masks(kmp, theirs):
    ours = torch.cat([v.reshape(-1) for v in kmp.values()])
    for sparsity in (0.5, 0.8, 0.9):
        a = kf.masks.global_topk([ours], sparsity)[0]
        b = kf.masks.global_topk([theirs.float()], sparsity)[0]
        assert torch.equal(a, b), sparsity


@pytest.mark.parametrize("method", ["auto", "gram", "qr"])
def test_default_kmp_gives_the_masks_of_the_authors_untruncated_exact_dmd(trained, method):
    _, _, rec = trained
    kmd = kf.DMD(method).fit(rec)
    assert kmd.n_modes == len(rec) - 1  # untruncated
    assert_same_masks(kf.criteria.koopman_magnitude(kmd), authors_exact_dmd(their_snapshots(rec))[0])


def test_default_kmp_matches_the_exact_dmd_late_in_training_too(late):
    """The Gram matrix cannot resolve this window (λ_min/λ_max ≈ 3e-15): the default falls back to
    the QR factor and keeps every singular value, as the authors' untruncated DMD does."""
    theirs, lam = authors_exact_dmd(their_snapshots(late))
    assert abs(lam.imag) == 0 and abs(lam - 1) < 1e-4
    kmd = kf.DMD().fit(late)
    assert kmd.method_used == "qr" and kmd.n_modes == len(late) - 1
    assert kmd.rtol_used < 1e-12
    eig = torch.linalg.eigvalsh(late.gram)
    assert float(eig[0] / eig[-1]) < 1e-13  # far below what the Gram resolves
    below = int((kmd.singular_values < late.storage_epsilon * kmd.singular_values[0]).sum())
    assert below > 30  # the directions the old storage-rounding cutoff dropped
    kmp = kf.criteria.koopman_magnitude(kmd)
    assert abs(complex(kmp.info["eigenvalues"][0]) - lam) < 1e-9
    assert_same_masks(kmp, theirs)


def test_stronger_truncation_changes_the_answer(trained):
    """numerics.md: keeping only singular values above 1e-4 σ₁ moves λ and the mask."""
    _, _, rec = trained
    full = kf.criteria.koopman_magnitude(kf.DMD().fit(rec))
    cut = kf.criteria.koopman_magnitude(kf.DMD(rtol=1e-4).fit(rec))
    a = kf.masks.global_topk(full, 0.8)
    b = kf.masks.global_topk(cut, 0.8)
    kept = sum(int(m.sum()) for m in a.values())
    overlap = sum(int((a[n] & b[n]).sum()) for n in a) / kept
    assert overlap < 0.95
