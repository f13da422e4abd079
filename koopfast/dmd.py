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
  oversampling and power iterations) and F = QᵀW; for long trajectories where T² work is large.

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
from koopfast import ops
from koopfast.trajectory import TrajectoryRecorder

__all__ = ["DMD"]

_FN = "koopfast.DMD"
Method = Literal["gram", "qr", "randomized"]
Debias = Literal["none", "forward_backward"]

_TSQR_CHUNK = 1 << 16
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
        order = torch.tensor(rec._order, dtype=torch.long, device=rec.device)
        t = len(order)
        r = torch.zeros(0, t, dtype=torch.float64, device=rec.device)
        for n0 in range(0, rec.numel, _TSQR_CHUNK):
            block = rec._snapshots[order, n0 : n0 + _TSQR_CHUNK].to(torch.float64)
            if rec._anchor is not None:
                block = block + rec._anchor[n0 : n0 + _TSQR_CHUNK].to(torch.float64)
            r = torch.linalg.qr(torch.cat([r, block.T]), mode="r").R
        return _stacked_r(r.cpu(), rec._layout)

    def _factor_randomized(self, rec: TrajectoryRecorder) -> Tensor:
        t = len(rec)
        width = min(self.rank + self.oversample, t)
        gen = torch.Generator().manual_seed(self.seed)
        omega = torch.randn(t, width, generator=gen, dtype=torch.float64)
        z = rec._combine(omega)  # [width, N] = (W Ω)ᵀ
        for _ in range(self.power_iters):
            q = _orthonormal_rows(z, rec._layout)
            z = rec._combine(_time_dots(rec, q))  # (W Wᵀ Q)ᵀ
        q = _orthonormal_rows(z, rec._layout)
        return _time_dots(rec, q).T.contiguous()  # B = Qᵀ W: [width, T]

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
        """θ̂ = Re Σ_i λ_i^(T−1+steps) b_i φ_i: the parameters ``steps`` steps after the last
        snapshot (0 reconstructs it), float32 in parameter shapes (Dogra & Redman 2020)."""
        steps = _positive_int(steps, "steps", minimum=0)
        fit = self._result()
        t = fit.n_snapshots - 1 + steps
        c = (fit.coeffs * (fit.amplitudes * fit.eigenvalues**t)).sum(1, keepdim=True)
        return self._recorder.unflatten(self._combine(c.real.contiguous())[0])

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
    r = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
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
    amplitudes = torch.linalg.lstsq(modes_reduced, fc[:, :1]).solution[:, 0]
    xv, yv = fc[:, :-1] @ vsw, fc[:, 1:] @ vsw
    residuals = (yv - lam * xv).norm(dim=0) / xv.norm(dim=0).clamp_min(1e-300)
    return _Fit(
        eigenvalues=lam,
        amplitudes=amplitudes,
        residuals=residuals,
        singular_values=s,
        coeffs=coeffs,
        n_snapshots=t,
    )


def _orthonormal_rows(z: Tensor, layout: kd.Layout | None) -> Tensor:
    """Rows spanning the same space as z's rows, orthonormal ([k, N] -> [k, N]).

    Across processes (z's columns split by process): TSQR with an explicit Q. Each process
    factors its columns, zᵀ_local = Q_l R_l; the stacked R_l (gathered, k × k each) are factored
    once more, [R_1; R_2; ...] = Q_s R; this process's rows of Q are Q_l times its block of Q_s.
    Householder throughout, as on one process: no division by small singular values."""
    zt = z.T.to(torch.float64)
    if layout is None or layout.world == 1:
        return torch.linalg.qr(zt).Q.T.contiguous()
    k = zt.shape[1]
    q_local, r_local = torch.linalg.qr(zt)  # [n, min(n, k)], [min(n, k), k]
    q_stack = torch.linalg.qr(_gathered_r(r_local.cpu(), layout)).Q  # [world·k, k]
    block = q_stack[layout.rank * k : layout.rank * k + q_local.shape[1]].to(q_local.device)
    return (q_local @ block).T.contiguous()


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


def _time_dots(rec: TrajectoryRecorder, vectors: Tensor) -> Tensor:
    """[t, m] inner products <θ_t, v_j> of the stored snapshots (time order) with vectors [m, N]."""
    d = ops.trajectory_dots(rec._snapshots, vectors.to(rec.device), rec._anchor)
    if rec._layout is not None:
        d = kd.all_reduce(d.to(kd.comm_device(rec._layout)), rec._layout).to(rec.device)
    order = torch.tensor(rec._order, dtype=torch.long, device=d.device)
    rows = d[order]
    if rec._anchor is not None:
        rows = rows + d[-1:]
    return rows.cpu()


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
