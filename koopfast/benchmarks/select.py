"""Global threshold selection: koopfast against torch.kthvalue / torch.topk on a concatenated copy.

Case: the k-th largest |θ| at 90 % sparsity over a model-like list of tensors (200 tensors of
log-uniformly spread sizes, trained-weight-like values with per-tensor scales). A streaming read
of the same tensors (per-tensor ``sum``) is the bandwidth floor next to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

import koopfast as kf
from koopfast.benchmarks.harness import Row, fill_ratios, peak_extra_bytes, time_fn

BASELINE = "torch.kthvalue(cat)"
STREAM = "stream read (sum)"


@dataclass(frozen=True)
class SelectCase:
    n: int
    tensors: int = 200
    sparsity: float = 0.9
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def name(self) -> str:
        return f"select N={self.n:.0e} in {self.tensors} tensors"

    @property
    def k(self) -> int:
        return kf.masks.keep_count(self.n, self.sparsity)


def model_like(n: int, tensors: int, dtype: torch.dtype, device: torch.device, seed: int) -> list[Tensor]:
    """`tensors` tensors holding n elements in all: sizes spread log-uniformly (a few large
    matrices, many small vectors), values Gaussian with a log-uniform scale per tensor."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(tensors, generator=g, dtype=torch.float64) * math.log(1e4))
    sizes = (weights / weights.sum() * n).floor().long().clamp_min(1)
    sizes[torch.argmax(sizes)] += n - int(sizes.sum())
    scales = torch.exp(torch.empty(tensors, dtype=torch.float64).uniform_(math.log(0.005), math.log(0.2), generator=g))
    return [(torch.randn(int(s), generator=g) * float(c)).to(dtype=dtype, device=device) for s, c in zip(sizes, scales)]


def methods(case: SelectCase, xs: list[Tensor]) -> dict[str, Callable[[], object]]:
    k, n = case.k, case.n

    def concatenated_abs() -> Tensor:
        return torch.cat([x.reshape(-1) for x in xs]).abs_()

    return {
        "koopfast.select_threshold": lambda: kf.ops.select_threshold(xs, [], "abs", k)[0],
        "koopfast.global_topk (masks)": lambda: kf.masks.global_topk(xs, case.sparsity, by="abs"),
        BASELINE: lambda: torch.kthvalue(concatenated_abs(), n - k + 1).values,
        "torch.topk(cat)": lambda: torch.topk(concatenated_abs(), k, sorted=False).values.min(),
        STREAM: lambda: [x.sum() for x in xs],
    }


def check(case: SelectCase, xs: list[Tensor], fns: dict[str, Callable[[], object]]) -> None:
    """Every method's answer agrees before anything is timed."""
    expected = float(fns[BASELINE]())
    assert float(fns["koopfast.select_threshold"]()) == expected
    assert float(fns["torch.topk(cat)"]()) == expected
    masks = fns["koopfast.global_topk (masks)"]()
    assert sum(int(m.sum()) for m in masks) == case.k
    assert all(bool((x.abs()[m] >= expected).all()) for x, m in zip(xs, masks))


def cases(quick: bool, large: bool = False) -> Iterator[SelectCase]:
    for n in (10**6, 10**7) if quick else (10**8, 10**9) if large else (10**6, 10**7, 10**8):
        yield SelectCase(n=n)


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None, large: bool = False) -> list[Row]:
    rows: list[Row] = []
    for case in cases(quick, large):
        xs = model_like(case.n, case.tensors, case.dtype, device, case.seed)
        fns = methods(case, xs)
        check(case, xs, fns)
        input_bytes = case.n * xs[0].element_size()
        for method, fn in fns.items():
            slow = method in (BASELINE, "torch.topk(cat)") and case.n >= 10**8
            t = time_fn(fn, device, repeat=repeat or (3 if slow else 7))
            peak = peak_extra_bytes(fn, device)
            rows.append(
                Row(
                    family="select",
                    case=case.name,
                    method=method,
                    n=case.n,
                    device=device.type,
                    median_ms=t.median_s * 1e3,
                    min_ms=t.min_s * 1e3,
                    bytes_moved=input_bytes,
                    peak_extra_mb=None if peak is None else peak / 2**20,
                    extra={"peak_extra_fraction_of_input": None if peak is None else peak / input_bytes},
                )
            )
        del xs, fns
    return fill_ratios(rows, BASELINE, STREAM)
