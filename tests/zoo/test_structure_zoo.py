"""Structured pruning that respects coupling (Torch-Pruning's dependency graph): coupled masks and
physical removal driven by koopfast criteria."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf

from zoo import CASES

pytest.importorskip("torch_pruning")


def logits(out):
    return out.logits


def test_coupled_masks_zero_pruned_channels_everywhere_they_flow_in_a_resnet():
    case = CASES["resnet"]
    model = case.model()
    x = case.inputs(case.batches(1)[0])
    scores = kf.criteria.magnitude(model, granularity="filter")
    scores.pop("classifier.1.weight")  # the predictions are not pruned
    groups = kf.structure.channel_groups(model, x, output_transform=logits)
    residual = [g for g in groups if sum(m.name.endswith("convolution.weight") for m in g.members) > 1]
    assert residual, "the shortcut and the block's last convolution share their channels"
    masks = kf.structure.coupled_masks(model, x, scores, 0.5, normalize="mean", output_transform=logits)
    units = {n: m.reshape(m.shape[0], -1).all(1) for n, m in masks.items() if n.endswith("convolution.weight")}
    scored = [g for g in groups if any(m.name in scores for m in g.members)]
    kept = [units[next(m for m in g.members if m.name in units).name] for g in scored]
    # exactly half of the group channels, each group's channels counted once
    assert sum(int(k.sum()) for k in kept) == round(0.5 * sum(g.channels for g in scored))
    for g in residual:  # coupled layers keep the same channels
        kept = [units[m.name][m.unit_of_channel] for m in g.members if m.name in units]
        assert all(torch.equal(k, kept[0]) for k in kept)
    kf.masks.apply_(model, masks)
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out))
        for n, m in model.named_modules()
        if n.endswith("normalization")
    ]
    model(**x)
    for h in hooks:
        h.remove()
    for name, out in outputs.items():
        pruned = ~units[name.replace("normalization", "convolution") + ".weight"]
        assert bool((out[:, pruned] == 0).all()), f"{name}: a pruned channel is not exactly zero"


def test_resnet_shrinks_physically_under_a_gradient_flow_criterion():
    case = CASES["resnet"]
    model = case.model()
    x = case.inputs(case.batches(1)[0])
    flow = kf.criteria.gradient_flow(model, case.loss, case.batches(2))
    scores = flow.scores("loss_preservation", "filter")
    before = model(**x).logits.shape
    result = kf.structure.prune_channels(
        model, x, scores, 0.5, ignored_layers=[model.classifier[1]], output_transform=lambda out: out.logits.sum()
    )
    assert result.params_after < 0.6 * result.params_before and result.units
    assert model(**x).logits.shape == before
    assert all(after < before for before, after in result.units.values())
    assert result.params_after == sum(p.numel() for p in model.parameters())


def test_vit_loses_whole_attention_heads_and_hidden_channels_under_koopman_scores():
    case = CASES["vit"]
    model = case.model()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = kf.TrajectoryRecorder(model, capacity=6)
    for batch in case.batches(6):
        opt.zero_grad()
        case.loss(model, batch).backward()
        opt.step()
        rec.record()
    model.eval()
    kmp = kf.criteria.koopman_magnitude(kf.DMD().fit(rec))
    scores = kf.criteria.per_unit(kmp, model)  # any unstructured criterion, per output unit
    x = case.inputs(case.batches(1)[0])
    heads = kf.structure.attention_heads(model)
    assert len(heads) == 6 and set(heads.values()) == {4}
    result = kf.structure.prune_channels(
        model,
        x,
        scores,
        0.5,
        ignored_layers=[model.classifier],
        output_transform=lambda out: out.logits.sum(),
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
    )
    assert result.params_after < 0.6 * result.params_before
    for layer in model.vit.layers:
        attention = layer.attention
        assert attention.q_proj.out_features == 2 * attention.head_dim  # two of four heads left
    assert model(**x).logits.shape == (4, 10)


def test_unit_importance_and_errors():
    case = CASES["resnet"]
    model = case.model()
    with pytest.raises(ValueError, match=r"UnitImportance: expected score names among the model's parameter names"):
        kf.structure.UnitImportance({"nope.weight": torch.ones(3)}, model)
    with pytest.raises(ValueError, match=r"coupled_masks: expected reduction to be one of"):
        kf.structure.coupled_masks(model, case.inputs(case.batches(1)[0]), {"x": torch.ones(1)}, 0.5, reduction="l3")
    with pytest.raises(ValueError, match=r"prune_channels: expected sparsity in \[0, 1\), got 1.5"):
        kf.structure.prune_channels(model, case.inputs(case.batches(1)[0]), {}, 1.5)
    gpt2, ids = CASES["gpt2"].model(), CASES["gpt2"].inputs(CASES["gpt2"].batches(1)[0])
    unknown = r"got Hugging Face Conv1D layers \('transformer.h.0.attn.c_attn' and 7 more"
    with pytest.raises(ValueError, match=rf"channel_groups: expected layers .* {unknown}"):
        kf.structure.channel_groups(gpt2, ids)
    with pytest.raises(ValueError, match=rf"prune_channels: expected layers .* {unknown}"):
        kf.structure.prune_channels(gpt2, ids, {}, 0.5)


def test_bert_loses_heads_through_its_query_key_value_projections():
    case = CASES["bert"]
    model = case.model()
    x = case.inputs(case.batches(1)[0])
    heads = kf.structure.attention_heads(model)  # BertSelfAttention's query / key / value
    assert len(heads) == 6 and set(heads.values()) == {4}
    scores = kf.criteria.magnitude(model, granularity="filter")
    assert "bert.embeddings.word_embeddings.weight" not in scores  # the decoder is the tied table: unscored
    result = kf.structure.prune_channels(
        model,
        x,
        scores,
        0.5,
        ignored_layers=[model.cls.predictions.decoder],
        output_transform=lambda o: o.logits.sum(),
        num_heads=heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
    )
    assert result.params_after < 0.5 * result.params_before
    assert model(**x).logits.shape == (4, 12, 48)
