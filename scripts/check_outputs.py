"""Checks what `koopfast demo` and `koopfast bench` wrote: the JSON parses and holds results, and
every PNG opens as an image of a reasonable size. Usage: check_outputs.py DEMO_DIR BENCH_DIR"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image


def png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100, f"{path}: not a usable image ({image.shape})"


def main(demo: Path, bench: Path) -> None:
    results = json.loads((demo / "results.json").read_text())
    assert results["pruning"] and results["training"] and results["koopman"]["eigenvalues"], "demo results"
    for name in ("accuracy_vs_sparsity.png", "koopman_eigenvalues.png", "mask_overlap_over_training.png"):
        png(demo / name)
    rows = json.loads((bench / "results.json").read_text())["rows"]
    families = {r["family"].split("/")[0] for r in rows}  # masks/apply, masks/global, ...
    expected = {"select", "masks", "koopman", "gradflow", "hvp", "codes", "distributed"}
    assert expected <= families, f"bench families: {families}"
    assert all(r["median_ms"] > 0 for r in rows)
    png(bench / "speedups.png")
    print(f"check_outputs: demo ({len(results['pruning'])} pruning runs) and bench ({len(rows)} rows) outputs are fine")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
