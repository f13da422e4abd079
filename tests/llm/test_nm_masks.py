"""kf.masks.nm_masks on real layouts: Linear rows, Hugging Face Conv1D columns, convolutions,
fused scores, every criterion's scores; and the masks keep working with apply_/Masked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import koopfast as kf

pytest.importorskip("transformers")
from zoo import CASES


def _groups_ok(mask: torch.Tensor, n: int, m: int) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())


def test_linear_weights_keep_n_of_every_m_inputs_by_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    masks = kf.masks.nm_masks(params, 2, 4, by="abs")
    for name, mask in masks.items():
        assert mask.shape == params[name].shape and _groups_ok(mask, 2, 4)
        w = params[name].detach().abs().reshape(mask.shape[0], -1, 4)
        k = mask.reshape(w.shape)
        assert (w.masked_fill(~k, float("inf")).amin(-1) >= w.masked_fill(k, -1).amax(-1)).all()
    kf.masks.apply_(model, masks)
    assert all(_groups_ok(params[n].detach() != 0, 2, 4) for n in masks)


def test_conv1d_weights_are_grouped_along_their_input_dimension():
    c = CASES["gpt2"]
    model = c.model()
    scores = kf.criteria.wanda(model, c.batches(1), forward=lambda m, b: m(b))
    masks = kf.masks.nm_masks(scores, 2, 4, model=model)
    name = "transformer.h.0.mlp.c_fc.weight"  # [in, out]
    mask = masks[name]
    assert _groups_ok(mask.t(), 2, 4)  # groups of 4 consecutive inputs in every output column
    assert not _groups_ok(mask, 2, 4) or mask.shape[1] % 4  # not along the outputs
    without_model = kf.masks.nm_masks(scores, 2, 4)[name]
    assert _groups_ok(without_model, 2, 4) and not torch.equal(without_model, mask)


def test_fused_scores_equal_materialised_ones():
    torch.manual_seed(1)
    w, g = torch.randn(6, 12), torch.randn(6, 12)
    fused = kf.masks.nm_masks({"w": (w, g)}, 1, 4, by="abs_product")
    given = kf.masks.nm_masks({"w": (w * g).abs()}, 1, 4)
    assert torch.equal(fused["w"], given["w"])


def test_convolutions_group_the_flattened_inputs_of_each_channel():
    conv = nn.Conv2d(3, 5, 2)
    masks = kf.masks.nm_masks({"conv.weight": conv.weight}, 2, 4, by="abs")
    assert masks["conv.weight"].shape == conv.weight.shape
    assert _groups_ok(masks["conv.weight"].reshape(5, -1), 2, 4)  # 3·2·2 = 12 inputs per channel


def test_masked_training_keeps_the_pattern():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    masks = kf.masks.nm_masks({n: p for n, p in model.named_parameters() if p.dim() == 2}, 2, 4, by="abs")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with kf.masks.Masked(model, masks, optimizer=opt):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
    for name, mask in masks.items():
        assert bool((model.get_parameter(name).detach()[~mask] == 0).all())


def test_errors_name_the_function_and_the_tensor():
    with pytest.raises(ValueError, match=r"nm_masks.*2\+ dimensions.*'b'"):
        kf.masks.nm_masks({"b": torch.zeros(4)}, 2, 4)
    with pytest.raises(ValueError, match=r"nm_masks.*NaN.*'w'"):
        kf.masks.nm_masks({"w": torch.full((2, 4), float("nan"))}, 2, 4)
    with pytest.raises(ValueError, match=r"nm_masks.*expected n"):
        kf.masks.nm_masks({"w": torch.zeros(2, 4)}, 5, 4)
    with pytest.raises(TypeError, match=r"nm_masks.*pair"):
        kf.masks.nm_masks({"w": torch.zeros(2, 4)}, 2, 4, by="abs_product")
    with pytest.raises(ValueError, match=r"nm_masks.*by"):
        kf.masks.nm_masks({"w": torch.zeros(2, 4)}, 2, 4, by="bogus")  # type: ignore[arg-type]


def test_semi_structured_conversion_refuses_what_it_cannot_hold():
    model = nn.Sequential(nn.Linear(8, 4))
    masks = kf.masks.nm_masks({"0.weight": model[0].weight}, 2, 4, by="abs")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"to_semi_structured.*compute capability"):
            kf.masks.to_semi_structured(model, masks)
    dense = {"0.weight": torch.ones(4, 8, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"to_semi_structured.*2:4"):
        kf.masks.to_semi_structured(model, dense)
    assert isinstance(model[0].weight, nn.Parameter) and model[0].weight.layout == torch.strided  # unchanged


def test_tensors_without_rows_get_empty_masks():
    # an FSDP2 shard of a weight with fewer rows than processes holds none
    assert kf.masks.nm_masks({"w": torch.zeros(0, 8)}, 2, 4)["w"].shape == (0, 8)
    assert kf.criteria.WandaScores({"w": torch.zeros(0, 8)}).masks(0.5)["w"].shape == (0, 8)
