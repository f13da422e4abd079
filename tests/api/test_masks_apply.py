"""kf.masks.pack / unpack / PackedMask and kf.masks.apply_: structures, names in errors, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import koopfast as kf

from conftest import DEVICES


def small_model(device="cpu") -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).to(device)


def magnitude_masks(model: nn.Module, sparsity=0.8) -> dict[str, torch.Tensor]:
    return kf.masks.global_topk(dict(model.named_parameters()), sparsity, by="abs")


def test_pack_unpack_keep_the_structure_and_the_format(device):
    gen = torch.Generator().manual_seed(2)
    masks = {
        "a": (torch.rand(5, 7, generator=gen) < 0.5).to(device),
        "b": torch.ones(3, 0, dtype=torch.bool, device=device),
    }
    packed = kf.masks.pack(masks)
    assert list(packed) == ["a", "b"] and all(isinstance(p, kf.masks.PackedMask) for p in packed.values())
    assert packed["a"].shape == (5, 7) and packed["a"].nbytes == 5 and packed["a"].device == masks["a"].device
    assert np.array_equal(
        packed["a"].bits.cpu().numpy(), np.packbits(masks["a"].cpu().numpy().ravel(), bitorder="little")
    )
    assert packed["a"].count() == int(masks["a"].sum())
    unpacked = kf.masks.unpack(packed)
    assert all(torch.equal(unpacked[k], masks[k]) for k in masks)
    as_list = kf.masks.pack(list(masks.values()))
    assert isinstance(as_list, list) and torch.equal(as_list[0].unpack(), masks["a"])
    single = kf.masks.pack(masks["a"])
    assert isinstance(single, kf.masks.PackedMask) and torch.equal(kf.masks.unpack(single), masks["a"])
    assert kf.masks.pack(packed)["a"] is packed["a"]  # packed masks pass through
    assert torch.equal(kf.masks.PackedMask.from_bool(masks["a"]).bits, packed["a"].bits)
    assert "PackedMask(shape=[5, 7]" in repr(packed["a"])


def test_packed_mask_validates_its_bytes():
    with pytest.raises(ValueError, match=r"PackedMask: expected 2 bytes for shape \[3, 4\], got 3"):
        kf.masks.PackedMask(torch.zeros(3, dtype=torch.uint8), (3, 4))
    with pytest.raises(TypeError, match=r"PackedMask: expected bits to be a 1-D uint8 tensor, got torch.int64"):
        kf.masks.PackedMask(torch.zeros(2, dtype=torch.long), (3, 4))
    with pytest.raises(TypeError, match=r"koopfast.masks.pack: expected mask 'w' to be a bool tensor or a PackedMask"):
        kf.masks.pack({"w": torch.ones(3)})


@pytest.mark.parametrize("form", ["bool", "packed", "bytes"])
def test_apply_to_a_model_zeroes_exactly_the_pruned_entries(device, form):
    model = small_model(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = magnitude_masks(model)
    given = {
        "bool": masks,
        "packed": kf.masks.pack(masks),
        "bytes": {n: p.bits for n, p in kf.masks.pack(masks).items()},
    }[form]
    assert kf.masks.apply_(model, given) is model
    for n, p in model.named_parameters():
        assert p.requires_grad
        assert torch.equal(p.detach(), torch.where(masks[n], before[n], torch.zeros((), device=device)))
        assert not torch.signbit(p.detach()[~masks[n]]).any()


def test_apply_to_a_subset_a_dict_a_list_and_a_tensor(device):
    model = small_model(device)
    masks = magnitude_masks(model)
    bias = model[3].bias.detach().clone()
    kf.masks.apply_(model, {"3.weight": masks["3.weight"]})  # a subset: the rest is untouched
    assert torch.equal(model[3].bias.detach(), bias)
    assert int((model[3].weight != 0).sum()) == int(masks["3.weight"].sum())
    tensors = {"x": torch.randn(6, device=device), "y": torch.randn(2, 2, device=device)}
    kf.masks.apply_(tensors, {"y": torch.tensor([[True, False], [False, True]], device=device)})
    assert tensors["y"][0, 1] == 0 and tensors["y"][1, 0] == 0 and bool((tensors["x"] != 0).all())
    xs = [torch.randn(3, device=device), torch.randn(4, device=device)]
    kf.masks.apply_(
        xs,
        [
            torch.tensor([True, False, True], device=device),
            kf.masks.pack(torch.zeros(4, dtype=torch.bool, device=device)),
        ],
    )
    assert xs[0][1] == 0 and bool((xs[1] == 0).all())
    x = torch.randn(5, device=device)
    kf.masks.apply_(x, torch.tensor([True] * 4 + [False], device=device))
    assert x[4] == 0


def test_apply_errors_name_the_tensor_and_change_nothing(device):
    model = small_model(device)
    masks = magnitude_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fn = "koopfast.masks.apply_"
    bad_shape = dict(masks, **{"3.bias": torch.ones(11, dtype=torch.bool, device=device)})
    with pytest.raises(
        ValueError, match=rf"{fn}: expected the mask of '3.bias' to have the shape of '3.bias' \[10\], got \[11\]"
    ):
        kf.masks.apply_(model, bad_shape)
    bad_packed = dict(masks, **{"3.bias": kf.masks.pack(torch.ones(2, 5, dtype=torch.bool, device=device))})
    with pytest.raises(
        ValueError,
        match=rf"{fn}: expected the mask of '3.bias' to have its shape \[10\], got a PackedMask of shape \[2, 5\]",
    ):
        kf.masks.apply_(model, bad_packed)
    bad_dtype = dict(masks, **{"0.bias": torch.ones(4, device=device)})
    with pytest.raises(
        TypeError, match=rf"{fn}: expected the mask of '0.bias' to be bool, or uint8 \(packed\), got Float"
    ):
        kf.masks.apply_(model, bad_dtype)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected mask names among the model's parameter names, got unknown \['fc.weight'\]"
    ):
        kf.masks.apply_(model, {"fc.weight": masks["3.weight"]})
    with pytest.raises(TypeError, match=rf"{fn}: expected masks as a dict keyed by parameter names, got list"):
        kf.masks.apply_(model, list(masks.values()))
    with pytest.raises(ValueError, match=rf"{fn}: expected a list of 2 masks, one per tensor, got 1 masks"):
        kf.masks.apply_([torch.ones(2), torch.ones(3)], [torch.ones(2, dtype=torch.bool)])
    with pytest.raises(
        TypeError, match=rf"{fn}: expected 'tensor' to be float16, bfloat16, float32 or float64, got Long"
    ):
        kf.masks.apply_(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    with pytest.raises(
        TypeError, match=rf"{fn}: expected a model, a dict of tensors, a list of tensors or a tensor, got int"
    ):
        kf.masks.apply_(3, {})
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_apply_to_tensors_on_two_devices_is_checked_before_writing():
    if len(DEVICES) < 2:
        pytest.skip("needs a second device")
    xs = {"a": torch.randn(3), "b": torch.randn(3, device="cuda")}
    before = {k: v.clone() for k, v in xs.items()}
    masks = {"a": torch.zeros(3, dtype=torch.bool), "b": torch.zeros(3, dtype=torch.bool)}  # b's mask on the CPU
    with pytest.raises(ValueError, match=r"expected the mask of 'b' on its device cuda:0, got cpu"):
        kf.masks.apply_(xs, masks)
    assert all(torch.equal(xs[k], before[k]) for k in xs)
    kf.masks.apply_(xs, {"a": masks["a"], "b": masks["b"].cuda()})
    assert not xs["a"].any() and not xs["b"].any()
