"""Checks what `koopfast demo`, `koopfast bench` and (optionally) `koopfast study` wrote: the JSON
parses and holds results, the study's Markdown table has a row per comparison, and every PNG opens
as an image of a reasonable size. Usage: check_outputs.py DEMO_DIR BENCH_DIR [STUDY_DIR]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image


def png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100, f"{path}: not a usable image ({image.shape})"


def provenance(results: dict) -> None:
    """The bench results say where they came from, flag noisy rows and compare with a copy."""
    meta = results["metadata"]
    for key in ("date_utc", "command", "torch", "koopfast", "device", "torch_threads", "size", "quick"):
        assert meta.get(key) not in (None, ""), f"bench metadata: no {key}"
    assert meta["command"].startswith("koopfast bench") and "repeat" in meta and "git_commit" in meta
    assert isinstance(results["warnings"], list)
    for r in results["rows"]:
        assert isinstance(r["noisy"], bool) and (r["spread"] is None or r["spread"] >= 1.0), r
        assert r["noisy"] == (r["spread"] is not None and r["spread"] > meta["noisy_spread_threshold"]), r
        if r["bytes_moved"] > 0:
            assert r["copy_fraction"] > 0 and r["copy_gbps"] > 0, f"no copy comparison: {r['case']} | {r['method']}"
    assert bool(results["warnings"]) == any(r["noisy"] for r in results["rows"])


def main(demo: Path, bench: Path) -> None:
    results = json.loads((demo / "results.json").read_text())
    assert results["pruning"] and results["training"] and results["koopman"]["eigenvalues"], "demo results"
    for name in ("accuracy_vs_sparsity.png", "koopman_eigenvalues.png", "mask_overlap_over_training.png"):
        png(demo / name)
    bench_results = json.loads((bench / "results.json").read_text())
    rows = bench_results["rows"]
    families = {r["family"].split("/")[0] for r in rows}  # masks/apply, masks/global, ...
    expected = {"select", "masks", "koopman", "gradflow", "hvp", "codes", "distributed", "llm"}
    assert expected <= families, f"bench families: {families}"
    assert all(r["median_ms"] > 0 for r in rows)
    provenance(bench_results)
    png(bench / "speedups.png")
    print(f"check_outputs: demo ({len(results['pruning'])} pruning runs) and bench ({len(rows)} rows) outputs are fine")


STUDY_FIGURES = ("study_gradflow.png", "study_koopman.png", "study_earlybird.png")
VERDICTS = ("supported", "not supported", "inconclusive")


def check_study(study: Path) -> int:
    """What `koopfast study` wrote; returns the number of comparisons."""
    data = json.loads((study / "study.json").read_text())
    comparisons = data["comparisons"]
    assert len(comparisons) == 6, f"study comparisons: {[c['name'] for c in comparisons]}"
    for c in comparisons:
        assert len(c["per_seed"]) == len(data["seeds"]) >= 2, f"{c['name']}: per-seed values"
        assert c["verdict"].startswith(VERDICTS), f"{c['name']}: verdict {c['verdict']!r}"
        if c["n"] >= 2:
            assert c["low"] <= c["mean"] <= c["high"], f"{c['name']}: interval"
    rows = [line for line in (study / "study.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(comparisons), f"study.md: {len(rows)} table rows"  # the header and one per claim
    for name in STUDY_FIGURES:
        png(study / name)
    return len(comparisons)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    if len(sys.argv) == 4:
        print(f"check_outputs: study ({check_study(Path(sys.argv[3]))} comparisons) outputs are fine")
