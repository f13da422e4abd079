"""DMD of a recorded parameter trajectory: an estimator (settings in __init__, ``fit`` -> self).

Every method reduces the N × T snapshot matrix W to a small float64 factor F (k × T) with
W = Q F for a Q with orthonormal columns that is never formed:

* ``"gram"``: method of snapshots, F = Λ^½ Uᵀ from the recorder's float64 Gram matrix G = WᵀW
  (already up to date after each ``record()``: no pass over W at fit time). It squares the
  condition number: singular values below √ε₆₄·σ₁ ≈ 1.5e-8·σ₁ are lost, which for float32 storage
  is below the storage rounding anyway.
* ``"qr"``: F = R of a tall-skinny QR (TSQR: Householder QR of W's column chunks in float64,
  stacked), one pass over W, stable whatever the conditioning.
* ``"randomized"``: Erichson et al. 2019: Q from a randomized range finder (sketch WΩ with
  oversampling and power iterations) and F = QᵀW, for a rank-k fit. Q = W C is kept as its
  coefficients C (T × k), never as an N × k matrix: each power iteration is one streamed pass over
  W (TSQR of W C and Wᵀ W C together), so extra memory is one block of the trajectory.

The exact DMD of Tu et al. 2014 (the Koopman pruning authors' choice) then runs on F: X = F[:, :-1],
Y = F[:, 1:], SVD X = UΣV*, Ã = U*YVΣ⁻¹, eig(Ã) = (λ, w), modes φ = λ⁻¹ Y V Σ⁻¹ w. A mode is a
combination of the snapshots, φ = W c, so modes, fixed points and forecasts each take one pass
over W (``trajectory_combine``) and nothing N × T complex is ever built. No centering (it removes
the λ = 1 eigenvalue that KMP needs; numerics.md, pitfall 1).

With a recorder spread across processes, the factor F is the same on every process: "gram" uses
the all-reduced Gram matrix; "qr" stacks every process's local R (t × t each, one all-gather) and
factors the stack (TSQR's reduction step); "randomized" all-reduces the sketch's t × m inner
products and orthonormalizes with a distributed TSQR-SVD. The small eigenproblem then runs
identically everywhere, and modes and scores are local passes over local snapshots.
"""

from __future__ import annotations

import numbers
import operator
from typing import Literal

import torch
from torch import Tensor

from koopfast import _distributed as kd
from koopfast.trajectory import TrajectoryRecorder

__all__ = ["DMD"]

_FN = "koopfast.DMD"
Method = Literal["gram", "qr", "randomized"]
Debias = Literal["none", "forward_backward"]

_TSQR_CHUNK = 1 << 16
_ALL_ZERO = "expected snapshots that are not all zero, got a trajectory of zeros only"


def _chunk(rec: TrajectoryRecorder) -> int:
    """Columns per block of a pass over W: at most 64K, and at most 1/64 of N (not below 4K), so
    that the pass's working memory (a few float64 copies of a block) stays well below the
    snapshot buffer for small models too."""
    return min(_TSQR_CHUNK, max(1 << 12, rec.numel // 64))


_RANGE_RTOL = 1e-13  # randomized range finder: directions of Z below this × its largest are rounding
_AUTO_RTOL_FACTOR = 1.0


class DMD:
    """Dynamic mode decomposition of a :class:`~koopfast.TrajectoryRecorder`'s snapshots.

    Args:
        method: "gram" (default), "qr" or "randomized" (see the module docstring).
        rank: keep at most this many singular values of X (an int >= 1), or None. Required for
            "randomized" (the target rank of the range finder).
        rtol: keep singular values above rtol × σ₁: a float in (0, 1), or "auto" (the default):
            the relative rounding of the stored snapshots (for float32 storage, 2.4e-7),
            which keeps every direction the data resolves and so reproduces the untruncated exact
            DMD (numerics.md, "Truncation changes the answer"). Stronger truncation is explicit.
        debias: "none" (default) or "forward_backward" (Dawson et al. 2016: Ã = (Ã_f Ã_b⁻¹)^½,
            which removes the bias noise puts on eigenvalues; numerics.md, pitfall 4).
        oversample, power_iters, seed: the randomized range finder's settings (defaults 10, 2, 0).

    After ``fit(recorder)``: ``eigenvalues`` (complex128 [r]), ``amplitudes`` (complex128 [r]:
    least-squares fit of the modes to the first snapshot, as PyDMD does), ``residuals`` (float64
    [r]: ‖Y v − λ X v‖ / ‖X v‖ for the mode's data-space coefficients v), ``singular_values``,
    ``rank``, and the methods ``fixed_point``, ``forecast``, ``mode``, ``nearest``.
    """

    def __init__(
        self,
        method: Method = "gram",
        *,
        rank: int | None = None,
        rtol: float | Literal["auto"] = "auto",
        debias: Debias = "none",
        oversample: int = 10,
        power_iters: int = 2,
        seed: int = 0,
    ) -> None:
        if method not in ("gram", "qr", "randomized"):
            raise ValueError(f"{_FN}: expected method 'gram', 'qr' or 'randomized', got {method!r}")
        if debias not in ("none", "forward_backward"):
            raise ValueError(f"{_FN}: expected debias 'none' or 'forward_backward', got {debias!r}")
        self.method = method
        self.rank = None if rank is None else _positive_int(rank, "rank")
        if method == "randomized" and self.rank is None:
            raise ValueError(f"{_FN}: expected an int rank for method='randomized' (the range finder's target rank)")
        if rtol != "auto":
            if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0.0 < float(rtol) < 1.0:
                raise ValueError(f"{_FN}: expected rtol to be 'auto' or a float in (0, 1), got {rtol!r}")
            rtol = float(rtol)
        self.rtol = rtol
        self.debias = debias
        self.oversample = _positive_int(oversample, "oversample", minimum=0)
        self.power_iters = _positive_int(power_iters, "power_iters", minimum=0)
        self.seed = _positive_int(seed, "seed", minimum=0)
        self._fitted: _Fit | None = None

    # ---- fitting --------------------------------------------------------------------------------------

    def fit(self, recorder: TrajectoryRecorder) -> DMD:
        """Decomposes the recorder's snapshots; returns self. Needs at least 2 snapshots."""
        if not isinstance(recorder, TrajectoryRecorder):
            raise TypeError(f"{_FN}.fit: expected a koopfast.TrajectoryRecorder, got {type(recorder).__name__}")
        t = len(recorder)
        if t < 2:
            raise ValueError(f"{_FN}.fit: expected at least 2 snapshots, got {t}")
        factor = {"gram": self._factor_gram, "qr": self._factor_qr, "randomized": self._factor_randomized}[self.method](
            recorder
        )
        rtol = _AUTO_RTOL_FACTOR * recorder._storage_epsilon() if self.rtol == "auto" else self.rtol
        self._fitted = _exact_dmd(factor, rank=self.rank, rtol=rtol, debias=self.debias)
        self._recorder = recorder
        self._steps = recorder.steps
        self.rtol_used = rtol
        return self

    def _factor_gram(self, rec: TrajectoryRecorder) -> Tensor:
        g = rec.gram
        evals, evecs = torch.linalg.eigh(g)
        keep = evals > evals.max() * 1e-15
        return evals[keep].sqrt()[:, None] * evecs[:, keep].T

    def _factor_qr(self, rec: TrajectoryRecorder) -> Tensor:
        t = len(rec)
        r = torch.zeros(0, t, dtype=torch.float64, device=rec.device)
        for block in rec.blocks(_chunk(rec)):
            r = torch.linalg.qr(torch.cat([r, block.T]), mode="r").R
        return _stacked_r(r.cpu(), rec.layout)

    def _factor_randomized(self, rec: TrajectoryRecorder) -> Tensor:
        """B = Qᵀ W for an orthonormal basis Q of the range of (W Wᵀ)^q W Ω, without storing Q.

        Every basis is Q = W C for a small coefficient matrix C (t × k), so one streamed pass over W
        gives both R of Z = W C (TSQR: Householder QR of the blocks' rows) and S = Wᵀ Z (t × k);
        Q = Z P with P from R, the next sketch is W (Wᵀ Q) = W (S P), and finally B = (S P)ᵀ.
        q + 1 passes (one more when Z is too ill-conditioned for P to orthonormalize it to working
        precision); extra memory is one block of the trajectory whatever N is (the textbook QB
        keeps Q, N × k, and more for its QR)."""
        t = len(rec)
        width = min(self.rank + self.oversample, t)
        gen = torch.Generator().manual_seed(self.seed)
        coeffs = torch.randn(t, width, generator=gen, dtype=torch.float64)  # Ω: W Ω is the sketch
        for i in range(self.power_iters + 1):
            r, s = _range_pass(rec, coeffs)
            p = _orthonormalizer(r)  # Q = W C P
            if i < self.power_iters:
                coeffs = s @ p  # Wᵀ Q: the next sketch is W Wᵀ Q
        basis = coeffs @ p
        if not _nearly_orthonormal(basis, rec.gram):
            r, s = _range_pass(rec, basis)
            p = _orthonormalizer(r)
        return (s @ p).T.contiguous()  # [k, t]

    # ---- results --------------------------------------------------------------------------------------

    @property
    def eigenvalues(self) -> Tensor:
        return self._result().eigenvalues

    @property
    def amplitudes(self) -> Tensor:
        return self._result().amplitudes

    @property
    def residuals(self) -> Tensor:
        return self._result().residuals

    @property
    def singular_values(self) -> Tensor:
        """Singular values of X (the first T − 1 snapshots), all of them, largest first."""
        return self._result().singular_values

    @property
    def n_modes(self) -> int:
        return int(self._result().eigenvalues.numel())

    def nearest(self, value: complex = 1.0) -> int:
        """Index of the eigenvalue nearest ``value``."""
        return int(torch.argmin((self.eigenvalues - complex(value)).abs()))

    def select(self, disc: float | None = None) -> list[int]:
        """Modes representing the fixed point: the eigenvalue nearest 1 (with its complex conjugate
        when it is not real), or, with ``disc`` = δ, every eigenvalue with |λ − 1| < δ."""
        lam = self.eigenvalues
        if disc is None:
            i = self.nearest(1.0)
            partner = _conjugate_partner(lam, i)
            return [i] if partner is None else sorted([i, partner])
        if isinstance(disc, bool) or not isinstance(disc, numbers.Real) or not disc > 0:
            raise ValueError(f"{_FN}.select: expected disc to be a positive float, got {disc!r}")
        chosen = torch.nonzero((lam - 1).abs() < disc).flatten().tolist()
        if not chosen:
            nearest = float((lam - 1).abs().min())
            raise ValueError(f"{_FN}.select: no eigenvalue with |λ - 1| < {disc} (the nearest is at {nearest:.3g})")
        return chosen

    def mode(self, i: int) -> dict[str, Tensor]:
        """Mode i (complex64 tensors in parameter shapes), φ_i = λ_i⁻¹ Y V Σ⁻¹ w_i."""
        fit = self._result()
        i = _mode_index(i, fit.eigenvalues.numel())
        return self._recorder.unflatten(self._combine(fit.coeffs[:, i : i + 1])[0])

    def fixed_point(self, disc: float | None = None) -> dict[str, Tensor]:
        """θ* = the real sum of b_i φ_i over the selected modes (see ``select``), float32 in
        parameter shapes: where training converges if it keeps following the fitted dynamics."""
        fit = self._result()
        idx = self.select(disc)
        c = (fit.coeffs[:, idx] * fit.amplitudes[idx]).sum(1, keepdim=True)
        return self._recorder.unflatten(self._combine(c.real.contiguous())[0])

    def forecast(self, steps: int) -> dict[str, Tensor]:
        """The parameters ``steps`` steps after the last snapshot, float32 in parameter shapes
        (Dogra & Redman 2020): θ̂ = θ_(T−1) + Re Σ_i (λ_i^steps − 1) b'_i φ_i, the last snapshot moved
        by the fitted dynamics, with amplitudes b' fitted to the last snapshot. ``forecast(0)`` is
        the last snapshot exactly (as stored); the part of it outside the modes' span (truncated
        directions) stays as it is. Without truncation this equals Re Σ_i λ_i^steps b'_i φ_i."""
        steps = _positive_int(steps, "steps", minimum=0)
        fit = self._result()
        c = (fit.coeffs * (fit.amplitudes_last * (fit.eigenvalues**steps - 1))).sum(1, keepdim=True).real
        c[-1] += 1.0  # θ_(T−1) itself
        return self._recorder.unflatten(self._combine(c.contiguous())[0])

    # ---- internals ------------------------------------------------------------------------------------

    def _result(self) -> _Fit:
        if self._fitted is None:
            raise RuntimeError(f"{_FN}: not fitted yet; call fit(recorder) first")
        return self._fitted

    def _combine(self, coeffs: Tensor) -> Tensor:
        """Snapshot combinations W c for coefficients in time order (checks the recorder)."""
        if self._recorder.steps != self._steps:
            raise RuntimeError(
                f"{_FN}: the recorder recorded {self._recorder.steps - self._steps} more snapshots since fit(); "
                "fit again to use them"
            )
        return self._recorder._combine(coeffs)


class _Fit:
    """The small float64 results of an exact DMD on a factor F (W = Q F)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _exact_dmd(factor: Tensor, *, rank: int | None, rtol: float, debias: str) -> _Fit:
    f = factor.to(torch.float64)
    t = f.shape[1]
    x, y = f[:, :-1], f[:, 1:]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or not s[0] > 0:
        raise ValueError(f"{_FN}.fit: {_ALL_ZERO}")
    r = int((s > rtol * s[0]).sum())
    if rank is not None:
        r = min(r, rank)
    if r == 0:
        raise ValueError(f"{_FN}.fit: no singular value of the snapshots above the tolerance (σ₁ = {float(s[0]):.3g})")
    u, sr, v = u[:, :r], s[:r], vh[:r].T
    a_forward = u.T @ y @ v / sr
    if debias == "forward_backward":
        # Backward map in the same basis: U*X = Ã_b U*Y; the debiased operator is (Ã_f Ã_b⁻¹)^½.
        a_backward = (u.T @ x) @ torch.linalg.pinv(u.T @ y)
        mu, w = torch.linalg.eig(a_forward @ torch.linalg.inv(a_backward))
        lam = torch.sqrt(mu)
    else:
        lam, w = torch.linalg.eig(a_forward)
    vsw = (v / sr).to(torch.complex128) @ w  # data-space coefficients of each mode: X (V Σ⁻¹ w)
    coeffs = torch.zeros(t, r, dtype=torch.complex128)
    tiny = lam.abs() <= 1e-13 * max(float(lam.abs().max()), 1e-300)
    coeffs[1:, ~tiny] = vsw[:, ~tiny] / lam[~tiny]  # exact modes: λ⁻¹ Y V Σ⁻¹ w
    coeffs[:-1, tiny] = vsw[:, tiny]  # λ ≈ 0: projected modes X V Σ⁻¹ w
    fc = f.to(torch.complex128)
    modes_reduced = fc @ coeffs  # Q*φ for every mode
    fits = torch.linalg.lstsq(modes_reduced, fc[:, [0, t - 1]]).solution  # to the first and the last snapshot
    amplitudes, amplitudes_last = fits[:, 0], fits[:, 1]
    xv, yv = fc[:, :-1] @ vsw, fc[:, 1:] @ vsw
    residuals = (yv - lam * xv).norm(dim=0) / xv.norm(dim=0).clamp_min(1e-300)
    return _Fit(
        eigenvalues=lam,
        amplitudes=amplitudes,
        amplitudes_last=amplitudes_last,
        residuals=residuals,
        singular_values=s,
        coeffs=coeffs,
        n_snapshots=t,
    )


def _stacked_r(r: Tensor, layout: kd.Layout | None) -> Tensor:
    """R of the whole tall matrix from each process's R of its rows (TSQR's reduction)."""
    if layout is None or layout.world == 1:
        return r
    return torch.linalg.qr(_gathered_r(r, layout), mode="r").R


def _gathered_r(r: Tensor, layout: kd.Layout) -> Tensor:
    """Every process's R ([≤ k, k], padded with zero rows to k × k) stacked in rank order."""
    width = r.shape[1]
    square = torch.zeros(width, width, dtype=torch.float64)
    square[: r.shape[0]] = r
    return kd.all_gather_rows(square.to(kd.comm_device(layout)), layout).cpu()


def _range_pass(rec: TrajectoryRecorder, coeffs: Tensor) -> tuple[Tensor, Tensor]:
    """One pass over W for Z = W C: R of Z (TSQR: Householder QR of the stacked block results,
    across processes too) and S = Wᵀ Z (t × k), both float64 on the CPU."""
    c_t = coeffs.T.contiguous().to(rec.device)  # [k, t]
    k = c_t.shape[0]
    r = torch.zeros(k, 0, dtype=torch.float64, device=rec.device)  # Rᵀ so far: [k, ≤ k]
    s = torch.zeros(k, c_t.shape[1], dtype=torch.float64, device=rec.device)
    for block in rec.blocks(_chunk(rec)):
        z_t = c_t @ block  # [k, n]: this block's rows of W C, transposed
        # QR of the column-major [rows, k] stack of R and the block's rows (LAPACK's fast layout)
        r = torch.linalg.qr(torch.cat([r, z_t], dim=1).T, mode="r").R.T
        s += z_t @ block.T
    layout = rec.layout
    if layout is not None and layout.world > 1:
        s = kd.all_reduce(s.to(kd.comm_device(layout)), layout)
    return _stacked_r(r.T.cpu(), layout), s.T.cpu()


def _nearly_orthonormal(coeffs: Tensor, gram: Tensor) -> bool:
    """Whether W C has orthonormal columns to 1e-10 (CᵀGC against I: G's rounding is far below)."""
    m = coeffs.T @ gram @ coeffs
    return float((m - torch.eye(m.shape[0], dtype=m.dtype)).abs().max()) < 1e-10


def _orthonormalizer(r: Tensor) -> Tensor:
    """P such that Z P has orthonormal columns, for Z = Q_Z R: P = V Σ⁻¹ over the singular values
    of R above 1e-13 σ₁ (rank-revealing: directions of Z lost to rounding are dropped)."""
    _, sigma, vh = torch.linalg.svd(r, full_matrices=False)
    keep = sigma > _RANGE_RTOL * sigma[0] if sigma.numel() and sigma[0] > 0 else sigma > 0
    if not bool(keep.any()):
        raise ValueError(f"{_FN}.fit: {_ALL_ZERO}")
    return vh[keep].T / sigma[keep]


def _conjugate_partner(lam: Tensor, i: int) -> int | None:
    li = complex(lam[i])
    if abs(li.imag) <= 1e-12 * max(abs(li), 1e-300):
        return None
    j = int(torch.argmin((lam - li.conjugate()).abs()))
    return None if j == i or abs(complex(lam[j]) - li.conjugate()) > 1e-8 * max(abs(li), 1.0) else j


def _mode_index(i: int, n: int) -> int:
    try:
        i = operator.index(i)
    except TypeError:
        raise TypeError(f"{_FN}.mode: expected an int mode index, got {type(i).__name__}") from None
    if not -n <= i < n:
        raise IndexError(f"{_FN}.mode: expected a mode index in [{-n}, {n}), got {i}")
    return i % n


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{_FN}: expected {name} to be an int, got bool")
    try:
        value = operator.index(value)  # ints and NumPy integers alike; never floats
    except TypeError:
        raise TypeError(f"{_FN}: expected {name} to be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{_FN}: expected {name} >= {minimum}, got {value}")
    return value
