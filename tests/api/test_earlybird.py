"""kf.EarlyBird detectors on scripted sequences of models, against transcriptions of the papers' rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import koopfast as kf

from conftest import DEVICES


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 3 * 3, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def probe(device="cpu") -> torch.Tensor:
    return torch.randn(25, 3, 7, 7, generator=torch.Generator().manual_seed(1)).to(device)


def randomize(model: nn.Module, seed: int) -> None:
    """A new draw of every parameter and BatchNorm statistic: a new partition."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                continue
            new = torch.randn(t.shape, generator=gen) * 0.5
            t.copy_((new.abs() + 0.5) if name.endswith("running_var") else new)


def authors_spline_distance(acts_now: dict, acts_before: dict) -> float:
    """Spline-EB's rule on float copies: per layer mean |1[a > 0] - 1[b > 0]|, averaged over layers
    (their code sums in float32; float64 here, so that the comparison can be exact)."""
    per_layer = [
        ((acts_now[k] > 0).double() - (acts_before[k] > 0).double()).abs().sum() / acts_now[k].numel() for k in acts_now
    ]
    return float(sum(per_layer) / len(per_layer))


def float_bn_outputs(model: nn.Module, x: torch.Tensor) -> dict:
    store = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out.detach().cpu().clone()))
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return store


# ---- scripted sequences ----------------------------------------------------------------------------


def test_a_frozen_model_is_detected_as_soon_as_the_window_is_full(device):
    model = small_cnn().to(device)
    spline = kf.EarlyBird.spline(model, probe(device))
    masks = kf.EarlyBird.mask_distance(model, 0.5)
    for _ in range(7):
        spline.update()
        masks.update()
    assert spline.epoch == 3 and spline.history == [None] * 3 + [0.0] * 4
    assert masks.epoch == 4 and masks.history == [None] * 4 + [0.0] * 3
    assert spline.detected and masks.detected and spline.distances[3] == [0.0, 0.0, 0.0]
    assert spline.modules == ["1", "4", "8"]


def test_a_partition_that_keeps_changing_is_never_detected(device):
    model = small_cnn().to(device)
    spline = kf.EarlyBird.spline(model, probe(device))
    masks = kf.EarlyBird.mask_distance(model, 0.5)
    for epoch in range(10):
        randomize(model, seed=100 + epoch)
        assert not spline.update() and not masks.update()
    assert spline.epoch is None and masks.epoch is None
    assert min(h for h in spline.history if h is not None) > spline.eps
    assert min(h for h in masks.history if h is not None) > masks.eps


def test_detection_comes_window_epochs_after_the_model_settles(device):
    model = small_cnn().to(device)
    spline = kf.EarlyBird.spline(model, probe(device))
    masks = kf.EarlyBird.mask_distance(model, 0.3)
    for epoch in range(12):
        if epoch <= 4:  # changes before updates 0..4, then frozen: update 4 is the first settled state
            randomize(model, seed=200 + epoch)
        spline.update()
        masks.update()
    assert spline.epoch == 4 + spline.window == 7
    assert masks.epoch == 4 + masks.window == 8
    assert spline.history[6] > 0 and spline.history[7] == 0.0


def test_spline_distances_equal_the_authors_float_computation(device):
    """History against a transcription of Spline-EB's detect_eb/getDiff on float copies."""
    model = small_cnn().to(device)
    x = probe(device)
    spline = kf.EarlyBird.spline(model, x)
    kept, expected = [], []
    for epoch in range(8):
        with torch.no_grad():  # small steps: a partition that drifts
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(epoch)).to(device) * 0.15)
        spline.update()
        acts = float_bn_outputs(model, x)
        if len(kept) == 3:
            expected.append(max(authors_spline_distance(acts, before) for before in kept))
            kept = kept[1:]
        else:
            expected.append(None)
        kept.append(acts)
    assert spline.history[:3] == [None] * 3
    assert spline.history[3:] == pytest.approx(expected[3:], rel=1e-12, abs=1e-15)
    assert all(0 < h < 1 for h in spline.history[3:])


def test_mask_distances_equal_the_fraction_of_differing_channels(device):
    model = small_cnn().to(device)
    detector = kf.EarlyBird.mask_distance(model, 0.4, window=2, eps=0.05)
    masks = []
    for epoch in range(5):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                    m.weight.add_(
                        torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(epoch)).to(device)
                    )
        detector.update()
        mask = torch.cat(list(detector.masks().values()))
        assert int(mask.sum()) == round(0.6 * 36)
        if len(masks) == 2:
            want = [float((mask != m).double().mean()) for m in masks]
            assert detector.distances[-1] == pytest.approx(want, abs=1e-15)
            masks = masks[1:]
        masks.append(mask)


def test_codes_take_a_32nd_of_the_float_activations(device):
    model = small_cnn().to(device)
    x = torch.randn(64, 3, 7, 7, device=device)  # 64 samples: every unit's bits fill whole words
    spline = kf.EarlyBird.spline(model, x)
    spline.update()
    float_bytes = sum(a.numel() * 4 for a in float_bn_outputs(model, x).values())
    assert float_bytes == 32 * spline.memory_bytes
    codes = spline.codes()
    assert all(c.codes.device.type == torch.device(device).type for c in codes.values())


def test_model_without_batchnorm_codes_the_hidden_pre_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 2))
    spline = kf.EarlyBird.spline(model, torch.randn(40, 6))
    assert spline.modules == ["0", "2"]
    spline.update()
    assert [c.codes.shape for c in spline._kept[0].values()] == [(9, 1), (5, 1)]
    with pytest.raises(ValueError, match=r"koopfast\.EarlyBird\.mask_distance: expected a model with BatchNorm layers"):
        kf.EarlyBird.mask_distance(model, 0.5)
    chosen = kf.EarlyBird.spline(model, torch.randn(40, 6), modules=["2"])
    assert chosen.modules == ["2"]


def test_a_failing_update_leaves_the_detector_as_it_was():
    model = small_cnn()
    x = probe()
    spline = kf.EarlyBird.spline(model, x)
    spline.update()
    spline.update()
    model.train()
    model[7] = nn.Linear(10, 16)  # the probe no longer fits
    with pytest.raises(ValueError, match=r"koopfast.EarlyBird.spline: expected probe batches that the model accepts"):
        spline.update()
    assert spline.history == [None, None] and len(spline._kept) == 2 and spline.epoch is None
    assert model.training and all(not m._forward_hooks for m in model.modules())
    model[7] = nn.Linear(12 * 3 * 3, 16)
    model[3] = nn.Conv2d(8, 12, 3, stride=1)  # fits, but the codes change shape
    model[7] = nn.Linear(12 * 5 * 5, 16)
    with pytest.raises(ValueError, match=r"expected the codes of '4' to keep their shape between epochs"):
        spline.update()
    assert spline.history == [None, None] and len(spline._kept) == 2


def test_errors():
    model = small_cnn()
    with pytest.raises(ValueError, match=r"koopfast\.EarlyBird\.spline: expected window to be a positive int, got 0"):
        kf.EarlyBird.spline(model, probe(), window=0)
    with pytest.raises(ValueError, match=r"koopfast.EarlyBird.spline: expected eps in \[0, 1\], got 1.5"):
        kf.EarlyBird.spline(model, probe(), eps=1.5)
    with pytest.raises(ValueError, match=r"expected prune_ratio in \[0, 1\), got 1.0"):
        kf.EarlyBird.mask_distance(model, 1.0)
    with pytest.raises(TypeError, match=r"koopfast\.EarlyBird\.spline: expected probe to be a tensor or a re-iterable"):
        kf.EarlyBird.spline(model, iter([probe()]))
    with pytest.raises(ValueError, match=r"koopfast\.EarlyBird\.spline: expected probe data with at least one sample"):
        kf.EarlyBird.spline(model, torch.zeros(0, 3, 7, 7)).update()
    with pytest.raises(ValueError, match=r"expected modules among the model's module names, got unknown \['fc'\]"):
        kf.EarlyBird.spline(model, probe(), modules=["fc"])
    with pytest.raises(ValueError, match="expected BatchNorm layers with affine scales"):
        kf.EarlyBird.mask_distance(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), 0.5)
    with pytest.raises(TypeError, match="Can't instantiate abstract class EarlyBird"):
        kf.EarlyBird(3, 0.1)


def test_bn_l1_subgradient():
    model = small_cnn()
    model(probe()).sum().backward()
    before = model[1].weight.grad.clone()
    kf.earlybird.add_bn_l1_subgradient(model, 1e-2)
    assert torch.allclose(model[1].weight.grad, before + 1e-2 * torch.sign(model[1].weight.detach()))
    with pytest.raises(ValueError, match="expected a finite strength"):
        kf.earlybird.add_bn_l1_subgradient(model, float("nan"))


# ---- presets: the authors' released code ------------------------------------------------------------------


def bn2d_model(gammas: list[float], dtype=torch.float32) -> nn.Module:
    """One BatchNorm2d whose scales are `gammas`, and a BatchNorm1d that Early-Bird-Tickets ignores."""
    model = nn.Sequential(nn.Conv2d(1, len(gammas), 1), nn.BatchNorm2d(len(gammas)), nn.Flatten(), nn.BatchNorm1d(3))
    model = model.to(dtype)
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(gammas, dtype=dtype))
    return model


def test_early_bird_tickets_preset_measures_the_initial_weights_and_counts_epochs_trained(device):
    model = small_cnn().to(device)
    detector = kf.EarlyBird.mask_distance(model, 0.5, preset="early_bird_tickets")
    assert detector.history == [None] and detector.updates == 1  # measurement 0: before any training
    default = kf.EarlyBird.mask_distance(model, 0.5)
    for epoch in range(1, 9):  # the weights change during epochs 1..3, then stay
        if epoch <= 3:
            randomize(model, seed=300 + epoch)
        detector.update()
        default.update()
    # the last change is in epoch 3; its mask and the next 4 are equal at epoch 3 + 4 = 7 epochs trained
    assert detector.epoch == 7 and detector.history[7] == 0.0 and detector.history[6] > 0.1
    assert default.epoch == 6  # the index of the update() after epoch 7: one less
    assert detector.window == 4 and detector.eps == 0.1
    assert list(detector.masks()) == ["1", "4"]  # BatchNorm2d only: the BatchNorm1d "8" is left out


def test_early_bird_tickets_threshold_prunes_every_tie_and_rounds_to_float32():
    ties = bn2d_model([0.5, 0.5, 0.5, 2.0])
    masks = kf.EarlyBird.mask_distance(ties, 0.25, preset="early_bird_tickets").masks()
    assert list(masks) == ["1"] and masks["1"].tolist() == [False, False, False, True]
    default = kf.EarlyBird.mask_distance(ties, 0.25).masks()  # every BatchNorm; round(0.75 * 7) kept, ties by position
    assert list(default) == ["1", "3"] and sum(int(m.sum()) for m in default.values()) == 5
    # float64 scales: the threshold is taken from float32 copies (1 + 2**-30 rounds to 1), the
    # comparison is in float64
    fine = bn2d_model([1.0, 1.0 + 2**-30, 3.0, 4.0], dtype=torch.float64)
    assert kf.EarlyBird.mask_distance(fine, 0.25, preset="early_bird_tickets").masks()["1"].tolist() == [
        False,
        True,
        True,
        True,
    ]
    # distinct values keep channels - int(channels * ratio) - 1
    distinct = bn2d_model([float(v) for v in range(1, 11)])
    assert int(kf.EarlyBird.mask_distance(distinct, 0.3, preset="early_bird_tickets").masks()["1"].sum()) == 6


def test_early_bird_tickets_distance_is_their_one_minus_same_fraction():
    model = bn2d_model([float(v) for v in range(1, 11)])
    detector = kf.EarlyBird.mask_distance(model, 0.5, window=1, preset="early_bird_tickets")
    default = kf.EarlyBird.mask_distance(model, 0.5, window=1)
    default.update()
    with torch.no_grad():
        model[1].weight[0] = 20.0  # channel 0 enters the mask, one channel leaves it: 2 differ
    detector.update()
    default.update()
    assert detector.distances[1] == [1 - 8 / 10] and 1 - 8 / 10 != 2 / 10  # their rounding, kept
    assert default.distances[1] == [2 / 13]  # the default also counts the BatchNorm1d's 3 channels


def test_spline_eb_preset_codes_batchnorm1d_and_2d_in_float32(device):
    model = small_cnn().to(device)
    x = probe(device)
    detector = kf.EarlyBird.spline(model, x, preset="spline_eb")
    default = kf.EarlyBird.spline(model, x)
    assert detector.modules == ["1", "4", "8"] and detector.window == 3 and detector.eps == 0.16
    for epoch in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(epoch)).to(device) * 0.15)
        detector.update()
        default.update()
    for got, want in zip(detector.history[3:], default.history[3:], strict=True):
        assert got == float(torch.tensor(got, dtype=torch.float32))  # a float32 value, as theirs
        assert abs(got - want) <= 5 * 2.0**-24 * want  # (L + 2) * 2**-24 relative, L = 3 layers
    bn3d = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    with pytest.raises(
        ValueError, match=r"expected a model with BatchNorm1d/BatchNorm2d layers for preset='spline_eb'"
    ):
        kf.EarlyBird.spline(bn3d, torch.randn(4, 1, 2, 2, 2), preset="spline_eb")
    assert kf.EarlyBird.spline(bn3d, torch.randn(4, 1, 2, 2, 2)).modules == ["1"]  # the default takes it


def test_preset_errors():
    model = small_cnn()
    with pytest.raises(
        ValueError,
        match=r"koopfast\.EarlyBird\.spline: expected preset to be one of \['koopfast', 'spline_eb'\], got 'x'",
    ):
        kf.EarlyBird.spline(model, probe(), preset="x")
    with pytest.raises(ValueError, match=r"expected preset to be one of \['koopfast', 'early_bird_tickets'\]"):
        kf.EarlyBird.mask_distance(model, 0.5, preset="spline_eb")
    with pytest.raises(ValueError, match=r"expected modules=None with preset='spline_eb'"):
        kf.EarlyBird.spline(model, probe(), modules=["1"], preset="spline_eb")
    mlp = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"expected a model with BatchNorm2d layers \(Early-Bird-Tickets masks"):
        kf.EarlyBird.mask_distance(mlp, 0.5, preset="early_bird_tickets")
    with pytest.raises(ValueError, match=r"add_bn_l1_subgradient: expected preset to be one of"):
        kf.earlybird.add_bn_l1_subgradient(model, 1e-4, preset="spline_eb")


def test_bn_l1_subgradient_early_bird_tickets_preset_penalizes_batchnorm2d_only():
    model = small_cnn()
    model(probe()).sum().backward()
    before = {i: model[i].weight.grad.clone() for i in (1, 4, 8)}
    kf.earlybird.add_bn_l1_subgradient(model, 1e-2, preset="early_bird_tickets")
    for i in (1, 4):
        assert torch.equal(model[i].weight.grad, before[i] + 1e-2 * torch.sign(model[i].weight.detach()))
    assert torch.equal(model[8].weight.grad, before[8])  # BatchNorm1d: not in their updateBN


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs CUDA")
def test_codes_stay_on_the_device():
    model = small_cnn().cuda()
    spline = kf.EarlyBird.spline(model, probe())  # a CPU probe: batches go to the model's device
    spline.update()
    assert all(c.codes.is_cuda for c in spline._kept[0].values())
