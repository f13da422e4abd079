"""Region codes: koopfast's packed codes vs torch bool comparisons vs the authors' float copies.

Each case checks all methods' answers against each other first, then times one method; compare
within a group (the case name): pytest-benchmark prints the group's relative times.
"""

from __future__ import annotations

import functools

import pytest

from koopfast.benchmarks import codes
from koopfast.benchmarks.harness import peak_extra_bytes

from conftest import sync_call

CASES = {f"{c.kind}-{c.layer}": c for c in codes.cases(quick=False)}
QUICK = {f"{c.kind}-{c.layer}": c for c in codes.cases(quick=True)}


@functools.lru_cache(maxsize=1)
def prepared(key: str, quick: bool, device_str: str):
    import torch

    case = (QUICK if quick else CASES)[key]
    p = codes.prepare(case, torch.device(device_str))
    codes.check(p)
    return p


@pytest.mark.parametrize("method", [codes.KOOPFAST, codes.BOOL, codes.FLOAT, codes.MATMUL, codes.STREAM])
@pytest.mark.parametrize("key", list(CASES))
def test_codes(benchmark, key, method, quick, device):
    p = prepared(key, quick, str(device))
    if method not in p.fns:
        pytest.skip(f"{method} is not a method of the '{p.case.kind}' case")
    fn = sync_call(p.fns[method], device)
    benchmark.group = p.case.name
    benchmark.extra_info["bytes_moved"] = p.bytes_moved
    benchmark.extra_info["kept_bytes_per_epoch"] = p.kept_bytes.get(method)
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(fn, device)
    slow = method in (codes.BOOL, codes.FLOAT) and p.case.kind != "distance"
    benchmark.pedantic(fn, rounds=3 if slow or quick else 7, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = p.bytes_moved / benchmark.stats["median"] / 1e9
