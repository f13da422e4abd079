"""Timing, peak memory and table formatting for the benchmarks (perf.md, "Protocol").

Two checks make a table trustworthy on a machine that may be busy or a device that may be slow:
each row's spread (median / minimum of its timed runs; above :data:`NOISY_SPREAD` the row is
flagged as noisy) and, for rows that move a known number of bytes, the fraction of a plain copy of
the same bytes on the same device, measured in the same run (:func:`fill_copy_fractions`).
"""

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
    runs: int | None = None  # timed runs behind median_ms and min_ms (None: not recorded by the family)
    spread: float | None = None  # median / min of the timed runs (set by mark_noise)
    noisy: bool = False  # spread above NOISY_SPREAD: other work disturbed the timing
    copy_gbps: float | None = None  # a device copy of the same bytes, same run (set by fill_copy_fractions)
    copy_fraction: float | None = None  # gbps / copy_gbps

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


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeat: int, warmup: int = 1
) -> dict[str, Timing]:
    """Median and minimum time of each fn, run in turn (one of each per round): on a shared, noisy
    machine every method sees the same slow and fast moments, so that their ratios hold."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(statistics.median(ts), min(ts), repeat) for name, ts in times.items()}


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
        runs=t.runs,
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
    """A plain-text table: one line per row, grouped as given; a noisy row's spread is marked
    with "!" and a warning line follows the table (see :func:`mark_noise`)."""
    headers = [
        "case", "method", "device", "median ms", "spread", "vs baseline", "GB/s", "% stream", "% copy",
        "peak extra MB",
    ]  # fmt: skip

    def cells(r: Row) -> list[str]:
        return [
            r.case,
            r.method,
            r.device,
            f"{r.median_ms:.2f}",
            "" if r.spread is None else f"{r.spread:.2f}{' !' if r.noisy else '  '}",
            "" if r.ratio is None else f"{r.ratio:.1f}x",
            "" if r.gbps is None else f"{r.gbps:.1f}",
            "" if r.stream_fraction is None else f"{100 * r.stream_fraction:.0f}%",
            "" if r.copy_fraction is None else f"{100 * r.copy_fraction:.{0 if r.copy_fraction >= 0.1 else 1}f}%",
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
    out += [f"WARNING: {w}" for w in noise_warnings(rows)]
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
        "/ median time; % stream: of a plain streaming read of the same data; % copy: of a device copy moving the "
        "same number of bytes (read + written), measured in this run. spread: median / fastest of the timed runs "
        f"(! above {NOISY_SPREAD}: the machine was busy). Peak extra: memory beyond the inputs, outputs included."
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


# ---- trust: noisy rows and a copy of the same bytes ----------------------------------------------------

NOISY_SPREAD = 1.3
"""A row whose median time exceeds its fastest run by more than 30 % is flagged as noisy. On an
idle machine the timed runs of one kernel stay within a few percent of each other (warm caches,
no allocation in the timed region); a median 30 % above the minimum means that at least half of
the runs were slowed by something else (other processes, frequency changes), so ratios against
rows timed at another moment are not to be trusted to better than that."""


def mark_noise(rows: Sequence[Row], threshold: float = NOISY_SPREAD) -> list[str]:
    """Set each row's spread (median / min; None from a single run or a zero minimum) and noisy
    flag; return the warnings (:func:`noise_warnings`)."""
    for r in rows:
        single = r.runs is not None and r.runs < 2
        r.spread = None if single or r.min_ms <= 0 else r.median_ms / r.min_ms
        r.noisy = r.spread is not None and r.spread > threshold
    return noise_warnings(rows, threshold)


def noise_warnings(rows: Sequence[Row], threshold: float = NOISY_SPREAD) -> list[str]:
    """One line naming the noisy rows, if any (empty list otherwise)."""
    noisy = [r for r in rows if r.noisy]
    if not noisy:
        return []
    worst = max(noisy, key=lambda r: r.spread or 0.0)
    return [
        f"{len(noisy)} of {len(rows)} rows are noisy (median / fastest run > {threshold}; worst {worst.spread:.2f}: "
        f"{worst.case} | {worst.method}): the machine was busy, rerun before trusting these ratios"
    ]


def copy_bandwidth(nbytes: int, device: torch.device, *, repeat: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` on ``device`` moving ``nbytes`` in all (half read, half written),
    median of ``repeat`` runs. The buffers hold random values (never time on zeros)."""
    numel = max(nbytes // 8, 1)  # float32 elements per buffer: 4 bytes read + 4 written each
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeat=repeat)
    return 8 * numel / t.median_s / 1e9


def fill_copy_fractions(
    rows: Sequence[Row], measure: Callable[[int, torch.device], float] = copy_bandwidth
) -> list[dict[str, Any]]:
    """For every case, measure a copy of its largest bytes_moved on its device once, and set
    copy_gbps and copy_fraction (gbps / copy GB/s) on its rows that move bytes. Returns one
    record per measured copy (device, case, bytes, gbps) for results.json."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.bytes_moved > 0 and r.median_ms > 0:
            groups.setdefault((r.device, r.case), []).append(r)
    records = []
    for (device, case), case_rows in groups.items():
        nbytes = max(r.bytes_moved for r in case_rows)
        gbps = measure(nbytes, torch.device(device))
        records.append({"device": device, "case": case, "bytes": nbytes, "gbps": gbps})
        for r in case_rows:
            r.gbps = r.gbps if r.gbps is not None else r.bytes_moved / (r.median_ms / 1e3) / 1e9
            r.copy_gbps = gbps
            r.copy_fraction = r.gbps / gbps
    return records
