"""kf.masks.global_topk and kf.masks.layerwise_topk: counts, ties, structures and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import koopfast as kf

from conftest import DEVICES


def model_scores(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    shapes = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 72), "fc.bias": (10,)}
    return {n: torch.randn(s, generator=g).to(device=device, dtype=dtype) for n, s in shapes.items()}


def topk_reference(flat_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest; ties by position (stable sort on descending scores)."""
    order = torch.sort(flat_scores.double(), descending=True, stable=True).indices
    keep = torch.zeros_like(flat_scores, dtype=torch.bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99, 0.999])
def test_global_keeps_exactly_round_of_one_minus_sparsity(device, sparsity):
    scores = model_scores(device)
    masks = kf.masks.global_topk(scores, sparsity=sparsity)
    n = sum(s.numel() for s in scores.values())
    assert list(masks) == list(scores)
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - sparsity) * n)
    flat = torch.cat([s.reshape(-1) for s in scores.values()]).cpu()
    expected = topk_reference(flat, round((1 - sparsity) * n))
    assert torch.equal(torch.cat([m.reshape(-1).cpu() for m in masks.values()]), expected)


def test_scores_computed_in_the_kernel_equal_materialised_scores(device):
    params = model_scores(device)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    pairs = {n: (params[n], grads[n]) for n in params}
    for by, materialise in [
        ("abs", lambda p, g: p.abs()),
        ("abs_product", lambda p, g: (p * g).abs()),
        ("product", lambda p, g: p * g),
        ("square_times_abs", lambda p, g: p * p * g.abs()),
    ]:
        fused = kf.masks.global_topk(pairs if by != "abs" else params, 0.8, by=by)
        direct = kf.masks.global_topk({n: materialise(params[n], grads[n]) for n in params}, 0.8)
        assert all(torch.equal(fused[n], direct[n]) for n in params), by


def test_keep_count_and_list_input(device):
    scores = list(model_scores(device).values())
    masks = kf.masks.global_topk(scores, keep=37)
    assert isinstance(masks, list) and len(masks) == len(scores)
    assert sum(int(m.sum()) for m in masks) == 37
    assert sum(int(m.sum()) for m in kf.masks.global_topk(scores, keep=0)) == 0


def test_ties_go_to_the_first_tensor_then_the_lowest_index(device):
    scores = {"b": torch.ones(4, device=device), "a": torch.ones(2, 3, device=device)}
    masks = kf.masks.global_topk(scores, keep=6)
    assert masks["b"].all() and masks["a"].reshape(-1).tolist() == [True, True, False, False, False, False]


def test_parameters_requiring_grad_are_accepted():
    model = torch.nn.Linear(20, 10)
    masks = kf.masks.global_topk(dict(model.named_parameters()), 0.5, by="abs")
    assert not any(m.requires_grad for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * 210)


def test_layerwise_keeps_round_of_one_minus_sparsity_per_tensor(device):
    scores = model_scores(device)
    masks = kf.masks.layerwise_topk(scores, 0.7)
    for name, s in scores.items():
        assert int(masks[name].sum()) == round(0.3 * s.numel())
        assert torch.equal(masks[name].reshape(-1).cpu(), topk_reference(s.reshape(-1).cpu(), round(0.3 * s.numel())))
    per_layer = kf.masks.layerwise_topk(scores, {"fc.weight": 0.9})
    assert int(per_layer["fc.weight"].sum()) == 72 and bool(per_layer["conv.weight"].all())


def test_layerwise_handles_empty_tensors(device):
    masks = kf.masks.layerwise_topk(
        {"empty": torch.ones(0, 3, device=device), "x": torch.arange(4.0, device=device)}, 0.5
    )
    assert masks["empty"].shape == (0, 3) and masks["x"].tolist() == [False, False, True, True]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5), sparsity=st.floats(0, 0.999), levels=st.integers(1, 4)
)
def test_property_global_counts_and_order(sizes, sparsity, levels):
    if sum(sizes) == 0:
        return
    g = torch.Generator().manual_seed(sum(sizes))
    scores = [torch.randint(levels, (n,), generator=g).float() for n in sizes]
    k = round((1 - sparsity) * sum(sizes))
    expected = topk_reference(torch.cat(scores), k)
    for device in DEVICES:
        masks = kf.masks.global_topk([s.to(device) for s in scores], sparsity)
        assert torch.equal(torch.cat([m.cpu() for m in masks]), expected)


# ---- errors -----------------------------------------------------------------------------------------


def test_errors(device):
    scores = model_scores(device)
    fn = "koopfast.masks.global_topk"
    for bad in (1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=rf"{fn}: expected sparsity in \[0, 1\), got"):
            kf.masks.global_topk(scores, bad)
    with pytest.raises(TypeError, match=rf"{fn}: expected sparsity to be a float in \[0, 1\), got bool"):
        kf.masks.global_topk(scores, True)
    with pytest.raises(ValueError, match=rf"{fn}: expected exactly one of sparsity and keep, got both"):
        kf.masks.global_topk(scores, 0.5, keep=3)
    with pytest.raises(ValueError, match=rf"{fn}: expected exactly one of sparsity and keep, got neither"):
        kf.masks.global_topk(scores)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected keep in \[0, 954\] \(the number of score elements\), got 1000"
    ):
        kf.masks.global_topk(scores, keep=1000)
    with pytest.raises(ValueError, match=rf"{fn}: expected at least one score tensor, got none"):
        kf.masks.global_topk({}, 0.5)
    with pytest.raises(ValueError, match=rf"{fn}: expected at least one score element, got only empty tensors"):
        kf.masks.global_topk({"x": torch.ones(0, device=device)}, 0.5)
    with pytest.raises(ValueError, match=rf"{fn}: expected by to be one of"):
        kf.masks.global_topk(scores, 0.5, by="l2")
    with pytest.raises(
        TypeError, match=rf"{fn}: expected 'conv.weight' to be a pair of tensors \(a, b\) for by='abs_product'"
    ):
        kf.masks.global_topk(scores, 0.5, by="abs_product")
    with pytest.raises(
        TypeError, match=rf"{fn}: expected scores to be a dict of tensors or a list of tensors, got Tensor"
    ):
        kf.masks.global_topk(torch.ones(3), 0.5)
    bad = dict(scores, **{"fc.bias": torch.tensor([1.0, float("nan")] * 5, device=device)})
    with pytest.raises(ValueError, match=rf"{fn}: expected scores without NaN, got NaN in 'fc.bias'"):
        kf.masks.global_topk(bad, 0.5)
    ints = dict(scores, mask=torch.ones(3, dtype=torch.long, device=device))
    with pytest.raises(
        TypeError, match=rf"{fn}: expected 'mask' to be float16, bfloat16, float32 or float64, got Long"
    ):
        kf.masks.global_topk(ints, 0.5)
    pairs = {"w": (torch.ones(3, device=device), torch.ones(4, device=device))}
    with pytest.raises(
        ValueError, match=rf"{fn}: expected 'w' \(second operand\) to have the shape of 'w' \[3\], got \[4\]"
    ):
        kf.masks.global_topk(pairs, 0.5, by="product")
    with pytest.raises(
        ValueError,
        match=r"koopfast.masks.layerwise_topk: expected sparsity keys among the score names, got unknown \['nope'\]",
    ):
        kf.masks.layerwise_topk(scores, {"nope": 0.5})
    with pytest.raises(ValueError, match=r"koopfast.masks.layerwise_topk: expected sparsity in \[0, 1\), got 2"):
        kf.masks.layerwise_topk(scores, 2)


def test_mixed_devices_name_the_tensors():
    if len(DEVICES) < 2:
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match=r"expected all tensors on one device, got 'x' on cpu and 'y' on cuda"):
        kf.masks.global_topk({"x": torch.ones(3), "y": torch.ones(3, device="cuda")}, 0.5)
