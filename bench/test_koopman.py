"""Koopman: the KMP pipeline against the authors' SVD code and PyDMD, and record() per step.

Results are checked (same 10 %-keep mask, float64 Gram row) before timing; compare within a group.
"""

from __future__ import annotations

import functools

import pytest
import torch

from koopfast.benchmarks import koopman
from koopfast.benchmarks.harness import peak_extra_bytes

from conftest import sync_call


@functools.lru_cache(maxsize=1)
def kmp_prepared(quick: bool):
    case = koopman.KmpCase(n=2 * 10**5, t=32) if quick else koopman.KmpCase(n=2 * 10**6, t=64)
    _, rec, w = koopman.training_like(case)
    methods = koopman.kmp_methods(rec, w)
    reference = koopman.keep_mask(methods["koopfast DMD('gram') + KMP"]())
    for name, fn in methods.items():
        overlap = float((koopman.keep_mask(fn()) & reference).sum()) / float(reference.sum())
        assert overlap >= 0.9999, name
    return case, methods


@pytest.mark.parametrize(
    "method", ["koopfast DMD('gram') + KMP", "koopfast DMD('qr') + KMP", koopman.AUTHORS, koopman.PYDMD]
)
def test_kmp_pipeline(benchmark, method, quick):
    case, methods = kmp_prepared(quick)
    if method not in methods:
        pytest.skip("PyDMD is not installed")
    benchmark.group = case.name
    slow = method in (koopman.AUTHORS, koopman.PYDMD)
    benchmark.pedantic(methods[method], rounds=2 if slow else 5, warmup_rounds=0 if slow else 1)


@functools.lru_cache(maxsize=1)
def record_prepared(quick: bool, device_str: str):
    device = torch.device(device_str)
    case = koopman.RecordCase(n=10**6 if quick else 10**7)
    gen = torch.Generator().manual_seed(0)
    sizes = [case.n // case.tensors] * case.tensors
    params = {f"p{i}": torch.randn(s, generator=gen).to(device) for i, s in enumerate(sizes)}
    rec = koopman.kf.TrajectoryRecorder(params, capacity=case.stored + 1, window=True)
    for _ in range(case.stored + 1):
        rec.record()
    buffer = torch.randn(case.stored + 1, sum(sizes), generator=gen).to(device)  # never time on zero pages

    def torch_way():
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        buffer[0].copy_(flat)
        return buffer @ flat

    return case, {"koopfast record()": rec.record, koopman.TORCH_RECORD: torch_way}


@pytest.mark.parametrize("method", ["koopfast record()", koopman.TORCH_RECORD])
def test_record(benchmark, method, quick, device):
    case, methods = record_prepared(quick, str(device))
    benchmark.group = case.name
    benchmark.extra_info["bytes"] = (case.stored + 2) * case.n * 4
    benchmark.pedantic(sync_call(methods[method], device), rounds=7, warmup_rounds=1)


@functools.lru_cache(maxsize=1)
def randomized_prepared(quick: bool):
    case = koopman.RandomizedCase(n=10**6 if quick else 11_689_512)
    methods, buffer = koopman.randomized_methods(case)  # checks the eigenvalues against the textbook QB
    return case, methods, buffer


@pytest.mark.parametrize("method", [koopman.RANDOMIZED, koopman.TEXTBOOK_QB])
def test_randomized_dmd(benchmark, method, quick):
    """One rank-10 randomized fit; koopfast's streamed range finder needs less extra memory than
    the snapshot buffer (the textbook QB ~7.6x)."""
    case, methods, buffer = randomized_prepared(quick)
    peak = peak_extra_bytes(methods[method], torch.device("cpu"))
    if peak is not None:
        benchmark.extra_info["peak_extra_over_buffer"] = peak / buffer
        if method == koopman.RANDOMIZED:
            assert peak < buffer, f"{peak / buffer:.2f}x the buffer"
    benchmark.group = case.name
    benchmark.pedantic(methods[method], rounds=1 if method == koopman.TEXTBOOK_QB else 2)
