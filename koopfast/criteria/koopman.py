"""Koopman criteria (Redman et al., ICLR 2022) from a fitted :class:`~koopfast.DMD`.

KMP (exact, as in the authors' code, with two corrections papers.md asks for): the score of a
parameter is |b φ| for the mode whose eigenvalue is nearest 1 (its complex magnitude, never just
the real part), or |Σ b_i φ_i| over every eigenvalue in a disc |λ − 1| < δ; one global threshold.
The chosen eigenvalue, its distance to 1 and its residual come with the scores.

KGP is a reconstruction (never released; papers.md, section 1): θ(t+1) − θ(t) =
Σ_i (λ_i − 1) λ_i^t b_i φ_i is the fitted update, proportional to −∇L under gradient descent, so
score = |θ(t) ⊙ Σ_i (λ_i − 1) λ_i^t b_i φ_i| at the last snapshot t (the learning rate does not
change a ranking). The paper's claim: nearly equivalent to gradient pruning |θ ⊙ g|.
"""

from __future__ import annotations

import torch

from koopfast.dmd import DMD
from koopfast.scores import ScoreMap

__all__ = ["KoopmanScores", "koopman_gradient", "koopman_magnitude"]


class KoopmanScores(ScoreMap):
    """Scores name -> tensor (float32, parameter shapes, higher = keep) with ``info``: the modes
    used ("modes"), their eigenvalues ("eigenvalues"), distances |λ − 1| ("distance") and
    residuals ("residuals")."""

    info: dict

    def __init__(self, scores=(), *, criterion: str = "", info: dict | None = None):
        super().__init__(scores, criterion=criterion)
        self.info = info or {}


def _checked(kmd: DMD, fn: str) -> DMD:
    if not isinstance(kmd, DMD):
        raise TypeError(f"koopfast.criteria.{fn}: expected a fitted koopfast.DMD, got {type(kmd).__name__}")
    kmd._result()  # raises if unfitted
    return kmd


def koopman_magnitude(kmd: DMD, *, disc: float | None = None) -> KoopmanScores:
    """KMP scores |b φ| of the λ ≈ 1 mode (or of the sum over the disc |λ − 1| < ``disc``)."""
    fit = _checked(kmd, "koopman_magnitude")._result()
    idx = kmd.select(disc)
    if disc is None:  # one mode; of a conjugate pair, the one with Im λ >= 0 (same magnitude)
        idx = [max(idx, key=lambda i: float(fit.eigenvalues[i].imag))]
    c = (fit.coeffs[:, idx] * fit.amplitudes[idx]).sum(1, keepdim=True)
    if disc is not None:
        c = c.real.contiguous()  # the disc is closed under conjugation: the sum is real
    flat = kmd._combine(c)[0].abs()
    return KoopmanScores(kmd._recorder.unflatten(flat), criterion="koopman_magnitude", info=_info(kmd, idx))


def koopman_gradient(kmd: DMD) -> KoopmanScores:
    """KGP scores |θ(t) ⊙ Σ_i (λ_i − 1) λ_i^t b_i φ_i| at the last snapshot (a reconstruction)."""
    fit = _checked(kmd, "koopman_gradient")._result()
    t = fit.n_snapshots - 1
    lam = fit.eigenvalues
    update = (fit.coeffs * ((lam - 1) * lam**t * fit.amplitudes)).sum(1, keepdim=True).real
    last = torch.zeros(fit.n_snapshots, 1, dtype=torch.float64)
    last[-1] = 1.0
    both = kmd._combine(torch.cat([update, last], dim=1).contiguous())  # [2, N]: update, θ(t)
    flat = (both[0] * both[1]).abs()
    return KoopmanScores(
        kmd._recorder.unflatten(flat), criterion="koopman_gradient", info=_info(kmd, list(range(lam.numel())))
    )


def _info(kmd: DMD, idx: list[int]) -> dict:
    fit = kmd._result()
    lam = fit.eigenvalues[idx]
    return {
        "modes": idx,
        "eigenvalues": lam.clone(),
        "distance": (lam - 1).abs(),
        "residuals": fit.residuals[idx].clone(),
    }
