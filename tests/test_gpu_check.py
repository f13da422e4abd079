"""Benchmark output a reader can trust (metadata, noisy rows, a copy of the same bytes), the `cuda`
test marker, and scripts/gpu_check.sh run end to end on the CPU."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import koopfast
from koopfast import cli
from koopfast.benchmarks import harness, provenance

from conftest import runs_on_cuda

ROOT = Path(__file__).resolve().parent.parent


def fake_timing(monkeypatch, durations: list[float]) -> harness.Timing:
    """harness.time_fn on a fake clock (it reads perf_counter twice per timed run): runs that take
    ``durations`` seconds; the real clock is back afterwards."""
    stamps, now = [], 100.0
    for d in durations:
        stamps += [now, now + d]
        now += d + 1.0
    ticks = iter(stamps)
    with monkeypatch.context() as m:
        m.setattr(harness.time, "perf_counter", lambda: next(ticks))
        return harness.time_fn(lambda: None, torch.device("cpu"), repeat=len(durations), warmup=1)


def timed_row(monkeypatch, durations: list[float], method: str, *, moved: int = 0) -> harness.Row:
    t = fake_timing(monkeypatch, durations)
    return harness.row_of(
        t, None, family="fake", case="a case", method=method, n=10, device=torch.device("cpu"), bytes_moved=moved
    )


def test_a_row_whose_median_is_far_above_its_fastest_run_is_flagged_noisy(monkeypatch):
    quiet = timed_row(monkeypatch, [0.010, 0.011, 0.0105, 0.012, 0.0102], "quiet")
    noisy = timed_row(monkeypatch, [0.010, 0.020, 0.019, 0.021, 0.010], "noisy")  # median 0.019 / min 0.010
    edge = timed_row(monkeypatch, [0.010, 0.013, 0.013], "at the threshold")  # exactly 1.3: not noisy
    single = timed_row(monkeypatch, [0.050], "one run")
    assert (noisy.median_ms, noisy.min_ms, noisy.runs) == pytest.approx((19.0, 10.0, 5))
    warnings = harness.mark_noise([quiet, noisy, edge, single])
    assert quiet.spread == pytest.approx(1.05) and not quiet.noisy
    assert noisy.spread == pytest.approx(1.9) and noisy.noisy
    assert edge.spread == pytest.approx(1.3) and not edge.noisy
    assert single.spread is None and not single.noisy  # one run says nothing about the spread
    assert len(warnings) == 1 and "1 of 4 rows are noisy" in warnings[0] and "worst 1.90: a case | noisy" in warnings[0]
    table = harness.format_table([quiet, noisy, edge, single])
    assert "1.90 !" in table and "1.05  " in table and "1.30  " in table
    assert table.splitlines()[-1] == f"WARNING: {warnings[0]}"
    assert harness.mark_noise([quiet, edge]) == [] and "WARNING" not in harness.format_table([quiet, edge])


def test_copy_fractions_compare_each_case_with_a_copy_of_its_largest_bytes():
    def row(case, method, moved, ms, device="cpu"):
        return harness.Row("f", case, method, 1, device, ms, ms, moved, None)

    rows = [row("a", "x", 4_000, 1.0), row("a", "y", 2_000, 2.0), row("b", "z", 0, 1.0), row("c", "w", 8_000, 4.0)]
    asked = []

    def measure(nbytes, device):
        asked.append((nbytes, device.type))
        return 1e-5 * nbytes  # GB/s: 0.04 for case a, 0.08 for case c

    records = harness.fill_copy_fractions(rows, measure)
    assert asked == [(4_000, "cpu"), (8_000, "cpu")]
    assert [(r["case"], r["bytes"]) for r in records] == [("a", 4_000), ("c", 8_000)]
    a_x, a_y, b_z, c_w = rows
    assert a_x.gbps == pytest.approx(0.004) and a_x.copy_fraction == pytest.approx(0.1)
    assert a_y.gbps == pytest.approx(0.001) and a_y.copy_fraction == pytest.approx(0.025)
    assert b_z.copy_fraction is None and b_z.copy_gbps is None  # moves no counted bytes
    assert c_w.copy_gbps == pytest.approx(0.08) and c_w.copy_fraction == pytest.approx(0.025)
    assert "% copy" in harness.format_table(rows) and "10%" in harness.format_table(rows)


def test_a_real_copy_is_measured_in_gb_per_second():
    gbps = harness.copy_bandwidth(8 * 2**20, torch.device("cpu"), repeat=3)
    assert 0.01 < gbps < 10_000


def fake_family(monkeypatch, durations, *, accepts_large: bool) -> dict:
    """Put a benchmark family with a fixed fake timing sequence in place of koopfast.benchmarks.select."""
    calls = {}

    def rows(quick, repeat, **options):
        calls.update(quick=quick, repeat=repeat, **options)
        base = timed_row(monkeypatch, [0.004] * 3, "baseline", moved=10**6)
        noisy = timed_row(monkeypatch, durations, "koopfast", moved=10**6)
        return harness.fill_ratios([base, noisy], "baseline")

    def run_large(device, *, quick=False, repeat=None, large=False):
        return rows(quick, repeat, large=large)

    def run_default(device, *, quick=False, repeat=None):  # no `large` keyword: default sizes only
        return rows(quick, repeat)

    module = types.ModuleType("koopfast.benchmarks.select", "A fake family.\n\nIts rows come from a fake clock.")
    module.run = run_large if accepts_large else run_default
    monkeypatch.setitem(sys.modules, "koopfast.benchmarks.select", module)
    return calls


def test_results_json_records_where_the_numbers_came_from_and_warns_of_noise(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    calls = fake_family(monkeypatch, [0.001, 0.002, 0.002, 0.002, 0.001], accepts_large=True)
    argv = ["bench", "--only", "select", "--size", "large", "--repeat", "5", "--device", "cpu", "--out", str(tmp_path)]
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    assert cli.main(argv) == 0
    assert calls == {"quick": False, "repeat": 5, "large": True}
    printed = capsys.readouterr().out
    assert "WARNING: 1 of 2 rows are noisy" in printed and "2.00 !" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    meta = results["metadata"]
    date = datetime.datetime.fromisoformat(meta["date_utc"])
    assert date.tzinfo is not None and before <= date <= datetime.datetime.now(datetime.timezone.utc)
    assert meta["command"] == "koopfast " + " ".join(argv)
    assert meta["process_command"]
    assert meta["torch"] == torch.__version__ and meta["koopfast"] == koopfast.__version__
    assert meta["device"]["name"] and meta["device"]["cores"] > 0
    assert meta["torch_threads"] == torch.get_num_threads() and meta["repeat"] == 5
    assert (meta["size"], meta["quick"], meta["families"]) == ("large", False, ["select"])
    assert meta["noisy_spread_threshold"] == harness.NOISY_SPREAD
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if provenance.checkout_root() is not None:
        assert meta["git_commit"] == head.stdout.strip() and isinstance(meta["git_dirty"], bool)
    assert results["size"] == "large" and results["family_sizes"] == {"select": "large"}
    assert len(results["warnings"]) == 1 and "koopfast" in results["warnings"][0]
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["koopfast"]["noisy"] and rows["koopfast"]["spread"] == pytest.approx(2.0)
    assert not rows["baseline"]["noisy"] and rows["baseline"]["runs"] == 3
    assert all(r["copy_fraction"] > 0 and r["copy_gbps"] > 0 for r in rows.values())
    assert results["copy_bandwidth"][0]["bytes"] == 10**6


def test_a_family_without_large_cases_runs_its_default_sizes(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    fake_family(monkeypatch, [0.001] * 3, accepts_large=False)
    assert cli.main(["bench", "--only", "select", "--size", "large", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "select: no large cases, runs its default sizes" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["family_sizes"] == {"select": "default"} and results["warnings"] == []
    assert cli.main(["bench", "--quick", "--size", "large", "--out", str(tmp_path)]) == 2
    assert "--quick contradicts --size large" in capsys.readouterr().err


def test_a_copy_without_git_takes_its_commit_from_the_environment(monkeypatch):
    monkeypatch.setattr(provenance, "checkout_root", lambda: None)
    monkeypatch.delenv("KOOPFAST_COMMIT", raising=False)
    assert provenance.git_state() == {"commit": None, "dirty": None, "commit_source": None}
    monkeypatch.setenv("KOOPFAST_COMMIT", "abc123")
    assert provenance.git_state() == {"commit": "abc123", "dirty": None, "commit_source": "KOOPFAST_COMMIT"}


class FakeItem:
    def __init__(self, function, **params):
        self.function = function
        if params:
            self.callspec = types.SimpleNamespace(params=params)


def test_the_cuda_marker_selects_the_cuda_cases_and_the_tests_that_name_cuda():
    def plain():
        return 1

    def loops_over_devices():
        return [d for d in DEVICES]  # noqa: F821 (only the source is read)

    def moves_to_the_gpu():
        return torch.ones(1).cuda()

    assert runs_on_cuda(FakeItem(plain, device="cuda")) and runs_on_cuda(FakeItem(plain, device=torch.device("cuda")))
    assert runs_on_cuda(FakeItem(plain, name="x", device="cuda:1"))
    assert not runs_on_cuda(FakeItem(moves_to_the_gpu, device="cpu"))  # the CPU case of a parametrized test
    assert not runs_on_cuda(FakeItem(plain)) and not runs_on_cuda(FakeItem(plain, n=3, name="cuda kernel"))
    assert runs_on_cuda(FakeItem(loops_over_devices)) and runs_on_cuda(FakeItem(moves_to_the_gpu))


def run_gpu_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_writes_its_summary(tmp_path):
    out = tmp_path / "check"
    done, summary = run_gpu_check(
        out, "--only", "select", "--repeat", "1", "--tests-k", "mixed_devices", "--archive", str(tmp_path / "c.tgz")
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["passed"] and summary["within_budget"] and summary["problems"] == []
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["env"]["status"] == steps["tests"]["status"] == steps["bench-select"]["status"] == "ok"
    assert steps["build"]["status"] == "not needed"  # koopfast already imports here
    assert summary["tests"]["tests"] >= 1 and summary["tests"]["failures"] == 0
    streaming = summary["bench"]["select"]["streaming"]
    assert {r["method"] for r in streaming} >= {"koopfast.select_threshold", "stream read (sum)"}
    assert all(r["pct_of_copy"] > 0 and r["gbps"] > 0 for r in streaming)
    assert (out / "bench-select" / "results.json").exists() and (out / "tests.log").exists()
    assert "gpu_check summary (cpu, --size quick" in done.stdout and "every step passed" in done.stdout
    assert (tmp_path / "c.tgz").stat().st_size > 0


@pytest.mark.slow
def test_gpu_check_names_the_step_that_ran_out_of_time(tmp_path):
    out = tmp_path / "check"
    done, summary = run_gpu_check(out, "--no-tests", "--only", "select", "--size", "default", "--bench-timeout", "8")
    assert done.returncode == 1
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["bench-select"]["status"] == "timeout" and not summary["passed"]
    assert "gpu_check: bench-select: timeout" in done.stdout and "SOME STEPS DID NOT PASS" in done.stdout
