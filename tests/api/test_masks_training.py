"""kf.masks.Masked: pruned entries stay exactly zero through training steps, and nothing else changes.

The reference is the same training written by hand with Python loops: mask the gradients before
the step, then the parameters and optimizer states after it. Masked must give the same weights,
with pruned entries exactly +0 after every step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import koopfast as kf

OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-amsgrad-wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def make_model(device="cpu") -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)
    ).to(device)


def batches(device, steps=6):
    g = torch.Generator().manual_seed(4)
    return [
        (torch.randn(8, 3, 8, 8, generator=g).to(device), torch.randint(4, (8,), generator=g).to(device))
        for _ in range(steps)
    ]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def reference_training(model, masks, make_opt, data, dense_steps=0):
    """Hand-written masked training: p.grad.mul_(mask) before, p.mul_(mask) and states after each step."""
    opt = make_opt(model.parameters())
    params = dict(model.named_parameters())
    for batch in data[:dense_steps]:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
            for v in opt.state.get(params[n], {}).values():
                if isinstance(v, torch.Tensor) and v.shape == m.shape:
                    v.mul_(m)
    for batch in data[dense_steps:]:
        opt.zero_grad()
        loss_of(model, batch).backward()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].mul_(m)
                for v in opt.state[params[n]].values():
                    if isinstance(v, torch.Tensor) and v.shape == m.shape:
                        v.mul_(m)
    return model


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dense_steps", [0, 2], ids=["pruned-at-start", "pruned-after-2-dense-steps"])
def test_pruned_entries_stay_exactly_zero_and_training_equals_the_reference(device, optimizer, dense_steps):
    model = make_model(device)
    reference = copy.deepcopy(model)
    data = batches(device)
    masks = kf.masks.global_topk({n: p for n, p in model.named_parameters() if n != "5.bias"}, 0.7, by="abs")
    reference_training(reference, masks, OPTIMIZERS[optimizer], data, dense_steps)

    opt = OPTIMIZERS[optimizer](model.parameters())
    for batch in data[:dense_steps]:  # momentum and moments fill up everywhere before pruning
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    masked = kf.masks.Masked(model, masks, opt)
    for batch in data[dense_steps:]:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        for n, m in masks.items():
            pruned = params[n].detach()[~m]
            assert bool((pruned == 0).all()) and not bool(torch.signbit(pruned).any()), n
            for v in opt.state[params[n]].values():
                if isinstance(v, torch.Tensor) and v.shape == m.shape:
                    assert bool((v[~m] == 0).all()), n
    for n, p in params.items():
        assert torch.equal(p.detach(), dict(reference.named_parameters())[n].detach()), n
        assert not torch.equal(p.detach(), before[n]), f"{n} did not train"
    assert masked.grads == "step"


def test_no_forward_hook_and_no_copy_of_the_weights():
    model = make_model()
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masked = kf.masks.Masked(model, kf.masks.global_topk(dict(model.named_parameters()), 0.5, by="abs"), opt)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert [n for n, _ in model.named_parameters()] == list(pointers)
    assert all(isinstance(m, kf.masks.PackedMask) for m in masked.masks.values())
    assert "Masked(6 tensors" in repr(masked)


def test_grads_masked_at_backward_are_seen_by_clipping_and_without_an_optimizer():
    model = make_model()
    masks = kf.masks.global_topk(dict(model.named_parameters()), 0.6, by="abs")
    params = dict(model.named_parameters())
    with kf.masks.Masked(model, masks) as masked:
        assert masked.grads == "backward"
        for batch in batches("cpu", 3):
            model.zero_grad()
            loss_of(model, batch).backward()
            for n, m in masks.items():
                assert bool((params[n].grad[~m] == 0).all()), n  # already masked after backward
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        for n, m in masks.items():
            assert bool((params[n][~m] == 0).all()) and bool((params[n][m] != 0).all()), n
    model.zero_grad()
    loss_of(model, batches("cpu", 1)[0]).backward()  # hooks removed: gradients are dense again
    assert any(bool((params[n].grad[~m] != 0).any()) for n, m in masks.items())


def test_step_mode_masks_grads_only_when_the_optimizer_steps():
    model = make_model()
    masks = kf.masks.global_topk(dict(model.named_parameters()), 0.6, by="abs")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kf.masks.Masked(model, masks, opt)
    loss_of(model, batches("cpu", 1)[0]).backward()
    w = model[5].weight
    assert bool((w.grad[~masks["5.weight"]] != 0).any())  # not yet
    opt.step()
    assert bool((w.grad[~masks["5.weight"]] == 0).all())


def test_removed_hooks_no_longer_keep_entries_at_zero():
    """The hooks are what keeps pruned entries at zero (the test above could not pass without them)."""
    model = make_model()
    masks = kf.masks.global_topk(dict(model.named_parameters()), 0.6, by="abs")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.0)
    masked = kf.masks.Masked(model, masks, opt)
    masked.remove()
    opt.zero_grad()
    loss_of(model, batches("cpu", 1)[0]).backward()
    opt.step()
    assert any(bool((p[~masks[n]] != 0).any()) for n, p in model.named_parameters())
    masked.apply_()  # re-masking by hand still works
    assert all(bool((p[~masks[n]] == 0).all()) for n, p in model.named_parameters())


def test_packed_masks_and_a_subset_of_parameters():
    model = make_model()
    masks = kf.masks.pack(kf.masks.global_topk({"3.weight": model[3].weight}, 0.9, by="abs"))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    kf.masks.Masked(model, masks, opt)
    for batch in batches("cpu", 3):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    assert int((model[3].weight != 0).sum()) == masks["3.weight"].count()
    assert bool((model[0].weight != 0).all())


def test_errors_leave_the_model_untouched():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    masks = kf.masks.global_topk(dict(model.named_parameters()), 0.5, by="abs")
    fn = "koopfast.masks.Masked"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected the mask of '5.bias' to have the shape of '5.bias' \[4\], got \[5\]"
    ):
        kf.masks.Masked(model, dict(masks, **{"5.bias": torch.ones(5, dtype=torch.bool)}), opt)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected mask names among the model's parameter names, got unknown \['nope'\]"
    ):
        kf.masks.Masked(model, {"nope": torch.ones(3, dtype=torch.bool)}, opt)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected an optimizer for grads='step' \(or grads='backward'\), got none"
    ):
        kf.masks.Masked(model, masks, grads="step")
    with pytest.raises(ValueError, match=rf"{fn}: expected grads to be 'step' or 'backward', got 'forward'"):
        kf.masks.Masked(model, masks, opt, grads="forward")
    with pytest.raises(TypeError, match=rf"{fn}: expected optimizer to be a torch.optim.Optimizer, got dict"):
        kf.masks.Masked(model, masks, {})
    with pytest.raises(ValueError, match=rf"{fn}: expected at least one mask, got none"):
        kf.masks.Masked(model, {}, opt)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
