"""Koopman pipeline benchmarks: KMP from a recorded trajectory, and the per-step cost of recording.

* ``kmp``: N parameters, T snapshots (fp32) of a training-like trajectory (gradient descent on a
  diagonal quadratic with per-parameter curvatures, plus SGD-like noise, so every singular value
  is populated). The full KMP pipeline (DMD fit + scores) of koopfast, against a float64 NumPy
  transcription of the Koopman pruning authors' exact DMD (thin SVD, untruncated) and against
  PyDMD's ``DMD(svd_rank=-1, exact=True)``; all must give the same 10 %-keep mask.
* ``record``: one ``TrajectoryRecorder.record()`` with 32 snapshots stored, against the PyTorch
  way: ``torch.cat`` of the parameters, a copy into the buffer row, and ``buffer @ flat`` (float32
  accumulation; koopfast accumulates in float64).
* ``randomized``: a rank-10 randomized DMD fit (2 power iterations) of T = 20 snapshots of N
  parameters (ResNet-18 size in the full run): peak memory beyond the snapshot buffer, koopfast's
  streamed range finder against the textbook QB in torch (W Ω, QR, W (Wᵀ Q), QR, Qᵀ W, float64 as
  koopfast computes), same sketch Ω, same eigenvalues; DMD("qr") and DMD("gram") for scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import koopfast as kf
from koopfast.benchmarks.harness import Row, fill_ratios, measure

AUTHORS = "authors' exact DMD (NumPy SVD, float64)"
PYDMD = "PyDMD DMD(exact=True)"
TORCH_RECORD = "torch: cat + copy + W @ flat"
TEXTBOOK_QB = "torch: textbook randomized QB (explicit Q)"
RANDOMIZED = "koopfast DMD('randomized')"


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
        rows.append(
            measure(
                fn,
                family="koopman",
                case=case.name,
                method=name,
                n=case.n,
                device=torch.device("cpu"),
                bytes_moved=case.n * case.t * 4,
                repeat=repeat or (2 if slow else 5),
                warmup=0 if slow else 1,
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
        rows.append(
            measure(
                fn,
                family="koopman",
                case=case.name,
                method=name,
                n=case.n,
                device=device,
                bytes_moved=moved,
                repeat=repeat or 7,
            )
        )
    return fill_ratios(rows, TORCH_RECORD)


@dataclass(frozen=True)
class RandomizedCase:
    n: int
    t: int = 20
    rank: int = 10
    oversample: int = 10
    power_iters: int = 2

    @property
    def name(self) -> str:
        return f"randomized DMD N={self.n:.2e} T={self.t} rank {self.rank}"


def textbook_qb(w: torch.Tensor, case: RandomizedCase) -> torch.Tensor:
    """B = Qᵀ W of Halko et al.'s randomized range finder with an explicit N × k Q, float64, with
    koopfast's sketch Ω (same seed): what a user writes in torch. w: [t, N] snapshots."""
    width = min(case.rank + case.oversample, case.t)
    omega = torch.randn(case.t, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wt = w.T.double()  # [N, t]
    q = torch.linalg.qr(wt @ omega).Q
    for _ in range(case.power_iters):
        q = torch.linalg.qr(wt @ (wt.T @ q)).Q
    return q.T @ wt  # [k, t]


def _eigenvalues_of_factor(b: torch.Tensor, rank: int) -> list[complex]:
    x, y = b[:, :-1], b[:, 1:]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    lam = torch.linalg.eigvals(u.T @ y @ v / s)
    return sorted((complex(z) for z in lam.tolist()), key=lambda z: (round(abs(z), 6), z.imag))


def randomized_methods(case: RandomizedCase) -> tuple[dict[str, Callable], int]:
    """The fits to compare on one trajectory (checked: koopfast's eigenvalues equal the textbook
    QB's with the same sketch), and the snapshot buffer's size in bytes."""
    gen = torch.Generator().manual_seed(0)
    w = torch.empty(case.t, case.n)
    theta = torch.randn(case.n, generator=gen)
    curvature = torch.rand(case.n, generator=gen) ** 3
    params = {"theta": theta}
    rec = kf.TrajectoryRecorder(params, capacity=case.t)
    for i in range(case.t):
        rec.record()
        w[i] = theta
        theta -= 0.1 * curvature * theta + 1e-3 * torch.randn(case.n, generator=gen)
    fit = kf.DMD("randomized", rank=case.rank, oversample=case.oversample, power_iters=case.power_iters).fit
    ours = sorted((complex(z) for z in fit(rec).eigenvalues.tolist()), key=lambda z: (round(abs(z), 6), z.imag))
    theirs = _eigenvalues_of_factor(textbook_qb(w, case), case.rank)
    gap = max(abs(a - b) for a, b in zip(ours, theirs))
    assert len(ours) == len(theirs) and gap < 1e-6, f"randomized DMD eigenvalues differ from the textbook QB by {gap}"
    methods = {
        RANDOMIZED: lambda: fit(rec),
        TEXTBOOK_QB: lambda: textbook_qb(w, case),
        "koopfast DMD('qr')": lambda: kf.DMD("qr").fit(rec),
        "koopfast DMD('gram')": lambda: kf.DMD("gram").fit(rec),
    }
    return methods, (case.t + 1) * case.n * 4


def run_randomized(case: RandomizedCase, repeat: int | None) -> list[Row]:
    methods, buffer = randomized_methods(case)

    def note(peak: int | None) -> str:
        return "" if peak is None else f"peak extra {peak / buffer:.2f}x the buffer ({buffer / 2**20:.0f} MiB)"

    rows = [
        measure(
            fn,
            family="koopman",
            case=case.name,
            method=name,
            n=case.n,
            device=torch.device("cpu"),
            bytes_moved=case.n * case.t * 4,
            repeat=repeat or 3,
            note=note,
            extra={"buffer_mb": buffer / 2**20},
        )
        for name, fn in methods.items()
    ]
    return fill_ratios(rows, TEXTBOOK_QB)


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    kmp = KmpCase(n=2 * 10**5, t=32) if quick else KmpCase(n=2 * 10**6, t=64)
    record = RecordCase(n=10**6) if quick else RecordCase(n=10**7)
    randomized = RandomizedCase(n=10**6) if quick else RandomizedCase(n=11_689_512)  # ResNet-18's parameters
    return run_kmp(kmp, repeat) + run_record(record, device, repeat) + run_randomized(randomized, repeat)


def summary(rows: list[Row]) -> str:
    notes = [f"  {r.method}: {r.note}" for r in rows if r.case.startswith("randomized") and r.note]
    return "randomized DMD memory:\n" + "\n".join(notes) if notes else ""
