"""Criteria across processes: per-step recorder overhead and fit time at 1, 2 and 3 processes.

The parameters (N elements in 200 tensors) are partitioned across W gloo processes on this
machine (each holds N / W elements; threads split so that W processes use the machine's cores).
Measured on rank 0, between barriers so every rank has finished: ``record()`` with T snapshots
stored (a full window), and the pipeline from a recorded trajectory to masks: ``DMD("gram")``
fit + KMP scores + ``global_topk`` at 90 % (and the same with ``DMD("qr")``). The 1-process row
is the plain single-process recorder (no group). Bytes communicated are each process's payloads
handed to the collectives (what it contributes; gloo moves about 2 (W − 1) / W of an all-reduce's
payload per process), counted from the algorithm, not sniffed from the wire. GB/s of record():
the stored snapshots read by all processes together per call.

On a 2-core machine 2 processes get a core each and 3 oversubscribe: the rows show what the
collectives cost and that the results do not change, not multi-node scaling (docs/distributed.md
has the arithmetic for that).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from koopfast.benchmarks.harness import Row, fill_ratios

WORLDS = (1, 2, 3)
SINGLE = "1 process (no group)"


@dataclass(frozen=True)
class DistCase:
    numel: int
    stored: int
    tensors: int = 200

    @property
    def name(self) -> str:
        return f"N={self.numel:.0e}, {self.stored} stored"


def cases(quick: bool) -> list[DistCase]:
    return [DistCase(200_000, 8)] if quick else [DistCase(10_000_000, 32)]


def _sizes(case: DistCase) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(case.tensors, generator=gen) + 0.05
    sizes = (weights / weights.sum() * case.numel).long()
    sizes[-1] += case.numel - int(sizes.sum())
    return sizes.tolist()


def _worker(rank: int, world: int, folder: str, case: DistCase, repeat: int) -> None:
    import torch.distributed as dist

    import koopfast as kf

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    grouped = world > 1
    if grouped:
        dist.init_process_group(
            "gloo", store=dist.FileStore(os.path.join(folder, "store"), world), rank=rank, world_size=world
        )
    sizes = _sizes(case)
    per = -(-len(sizes) // world)
    mine = list(range(rank * per, min((rank + 1) * per, len(sizes))))
    gen = torch.Generator().manual_seed(1 + rank)
    params = {f"p{i}": torch.randn(sizes[i], generator=gen) for i in mine}
    group = dist.group.WORLD if grouped else None
    rec = kf.TrajectoryRecorder(params, case.stored, window=True, process_group=group)

    def barrier():
        if grouped:
            dist.barrier()

    def step(i):
        with torch.no_grad():
            for p in params.values():
                p.mul_(0.999).add_(0.001 * (i % 7))

    for i in range(case.stored):  # fill the window
        step(i)
        rec.record()
    record_s = []
    for i in range(repeat + 1):
        step(i)
        barrier()
        t0 = time.perf_counter()
        rec.record()
        barrier()
        record_s.append(time.perf_counter() - t0)
    fits = {}
    for method in ("gram", "qr"):
        runs = []
        for _ in range(max(2, repeat // 2) + 1):
            barrier()
            t0 = time.perf_counter()
            kmp = kf.criteria.koopman_magnitude(kf.DMD(method).fit(rec))
            masks = kf.masks.global_topk(kmp, 0.9, process_group=group)
            barrier()
            runs.append(time.perf_counter() - t0)
        fits[method] = runs[1:]  # the first is a warm-up
        kept = sum(int(m.sum()) for m in masks.values())
    if grouped:
        total = torch.tensor([kept])
        dist.all_reduce(total)
        kept = int(total)
        dist.destroy_process_group()
    if rank == 0:
        t = case.stored
        torch.save(
            {
                "record": record_s[1:],
                "fits": fits,
                "kept": kept,
                "record_bytes": 0 if not grouped else (t + 3) * 8,  # the Gram row, self/anchor dots, NaN flag
                "select_bytes": 0
                if not grouped
                else 2 * 65536 * 8 + 64 + 8 * len(params),  # histograms, scalars, tie counts
                "qr_bytes": 0 if not grouped else t * t * 8,  # this process's R in the all-gather
            },
            os.path.join(folder, "rank0.pt"),
        )


def _spawn(world: int, case: DistCase, repeat: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, folder, case, repeat), nprocs=world, start_method="spawn", join=True)
        return torch.load(os.path.join(folder, "rank0.pt"))


def run(device: torch.device, *, quick: bool = False, repeat: int | None = None) -> list[Row]:
    if device.type != "cpu":
        return []  # gloo on CPU processes: the GPU version needs one GPU per process (NCCL)
    rows: list[Row] = []
    repeat = repeat or (3 if quick else 7)
    for case in cases(quick):
        kept = set()
        for world in WORLDS:
            got = _spawn(world, case, repeat)
            kept.add(got["kept"])
            method = SINGLE if world == 1 else f"{world} processes (gloo)"
            stored_bytes = case.stored * case.numel * 4  # read per record(), by all processes together
            for what, times, comm in (
                ("record()", got["record"], got["record_bytes"]),
                ("DMD('gram') + KMP + global_topk 90 %", got["fits"]["gram"], got["select_bytes"]),
                ("DMD('qr') + KMP + global_topk 90 %", got["fits"]["qr"], got["select_bytes"] + got["qr_bytes"]),
            ):
                rows.append(
                    Row(
                        family="distributed",
                        case=f"{what} {case.name}",
                        method=method,
                        n=case.numel,
                        device="cpu",
                        median_ms=statistics.median(times) * 1e3,
                        min_ms=min(times) * 1e3,
                        bytes_moved=stored_bytes if what == "record()" else 0,
                        peak_extra_mb=None,
                        note=f"sends {comm} B per process" if comm else "no communication",
                        extra={"bytes_communicated_per_process": comm, "world": world},
                    )
                )
        if len(kept) != 1 or kept.pop() != round(0.1 * case.numel):
            raise AssertionError(f"distributed benchmark: kept counts differ between process counts: {kept}")
    return fill_ratios(rows, SINGLE)


def summary(rows: list[Row]) -> str:
    """Bytes each process hands to the collectives, per call, next to the time."""
    lines = ["case                                                     processes  median ms  sent per process"]
    for r in rows:
        sent = r.extra["bytes_communicated_per_process"]
        lines.append(f"{r.case:55s}  {r.extra['world']:9d}  {r.median_ms:9.2f}  {sent:>12,d} B")
    return "\n".join(lines)
