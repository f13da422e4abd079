"""Recorder, DMD, Koopman scores and global masks across 2 and 3 gloo processes, against one process.

Each world size is spawned once (spawning costs seconds); the worker computes every result for
both layouts (a partition of named tensors, DTensor Shard(0) shards) and returns full tensors,
which the tests compare with the single-process computation on the whole set of tensors.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from harness import run

import koopfast as kf

SHAPES = {"a": (7, 5), "b": (13,), "c": (4, 3, 2), "d": (9, 9), "e": (1,), "f": (6, 11)}
STEPS, CAPACITY = 11, 8


def trajectory(step: int) -> dict[str, torch.Tensor]:
    """θ_t = θ* + D^t (θ_0 − θ*) + small noise: a training-like trajectory, the same on every rank."""
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for name, shape in SHAPES.items():
        start = torch.randn(shape, generator=gen)
        target = torch.randn(shape, generator=gen)
        rate = 0.5 + 0.45 * torch.rand(shape, generator=gen)
        noise = torch.randn((STEPS, *shape), generator=gen)[step]
        out[name] = target + rate**step * (start - target) + 1e-3 * noise
    return out


def tied(dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(θ, g) pairs on a coarse grid: many exact ties at any threshold."""
    gen = torch.Generator().manual_seed(99)
    return {
        n: (
            (torch.randint(-4, 5, s, generator=gen) / 4).to(dtype),
            (torch.randint(-2, 3, s, generator=gen) / 2).to(dtype),
        )
        for n, s in SHAPES.items()
    }


def results(recorder_of, masks_of, full) -> dict:
    """Everything compared, from a recorder factory and a masks function, as full tensors."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        rec, update = recorder_of(dtype)
        for step in range(STEPS):
            update(trajectory(step))
            rec.record()
        key = str(dtype).split(".")[-1]
        out[f"gram_{key}"] = rec.gram
        for method, kw in (("auto", {}), ("gram", {}), ("qr", {}), ("randomized", {"rank": 4})):
            kmd = kf.DMD(method, **kw).fit(rec)
            out[f"eig_{key}_{method}"] = kmd.eigenvalues
            out[f"fixed_{key}_{method}"] = full(kmd.fixed_point())
            out[f"forecast_{key}_{method}"] = full(kmd.forecast(5))
        kmd = kf.DMD("gram").fit(rec)
        kmp = kf.criteria.koopman_magnitude(kmd)
        out[f"kmp_{key}"] = full(kmp)
        out[f"kgp_{key}"] = full(kf.criteria.koopman_gradient(kmd))
        out[f"kmp_masks_{key}"] = full(kf.masks.global_topk(kmp, 0.6, **masks_of.kw))
    for dtype in (torch.float32, torch.float64):
        pairs = tied(dtype)
        key = str(dtype).split(".")[-1]
        for by in ("abs", "abs_product", "value"):
            scores = {n: masks_of.piece(p[0]) for n, p in pairs.items()}
            if by == "abs_product":
                scores = {n: (masks_of.piece(p[0]), masks_of.piece(p[1])) for n, p in pairs.items()}
            scores = masks_of.select(scores)
            for sparsity in (0.0, 0.5, 0.77):
                out[f"masks_{key}_{by}_{sparsity}"] = full(kf.masks.global_topk(scores, sparsity, by=by, **masks_of.kw))
            out[f"masks_{key}_{by}_keep0"] = full(kf.masks.global_topk(scores, keep=0, by=by, **masks_of.kw))
            if by == "abs":  # prune: each process zeroes its own entries (DTensor shards: its rows)
                weights = masks_of.select({n: masks_of.piece(p[0].clone()) for n, p in pairs.items()})
                kf.masks.apply_(weights, kf.masks.global_topk(weights, 0.5, by=by, **masks_of.kw))
                out[f"pruned_{key}"] = full(weights)
    return out


class _Partition:
    """Rank r holds a contiguous run of the named tensors, whole."""

    def __init__(self, rank, world):
        names = list(SHAPES)
        per = -(-len(names) // world)
        self.mine = names[rank * per : (rank + 1) * per]
        self.kw = {"process_group": dist.group.WORLD}

    def piece(self, t):
        return t

    def select(self, d):
        return {n: v for n, v in d.items() if n in self.mine}


class _Shards:
    """Every tensor a DTensor placed Shard(0) on a 1-d CPU mesh (FSDP2's layout)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.kw = {}

    def piece(self, t):
        from torch.distributed.tensor import Shard, distribute_tensor

        return distribute_tensor(t, self.mesh, [Shard(0)])

    def select(self, d):
        return d


def worker(rank: int, world: int, folder: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    # A partition of named tensors, snapshots in a memory-mapped file per rank.
    part = _Partition(rank, world)

    def full_partition(d):
        gathered = [None] * world
        dist.all_gather_object(gathered, {n: v.detach().clone() for n, v in d.items()})
        return {n: v for g in gathered for n, v in g.items()}

    def partition_recorder(dtype):
        params = {n: torch.zeros(SHAPES[n]) for n in part.mine}
        path = os.path.join(folder, f"{dtype}-{{rank}}.bin")
        rec = kf.TrajectoryRecorder(
            params, CAPACITY, dtype=dtype, window=True, path=path, process_group=dist.group.WORLD
        )

        def update(values):
            for n, p in params.items():
                p.copy_(values[n])

        return rec, update

    out["partition"] = results(partition_recorder, part, full_partition)

    # DTensor shards.
    mesh = init_device_mesh("cpu", (world,))
    shards = _Shards(mesh)

    def full_dtensor(d):
        return {n: v.full_tensor() for n, v in d.items()}

    def dtensor_recorder(dtype):
        params = {n: shards.piece(torch.zeros(s)) for n, s in SHAPES.items()}

        def update(values):
            for n, p in params.items():
                p.to_local().copy_(shards.piece(values[n]).to_local())

        return kf.TrajectoryRecorder(params, CAPACITY, dtype=dtype, window=True), update

    out["dtensor"] = results(dtensor_recorder, shards, full_dtensor)

    # Failures: every process raises, nothing recorded or changed.
    params = {n: shards.piece(v) for n, v in trajectory(0).items()}
    rec = kf.TrajectoryRecorder(params, CAPACITY)
    rec.record()
    gram = rec.gram
    if rank == world - 1:
        params["a"].to_local().fill_(float("nan"))  # rank world-1 holds the last rows of "a"
    try:
        rec.record()
        out["record_error"] = None
    except ValueError as exc:
        out["record_error"] = str(exc)
    out["record_unchanged"] = len(rec) == 1 and torch.equal(rec.gram, gram)
    try:
        kf.masks.global_topk(params, 0.5, by="abs")
        out["nan_error"] = None
    except ValueError as exc:
        out["nan_error"] = str(exc)
    return out


def single() -> dict:
    class _One:
        def __init__(self):
            self.kw = {}

        def piece(self, t):
            return t

        def select(self, d):
            return d

    def recorder(dtype):
        params = {n: torch.zeros(s) for n, s in SHAPES.items()}

        def update(values):
            for n, p in params.items():
                p.copy_(values[n])

        return kf.TrajectoryRecorder(params, CAPACITY, dtype=dtype, window=True), update

    return results(recorder, _One(), lambda d: {n: v.detach().clone() for n, v in d.items()})


@pytest.fixture(scope="module")
def reference():
    return single()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 processes", "3 processes"])
def distributed(request):
    with tempfile.TemporaryDirectory() as folder:
        return request.param, run(request.param, worker, folder)


def _close(key: str, got, want):
    """Same as one process: masks exactly; the rest to rounding (the sums are in another order)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), key
        for n in want:
            _close(f"{key}[{n}]", got[n], want[n])
    elif want.dtype == torch.bool:
        assert torch.equal(got, want), f"{key}: masks differ"
    else:
        tol = 1e-9 if want.dtype in (torch.float64, torch.complex128) else 4e-6  # float32: a few ulps
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("layout", ["partition", "dtensor"])
def test_every_result_equals_the_single_process_run(distributed, reference, layout):
    world, per_rank = distributed
    for rank, got in enumerate(per_rank):
        for key, want in reference.items():
            if key.startswith("kmp_masks"):
                continue
            _close(f"{layout}, rank {rank}/{world}, {key}", got[layout][key], want)


@pytest.mark.parametrize("layout", ["partition", "dtensor"])
def test_koopman_masks_agree_with_one_process_and_across_ranks(distributed, reference, layout):
    _, per_rank = distributed
    for key in ("kmp_masks_float32", "kmp_masks_bfloat16"):
        want = reference[key]
        for got in per_rank:
            for n in want:
                assert torch.equal(got[layout][key][n], per_rank[0][layout][key][n]), "ranks disagree"
            agree = sum(int((got[layout][key][n] == want[n]).sum()) for n in want)
            total = sum(want[n].numel() for n in want)
            # The scores differ from one process's by float rounding only: at most a tie-like swap.
            assert agree >= total - 2, f"{key}: {total - agree} of {total} entries differ"


def test_a_failure_on_one_process_raises_on_every_process(distributed):
    world, per_rank = distributed
    for rank, got in enumerate(per_rank):
        assert got["record_error"] is not None and "nothing was recorded" in got["record_error"]
        assert got["record_unchanged"]
        assert got["nan_error"] is not None and "NaN" in got["nan_error"]
        if rank == world - 1:
            assert "'a'" in got["record_error"]
        else:
            assert "another process" in got["record_error"]
