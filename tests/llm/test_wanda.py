"""Wanda scores against a float64 reference built from every captured layer input, on an MLP and
on GPT-2 (Hugging Face Conv1D) and Llama (Linear) from small configs; per-output masks exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import koopfast as kf

pytest.importorskip("transformers")
from zoo import CASES


def _reference(model: nn.Module, batches, run) -> dict[str, torch.Tensor]:
    """|W| · ‖X_j‖₂ in float64 from the concatenated inputs of every Linear/Conv1D layer."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: inputs.setdefault(n, []).append(a[0])))
    with torch.no_grad():
        for b in batches:
            run(model, b)
    for h in handles:
        h.remove()
    out = {}
    for name, xs in inputs.items():
        m = model.get_submodule(name)
        w = m.weight.detach().double()
        x = torch.cat([x.detach().double().reshape(-1, x.shape[-1]) for x in xs])
        norm = x.norm(dim=0)
        out[f"{name}.weight"] = w.abs() * (norm[:, None] if type(m).__name__ == "Conv1D" else norm[None, :])
    return out


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def test_mlp_scores_match_the_float64_reference():
    model = _mlp()
    batches = [torch.randn(3, 7) for _ in range(4)] + [torch.randn(1, 2, 7)]  # any leading shape
    scores = kf.criteria.wanda(model, batches)
    ref = _reference(model, batches, lambda m, b: m(b))
    assert set(scores) == set(ref) == {"0.weight", "2.weight"}
    for name, r in ref.items():
        torch.testing.assert_close(scores[name].double(), r, rtol=2e-6, atol=0)
    assert scores.tokens == {"0.weight": 14, "2.weight": 14}
    assert scores.criterion == "wanda" and not scores.skipped


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_transformer_scores_match_the_float64_reference(case):
    c = CASES[case]
    model = c.model()
    batches = c.batches(3)

    def run(m, b):
        inputs = c.inputs(b)
        return m(**inputs) if isinstance(inputs, dict) else m(inputs)

    scores = kf.criteria.wanda(model, batches, forward=run)
    ref = _reference(model, batches, run)
    ref = {n: r for n, r in ref.items() if n in scores}
    assert len(ref) == len(scores) > 4
    for name, r in ref.items():
        torch.testing.assert_close(scores[name].double(), r, rtol=2e-6, atol=1e-12)


def test_the_running_sums_equal_one_concatenated_batch():
    model = _mlp()
    xs = [torch.randn(5, 7) for _ in range(3)]
    split = kf.criteria.wanda(model, xs)
    whole = kf.criteria.wanda(model, [torch.cat(xs)])
    for name in split:
        torch.testing.assert_close(split.input_norms[name], whole.input_norms[name], rtol=1e-12, atol=0)


def test_masks_keep_the_same_count_in_every_output_unit_and_ties_keep_the_lower_index():
    model = _mlp()
    scores = kf.criteria.wanda(model, [torch.randn(8, 7)])
    masks = scores.masks(0.5)
    assert masks["0.weight"].shape == (16, 7)
    assert (masks["0.weight"].sum(1) == 4).all()  # round(0.5 * 7) = 4 kept per row (3.5 rounds to even)
    for name, s in scores.items():
        keep = masks[name]
        for row_s, row_k in zip(s, keep):  # every kept score >= every pruned one
            if (~row_k).any():
                assert row_s[row_k].min() >= row_s[~row_k].max()
    tied = kf.criteria.WandaScores({"w": torch.ones(2, 4)})
    assert tied.masks(0.5)["w"].tolist() == [[True, True, False, False]] * 2


def test_gpt2_conv1d_units_are_columns():
    c = CASES["gpt2"]
    model = c.model()
    scores = kf.criteria.wanda(model, c.batches(1), forward=lambda m, b: m(b))
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D [in, out]: one comparison group per column
    keep = scores.masks(0.25)[name]
    assert (keep.sum(0) == kf.masks.keep_count(keep.shape[0], 0.25)).all()
    assert not (keep.sum(1) == keep.sum(1)[0]).all()  # rows are not the comparison groups


def test_a_layer_that_never_runs_is_skipped_with_its_reason():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1).eval()
    scores = kf.criteria.wanda(model, [torch.randn(2, 3, 8)])
    assert "layers.0.linear1.weight" in scores
    assert any("out_proj" in m for m in scores.skipped)  # MultiheadAttention reads out_proj.weight itself


def test_modes_are_restored_and_the_hooks_removed():
    model = _mlp().train()
    first = kf.criteria.wanda(model, [torch.randn(2, 7)])
    assert model.training and all(m.training for m in model.modules())
    second = kf.criteria.wanda(model, [torch.randn(3, 7)])
    assert first.tokens == {"0.weight": 2, "2.weight": 2} and second.tokens == {"0.weight": 3, "2.weight": 3}
    model(torch.randn(4, 7))  # a later forward pass feeds no hook: nothing changes
    assert first.tokens["0.weight"] == 2 and second.tokens["0.weight"] == 3


def test_bad_inputs_raise_naming_the_function():
    model = _mlp()
    with pytest.raises(ValueError, match=r"wanda.*at least one token"):
        kf.criteria.wanda(model, [])
    with pytest.raises(ValueError, match=r"wanda.*end in 7 features"):
        kf.criteria.wanda(model, [torch.randn(2, 6)])
    with pytest.raises(TypeError, match=r"wanda.*nn.Module"):
        kf.criteria.wanda({"w": torch.zeros(2, 2)}, [])
    with pytest.raises(ValueError, match=r"wanda.*params"):
        kf.criteria.wanda(model, [torch.randn(2, 7)], params=["0.bias"])
    with pytest.raises(ValueError, match=r"wanda.*NaN"):
        kf.criteria.wanda(model, [torch.full((2, 7), float("nan"))])
    only = kf.criteria.wanda(model, [torch.randn(2, 7)], params=["2.weight"])
    assert list(only) == ["2.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masks_equal_a_stable_descending_sort_per_unit_with_many_ties(dtype):
    """Per-unit masks come from one per-tensor selection over all units: the same as the paper's
    stable sort per output row and a scatter, ties included, for row and column units alike."""
    g = torch.Generator().manual_seed(0)
    scores = {
        "rows": (torch.randint(0, 5, (300, 70), generator=g) / 4).to(dtype),  # 5 distinct values: ties
        "columns": torch.rand(40, 130, generator=g).to(dtype),  # Conv1D [in, out]: a unit is a column
        "one": torch.rand(1, 9, generator=g).to(dtype),
    }
    ws = kf.criteria.WandaScores(scores, unit_dims={"columns": 1})
    for sparsity in (0.0, 0.3, 0.5, 0.99):
        masks = ws.masks(sparsity)
        for name, s in scores.items():
            units = s.movedim(ws.unit_dims.get(name, 0), 0)
            keep = kf.masks.keep_count(units.shape[1], sparsity)
            order = torch.sort(units, dim=1, descending=True, stable=True).indices[:, :keep]
            expected = torch.zeros_like(units, dtype=torch.bool).scatter_(1, order, True)
            assert torch.equal(masks[name].movedim(ws.unit_dims.get(name, 0), 0), expected), (name, sparsity)
