"""The adversarial harness's short profile, in its own process (a crash is a failure, not the end of
the test run): tests/edges/fuzz.py, 150 hypothesis examples per target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

FUZZ = Path(__file__).with_name("fuzz.py")


def test_short_profile_finds_no_crash_no_unclear_error_and_no_changed_state(tmp_path):
    counts = tmp_path / "counts.json"
    result = subprocess.run(
        [sys.executable, str(FUZZ), "--examples", "150", "--json", str(counts)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.returncode, result.stdout[-3000:], result.stderr[-6000:])
    data = json.loads(counts.read_text())
    checked = {k.split(" | ")[0] for k, n in data["counts"].items() if "result checked" in k and n > 0}
    assert len(checked) == 13, f"every target must get calls whose results are checked, got {sorted(checked)}"
    assert data["calls"] >= 13 * 150
