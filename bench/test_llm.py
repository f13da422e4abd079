"""Wanda scoring and N:M / per-row / global selection on a GPT-2-small-sized model (``--quick``: a
tiny one) against plain PyTorch: koopfast.benchmarks.llm's methods, each checked against
koopfast's result before it is timed (the check runs in koopfast.benchmarks.llm.prepared)."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("transformers")

from koopfast.benchmarks import llm


@functools.lru_cache(maxsize=1)
def prepared(quick: bool):
    case = llm.cases(quick)[0]
    model, batches = llm.build(case)
    return case, llm.methods(model, batches)


@pytest.mark.parametrize(
    ("group", "method"),
    [(g, m) for g, ms in llm.METHODS.items() for m in ms],
)
def test_llm(benchmark, group, method, quick):
    case, groups = prepared(quick)
    benchmark.group = f"{group}, {case.name}"
    benchmark.pedantic(groups[group][method], rounds=3, warmup_rounds=1)
