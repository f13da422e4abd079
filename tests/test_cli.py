"""The command line: `koopfast demo` and `koopfast bench` run and write what they say they write."""

from __future__ import annotations

import json

import pytest

from koopfast import cli

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def assert_png(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_demo_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(
        ["demo", "--out", str(out), "--epochs", "3", "--hidden", "32,16", "--sparsities", "0.5,0.9",
         "--fine-tune-epochs", "1", "--window", "8", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy per criterion and sparsity" in printed and "early-bird detectors" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["epochs"] == 3 and len(results["training"]) == 3
    criteria = {r["criterion"] for r in results["pruning"]}
    assert criteria == {"magnitude", "kmp", "kgp", "loss_preservation", "gradient_norm_preservation", "grasp",
                        "spline_redundancy"}  # fmt: skip
    for row in results["pruning"]:
        assert 0.0 <= row["accuracy_pruned"] <= 1.0 and 0.0 <= row["accuracy_fine_tuned"] <= 1.0
        if not row["structured"]:
            assert abs(row["weights_kept"] - (1 - row["sparsity"])) < 1e-3
    assert len(results["mask_overlap"]["matrix"]) == 6
    for name in ("accuracy_vs_sparsity.png", "koopman_eigenvalues.png", "mask_overlap_over_training.png"):
        assert_png(out / name)


def test_bench_writes_results_and_a_chart(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        cli.main(["bench", "--quick", "--only", "select", "--repeat", "1", "--device", "cpu", "--out", str(out)]) == 0
    )
    assert "koopfast.select_threshold" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["device"] and {r["method"] for r in results["rows"]} >= {"koopfast.select_threshold"}
    assert_png(out / "speedups.png")


def test_bad_options_are_reported(capsys):
    assert cli.main(["demo", "--epochs", "1", "--out", "unused"]) == 2
    assert "expected at least 2 epochs" in capsys.readouterr().err
    assert cli.main(["bench", "--only", "nope"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--help"])
