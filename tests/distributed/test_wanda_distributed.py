"""Wanda scores, N:M masks and layer budgets (uniform per output unit, global, OWL) over 2 and 3
gloo processes, against one process on all the calibration batches.

Data parallel (process_group, DDP): every process holds the same model and runs its own batches
(rank r: batches[r::world], uneven sizes; with two batches and three processes one has none).
Global selection is run twice: on every process's full (replicated) scores, and partitioned, each
process passing only its share of the tensors with the group. FSDP2 (fully_shard, DTensor
Shard(0) weights): the same number of batches per process; each process's masks are its rows.
"""

from __future__ import annotations

import pytest
import torch
from harness import run
from torch import nn

import koopfast as kf

SIZES = (5, 3, 8, 1, 6, 4)  # 6 batches of uneven sizes
SPARSITY = 0.5


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every process
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def all_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, 2, 8, generator=gen, dtype=torch.float64) for s in SIZES]


def selections(scores) -> dict:
    """Everything derived from the scores that is compared."""
    owl = kf.masks.owl_sparsities(scores, SPARSITY, lam=0.1, m=2.0)
    return {
        "scores": dict(scores),
        "norms": scores.input_norms,
        "tokens": scores.tokens,
        "uniform": scores.masks(SPARSITY),
        "nm": kf.masks.nm_masks(scores, 2, 4),
        "global": kf.masks.global_topk(scores, SPARSITY),
        "owl_sparsities": owl,
        "owl": scores.masks(owl),
    }


def partitioned(scores, rank: int, world: int) -> dict:
    names = list(scores)[rank::world]
    return kf.masks.global_topk({n: scores[n] for n in names}, SPARSITY, process_group="default")


def worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    batches = all_batches()
    model = make_model()
    scores = kf.criteria.wanda(model, batches[rank::world], process_group="default")
    out = {"all": selections(scores), "partitioned": partitioned(scores, rank, world)}
    out["two"] = selections(kf.criteria.wanda(model, batches[:2][rank::world], process_group=dist.group.WORLD))
    out["ddp"] = selections(kf.criteria.wanda(nn.parallel.DistributedDataParallel(make_model()), batches[rank::world]))
    out["fsdp"] = fsdp_outcomes(rank, world, batches)
    return out


def fsdp_outcomes(rank: int, world: int, batches) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2], model[4], model):
        fully_shard(layer)
    scores = kf.criteria.wanda(model, batches[rank::world])  # 3 or 2 batches each
    local = {n: s.to_local() for n, s in scores.items()}
    return {
        "scores": local,  # this process's rows
        "norms": scores.input_norms,
        "uniform": {n: m.to_local() for n, m in scores.masks(SPARSITY).items()},
        "nm": kf.masks.nm_masks(local, 2, 4),  # groups run along the inputs: rows are whole
        "global": {n: m.to_local() for n, m in kf.masks.global_topk(scores, SPARSITY).items()},
    }


@pytest.fixture(scope="module")
def reference() -> dict:
    batches = all_batches()
    model = make_model()
    return {
        "all": selections(kf.criteria.wanda(model, batches)),
        "two": selections(kf.criteria.wanda(model, batches[:2])),
    }


@pytest.fixture(scope="module", params=[2, 3], ids=["2 processes", "3 processes"])
def distributed(request):
    return request.param, run(request.param, worker)


def _same(key: str, got, want) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), key
        for n in want:
            _same(f"{key}[{n}]", got[n], want[n])
    elif isinstance(want, (int, float)):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), key
    elif want.dtype == torch.bool:
        assert torch.equal(got, want), f"{key}: masks differ in {int((got != want).sum())} entries"
    else:  # float64 sums of squares in another order; float32 scores from them
        rtol = 1e-12 if want.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got, want, rtol=rtol, atol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("case", ["all", "two", "ddp"])
def test_every_process_gets_the_single_process_result(distributed, reference, case):
    world, per_rank = distributed
    want = reference["two" if case == "two" else "all"]
    for rank, got in enumerate(per_rank):
        _same(f"{case}, rank {rank}/{world}", got[case], want)
    assert len(set(want["owl_sparsities"].values())) > 1  # the OWL budget is not the uniform one


def test_partitioned_global_selection_equals_one_process(distributed, reference):
    world, per_rank = distributed
    names = list(reference["all"]["scores"])
    order = [n for r in range(world) for n in names[r::world]]  # rank 0's tensors first
    want = kf.masks.global_topk({n: reference["all"]["scores"][n] for n in order}, SPARSITY)
    for rank, got in enumerate(per_rank):
        _same(f"partitioned, rank {rank}/{world}", got["partitioned"], {n: want[n] for n in names[rank::world]})
    assert sum(int(m.sum()) for m in want.values()) == round((1 - SPARSITY) * sum(m.numel() for m in want.values()))


def test_fsdp2_rows_equal_one_process(distributed, reference):
    world, per_rank = distributed
    want = reference["all"]
    for key in ("scores", "uniform", "nm", "global"):
        rows = {n: torch.cat([got["fsdp"][key][n] for got in per_rank]) for n in want[key]}
        _same(f"fsdp {key}, {world} processes", rows, want[key])
    for rank, got in enumerate(per_rank):
        _same(f"fsdp norms, rank {rank}/{world}", got["fsdp"]["norms"], want["norms"])
