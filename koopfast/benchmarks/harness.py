"""Timing, peak memory and table formatting for the benchmarks (perf.md, "Protocol")."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    runs: int


@dataclass
class Row:
    """One measured method on one case; ratio and bandwidth are filled in by the family."""

    family: str
    case: str
    method: str
    n: int
    device: str
    median_ms: float
    min_ms: float
    bytes_moved: int
    peak_extra_mb: float | None
    ratio: float | None = None  # baseline time / this time (> 1: faster than baseline)
    baseline: str = ""
    gbps: float | None = None  # bytes_moved / median time
    stream_fraction: float | None = None  # gbps / measured streaming-read bandwidth
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    repeat: int = 5,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Median and minimum wall time of fn() over `repeat` runs after `warmup` runs.

    ``setup()``, if given, runs untimed before every run (to restore inputs that fn modifies).
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
            synchronize(device)
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), repeat)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so that the next allocations count in VmHWM
    instead of silently reusing pages that are already resident."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure without trimming
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak memory fn() needs beyond what was allocated before it (its outputs included).

    CUDA: the caching allocator's peak. CPU: the peak resident set size (VmHWM, reset through
    /proc/self/clear_refs) minus the resident size before; None where /proc does not allow it.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size
    except OSError:
        return None
    base = _proc_status_kib("VmRSS")
    out = fn()
    peak = _proc_status_kib("VmHWM") - base
    del out
    return max(peak, 0) * 1024


def measure(
    fn: Callable[[], Any],
    *,
    family: str,
    case: str,
    method: str,
    n: int,
    device: torch.device,
    bytes_moved: int = 0,
    repeat: int = 5,
    warmup: int = 1,
    note: str | Callable[[int | None], str] = "",
    extra: dict[str, Any] | None = None,
) -> Row:
    """One Row: fn's median and minimum time (:func:`time_fn`) and its peak extra memory
    (:func:`peak_extra_bytes`). ``note`` may be a function of the peak bytes (None if unknown)."""
    t = time_fn(fn, device, repeat=repeat, warmup=warmup)
    peak = peak_extra_bytes(fn, device)
    return row_of(
        t,
        peak,
        family=family,
        case=case,
        method=method,
        n=n,
        device=device,
        bytes_moved=bytes_moved,
        note=note(peak) if callable(note) else note,
        extra=extra,
    )


def row_of(
    t: Timing,
    peak: int | None,
    *,
    family: str,
    case: str,
    method: str,
    n: int,
    device: torch.device,
    bytes_moved: int = 0,
    note: str = "",
    extra: dict[str, Any] | None = None,
) -> Row:
    """A Row from a measured time and peak (bytes, or None)."""
    return Row(
        family=family,
        case=case,
        method=method,
        n=n,
        device=device.type,
        median_ms=t.median_s * 1e3,
        min_ms=t.min_s * 1e3,
        bytes_moved=bytes_moved,
        peak_extra_mb=None if peak is None else peak / 2**20,
        note=note,
        extra=dict(extra or {}),
    )


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = name.group(1).strip() if name else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: one line per row, grouped as given."""
    headers = ["case", "method", "device", "median ms", "vs baseline", "GB/s", "% stream", "peak extra MB"]

    def cells(r: Row) -> list[str]:
        return [
            r.case,
            r.method,
            r.device,
            f"{r.median_ms:.2f}",
            "" if r.ratio is None else f"{r.ratio:.1f}x",
            "" if r.gbps is None else f"{r.gbps:.1f}",
            "" if r.stream_fraction is None else f"{100 * r.stream_fraction:.0f}%",
            "" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}",
        ]

    body = [cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    previous = None
    for r, c in zip(rows, body):
        if previous is not None and r.case != previous:
            out.append("")
        previous = r.case
        out.append("  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    return "\n".join(out)


def legend(rows: Sequence[Row]) -> str:
    """What the table's columns mean, with the baseline of each family that ran."""
    baselines: dict[str, list[str]] = {}
    for r in rows:
        family = r.family.split("/")[0]
        if r.baseline and r.baseline not in baselines.setdefault(family, []):
            baselines[family].append(r.baseline)
    per_family = "; ".join(f"{family}: {', '.join(b) or 'none'}" for family, b in baselines.items())
    return (
        f"vs baseline: the baseline's time / the method's time (baselines: {per_family}). GB/s: bytes that must move "
        "/ median time; % stream: of a plain streaming read of the same data. Peak extra: memory beyond the inputs, "
        "outputs included."
    )


def fill_ratios(rows: list[Row], baseline_method: str, stream_method: str | None = None) -> list[Row]:
    """Set ratio (baseline time / time) and stream_fraction for rows sharing a case."""
    by_case: dict[str, list[Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, []).append(r)
    for case_rows in by_case.values():
        base = next((r for r in case_rows if r.method == baseline_method), None)
        stream = next((r for r in case_rows if r.method == stream_method), None) if stream_method else None
        for r in case_rows:
            r.gbps = r.bytes_moved / (r.median_ms / 1e3) / 1e9 if r.bytes_moved else None
        for r in case_rows:
            if base is not None:
                r.ratio = base.median_ms / r.median_ms
                r.baseline = baseline_method
            if stream is not None and stream.gbps and r.gbps:
                r.stream_fraction = r.gbps / stream.gbps
    return rows
