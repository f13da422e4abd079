"""kf.criteria.magnitude and the choice of prunable parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import koopfast as kf


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1))  # not in a conv/linear layer: not scored


def test_model_gives_conv_and_linear_weights_and_biases():
    net = Net()
    scores = kf.criteria.magnitude(net)
    assert list(scores) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    for name, s in scores.items():
        p = net.get_parameter(name)
        assert torch.equal(s, p.detach().abs()) and not s.requires_grad


def test_named_tensors_are_taken_as_given():
    t = {"a": torch.tensor([-1.0, 2.0]), "b": torch.tensor([[-3.0]])}
    assert {k: v.tolist() for k, v in kf.criteria.magnitude(t).items()} == {"a": [1.0, 2.0], "b": [[3.0]]}
    assert list(kf.criteria.magnitude(list(t.items()))) == ["a", "b"]


def test_masks_from_magnitude_equal_fused_abs():
    net = Net()
    a = kf.masks.global_topk(kf.criteria.magnitude(net), 0.7)
    b = kf.masks.global_topk({n: p for n, p in net.named_parameters() if n in a}, 0.7, by="abs")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_errors():
    with pytest.raises(ValueError, match=r"magnitude: expected a model with linear, convolutional or attention layers"):
        kf.criteria.magnitude(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"koopfast.criteria.magnitude: expected at least one named tensor, got none"):
        kf.criteria.magnitude({})
    with pytest.raises(TypeError, match=r"koopfast.criteria.magnitude: expected 'w' to be a tensor, got list"):
        kf.criteria.magnitude({"w": [1.0]})
    with pytest.raises(TypeError, match=r"koopfast.criteria.magnitude: expected a model, a dict of named tensors"):
        kf.criteria.magnitude(3)
