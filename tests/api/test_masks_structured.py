"""kf.masks.structured_topk: whole output units kept or pruned, global and layerwise."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import koopfast as kf


def make_model(device="cpu") -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ConvTranspose2d(8, 6, 3, groups=2),
        nn.Conv2d(6, 4, 1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    ).to(device)


WEIGHTS = {"0.weight": 8, "1.weight": 6, "2.weight": 4, "4.weight": 10}  # output units


def unit_scores(device, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(u, generator=g).to(device) for n, u in WEIGHTS.items()}


def output_unit_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """[units, rest] view of a weight (or bias) mask, by the layer's layout."""
    if name == "1.weight":  # ConvTranspose2d(8, 6, groups=2): [in=8, out/groups=3, k, k]
        return t.reshape(2, 4, 3, -1).permute(0, 2, 1, 3).reshape(6, -1)
    return t.reshape(t.shape[0], -1)


def check_units(masks, model, unit_masks):
    for name, units in unit_masks.items():
        view = output_unit_view(name, masks[name])
        assert masks[name].shape == model.get_parameter(name).shape and masks[name].is_contiguous()
        assert torch.equal(view.all(1), units) and torch.equal(view.any(1), units), name  # all or nothing
        if model.get_submodule(name.removesuffix(".weight")).bias is not None:
            assert torch.equal(masks[name.replace("weight", "bias")], units)
        else:
            assert name.replace("weight", "bias") not in masks


def test_global_keeps_exactly_round_of_the_units_and_equals_global_topk(device):
    model = make_model(device)
    scores = unit_scores(device)
    for sparsity in (0.0, 0.25, 0.5, 0.9):
        masks = kf.masks.structured_topk(scores, model, sparsity)
        units = kf.masks.global_topk(scores, sparsity)
        assert list(masks) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "4.weight", "4.bias"]
        assert sum(int(u.sum()) for u in units.values()) == round((1 - sparsity) * 28)
        check_units(masks, model, units)
    masks = kf.masks.structured_topk(scores, model, keep=5, include_bias=False)
    assert list(masks) == list(WEIGHTS) and sum(int(output_unit_view(n, m).all(1).sum()) for n, m in masks.items()) == 5


def test_layerwise_equals_torch_ln_structured_on_row_norms(device):
    model = make_model(device)
    names = ["0.weight", "2.weight", "4.weight"]
    scores = {n: model.get_parameter(n).detach().flatten(1).norm(dim=1) for n in names}
    masks = kf.masks.structured_topk(scores, model, 0.3, scope="layerwise", include_bias=False)
    for n in names:
        module = model.get_submodule(n[:-7])
        torch_prune.ln_structured(module, "weight", amount=0.3, n=2, dim=0)
        assert torch.equal(masks[n], module.weight_mask.bool()), n
    per_layer = kf.masks.structured_topk(scores, model, {"4.weight": 0.5}, scope="layerwise")
    assert bool(per_layer["0.weight"].all()) and int(per_layer["4.bias"].sum()) == 5


def test_a_dict_of_parameters_uses_dim_0_and_the_matching_bias():
    params = {"fc.weight": torch.randn(5, 3), "fc.bias": torch.randn(5), "bn.weight": torch.randn(4)}
    scores = {"fc.weight": torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2]), "bn.weight": torch.tensor([1.0, 0.0, 0.3, 0.6])}
    masks = kf.masks.structured_topk(scores, params, keep=4)
    assert masks["fc.bias"].tolist() == [False, True, False, True, False]
    assert masks["fc.weight"].all(1).tolist() == [False, True, False, True, False]
    assert masks["bn.weight"].tolist() == [True, False, False, True]


def test_masks_apply_and_prune_whole_units(device):
    model = make_model(device)
    masks = kf.masks.structured_topk(unit_scores(device, 2), model, 0.5)
    kf.masks.apply_(model, masks)
    w = model[4].weight
    assert int((w.abs().sum(1) != 0).sum()) == int(masks["4.bias"].sum())


def test_ties_go_to_the_first_layer_then_the_lowest_unit(device):
    model = make_model(device)
    scores = {n: torch.ones(u, device=device) for n, u in WEIGHTS.items()}
    masks = kf.masks.structured_topk(scores, model, keep=10)
    assert bool(masks["0.weight"].all()) and masks["1.bias"].tolist() == [True, True, False, False, False, False]


def test_errors():
    model = make_model()
    fn = "koopfast.masks.structured_topk"
    scores = unit_scores("cpu")
    with pytest.raises(
        ValueError, match=rf"{fn}: expected '4.weight' to hold one score per output unit, shape \[10\], got shape \[9\]"
    ):
        kf.masks.structured_topk(dict(scores, **{"4.weight": torch.rand(9)}), model, 0.5)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected score names among the model's parameter names, got unknown 'x.weight'"
    ):
        kf.masks.structured_topk({"x.weight": torch.rand(3)}, model, 0.5)
    with pytest.raises(ValueError, match=rf"{fn}: expected keep only with scope='global'"):
        kf.masks.structured_topk(scores, model, keep=3, scope="layerwise")
    with pytest.raises(ValueError, match=rf"{fn}: expected scope to be 'global' or 'layerwise', got 'local'"):
        kf.masks.structured_topk(scores, model, 0.5, scope="local")
    with pytest.raises(ValueError, match=rf"{fn}: expected sparsity in \[0, 1\), got 1.5"):
        kf.masks.structured_topk(scores, model, 1.5)
    with pytest.raises(ValueError, match=rf"{fn}: expected scores without NaN, got NaN in '2.weight'"):
        kf.masks.structured_topk(dict(scores, **{"2.weight": torch.tensor([1.0, float("nan"), 0.0, 2.0])}), model, 0.5)
    with pytest.raises(
        TypeError, match=rf"{fn}: expected '0.weight' to be float16, bfloat16, float32 or float64, got Long"
    ):
        kf.masks.structured_topk(dict(scores, **{"0.weight": torch.arange(8)}), model, 0.5)
    with pytest.raises(ValueError, match=rf"{fn}: expected sparsity keys among the score names, got unknown \['y'\]"):
        kf.masks.structured_topk(scores, model, {"y": 0.5}, scope="layerwise")


def test_models_with_batchnorm_get_a_warning_that_points_to_coupled_masks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    scores = {"0.weight": torch.rand(4)}
    with pytest.warns(UserWarning, match=r"structured_topk: .* BatchNorm layers \('1' and 0 more\) unmasked.*coupled"):
        kf.masks.structured_topk(scores, model, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kf.masks.structured_topk(scores, model, 0.5, warn_normalization=False)
        kf.masks.structured_topk(unit_scores("cpu"), make_model(), 0.5)  # no BatchNorm: no warning


def test_units_of_prunable_entries_are_kept_when_they_are_passed_in_place_of_a_model():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3))
    entries = kf.prunable.prunable(model, embeddings=True)
    per_unit = kf.criteria.magnitude(entries, granularity="filter")
    assert per_unit["0.weight"].shape == (6,)  # an embedding's units are its features (columns)
    assert kf.criteria.magnitude(dict(model.named_parameters()), granularity="filter")["0.weight"].shape == (10,)
