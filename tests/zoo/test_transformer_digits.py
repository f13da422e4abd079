"""examples/transformer_digits.py end to end at a small size: a real (tiny) problem, a transformer
nobody here wrote, every step of the pipeline (recorder, DMD, gradient flow through SDPA, masks
under AdamW, physical removal)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformer_digits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("transformer_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_prunes_and_recovers():
    r = load_example().run(train_steps=200, fine_tune=60, seed=0, sparsities=(0.5,))
    assert r["dense"] > 0.6 and r["test_samples"] == 450  # chance: 0.1
    assert len(r["unstructured"]) == 4 and "KMP (Koopman)" in r["unstructured"]
    for row in r["unstructured"].values():
        assert row[0.5][1] > 0.5, row  # accuracy after fine-tuning
    for s in r["structured"].values():
        before, after = s["params"]
        assert after < 0.5 * before  # half the heads and hidden channels: most of the weights
        assert s["accuracy"][1] > 0.4
