"""Hḡ on transformers: exact double backward against finite differences and torch.func.

Correctness first: each method's Hḡ is checked against a float64 double-backward reference
(within the bound the method documents) before it is timed."""

from __future__ import annotations

import functools
import math

import pytest

pytest.importorskip("transformers")

import koopfast as kf
from koopfast.benchmarks import hvp

BOUNDS = {hvp.EXACT: 1e-5, hvp.TORCH_FUNC: 1e-5, hvp.FD_AUTO: 5e-2}


@functools.lru_cache(maxsize=1)
def prepared(quick: bool):
    case = hvp.cases(quick)[0]
    model, batches, loss = hvp.build(case)
    reference_model, _, _ = hvp.build(case)
    reference_model.double()
    reference = hvp.flat(kf.criteria.gradient_flow(reference_model.double(), loss, batches, hvp="exact").hg)
    params = {n: e.tensor for n, e in kf.prunable.prunable(model).items()}
    methods = {
        hvp.EXACT: lambda: kf.criteria.gradient_flow(model, loss, batches, hvp="exact").hg,
        hvp.FD_AUTO: lambda: kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference").hg,
        hvp.TORCH_FUNC: lambda: hvp.torch_func_hg(model, batches, loss, params),
    }
    for name, fn in methods.items():
        error = float((hvp.flat(fn()) - reference).norm() / reference.norm())
        assert math.isfinite(error) and error < BOUNDS[name], (name, error)
    return case, methods


@pytest.mark.parametrize("method", [hvp.EXACT, hvp.FD_AUTO, hvp.TORCH_FUNC])
def test_hg(benchmark, method, quick):
    case, methods = prepared(quick)
    benchmark.group = case.name
    benchmark.pedantic(methods[method], rounds=3, warmup_rounds=1)
