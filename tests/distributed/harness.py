"""Run a function on W gloo processes on this machine and collect what each returns.

``run(world, fn, *args)`` spawns ``world`` processes; each initializes the default process group
(gloo, a file store in a fresh temporary directory), calls ``fn(rank, world, *args)`` and saves
its result; the list of results, in rank order, comes back. A failing rank's traceback is raised
in the test. ``fn`` must be importable (defined at module level).
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _main(rank: int, world: int, folder: str, fn, args) -> None:
    torch.set_num_threads(1)  # W processes on a 2-core machine
    out = os.path.join(folder, f"rank{rank}.pt")
    try:
        store = dist.FileStore(os.path.join(folder, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": result}, out)
    except BaseException:  # reported to the parent, which raises
        torch.save({"error": traceback.format_exc()}, out)
    # The result is on disk: leave without the interpreter's finalization, during which gloo's
    # worker threads can still hold tensors and abort the process now and then ("terminate called
    # without an active exception", SIGABRT; pytorch/pytorch PR 179291 describes the race).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(world: int, fn, *args) -> list:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_main, args=(world, folder, fn, args), nprocs=world, start_method="spawn", join=True)
        results = []
        for rank in range(world):
            got = torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False)
            if "error" in got:
                raise AssertionError(f"rank {rank} of {world} failed:\n{got['error']}")
            results.append(got["ok"])
        return results
