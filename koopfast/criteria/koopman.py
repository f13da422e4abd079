"""Koopman criteria (Redman et al., ICLR 2022) from a fitted :class:`~koopfast.DMD`.

KMP (exact, as in the authors' code, with two corrections papers.md asks for): the score of a
parameter is |b φ| for the mode whose eigenvalue is nearest 1 (its complex magnitude, never just
the real part), or |Σ b_i φ_i| over every eigenvalue in a disc |λ − 1| < δ; one global threshold.
The chosen eigenvalue, its distance to 1 and its residual come with the scores.
``preset="shrinkbench"`` gives the authors' scores exactly (see :func:`koopman_magnitude`), for
:func:`koopfast.criteria.shrinkbench_masks`, their threshold.

KGP is a reconstruction (never released; papers.md, section 1): θ(t+1) − θ(t) =
Σ_i (λ_i − 1) λ_i^t b_i φ_i is the fitted update, proportional to −∇L under gradient descent, so
score = |θ(t) ⊙ Σ_i (λ_i − 1) λ_i^t b_i φ_i| at the last snapshot t (the learning rate does not
change a ranking). The paper's claim: nearly equivalent to gradient pruning |θ ⊙ g|.

Everything here goes through the DMD's public results (``kmd.result``, ``kmd.combine``,
``kmd.recorder.unflatten``): how snapshots are stored is the recorder's business only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from koopfast.dmd import DMD, DMDResult
from koopfast.scores import ScoreMap

__all__ = ["KoopmanScores", "koopman_gradient", "koopman_magnitude"]

Preset = Literal["koopfast", "shrinkbench"]


class KoopmanScores(ScoreMap):
    """Scores name -> tensor (float32, parameter shapes, higher = keep) with ``info``: the modes
    used ("modes"), their eigenvalues ("eigenvalues"), distances |λ − 1| ("distance"),
    residuals ("residuals") and the preset ("preset")."""

    info: dict[str, Any]

    def __init__(
        self,
        scores: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = (),
        *,
        criterion: str = "",
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(scores, criterion=criterion)
        self.info = info or {}


def _fitted(kmd: DMD, fn: str) -> DMDResult:
    if not isinstance(kmd, DMD):
        raise TypeError(f"koopfast.criteria.{fn}: expected a fitted koopfast.DMD, got {type(kmd).__name__}")
    return kmd.result  # raises if unfitted


def koopman_magnitude(kmd: DMD, *, disc: float | None = None, preset: Preset = "koopfast") -> KoopmanScores:
    """KMP scores of the λ ≈ 1 mode.

    Args:
        kmd: a fitted :class:`~koopfast.DMD`.
        disc: the default preset only: sum the modes with |λ − 1| < ``disc`` instead of taking the
            one nearest 1.
        preset: "koopfast" (default): |b φ|, the complex magnitude of the mode times its
            amplitude. "shrinkbench": exactly the Koopman pruning authors' scores
            (william-redman/Koopman_pruning, ``koopman_magnitude_pruning.py`` with ``ExactDMD`` of
            ``koopman_tools.py``): |Re φ| rounded to float32, of the mode φ = λ⁻¹ Y V Σ⁻¹ w itself
            (w the unit-norm eigenvector LAPACK's geev returns, no amplitude), because their
            ``np.float32(fixed_pt)`` keeps the real part only. The two rank identically when the
            eigenvalue nearest 1 is real (φ is then real up to one factor); when it is complex
            the authors' real part depends on the eigenvector's arbitrary phase, which the default
            avoids. Their masks come from :func:`koopfast.criteria.shrinkbench_masks`.
    """
    fit = _fitted(kmd, "koopman_magnitude")
    if preset not in ("koopfast", "shrinkbench"):
        raise ValueError(
            f"koopfast.criteria.koopman_magnitude: expected preset 'koopfast' or 'shrinkbench', got {preset!r}"
        )
    if preset == "shrinkbench":
        if disc is not None:
            raise ValueError(
                "koopfast.criteria.koopman_magnitude: expected disc=None with preset='shrinkbench' (one mode)"
            )
        idx = [kmd.nearest(1.0)]  # their argmin |λ − 1|: the first of a conjugate pair in eig's order
        flat = kmd.combine(fit.coeffs[:, idx].contiguous(), wide=True)[0].real.to(torch.float32).abs()
    else:
        idx = kmd.select(disc)
        if disc is None:  # one mode; of a conjugate pair, the one with Im λ >= 0 (same magnitude)
            idx = [max(idx, key=lambda i: float(fit.eigenvalues[i].imag))]
        c = (fit.coeffs[:, idx] * fit.amplitudes[idx]).sum(1, keepdim=True)
        if disc is not None:
            c = c.real.contiguous()  # the disc is closed under conjugation: the sum is real
        flat = kmd.combine(c)[0].abs()
    return KoopmanScores(kmd.recorder.unflatten(flat), criterion="koopman_magnitude", info=_info(fit, idx, preset))


def koopman_gradient(kmd: DMD) -> KoopmanScores:
    """KGP scores |θ(t) ⊙ Σ_i (λ_i − 1) λ_i^t b_i φ_i| at the last snapshot (a reconstruction)."""
    fit = _fitted(kmd, "koopman_gradient")
    t = fit.n_snapshots - 1
    lam = fit.eigenvalues
    update = (fit.coeffs * ((lam - 1) * lam**t * fit.amplitudes)).sum(1, keepdim=True).real
    last = torch.zeros(fit.n_snapshots, 1, dtype=torch.float64)
    last[-1] = 1.0
    both = kmd.combine(torch.cat([update, last], dim=1).contiguous())  # [2, N]: update, θ(t)
    flat = (both[0] * both[1]).abs()
    return KoopmanScores(
        kmd.recorder.unflatten(flat),
        criterion="koopman_gradient",
        info=_info(fit, list(range(lam.numel())), "koopfast"),
    )


def _info(fit: DMDResult, idx: list[int], preset: str) -> dict[str, Any]:
    lam = fit.eigenvalues[idx]
    return {
        "modes": idx,
        "eigenvalues": lam.clone(),
        "distance": (lam - 1).abs(),
        "residuals": fit.residuals[idx].clone(),
        "preset": preset,
    }
