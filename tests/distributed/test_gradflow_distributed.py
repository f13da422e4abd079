"""Gradient-flow operands, scores and masks over 2 and 3 gloo processes, against one process.

Replicated (process_group, DDP): every process holds the same float64 model and takes its own
batches (rank r: batches[r::world], uneven counts and sizes, none at all on some rank for the
two-batch set). Sharded (FSDP2 fully_shard: DTensor parameters): the same number of batches per
process. Each must get the single-process result on all the batches. Each world size is spawned
once (spawning costs seconds).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from harness import run
from torch import nn

import koopfast as kf

SIZES = (5, 3, 8, 1, 6, 4, 2)  # 7 batches of uneven sizes
UNSTRUCTURED = ("loss_preservation", "gradient_norm_preservation", "grasp", "fisher")


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same θ on every process
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def all_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(s, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (s,), generator=gen)) for s in SIZES
    ]


def outcomes(model, batches, loss=None, **kw) -> dict:
    """Everything compared, for one model and one process's batches."""
    loss = loss or kf.criteria.cross_entropy()
    exact = kf.criteria.gradient_flow(model, loss, batches, hvp="exact", fisher=True, **kw)
    fd = kf.criteria.gradient_flow(model, loss, batches, hvp="finite_difference", **kw)
    return {
        "batches": (exact.batches, fd.batches),
        "samples": (exact.samples, fd.samples),
        "params": exact.params,
        "grad": exact.grad,
        "hg": exact.hg,
        "grad_sq": exact.grad_sq,
        "fd_hg": fd.hg,
        "scores": {m: exact.scores(m) for m in UNSTRUCTURED},
        "filter": exact.scores("gradient_norm_preservation", "filter"),
        "masks": exact.masks("gradient_norm_preservation", 0.7),
        "grasp": kf.criteria.grasp(model, loss, batches, **kw),  # the named wrappers pass process_group on
    }


def worker(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    batches = all_batches()
    out = {
        "all": outcomes(make_model(), batches[rank::world], process_group="default"),
        # Two batches: with 3 processes, rank 2 has none.
        "two": outcomes(make_model(), batches[:2][rank::world], process_group=dist.group.WORLD),
    }

    # DDP: unwrapped, its process group used, its gradient hooks silent.
    ddp = nn.parallel.DistributedDataParallel(make_model())
    seen = set()
    ce = kf.criteria.cross_entropy()

    def loss(module, batch):
        seen.add(type(module).__name__)
        return ce(module, batch)

    out["ddp"] = outcomes(ddp, batches[rank::world], loss)
    out["ddp_seen"] = seen
    out["ddp_no_grad"] = all(p.grad is None for p in ddp.parameters())

    # No batch on any process: every process raises, after the same collectives.
    try:
        kf.criteria.gradient_flow(make_model(), ce, [], hvp="exact", process_group="default")
        out["empty_error"] = None
    except ValueError as exc:
        out["empty_error"] = str(exc)

    # A mix of DTensor and plain parameters is refused.
    mesh = init_device_mesh("cpu", (world,))
    mixed = make_model()
    mixed[0].weight = nn.Parameter(distribute_tensor(mixed[0].weight.detach(), mesh, [Shard(0)]))
    try:
        kf.criteria.gradient_flow(mixed, ce, batches[rank::world])
        out["mixed_error"] = None
    except ValueError as exc:
        out["mixed_error"] = str(exc)

    out["fsdp"] = fsdp_outcomes(rank, world, batches)
    return out


def fsdp_outcomes(rank: int, world: int, batches) -> dict:
    """FSDP2 (fully_shard): DTensor Shard(0) parameters; the same number of batches per process."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    ce = kf.criteria.cross_entropy()
    mine = batches[:SHARDED_BATCHES][rank::world]
    flow = kf.criteria.gradient_flow(model, ce, mine, hvp="finite_difference")
    out = {
        "batches": (flow.batches,),
        "samples": (flow.samples,),
        "grad": {n: g.full_tensor() for n, g in flow.grad.items()},
        "fd_hg": {n: h.full_tensor() for n, h in flow.hg.items()},
        "scores": {m: {n: t.full_tensor() for n, t in flow.scores(m).items()} for m in SHARDED_MEASURES},
        "filter": {n: t.full_tensor() for n, t in flow.scores("loss_preservation", "filter").items()},
        "masks": {n: t.full_tensor() for n, t in flow.masks("gradient_norm_preservation", 0.7).items()},
        "grads_restored": all(p.grad is None for p in model.parameters()),
    }
    # Prune with the sharded masks and fine-tune under Masked (SGD with momentum): each process
    # keeps its rows pruned; pruned entries stay exactly zero, kept ones train.
    masks = flow.masks("gradient_norm_preservation", 0.7)
    before = {n: p.full_tensor() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with kf.masks.Masked(model, masks, optimizer):
        for batch in mine:
            optimizer.zero_grad()
            ce(model, batch).backward()
            optimizer.step()
    after = {n: p.full_tensor() for n, p in model.named_parameters()}
    full_masks = {n: m.full_tensor() for n, m in masks.items()}
    out["masked_zero"] = all(bool((after[n][~m] == 0).all()) for n, m in full_masks.items())
    out["masked_trained"] = all(not torch.equal(after[n][m], before[n][m]) for n, m in full_masks.items())
    for name, kw, use in (
        ("exact", {"hvp": "exact"}, mine),
        ("fisher", {"fisher": True}, mine),
        ("uneven", {}, batches[rank::world] if world == 3 else batches[: rank + 1]),
    ):
        try:
            kf.criteria.gradient_flow(model, ce, use, **kw)
            out[f"{name}_error"] = None
        except ValueError as exc:
            out[f"{name}_error"] = str(exc)
    return out


SHARDED_BATCHES = 6  # 3 per process for 2 processes, 2 for 3: each backward pass is collective
SHARDED_MEASURES = ("loss_preservation", "gradient_norm_preservation", "grasp", "magnitude")


def sharded_reference() -> dict:
    flow = kf.criteria.gradient_flow(
        make_model(), kf.criteria.cross_entropy(), all_batches()[:SHARDED_BATCHES], hvp="finite_difference"
    )
    return {
        "batches": (flow.batches,),
        "samples": (flow.samples,),
        "grad": flow.grad,
        "fd_hg": flow.hg,
        "scores": {m: flow.scores(m) for m in SHARDED_MEASURES},
        "filter": flow.scores("loss_preservation", "filter"),
        "masks": flow.masks("gradient_norm_preservation", 0.7),
    }


@pytest.fixture(scope="module")
def reference():
    batches = all_batches()
    return {"all": outcomes(make_model(), batches), "two": outcomes(make_model(), batches[:2])}


@pytest.fixture(scope="module", params=[2, 3], ids=["2 processes", "3 processes"])
def distributed(request):
    return request.param, run(request.param, worker)


def _close(key: str, got, want, rtol: float = 1e-12, atol: float = 1e-14) -> None:
    if isinstance(want, Mapping):  # dicts of operands, ScoreMaps of scores
        assert got.keys() == want.keys(), key
        for n in want:
            _close(f"{key}[{n}]", got[n], want[n], rtol, atol)
    elif isinstance(want, tuple):
        assert got == want, f"{key}: {got} != {want}"
    elif want.dtype == torch.bool:
        assert torch.equal(got, want), f"{key}: masks differ"
    else:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("case", ["all", "two", "ddp"])
def test_every_process_gets_the_single_process_result(distributed, reference, case):
    world, per_rank = distributed
    want = reference["two" if case == "two" else "all"]
    for rank, got in enumerate(per_rank):
        for key in want:
            # Finite differences: the rounding of the sums, divided by 2h.
            tol = {"rtol": 1e-7, "atol": 1e-9} if key == "fd_hg" else {}
            _close(f"{case}, rank {rank}/{world}, {key}", got[case][key], want[key], **tol)


def test_ddp_is_unwrapped_and_its_hooks_do_not_fire(distributed):
    _, per_rank = distributed
    for got in per_rank:
        assert got["ddp_seen"] == {"Sequential"}
        assert got["ddp_no_grad"]


def test_no_batch_on_any_process_raises_everywhere(distributed):
    world, per_rank = distributed
    for got in per_rank:
        assert got["empty_error"] == (
            "koopfast.criteria.gradient_flow: expected at least one batch with samples, got none on any of the "
            f"{world} processes"
        )


def test_a_mix_of_sharded_and_plain_parameters_is_refused(distributed):
    _, per_rank = distributed
    for got in per_rank:
        message = got["mixed_error"]
        assert message is not None and message.startswith("koopfast.criteria.gradient_flow: ")
        assert "either all tensors or none to be DTensors" in message


def test_fsdp_sharded_parameters_give_the_single_process_result(distributed):
    world, per_rank = distributed
    want = sharded_reference()
    for rank, got in enumerate(per_rank):
        for key in want:
            # ḡ: FSDP averages over processes and koopfast multiplies back: rounding only.
            tol = (
                {"rtol": 1e-7, "atol": 1e-9} if key in ("fd_hg", "scores", "filter") else {"rtol": 1e-12, "atol": 1e-14}
            )
            _close(f"fsdp, rank {rank}/{world}, {key}", got["fsdp"][key], want[key], **tol)
        assert got["fsdp"]["grads_restored"]
        assert got["fsdp"]["masked_zero"] and got["fsdp"]["masked_trained"]


def test_fsdp_limits_raise_on_every_process(distributed):
    _, per_rank = distributed
    for got in per_rank:
        fsdp = got["fsdp"]
        assert "hvp='exact' needs double backpropagation" in fsdp["exact_error"]
        assert "fisher=True needs each process's own per-batch gradients" in fsdp["fisher_error"]
        assert "every process must pass the same number of batches" in fsdp["uneven_error"]
