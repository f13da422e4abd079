"""Koopman pipeline benchmarks: KMP from a recorded trajectory, and the per-step cost of recording.

* ``kmp``: N parameters, T snapshots (fp32) of a training-like trajectory (gradient descent on a
  diagonal quadratic with per-parameter curvatures, plus SGD-like noise, so every singular value
  is populated). The full KMP pipeline (DMD fit + scores) of koopfast, against a float64 NumPy
  transcription of the Koopman pruning authors' exact DMD (thin SVD, untruncated) and against
  PyDMD's ``DMD(svd_rank=-1, exact=True)``; all must give the same 10 %-keep mask.
* ``record``: one ``TrajectoryRecorder.record()`` with 32 snapshots stored, against the PyTorch
  way: ``torch.cat`` of the parameters, a copy into the buffer row, and ``buffer @ flat`` (float32
  accumulation; koopfast accumulates in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import koopfast as kf
from koopfast.benchmarks.harness import Row, fill_ratios, peak_extra_bytes, time_fn

AUTHORS = "authors' exact DMD (NumPy SVD, float64)"
PYDMD = "PyDMD DMD(exact=True)"
TORCH_RECORD = "torch: cat + copy + W @ flat"


@dataclass(frozen=True)
class KmpCase:
    n: int
    t: int
    seed: int = 0

    @property
    def name(self) -> str:
        return f"KMP pipeline N={self.n:.0e} T={self.t}"


@dataclass(frozen=True)
class RecordCase:
    n: int
    stored: int = 32
    tensors: int = 200

    @property
    def name(self) -> str:
        return f"record() N={self.n:.0e}, {self.stored} stored"


def training_like(case: KmpCase) -> tuple[dict[str, torch.Tensor], kf.TrajectoryRecorder, np.ndarray]:
    """The recorder filled with the trajectory, and the same snapshots as an N × T float64 array."""
    gen = torch.Generator().manual_seed(case.seed)
    star = torch.randn(case.n, generator=gen)
    curvature = torch.rand(case.n, generator=gen) ** 3  # many slow directions, a few fast ones
    theta = star + torch.randn(case.n, generator=gen)
    params = {"theta": theta}
    rec = kf.TrajectoryRecorder(params, capacity=case.t)
    w = np.empty((case.n, case.t), dtype=np.float64)
    for t in range(case.t):
        rec.record()
        w[:, t] = theta.numpy()
        theta -= 0.1 * curvature * (theta - star) + 1e-3 * torch.randn(case.n, generator=gen)
    return params, rec, w


def authors_kmp(w: np.ndarray) -> np.ndarray:
    x, y = w[:, :-1], w[:, 1:]
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    lam, vecs = np.linalg.eig(u.conj().T @ y @ vh.conj().T @ np.diag(1 / s))
    i = int(np.argmin(np.abs(lam - 1)))
    return np.abs(y @ vh.conj().T @ np.diag(1 / s) @ vecs[:, i] / lam[i])


def pydmd_kmp(w: np.ndarray) -> np.ndarray:
    from pydmd import DMD

    dmd = DMD(svd_rank=-1, exact=True).fit(w)
    i = int(np.argmin(np.abs(dmd.eigs - 1)))
    return np.abs(dmd.modes[:, i])


def kmp_methods(rec, w) -> dict[str, Callable[[], np.ndarray | torch.Tensor]]:
    methods: dict[str, Callable] = {
        "koopfast DMD('gram') + KMP": lambda: kf.criteria.koopman_magnitude(kf.DMD("gram").fit(rec))["theta"],
        "koopfast DMD('qr') + KMP": lambda: kf.criteria.koopman_magnitude(kf.DMD("qr").fit(rec))["theta"],
        AUTHORS: lambda: authors_kmp(w),
    }
    try:
        import pydmd  # noqa: F401

        methods[PYDMD] = lambda: pydmd_kmp(w)
    except ImportError:
        pass
    return methods


def keep_mask(scores) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32) if isinstance(scores, np.ndarray) else scores)
    return kf.masks.global_topk([s.float()], 0.9)[0]


def run_kmp(case: KmpCase, repeat: int | None) -> list[Row]:
    _, rec, w = training_like(case)
    methods = kmp_methods(rec, w)
    reference = keep_mask(methods["koopfast DMD('gram') + KMP"]())
    rows = []
    for name, fn in methods.items():
        mask = keep_mask(fn())
        overlap = float((mask & reference).sum()) / float(reference.sum())
        assert overlap >= 0.9999, f"{name}: mask overlap {overlap} with koopfast's"
        slow = name in (AUTHORS, PYDMD)
        t = time_fn(fn, torch.device("cpu"), repeat=repeat or (2 if slow else 5), warmup=0 if slow else 1)
        peak = peak_extra_bytes(fn, torch.device("cpu"))
        rows.append(
            Row(
                family="koopman",
                case=case.name,
                method=name,
                n=case.n,
                device="cpu",
                median_ms=t.median_s * 1e3,
                min_ms=t.min_s * 1e3,
                bytes_moved=case.n * case.t * 4,
                peak_extra_mb=None if peak is None else peak / 2**20,
                note=f"10% mask overlap with koopfast: {overlap:.5f}",
            )
        )
    return fill_ratios(rows, PYDMD if PYDMD in methods else AUTHORS)


def run_record(case: RecordCase, device: torch.device, repeat: int | None) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    sizes = [case.n // case.tensors] * case.tensors
    sizes[0] += case.n - sum(sizes)
    params = {f"p{i}": torch.randn(s, generator=gen).to(device) for i, s in enumerate(sizes)}
    rec = kf.TrajectoryRecorder(params, capacity=case.stored + 1, window=True)
    for _ in range(case.stored + 1):
        rec.record()
    # real data in the buffer: untouched pages would all read from the one zero page
    buffer = torch.randn(case.stored + 1, case.n, generator=gen).to(device)
    slot = [0]

    def torch_way():
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        slot[0] = (slot[0] + 1) % (case.stored + 1)
        buffer[slot[0]].copy_(flat)
        return buffer @ flat

    # the float64 Gram row is right (float32 accumulation is only close)
    rec.record()
    flat = torch.cat([p.reshape(-1) for p in params.values()]).double()
    g = rec.gram
    assert torch.allclose(g[-1, -1].to(flat.device), flat @ flat, rtol=1e-12)
    rows = []
    moved = (case.stored + 2) * case.n * 4  # stored rows + parameters read, one row written
    for name, fn in {"koopfast record()": rec.record, TORCH_RECORD: torch_way}.items():
        t = time_fn(fn, device, repeat=repeat or 7)
        peak = peak_extra_bytes(fn, device)
        rows.append(
            Row(
                family="koopman",
                case=case.name,
                method=name,
                n=case.n,
                device=device.type,
                median_ms=t.median_s * 1e3,
                min_ms=t.min_s * 1e3,
                bytes_moved=moved,
                peak_extra_mb=None if peak is None else peak / 2**20,
            )
        )
    return fill_ratios(rows, TORCH_RECORD)


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    kmp = KmpCase(n=2 * 10**5, t=32) if quick else KmpCase(n=2 * 10**6, t=64)
    record = RecordCase(n=10**6) if quick else RecordCase(n=10**7)
    return run_kmp(kmp, repeat) + run_record(record, device, repeat)
