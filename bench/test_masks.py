"""Masks: fused apply vs a loop of p.mul_(mask) and torch._foreach_mul_; koopfast.prune.global_unstructured
vs torch.nn.utils.prune's; forward / training-step cost of a masked model vs torch's pruning hooks.

Each parameter set checks all methods' results against each other first, then times one method;
compare within a group: pytest-benchmark prints the group's relative times.
"""

from __future__ import annotations

import copy
import functools

import pytest

from koopfast.benchmarks import masks
from koopfast.benchmarks.harness import peak_extra_bytes

from conftest import sync_call

APPLY_METHODS = [
    masks.APPLY_BASELINE,
    "torch._foreach_mul_ (bool masks)",
    "torch._foreach_mul_ (float masks)",
    "koopfast apply_masks (bool)",
    "koopfast apply_masks (packed)",
    masks.APPLY_STREAM,
]
GLOBAL_METHODS = [masks.GLOBAL_BASELINE, "koopfast.prune.global_unstructured", "koopfast lean: global_topk + Masked"]
OVERHEAD_METHODS = [masks.DENSE, masks.MASKED, masks.MASKED_TWO_PASSES, masks.OVERHEAD_BASELINE]
OVERHEAD_CASES = ["forward", *(f"train-step-{o.replace(' ', '-')}" for o in masks.OPTIMIZERS)]


@functools.lru_cache(maxsize=1)
def prepared_apply(case: masks.ApplyCase, device_str: str):
    import torch

    targets, pristine, ms = masks.apply_inputs(case, torch.device(device_str))
    fns = masks.apply_methods(case, targets, ms)
    masks.check_apply(targets, pristine, ms, fns, case)
    return targets, pristine, fns


@pytest.mark.parametrize("method", APPLY_METHODS)
@pytest.mark.parametrize("groups", [1, 4], ids=["params", "params+grads+adam"])
def test_apply(benchmark, groups, method, quick, device):
    n = (10**6 if quick else 10**8) // groups
    case = masks.ApplyCase(n=n, groups=groups)
    targets, pristine, fns = prepared_apply(case, str(device))
    fn, moved = fns[method]
    fn = sync_call(fn, device)
    benchmark.group = case.name
    benchmark.extra_info["bytes_moved"] = moved
    benchmark.pedantic(fn, setup=lambda: masks.restore(targets, pristine), rounds=3 if quick else 7, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = moved / benchmark.stats["median"] / 1e9


@functools.lru_cache(maxsize=1)
def prepared_global(case: masks.GlobalCase, device_str: str):
    import torch

    pristine = masks.linear_stack(case.layers, case.width, case.seed, torch.device(device_str))
    holder: dict = {}
    fns = masks.global_methods(case, holder)
    masks.check_global(case, pristine, holder, fns)
    return pristine, holder, fns


@pytest.mark.parametrize("method", GLOBAL_METHODS)
def test_global_unstructured(benchmark, method, quick, device):
    case = next(masks.global_cases(quick))
    pristine, holder, fns = prepared_global(case, str(device))

    def setup():
        holder.clear()
        holder["model"] = copy.deepcopy(pristine)

    fn = sync_call(fns[method], device)
    benchmark.group = case.name
    setup()
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(fn, device)
    slow = method == masks.GLOBAL_BASELINE and not quick
    benchmark.pedantic(fn, setup=setup, rounds=3 if slow or quick else 5, warmup_rounds=0 if slow else 1)
    holder.clear()


@pytest.mark.parametrize("method", OVERHEAD_METHODS)
@pytest.mark.parametrize("which", range(len(OVERHEAD_CASES)), ids=OVERHEAD_CASES)
def test_overhead(benchmark, which, method, quick, device):
    import torch

    case = list(masks.overhead_cases(quick))[which]
    models, _ = masks.overhead_models(case, device)
    fns = masks.overhead_methods(case, models, torch.randn(case.batch, case.width, device=device))
    if method not in fns:
        pytest.skip(f"{method!r} is timed for training steps only")
    benchmark.group = case.name
    benchmark.pedantic(sync_call(fns[method], device), rounds=3 if quick else 7, warmup_rounds=1)
