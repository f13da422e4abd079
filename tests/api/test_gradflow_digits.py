"""The gradient-flow paper's claims, checked in direction on a real (small) problem: an MLP pruned
early in training on scikit-learn's digits (examples/gradflow_digits.py prints the full table)."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast import _digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def setup():
    split = _digits.load(seed=0)
    model = _digits.mlp((256, 128), seed=0)
    _digits.train(model, split, steps=100, seed=0)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(split.x_train), generator=gen)[: 20 * 64].reshape(20, 64)
    batches = [(split.x_train[i], split.y_train[i]) for i in idx]
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches, hvp="exact")
    return split, model, flow


def tuned_accuracy(split, model, flow, measure, sparsity, steps=150):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = flow.masks(measure, sparsity)

    def keep_zero(_=None):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.mul_(masks[n])

    try:
        keep_zero()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        _digits.train(model, split, steps=steps, optimizer=opt, seed=2, after_step=keep_zero)
        return _digits.accuracy(model, split.x_test, split.y_test)
    finally:
        model.load_state_dict(state)


def test_magnitude_beats_loss_preservation_after_fine_tuning_at_high_sparsity(setup):
    """'Magnitude-based pruning removes parameters that contribute least to reduction in loss,
    resulting in ... faster convergence': after a short fine-tune at 98 % sparsity."""
    split, model, flow = setup
    assert tuned_accuracy(split, model, flow, "magnitude", 0.98) > tuned_accuracy(
        split, model, flow, "loss_preservation", 0.98
    )


def test_preserving_the_gradient_norm_beats_grasp(setup):
    """'Pruning to raise the gradient norm (GraSP) can hurt; preserving it does better.'"""
    split, model, flow = setup
    assert (
        tuned_accuracy(split, model, flow, "gradient_norm_preservation", 0.9)
        > tuned_accuracy(split, model, flow, "grasp", 0.9) + 0.2
    )
