"""The one definition of prunable tensors and output units, on models nobody here wrote."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import koopfast as kf

from zoo import ALL, CASES, linear_like


def out_features(module: nn.Module, attr: str) -> int:
    """Output units of a layer's tensor, read from the layer's own attributes."""
    if isinstance(module, nn.MultiheadAttention):
        return 3 * module.embed_dim if attr.startswith("in_proj") else module.embed_dim
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return module.nf  # transformers' Conv1D


@pytest.mark.parametrize("case", ALL)
def test_default_selection_covers_every_linear_like_weight_and_says_what_it_leaves_out(case):
    model = CASES[case].model()
    coverage = kf.prunable.coverage(model)
    assert set(coverage.included) == set(linear_like(model))
    patterns = CASES[case].left_out
    for name, why in coverage.excluded.items():
        assert any(p in name and keyword in why for p, keyword in patterns.items()), (name, why)
    for p in patterns:  # every documented reason is used
        assert any(p in name for name in coverage.excluded), p
    assert set(coverage.included) | set(coverage.excluded) == set(dict(model.named_parameters()))
    assert len(coverage.table().splitlines()) == len(coverage.included) + len(coverage.excluded)


@pytest.mark.parametrize("case", ALL)
def test_per_unit_scores_have_one_score_per_output_feature(case):
    model = CASES[case].model()
    entries = kf.prunable.prunable(model)
    filters = kf.criteria.magnitude(model, granularity="filter")
    assert set(filters) == {n for n, e in entries.items() if e.tensor.dim() >= 2}
    for name, scores in filters.items():
        e = entries[name]
        module = model.get_submodule(e.module_name)
        assert scores.shape == (out_features(module, e.attr),), name
        if e.bias is not None:
            assert model.get_parameter(e.bias).shape == scores.shape


def test_gpt2_conv1d_units_are_output_columns_and_structured_masks_keep_whole_columns():
    model = CASES["gpt2"].model()
    name = "transformer.h.0.mlp.c_fc.weight"
    weight = model.get_parameter(name)  # [in, out] = [32, 128]
    filters = kf.criteria.magnitude(model, granularity="filter")
    torch.testing.assert_close(filters[name], weight.detach().norm(dim=0))
    masks = kf.masks.structured_topk({name: filters[name]}, model, sparsity=0.5)
    kept_columns = masks[name].all(0)
    assert torch.equal(masks[name], kept_columns.expand_as(weight)) and int(kept_columns.sum()) == 64
    assert torch.equal(masks["transformer.h.0.mlp.c_fc.bias"], kept_columns)
    assert torch.equal(kept_columns, kf.masks.global_topk({"s": filters[name]}, 0.5)["s"])


def test_tied_weights_are_one_entry_and_every_alias_is_accepted():
    model = CASES["gpt2"].model()
    canonical = kf.prunable.aliases(model)
    assert canonical["lm_head.weight"] == "transformer.wte.weight"
    with_embeddings = kf.prunable.prunable(model, embeddings=True)
    assert with_embeddings["transformer.wte.weight"].aliases == ("lm_head.weight",)
    assert "lm_head.weight" not in with_embeddings
    table = model.get_parameter("transformer.wte.weight")
    mask = torch.rand(table.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    kf.masks.apply_(model, {"lm_head.weight": mask})  # the alias names the tied tensor
    assert torch.all(table[~mask] == 0) and torch.all(model.lm_head.weight[~mask] == 0)
    with pytest.raises(ValueError, match=r"apply_: expected one entry per tensor, got 'transformer.wte.weight' and"):
        kf.masks.apply_(model, {"transformer.wte.weight": mask, "lm_head.weight": mask})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masked = kf.masks.Masked(model, {"lm_head.weight": mask}, opt)
    assert list(masked.masks) == ["transformer.wte.weight"]
    everything = dict(model.named_parameters(remove_duplicate=False))
    with pytest.raises(ValueError, match=r"global_topk: expected each tensor once, got the same tensor as"):
        kf.masks.global_topk(everything, 0.5, by="abs")
    with pytest.raises(ValueError, match=r"TrajectoryRecorder: expected each tensor once"):
        kf.TrajectoryRecorder(everything, capacity=2)


def test_bert_tied_decoder_and_its_bias():
    model = CASES["bert"].model()
    canonical = kf.prunable.aliases(model)
    assert canonical["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"
    entries = kf.prunable.prunable(model)
    assert "cls.predictions.bias" in entries  # the decoder's bias, a linear bias
    assert canonical["cls.predictions.decoder.bias"] == "cls.predictions.bias"
    report = kf.masks.report(model)
    assert [r.name for r in report.layers] == list(entries)


def test_multihead_attention_input_projections_are_prunable():
    model = CASES["transformer_encoder"].model()
    entries = kf.prunable.prunable(model)
    e = entries["layers.0.self_attn.in_proj_weight"]
    assert e.units.dim == 0 and e.bias == "layers.0.self_attn.in_proj_bias" and e.layer.startswith("MultiheadAttention")
    separate = nn.MultiheadAttention(16, 4, kdim=8, vdim=12, add_bias_kv=True)
    coverage = kf.prunable.coverage(separate)
    assert set(coverage.included) == {
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "in_proj_bias",
        "out_proj.weight",
        "out_proj.bias",
    }
    assert set(coverage.excluded) == {"bias_k", "bias_v"} and "keys/values" in coverage.excluded["bias_k"]


def test_layers_pruned_by_torch_keep_their_names_in_reports():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    entries = kf.prunable.prunable(model)
    assert "0.weight_orig" in entries and entries["0.weight_orig"].attr == "weight"
    rows = {r.name: r for r in kf.masks.report(model).layers}
    assert rows["0.weight"].kept == 6 and rows["2.weight"].kept == 6
