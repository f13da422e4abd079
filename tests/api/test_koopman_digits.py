"""KMP on a real trajectory: an MLP learning scikit-learn's digits, one snapshot per SGD step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import koopfast as kf
from koopfast import _digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def trained():
    split = _digits.load(seed=0)
    model = _digits.mlp((128,), seed=0)
    rec = kf.TrajectoryRecorder(model, capacity=66)
    rec.record()
    _digits.train(model, split, steps=65, seed=0, after_step=lambda i: rec.record())
    return split, model, rec


def authors_exact_dmd_scores(rec) -> torch.Tensor:
    """The Koopman pruning authors' exact DMD, transcribed in float64 NumPy, untruncated:
    X = W[:, :-1], Y = W[:, 1:], X = UΣV*, Ã = U*YVΣ⁻¹, φ = λ⁻¹ Y V Σ⁻¹ w for λ nearest 1; score |φ|."""
    w = np.stack(
        [torch.cat([v.reshape(-1) for v in rec.snapshot(t).values()]).double().numpy() for t in range(len(rec))], 1
    )
    x, y = w[:, :-1], w[:, 1:]
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    lam, vecs = np.linalg.eig(u.conj().T @ y @ vh.conj().T @ np.diag(1 / s))
    i = int(np.argmin(np.abs(lam - 1)))
    return torch.tensor(np.abs(y @ vh.conj().T @ np.diag(1 / s) @ vecs[:, i] / lam[i]))


@pytest.mark.parametrize("method", ["gram", "qr"])
def test_default_kmp_gives_the_masks_of_the_authors_untruncated_exact_dmd(trained, method):
    _, _, rec = trained
    kmp = kf.criteria.koopman_magnitude(kf.DMD(method).fit(rec))
    ours = torch.cat([v.reshape(-1) for v in kmp.values()])
    theirs = authors_exact_dmd_scores(rec)
    for sparsity in (0.5, 0.8, 0.9):
        a = kf.masks.global_topk([ours], sparsity)[0]
        b = kf.masks.global_topk([theirs.float()], sparsity)[0]
        assert torch.equal(a, b), sparsity


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
