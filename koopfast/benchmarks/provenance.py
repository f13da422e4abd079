"""Where a benchmark result came from: date, commit, command, versions, device, threads, repeats.

``koopfast bench`` writes :func:`run_metadata` into results.json and bench/conftest.py into
pytest-benchmark's machine_info, so that a number in bench/RESULTS.md can be traced to the code and
the machine that produced it.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def checkout_root() -> Path | None:
    """The git checkout koopfast is imported from (an editable install or a source tree), or None
    when koopfast is installed elsewhere (a wheel in site-packages is no checkout, even when a
    checkout encloses the virtual environment)."""
    import koopfast

    root = Path(koopfast.__file__).resolve().parent.parent
    top = _git(root, "rev-parse", "--show-toplevel")
    return root if top is not None and Path(top).resolve() == root else None


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``commit`` (the checked-out commit) and ``dirty`` (tracked files differ from that commit;
    untracked files such as benchmark outputs do not count; None when unknown). A copy of a tree
    without its .git (as sent to a GPU machine) has no commit of its own: there the environment
    variable KOOPFAST_COMMIT, if set by whoever made the copy, names it (``commit_source`` says which)."""
    root = checkout_root()
    if root is None:
        given = os.environ.get("KOOPFAST_COMMIT") or None
        return {"commit": given, "dirty": None, "commit_source": "KOOPFAST_COMMIT" if given else None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    commit = _git(root, "rev-parse", "HEAD")
    return {"commit": commit, "dirty": None if status is None else bool(status), "commit_source": "git"}


def device_details(device: torch.device) -> dict[str, Any]:
    """The device's name and the numbers that bound its bandwidth and parallelism."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda_runtime": torch.version.cuda,
        }
    return {"name": _cpu_name(), "cores": os.cpu_count(), "machine": platform.machine()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(
    *,
    command: Sequence[str],
    device: torch.device,
    repeat: int | None,
    size: str,
    families: Sequence[str],
    noisy_spread: float,
) -> dict[str, Any]:
    """Everything a reader needs to trust (or redo) a run. ``command``: the arguments of the
    command that ran (``koopfast bench ...``); the process's own command line is kept beside it.
    ``repeat`` None means each case's own default number of timed runs (every row records its own)."""
    import koopfast

    info = koopfast.build_info()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{f"git_{k}": v for k, v in git_state().items()},
        "command": shlex.join(command),
        "process_command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "koopfast": koopfast.__version__,
        "koopfast_backends": list(info["backends"]),
        "device": device_details(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeat": repeat,
        "size": size,
        "quick": size == "quick",
        "families": list(families),
        "noisy_spread_threshold": noisy_spread,
    }
