"""Criteria across processes: record() and fit + masks at 1, 2 and 3 gloo processes.

The processes time themselves (between barriers, on rank 0); pytest-benchmark times the whole
spawn-and-measure run once and carries the per-row medians and bytes communicated in extra_info
(`pytest bench -k distributed --benchmark-json out.json`). The run itself checks that every
process count keeps the same number of entries.
"""

from __future__ import annotations

import pytest

from koopfast.benchmarks import distributed


def test_distributed(benchmark, quick, device):
    if device.type != "cpu":
        pytest.skip("gloo processes on the CPU")
    rows = benchmark.pedantic(lambda: distributed.run(device, quick=quick), rounds=1, iterations=1)
    benchmark.group = "distributed (timed inside the processes: see extra_info)"
    benchmark.extra_info["rows"] = [
        {
            "case": r.case,
            "processes": r.extra["world"],
            "median_ms": r.median_ms,
            "bytes_sent_per_process": r.extra["bytes_communicated_per_process"],
        }
        for r in rows
    ]
    assert {r.extra["world"] for r in rows} == set(distributed.WORLDS)
    print("\n" + distributed.summary(rows))
