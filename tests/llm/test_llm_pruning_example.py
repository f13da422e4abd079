"""examples/llm_pruning.py end to end at a tiny size: a character-level Llama trained on the
repository's text, pruned by every criterion to 50 % and 2:4, fine-tuned under Masked, the table,
plot and compressed-tensors export written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import koopfast as kf

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llm_pruning.py"


def load_example():
    spec = importlib.util.spec_from_file_location("llm_pruning", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_prunes_fine_tunes_and_writes_its_outputs(tmp_path):
    example = load_example()
    r = example.run(tmp_path, train_steps=60, fine_tune=20, width=32, layers=2, length=32, batch=8)
    vocab = r["characters"]["alphabet"]
    assert 1 < r["dense"] < vocab and 1 < r["dense_fine_tuned"] < vocab  # better than uniform over the alphabet
    assert set(r["rows"]) == {"magnitude", "Wanda", "Wanda + OWL budgets", "gradient flow θ·Hg"}
    for criterion, row in r["rows"].items():
        assert set(row) == ({"50%"} if "OWL" in criterion else {"50%", "2:4"})
        for kind, cell in row.items():
            assert cell["sparsity"] == pytest.approx(0.5, abs=0.01), (criterion, kind)
            assert 1 < cell["fine_tuned"] < vocab and cell["pruned"] > 1
    lo, hi = r["owl_range"]
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.16)

    table = (tmp_path / "results.md").read_text()
    assert "| criterion | 50 % unstructured | 2:4 |" in table and table.count("\n|") == 6
    assert f"{r['rows']['Wanda']['2:4']['fine_tuned']:.2f}" in table
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == r["rows"]
    assert (tmp_path / "llm_pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the export: the Wanda 2:4 weights, every decoder-block linear layer 2:4 in its rows
    from safetensors.torch import load_file

    config = json.loads((tmp_path / "wanda_2of4" / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert config["model_type"] == "llama" and sparsity["format"] == "sparse-bitmask"
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["global_sparsity"] >= 0.5
    tensors = load_file(tmp_path / "wanda_2of4" / "model.safetensors")
    for target in sparsity["targets"]:
        shape = tensors[f"{target}.shape"].tolist()
        bits = tensors[f"{target}.bitmask"]
        present = kf.masks.unpack(kf.masks.PackedMask(bits.reshape(-1), torch.Size([shape[0], bits.shape[1] * 8])))
        groups = present[:, : shape[1]].reshape(shape[0], -1, 4)
        assert bool((groups.sum(-1) <= 2).all()), target
