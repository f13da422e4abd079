"""The command line: `koopfast demo`, `koopfast study` and `koopfast bench` run and write what they
say they write."""

from __future__ import annotations

import json

import pytest
import torch

import koopfast
from koopfast import cli, demo, plots

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
    assert "chance 0.10" in printed and f"on {results['test_samples']} held-out digits" in printed
    assert "spline redundancy is not in the matrix" in printed and "residual ‖Yv − λXv‖/‖Xv‖" in printed
    koopman = results["koopman"]
    assert len(koopman["residuals"]) == len(koopman["eigenvalues"]) == koopman["modes"]
    assert koopman["eigenvalues"][koopman["nearest"]] == koopman["nearest_to_one"]
    assert all(len(repr(v)) <= 12 for r in results["pruning"] for v in r.values() if isinstance(v, float))
    for name in ("accuracy_vs_sparsity.png", "koopman_eigenvalues.png", "mask_overlap_over_training.png"):
        assert_png(out / name)
    # every number the figures show is in the JSON: they can be drawn again from it alone
    again = plots.demo_figures(results, tmp_path, demo.LABELS)
    assert [p.name for p in again] == ["accuracy_vs_sparsity.png", "koopman_eigenvalues.png",
                                       "mask_overlap_over_training.png"]  # fmt: skip
    for path in again:
        assert_png(path)


def test_study_writes_its_table_json_and_figures(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "study"
    try:
        assert cli.main(["study", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)  # the command runs single-threaded
    printed = capsys.readouterr().out
    assert "Student's t" in printed and "| verdict |" in printed
    results = json.loads((out / "study.json").read_text())
    assert results["seeds"] == [0, 1] and results["config"]["quick"]
    names = [c["name"] for c in results["comparisons"]]
    assert names == ["magnitude_vs_loss_preservation", "gnp_vs_grasp", "kmp_overlap_late_minus_early",
                     "kmp_accuracy_gap_late", "kmp_accuracy_gap_early_minus_late",
                     "spline_fires_before_mask_distance"]  # fmt: skip
    for c in results["comparisons"]:
        assert len(c["per_seed"]) == 2 and c["verdict"].split(":")[0] in ("supported", "not supported", "inconclusive")
    table = (out / "study.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(names)
    assert "\\|θg\\|" in table  # a |…| inside a cell is escaped, not a cell edge
    figures = ["study_gradflow.png", "study_koopman.png", "study_earlybird.png"]
    for name in figures:
        assert_png(out / name)
    again = plots.study_figures(results, tmp_path)  # drawn from the JSON alone
    assert [p.name for p in again] == figures


def test_bench_writes_results_and_a_chart(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        cli.main(["bench", "--quick", "--only", "select", "--repeat", "1", "--device", "cpu", "--out", str(out)]) == 0
    )
    assert "koopfast.select_threshold" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["device"] and {r["method"] for r in results["rows"]} >= {"koopfast.select_threshold"}
    assert results["metadata"]["command"] == f"koopfast bench --quick --only select --repeat 1 --device cpu --out {out}"
    assert results["metadata"]["repeat"] == 1 and results["size"] == "quick" and isinstance(results["warnings"], list)
    streaming = [r for r in results["rows"] if r["bytes_moved"]]
    assert streaming and all(r["copy_fraction"] > 0 for r in streaming)
    assert all(r["spread"] in (None, 1.0) and not r["noisy"] for r in results["rows"])  # one timed run each
    assert_png(out / "speedups.png")


def test_version_and_a_bare_command_print_what_koopfast_is(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"koopfast {koopfast.__version__} (torch {torch.__version__}")
    assert cli.main([]) == 0
    printed = capsys.readouterr().out
    assert "usage: koopfast" in printed and "results.json" in printed and "speedups.png" in printed


def test_bad_options_are_reported(capsys):
    assert cli.main(["demo", "--epochs", "1", "--out", "unused"]) == 2
    assert "expected at least 2 epochs" in capsys.readouterr().err
    assert cli.main(["bench", "--only", "nope"]) == 2
    assert cli.main(["study", "--seeds", "1", "--out", "unused"]) == 2
    assert "expected seeds to be an int >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
