"""Spline redundancy and both early-bird detectors where the architecture has the layers they
describe, and a clear error naming the reason where it has not."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf

from zoo import CASES


def probe(case: str):
    return CASES[case].inputs(CASES[case].batches(1)[0])


def test_resnet_scores_the_layers_that_feed_a_relu_and_says_why_the_others_are_left_out():
    model = CASES["resnet"].model()
    x = probe("resnet")["pixel_values"]
    scores = kf.criteria.spline_redundancy(_Pixels(model), x)
    stem = "model.resnet.embedder.embedder.convolution.weight"
    first = "model.resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"
    assert stem in scores and first in scores
    assert scores.bn_names[first].endswith("layer.0.normalization")
    residual = "model.resnet.encoder.stages.0.layers.0.layer.1.convolution"
    shortcut = "model.resnet.encoder.stages.1.layers.0.shortcut.convolution"
    assert "residual sum" in scores.skipped[residual] and "residual sum" in scores.skipped[shortcut]
    assert "classifier" in scores.skipped["model.classifier.1"]
    masks = scores.masks(_Pixels(model), 0.5)
    assert all(n in masks for n in scores)


def test_spline_criteria_refuse_models_without_relu_partitions_and_name_the_reason():
    for case, reason in (("mobilenet_v2", "ReLU6-like"), ("gpt2", "GELUActivation"), ("llama", "silu")):
        model = CASES[case].model()
        with pytest.raises(ValueError, match=rf"spline_redundancy: expected hidden .* ReLU-like .*{reason}"):
            kf.criteria.spline_redundancy(_Keywords(model, case), probe_tensor(case))


def test_early_birds_on_a_resnet_and_a_clear_error_on_a_transformer():
    model = CASES["resnet"].model()
    x = probe("resnet")["pixel_values"]
    spline = kf.EarlyBird.spline(_Pixels(model), x)  # the authors' rule: every BatchNorm output
    assert len(spline.modules) == 6 and not spline.update()
    mask = kf.EarlyBird.mask_distance(model, prune_ratio=0.5)
    mask.update()
    assert mask.history == [None]
    with pytest.raises(ValueError, match=r"mask_distance: expected a model with BatchNorm layers, got GPT2LMHeadModel"):
        kf.EarlyBird.mask_distance(CASES["gpt2"].model(), 0.5)
    with pytest.raises(ValueError, match=r"EarlyBird.spline: expected hidden .* ReLU-like .*GELUActivation"):
        kf.EarlyBird.spline(_Keywords(CASES["gpt2"].model(), "gpt2"), probe_tensor("gpt2"))


def probe_tensor(case: str) -> torch.Tensor:
    inputs = probe(case)
    return next(iter(inputs.values())) if isinstance(inputs, dict) else inputs


class _Pixels(torch.nn.Module):
    """model(x) for an image model that takes pixel_values= and returns .logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


class _Keywords(torch.nn.Module):
    """model(x) for a zoo model, with the batch tensor as its first keyword input."""

    def __init__(self, model, case):
        super().__init__()
        self.model, self.key = model, next(iter(CASES[case].inputs(CASES[case].batches(1)[0])))

    def forward(self, x):
        return self.model(**{self.key: x}).logits
