"""Which optimizers keep pruned entries at zero without the re-masking pass after the step.

Masked skips that pass for the optimizers of kf.masks.ZERO_PRESERVING (with grads="step"). The
claim behind it, checked here per optimizer and option rather than assumed: with the gradients
masked before every step and the states zero at the pruned entries, many steps (weight decay,
momentum, Nesterov, AMSGrad, maximize, foreach and fused implementations) leave every pruned
parameter entry exactly +0 and every state entry 0. Everything else keeps the pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import koopfast as kf

ZERO_PRESERVING_CASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.1),
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd-momentum-dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3),
    "sgd-nesterov-wd-maximize": lambda ps: torch.optim.SGD(
        ps, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True
    ),
    "sgd-momentum-foreach": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1, foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-wd-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adam-foreach-maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True, maximize=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5),
    "adamw-amsgrad-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5, amsgrad=True, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5, fused=True),
}


def make_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def data(steps: int):
    g = torch.Generator().manual_seed(6)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)) for _ in range(steps)]


def train(model, opt, steps: int = 40, closure: bool = False):
    for x, y in data(steps):

        def loss_fn(x=x, y=y):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


def masks_of(model):
    return kf.masks.global_topk(dict(model.named_parameters()), 0.7, by="abs")


def count_passes(masked) -> list:
    """A list that grows by one at every re-masking pass (Masked.apply_) of this Masked."""
    passes, apply = [], masked.apply_

    def counted():
        passes.append(1)
        apply()

    masked.apply_ = counted
    return passes


def assert_pruned_zero(model, opt, masks):
    for n, p in model.named_parameters():
        pruned = p.detach()[~masks[n]]
        assert bool((pruned == 0).all()) and not bool(torch.signbit(pruned).any()), n
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert bool((v[~masks[n]] == 0).all()), (n, key)


@pytest.mark.parametrize("make_opt", list(ZERO_PRESERVING_CASES.values()), ids=list(ZERO_PRESERVING_CASES))
def test_masked_gradients_alone_keep_pruned_entries_zero(make_opt):
    """The claim itself, written by hand: mask θ once, then only the gradients before each step."""
    model = make_model()
    masks = masks_of(model)
    opt = make_opt(model.parameters())
    assert type(opt) in kf.masks.ZERO_PRESERVING
    params = dict(model.named_parameters())
    before = [p.detach().clone() for p in params.values()]
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m).add_(0.0)  # +0, as apply_masks leaves them
    for x, y in data(40):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        with torch.no_grad():
            for n, m in masks.items():
                params[n].grad.mul_(m)
        opt.step()
    assert_pruned_zero(model, opt, masks)
    assert not all(torch.equal(p.detach() * m, b * m) for p, m, b in zip(params.values(), masks.values(), before))


@pytest.mark.parametrize("make_opt", list(ZERO_PRESERVING_CASES.values()), ids=list(ZERO_PRESERVING_CASES))
def test_masked_skips_the_pass_after_the_step_and_equals_masking_both(make_opt):
    """Masked without the second pass trains exactly as with it (remask_after_step=True)."""
    model = make_model()
    both = copy.deepcopy(model)
    masks = masks_of(model)
    opt, opt_both = make_opt(model.parameters()), make_opt(both.parameters())
    masked = kf.masks.Masked(model, masks, opt)
    forced = kf.masks.Masked(both, masks, opt_both, remask_after_step=True)
    assert not masked.remask_after_step and forced.remask_after_step
    skipped, done = count_passes(masked), count_passes(forced)
    train(model, opt)
    train(both, opt_both)
    assert (len(skipped), len(done)) == (0, 40)  # one gradient pass per step, no second pass
    assert_pruned_zero(model, opt, masks)
    for (n, p), q in zip(model.named_parameters(), both.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


class DriftingSGD(torch.optim.SGD):
    """An optimizer that moves every entry, gradient or not (as non-elementwise optimizers can)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


def test_unknown_optimizers_and_subclasses_keep_the_pass():
    model = make_model()
    masks = masks_of(model)
    opt = DriftingSGD(model.parameters(), lr=0.05)
    masked = kf.masks.Masked(model, masks, opt)
    assert masked.remask_after_step and type(opt) not in kf.masks.ZERO_PRESERVING
    assert kf.masks.Masked(make_model(), masks, torch.optim.RMSprop(make_model().parameters())).remask_after_step
    train(model, opt, steps=5)
    assert_pruned_zero(model, opt, masks)
    # ... and the pass is what keeps them zero there:
    other = make_model()
    opt_off = DriftingSGD(other.parameters(), lr=0.05)
    kf.masks.Masked(other, masks, opt_off, remask_after_step=False)
    train(other, opt_off, steps=2)
    assert any(bool((p.detach()[~masks[n]] != 0).any()) for n, p in other.named_parameters())


def test_backward_mode_and_closures_keep_the_pass():
    model = make_model()
    masks = masks_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert kf.masks.Masked(model, masks, opt, grads="backward").remask_after_step
    # A closure computes its gradients inside step(), after the pre-step mask: re-masked after it.
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masked = kf.masks.Masked(model, masks, opt)
    assert not masked.remask_after_step
    passes = count_passes(masked)
    train(model, opt, steps=5, closure=True)
    assert_pruned_zero(model, opt, masks)
    assert len(passes) == 5


def test_states_loaded_after_construction_are_masked():
    model = make_model()
    masks = masks_of(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, steps=3)  # dense moments everywhere
    dense_state = copy.deepcopy(opt.state_dict())
    kf.masks.Masked(model, masks, opt)
    opt.load_state_dict(dense_state)
    assert_pruned_zero(model, opt, masks)
    train(model, opt, steps=5)
    assert_pruned_zero(model, opt, masks)


def test_remask_after_step_is_checked():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"koopfast\.masks\.Masked: expected remask_after_step to be True, False or"):
        kf.masks.Masked(model, masks_of(model), opt, remask_after_step="yes")
