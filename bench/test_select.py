"""Global threshold selection: koopfast vs torch.kthvalue / torch.topk on a concatenated copy.

Each parameter set checks all methods' answers against each other first, then times one method;
compare within a group ("select N=..."): pytest-benchmark prints the group's relative times.
"""

from __future__ import annotations

import functools

import pytest

from koopfast.benchmarks import select
from koopfast.benchmarks.harness import peak_extra_bytes

from conftest import sync_call

SIZES = [10**6, 10**7, 10**8]
METHODS = [
    "koopfast.select_threshold",
    select.GLOBAL,
    select.BASELINE,
    "torch.topk(cat)",
    select.STREAM,
]


@functools.lru_cache(maxsize=1)
def prepared(n: int, device_str: str):
    import torch

    case = select.SelectCase(n=n)
    xs = select.model_like(case.n, case.tensors, case.dtype, torch.device(device_str), case.seed)
    fns = select.methods(case, xs)
    select.check(case, xs, fns)
    return case, xs, fns


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"N={n:.0e}")
def test_select(benchmark, n, method, quick, device):
    if quick and n > 10**6:
        pytest.skip("--quick: N = 10^6 only")
    case, xs, fns = prepared(n, str(device))
    fn = sync_call(fns[method], device)
    benchmark.group = case.name
    benchmark.extra_info["input_bytes"] = case.n * xs[0].element_size()
    peak = peak_extra_bytes(fn, device)
    benchmark.extra_info["peak_extra_bytes"] = peak
    slow = method in (select.BASELINE, "torch.topk(cat)") and n >= 10**8
    benchmark.pedantic(fn, rounds=3 if slow or quick else 7, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = benchmark.extra_info["input_bytes"] / benchmark.stats["median"] / 1e9


@functools.lru_cache(maxsize=1)
def prepared_layerwise(device_str: str):
    import torch

    xs = select.resnet50_like(torch.float32, torch.device(device_str), 0)
    fns = select.layerwise_methods(xs, 0.9)
    select.check_layerwise(xs, 0.9, fns)
    return xs, fns


@pytest.mark.parametrize("method", [select.GLOBAL, select.LAYERWISE, "torch.topk per tensor (masks)", select.STREAM])
def test_layerwise_vs_global(benchmark, method, quick, device):
    """Layerwise and global masks over ResNet-50's parameter shapes (25.6 M entries, 161 tensors)."""
    xs, fns = prepared_layerwise(str(device))
    fn = sync_call(fns[method], device)
    benchmark.group = select.LAYERWISE_CASE
    benchmark.extra_info["input_bytes"] = sum(x.numel() for x in xs) * xs[0].element_size()
    benchmark.pedantic(fn, rounds=3 if quick else 7, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = benchmark.extra_info["input_bytes"] / benchmark.stats["median"] / 1e9
