"""kf.masks.report, and kf.masks.save / load of bit-packed masks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import koopfast as kf


def make_model() -> nn.Module:
    torch.manual_seed(8)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


def test_report_of_masks_bool_and_packed_on_one_call(device):
    g = torch.Generator().manual_seed(1)
    masks = {
        "a": (torch.rand(10, 20, generator=g) < 0.3).to(device),
        "b": kf.masks.pack((torch.rand(77, generator=g) < 0.6).to(device)),
        "empty": torch.ones(0, 3, dtype=torch.bool, device=device),
    }
    r = kf.masks.report(masks)
    assert [row.name for row in r.layers] == ["a", "b", "empty"]
    assert r["a"].total == 200 and r["a"].kept == int(masks["a"].sum()) and r["a"].shape == (10, 20)
    assert r["b"].kept == masks["b"].count() and r["b"].total == 77
    assert r["empty"].sparsity == 0.0 and r.total == 277 and r.kept == r["a"].kept + r["b"].kept
    assert r.pruned == r.total - r.kept and abs(r.sparsity - r.pruned / 277) < 1e-12
    data = r.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["layers"][0] == {
        "name": "a",
        "shape": [10, 20],
        "total": 200,
        "kept": r["a"].kept,
        "pruned": r["a"].pruned,
        "sparsity": r["a"].sparsity,
    }
    table = str(r)
    lines = table.splitlines()
    assert lines[0].split() == ["tensor", "shape", "kept", "total", "sparsity"]
    assert lines[-1].split()[:3] == ["total", str(r.kept), "277"] and lines[-1].endswith(f"{100 * r.sparsity:.2f}%")
    assert any(line.startswith("b ") and "[77]" in line for line in lines)


def test_report_of_a_model_a_torch_pruned_model_and_a_masked_model():
    model = make_model()
    dense = kf.masks.report(model)
    assert [row.name for row in dense.layers] == ["0.weight", "0.bias", "3.weight", "3.bias"]  # no BatchNorm
    assert dense.sparsity == 0.0
    masks = kf.masks.global_topk(kf.criteria.magnitude(model), 0.75)
    masked = kf.masks.Masked(model, masks)
    for r in (kf.masks.report(masked), kf.masks.report(model), kf.masks.report(masks)):
        assert r.kept == round(0.25 * dense.total) and [x.kept for x in r.layers] == [
            int(m.sum()) for m in masks.values()
        ]
    pruned = make_model()
    torch_prune.global_unstructured(
        [(pruned[0], "weight"), (pruned[3], "weight")], torch_prune.L1Unstructured, amount=100
    )
    r = kf.masks.report(pruned)
    assert r["0.weight"].pruned + r["3.weight"].pruned == 100 and r["3.bias"].pruned == 0


def test_report_errors():
    with pytest.raises(
        TypeError,
        match=r"koopfast.masks.report: expected mask 'w' to be a bool tensor or a PackedMask, got torch.float32",
    ):
        kf.masks.report({"w": torch.ones(3)})
    with pytest.raises(
        TypeError, match=r"koopfast.masks.report: expected a dict of masks, a Masked model or a model, got list"
    ):
        kf.masks.report([torch.ones(3, dtype=torch.bool)])


# ---- save / load ------------------------------------------------------------------------------------


def some_masks(device="cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "conv.weight": (torch.rand(8, 3, 3, 3, generator=g) < 0.2).to(device),
        "conv.bias": torch.tensor([True, False, True], device=device),
        "fc.weight": (torch.rand(13, 7, generator=g) < 0.5).to(device).t(),  # non-contiguous
        "scalar": torch.tensor(True, device=device),
        "empty": torch.zeros(0, 4, dtype=torch.bool, device=device),
    }


def test_save_load_round_trip(device, tmp_path):
    masks = some_masks(device)
    path = tmp_path / "masks.pt"
    kf.masks.save(masks, path)
    loaded = kf.masks.load(path)
    assert list(loaded) == list(masks)
    for k in masks:
        assert loaded[k].dtype == torch.bool and loaded[k].device.type == "cpu"
        assert torch.equal(loaded[k], masks[k].cpu()), k
    on_device = kf.masks.load(path, device=device, packed=True)
    assert all(isinstance(p, kf.masks.PackedMask) and p.device == masks[k].device for k, p in on_device.items())
    kf.masks.save(on_device, path)  # packed masks save as they are
    assert all(torch.equal(kf.masks.load(path)[k], masks[k].cpu()) for k in masks)


def test_the_file_is_plain_data_in_the_numpy_packbits_format():
    masks = some_masks()
    buffer = io.BytesIO()
    kf.masks.save(masks, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["format"] == "koopfast.masks" and state["version"] == 2 and state["names"] == list(masks)
    for name, shape, bits in zip(state["names"], state["shapes"], state["bits"]):
        assert shape == list(masks[name].shape)
        expected = np.packbits(masks[name].numpy().reshape(-1), bitorder="little")
        assert np.array_equal(bits.numpy(), expected), name


def test_saved_masks_are_a_few_percent_of_float_masks(tmp_path):
    g = torch.Generator().manual_seed(3)
    masks = {f"layer{i}.weight": torch.rand(256, 512, generator=g) < 0.1 for i in range(4)}
    kf.masks.save(masks, tmp_path / "packed.pt")
    torch.save({k: m.float() for k, m in masks.items()}, tmp_path / "float.pt")
    torch.save(masks, tmp_path / "bool.pt")
    packed = (tmp_path / "packed.pt").stat().st_size
    assert packed / (tmp_path / "float.pt").stat().st_size < 0.04
    assert packed / (tmp_path / "bool.pt").stat().st_size < 0.14


def test_load_rejects_other_files_and_save_rejects_bad_masks(tmp_path):
    torch.save({"weight": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match=r"koopfast.masks.load: expected a koopfast masks file \(format 'koopfast.masks'\), got None"
    ):
        kf.masks.load(tmp_path / "other.pt")
    torch.save({"format": "koopfast.masks", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"koopfast.masks.load: expected masks file version 1 or 2, got 99"):
        kf.masks.load(tmp_path / "future.pt")
    state = {
        "format": "koopfast.masks",
        "version": 1,
        "names": ["w"],
        "shapes": [[4, 4]],
        "bits": [torch.zeros(1, dtype=torch.uint8)],
    }
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match=r"koopfast.masks.load: expected mask 'w' to match its shape \[4, 4\]"):
        kf.masks.load(tmp_path / "damaged.pt")
    with pytest.raises(
        TypeError,
        match=r"koopfast.masks.save: expected mask 'w' to be a bool tensor or a PackedMask, got torch.float32",
    ):
        kf.masks.save({"w": torch.ones(3)}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match=r"koopfast.masks.save: expected masks as a dict of named masks, got list"):
        kf.masks.save([torch.ones(3, dtype=torch.bool)], tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
