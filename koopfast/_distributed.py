"""What a criterion needs from torch.distributed: which process group, which local pieces.

Two ways parameters are split across processes, both resolved here once:

* sharded tensors: ``DTensor`` parameters (FSDP2's ``fully_shard``, or ``distribute_tensor``)
  placed ``Shard(0)`` on a one-dimensional mesh. The group is the mesh's; each process holds
  rows of every tensor, rank r's rows after rank r-1's, so the single-process order of elements,
  (tensor index, flat index), is (tensor index, rank, local flat index).
* a partition: plain tensors and an explicit ``process_group``: each process holds its own
  named tensors whole. The single-process order is then (rank, local order): rank 0's tensors
  first. It equals the order of a model's ``named_parameters()`` when each rank holds a
  contiguous run of them (pipeline stages do).

Replicated parameters (DDP) need no group for recording or selection: every process holds and
computes the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor = Shard = None  # type: ignore[assignment, misc]


@dataclass(frozen=True)
class Layout:
    """How this process's tensors sit in the single-process order of all of them."""

    group: Any  # a ProcessGroup; dist.group.WORLD when given as None with sharded tensors
    rank: int
    world: int
    sharded: bool  # True: DTensor Shard(0) pieces of every tensor; False: a partition by rank
    mesh: Any = None
    placements: tuple[Any, ...] = ()

    def segment_order(self, counts_by_rank: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """(rank, local index) of every local tensor of every rank, in single-process order."""
        if self.sharded:
            n = len(counts_by_rank[0])
            return [(r, i) for i in range(n) for r in range(self.world)]
        return [(r, i) for r in range(self.world) for i in range(len(counts_by_rank[r]))]

    def wrap(self, local: Tensor, like: Tensor | None, shape: Sequence[int] | None = None) -> Tensor:
        """A local result back in the caller's form: a DTensor placed as ``like`` (of ``like``'s
        global shape, or ``shape``: per-unit results of a sharded weight) when the inputs were
        DTensors, else the local tensor."""
        if self.sharded and like is not None and _is_dtensor(like):
            shape = torch.Size(like.shape if shape is None else shape)
            stride = torch.empty(shape, device="meta").stride()  # the global tensor, contiguous
            local = local.contiguous()
            return DTensor.from_local(
                local, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride
            )
        return local


def _is_dtensor(t: object) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: Sequence[Tensor]) -> bool:
    return any(_is_dtensor(t) for t in tensors)


def resolve(tensors: Sequence[Tensor], process_group: Any, fn: str) -> Layout | None:
    """The layout of ``tensors`` across processes, or None for a single process's computation.

    DTensors are detected (all must be ``Shard(0)`` on the same one-dimensional mesh); plain
    tensors are a partition when ``process_group`` is given. Raises naming ``fn`` otherwise.
    """
    dtensors: list[DTensor] = [t for t in tensors if _is_dtensor(t)]
    if dtensors:
        if len(dtensors) != len(tensors):
            raise ValueError(f"{fn}: expected either all tensors or none to be DTensors, got a mix")
        mesh = dtensors[0].device_mesh
        for t in dtensors:
            if t.device_mesh != mesh:
                raise ValueError(f"{fn}: expected every DTensor on one device mesh, got {mesh} and {t.device_mesh}")
            if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
                raise ValueError(
                    f"{fn}: expected DTensors sharded as (Shard(0),) on a one-dimensional mesh (FSDP2's layout), "
                    f"got placements {tuple(t.placements)} on a {mesh.ndim}-d mesh"
                )
        group = mesh.get_group()
        if process_group is not None and process_group is not group:
            raise ValueError(f"{fn}: expected process_group to be the DTensors' mesh group (or None)")
        return Layout(group, dist.get_rank(group), dist.get_world_size(group), True, mesh, (Shard(0),))
    if process_group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: expected torch.distributed to be initialized for process_group, it is not")
    if process_group == "default":
        process_group = dist.group.WORLD
    return Layout(process_group, dist.get_rank(process_group), dist.get_world_size(process_group), False)


def local(t: Tensor) -> Tensor:
    """This process's piece of a tensor (the local shard of a DTensor; the tensor itself)."""
    return t.to_local() if _is_dtensor(t) else t


def all_reduce(t: Tensor, layout: Layout | None) -> Tensor:
    """Sum over the processes of the layout, in place; returns ``t``. No-op for one process."""
    if layout is not None and layout.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=layout.group)
    return t


def all_gather_ints(values: Sequence[int], layout: Layout) -> list[list[int]]:
    """Each rank's list of ints (lengths may differ), on every rank."""
    device = _comm_device(layout)
    n = torch.tensor([len(values)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(layout.world)]
    dist.all_gather(sizes, n, group=layout.group)
    width = max(int(s) for s in sizes)
    mine = torch.zeros(width, dtype=torch.int64, device=device)
    mine[: len(values)] = torch.tensor(list(values), dtype=torch.int64)
    out = [torch.zeros_like(mine) for _ in range(layout.world)]
    dist.all_gather(out, mine, group=layout.group)
    return [o[: int(s)].tolist() for o, s in zip(out, sizes)]


def all_gather_rows(t: Tensor, layout: Layout) -> Tensor:
    """Every rank's [k, m] tensor (same shape everywhere), stacked in rank order: [world·k, m]."""
    out = [torch.empty_like(t) for _ in range(layout.world)]
    dist.all_gather(out, t.contiguous(), group=layout.group)
    return torch.cat(out)


def _comm_device(layout: Layout) -> torch.device:
    """Where the group's backend wants tensors: CUDA for NCCL, else the CPU."""
    backend = dist.get_backend(layout.group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device(layout: Layout | None) -> torch.device:
    return torch.device("cpu") if layout is None else _comm_device(layout)
