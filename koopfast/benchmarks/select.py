"""Global threshold selection: koopfast against torch.kthvalue / torch.topk on a concatenated copy.

Case: the k-th largest |θ| at 90 % sparsity over a model-like list of tensors (200 tensors of
log-uniformly spread sizes, trained-weight-like values with per-tensor scales). A streaming read
of the same tensors (per-tensor ``sum``) is the bandwidth floor next to it.

Second case: layerwise against global selection of the same masks budget over ResNet-50's 161
parameter shapes (25.6 M entries): ``layerwise_topk`` (every tensor's own top 10 %, one call)
next to ``global_topk`` (ratio: global time / layerwise time) and the per-tensor loop a user
would write with ``torch.topk``, timed in turn (one call of each per round).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

import koopfast as kf
from koopfast.benchmarks.harness import Row, fill_ratios, measure, peak_extra_bytes, row_of, time_interleaved

BASELINE = "torch.kthvalue(cat)"
STREAM = "stream read (sum)"
GLOBAL = "koopfast.global_topk (masks)"
LAYERWISE = "koopfast.layerwise_topk (masks)"


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
        GLOBAL: lambda: kf.masks.global_topk(xs, case.sparsity, by="abs"),
        BASELINE: lambda: torch.kthvalue(concatenated_abs(), n - k + 1).values,
        "torch.topk(cat)": lambda: torch.topk(concatenated_abs(), k, sorted=False).values.min(),
        STREAM: lambda: [x.sum() for x in xs],
    }


def check(case: SelectCase, xs: list[Tensor], fns: dict[str, Callable[[], object]]) -> None:
    """Every method's answer agrees before anything is timed."""
    expected = float(fns[BASELINE]())
    assert float(fns["koopfast.select_threshold"]()) == expected
    assert float(fns["torch.topk(cat)"]()) == expected
    masks = fns[GLOBAL]()
    assert sum(int(m.sum()) for m in masks) == case.k
    assert all(bool((x.abs()[m] >= expected).all()) for x, m in zip(xs, masks))


def cases(quick: bool, large: bool = False) -> Iterator[SelectCase]:
    for n in (10**6, 10**7) if quick else (10**8, 10**9) if large else (10**6, 10**7, 10**8):
        yield SelectCase(n=n)


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's / transformers' ResNet-50 (bottleneck blocks 3-4-6-3,
    BatchNorm weight and bias after every convolution, a 1000-way classifier): 161 tensors."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            for cout, cin_, kernel in ((width, cin, 1), (width, width, 3), (4 * width, width, 1)):
                shapes += [(cout, cin_, kernel, kernel), (cout,), (cout,)]
            if block == 0:  # the projection shortcut
                shapes += [(4 * width, cin, 1, 1), (4 * width,), (4 * width,)]
            cin = 4 * width
    return [*shapes, (1000, 2048), (1000,)]


def resnet50_like(dtype: torch.dtype, device: torch.device, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in resnet50_shapes():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shape) > 1 else 0.1
        out.append(
            (torch.randn(shape, generator=g) * scale + (1.0 if len(shape) == 1 else 0.0)).to(dtype=dtype, device=device)
        )
    return out


LAYERWISE_CASE = "layerwise vs global: ResNet-50 shapes"


def layerwise_methods(xs: list[Tensor], sparsity: float) -> dict[str, Callable[[], object]]:
    def torch_loop() -> list[Tensor]:
        masks = []
        for x in xs:
            k = kf.masks.keep_count(x.numel(), sparsity)
            mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
            mask[torch.topk(x.reshape(-1).abs(), k, sorted=False).indices] = True
            masks.append(mask.reshape(x.shape))
        return masks

    return {
        GLOBAL: lambda: kf.masks.global_topk(xs, sparsity, by="abs"),
        LAYERWISE: lambda: kf.masks.layerwise_topk(xs, sparsity, by="abs"),
        "torch.topk per tensor (masks)": torch_loop,
        STREAM: lambda: [x.sum() for x in xs],
    }


def check_layerwise(xs: list[Tensor], sparsity: float, fns: dict[str, Callable[[], object]]) -> None:
    masks = fns[LAYERWISE]()
    for x, m in zip(xs, masks):
        k = kf.masks.keep_count(x.numel(), sparsity)
        assert int(m.sum()) == k
        if 0 < k < x.numel():  # every kept |x| at least every dropped one
            assert float(x.abs()[m].min()) >= float(x.abs()[~m].max())
    torch_masks = fns["torch.topk per tensor (masks)"]()
    assert all(int(m.sum()) == int(t.sum()) for m, t in zip(masks, torch_masks))


def run_layerwise(device: torch.device, *, repeat: int | None = None, sparsity: float = 0.9) -> list[Row]:
    xs = resnet50_like(torch.float32, device, 0)
    fns = layerwise_methods(xs, sparsity)
    check_layerwise(xs, sparsity, fns)
    n = sum(x.numel() for x in xs)
    # In turn, one call of each per round: the ratio the issue asks about (layerwise / global) is
    # then measured under the same machine state on both sides.
    timings = time_interleaved(fns, device, repeat or 15)
    rows = [
        row_of(
            timings[method], peak_extra_bytes(fn, device), family="select", case=LAYERWISE_CASE, method=method,
            n=n, device=device, bytes_moved=n * xs[0].element_size(),
        )
        for method, fn in fns.items()
    ]  # fmt: skip
    return fill_ratios(rows, GLOBAL, STREAM)


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None, large: bool = False) -> list[Row]:
    rows: list[Row] = []
    for case in cases(quick, large):
        xs = model_like(case.n, case.tensors, case.dtype, device, case.seed)
        fns = methods(case, xs)
        check(case, xs, fns)
        input_bytes = case.n * xs[0].element_size()
        for method, fn in fns.items():
            slow = method in (BASELINE, "torch.topk(cat)") and case.n >= 10**8
            row = measure(
                fn, family="select", case=case.name, method=method, n=case.n, device=device,
                bytes_moved=input_bytes, repeat=repeat or (3 if slow else 7),
            )  # fmt: skip
            peak = None if row.peak_extra_mb is None else row.peak_extra_mb * 2**20
            row.extra = {"peak_extra_fraction_of_input": None if peak is None else peak / input_bytes}
            rows.append(row)
        del xs, fns
    return fill_ratios(rows, BASELINE, STREAM) + run_layerwise(device, repeat=repeat)
