"""kf.criteria.spline_redundancy and fold_batchnorm: folding, planted duplicates, greedy order,
flat units, layer discovery and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import koopfast as kf
from koopfast.criteria.spline import _greedy_removal

from conftest import DEVICES


def randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(n, generator=gen).abs() + 0.5)
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def calibrate_bn(model: nn.Module, data: torch.Tensor) -> None:
    """Running statistics of the data itself (as after training), random scales and shifts."""
    gen = torch.Generator().manual_seed(11)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average: one pass gives the data's statistics
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=gen).abs() + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.train()
    with torch.no_grad():
        model(data)
    model.eval()


# ---- BatchNorm folding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "bn", "shape"),
    [
        (lambda: nn.Linear(7, 5), lambda: nn.BatchNorm1d(5), (11, 7)),
        (lambda: nn.Linear(7, 5, bias=False), lambda: nn.BatchNorm1d(5, affine=False), (11, 7)),
        (lambda: nn.Conv1d(3, 4, 3, padding=2, dilation=2), lambda: nn.BatchNorm1d(4), (2, 3, 9)),
        (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), lambda: nn.BatchNorm2d(6), (2, 4, 7, 7)),
        (
            lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False),
            lambda: nn.BatchNorm2d(4),
            (2, 3, 5, 5),
        ),
        (lambda: nn.Conv3d(2, 3, 2), lambda: nn.BatchNorm3d(3, eps=1e-3), (2, 2, 4, 4, 4)),
    ],
)
def test_fold_batchnorm_matches_the_modules_own_output(device, layer, bn, shape):
    gen = torch.Generator().manual_seed(1)
    layer, bn = layer().double().to(device), bn().double().to(device)
    randomize_bn(bn, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    bn.eval()
    expected = bn(layer(x))
    w, b = kf.criteria.fold_batchnorm(layer, bn)
    assert w.dtype == torch.float64 and w.shape == layer.weight.shape and b.shape == (layer.weight.shape[0],)
    got = F.linear(x, w, b) if isinstance(layer, nn.Linear) else layer._conv_forward(x, w, b)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    w0, b0 = kf.criteria.fold_batchnorm(layer)  # no BatchNorm: the layer's own parameters
    assert torch.equal(w0, layer.weight.double()) and b0.shape == b.shape


def test_fold_batchnorm_of_a_float32_model_is_float64():
    layer, bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
    randomize_bn(bn, torch.Generator().manual_seed(2))
    x = torch.randn(5, 4)
    bn.eval()
    w, b = kf.criteria.fold_batchnorm(layer, bn)
    torch.testing.assert_close(F.linear(x.double(), w, b), bn(layer(x)).double(), rtol=1e-5, atol=1e-6)


def test_fold_batchnorm_errors():
    with pytest.raises(ValueError, match=r"fold_batchnorm: expected the BatchNorm to have 5 features .* got 4"):
        kf.criteria.fold_batchnorm(nn.Linear(3, 5), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="expected the BatchNorm to track running statistics"):
        kf.criteria.fold_batchnorm(nn.Linear(3, 5), nn.BatchNorm1d(5, track_running_stats=False))
    layer = nn.Linear(3, 5)
    with torch.no_grad():
        layer.weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match="expected finite folded weights and biases, got NaN or Inf"):
        kf.criteria.fold_batchnorm(layer, nn.BatchNorm1d(5))


# ---- planted duplicates -----------------------------------------------------------------------------


def mlp_with_duplicates(device) -> tuple[nn.Module, torch.Tensor]:
    """Linear(10, 16) + BN + ReLU -> Linear(16, 12) + BN + ReLU -> Linear(12, 3). In the first
    layer, unit 7 is an exact copy of unit 3 and unit 11 the negation of unit 2 (after folding)."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(10, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 3),
    )
    probe = torch.randn(300, 10, generator=gen)
    calibrate_bn(model, probe)
    fc, bn = model[0], model[1]
    with torch.no_grad():
        for p in (fc.weight, fc.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            p[7] = p[3]
        for p in (fc.weight, fc.bias, bn.running_mean, bn.running_var):
            p[11] = p[2]
        bn.weight[11] = -bn.weight[2]
        bn.bias[11] = -bn.bias[2]
    return model.to(device), probe.to(device)


@pytest.mark.parametrize("measure", ["angle", "hamming"])
@pytest.mark.parametrize("policy", ["layerwise", "global"])
def test_planted_duplicates_are_removed_first(device, measure, policy):
    model, probe = mlp_with_duplicates(device)
    scores = kf.criteria.spline_redundancy(model, probe, measure, policy)
    assert list(scores) == ["0.weight", "3.weight"]  # the classifier is not scored
    assert scores.bn_names == {"0.weight": "1", "3.weight": "4"}
    assert not any(f.any() for f in scores.flat.values()), "the probe must switch every unit"
    d = scores.distances["0.weight"]
    assert d[3, 7] < 1e-12 and d[2, 11] < 1e-12
    first = scores.ranks["0.weight"]
    removed_first = {int(k) for k in torch.nonzero(first < 2)}
    assert removed_first == {7, 11}  # one of each pair: the later one (ties go to the last)
    assert scores["0.weight"][[7, 11]].max() < 1e-12
    # Neighbours are recomputed: the partners left behind are no longer at distance 0.
    assert scores["0.weight"][3] > 1e-6 and scores["0.weight"][2] > 1e-6
    for name, r in scores.ranks.items():  # scores never decrease along the removal order
        assert torch.all(scores[name][torch.argsort(r)].diff() >= 0)


def test_three_copies_keep_one(device):
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 2)).to(device)
    with torch.no_grad():
        model[0].weight[4] = model[0].weight[1] * 2.0  # a positive multiple: the same hyperplane
        model[0].bias[4] = model[0].bias[1] * 2.0
        model[0].weight[8] = model[0].weight[1]
        model[0].bias[8] = model[0].bias[1]
    scores = kf.criteria.spline_redundancy(model, torch.randn(200, 6, generator=gen).to(device), "hamming")
    ranks = scores.ranks["0.weight"]
    assert {int(k) for k in torch.nonzero(ranks < 2)} == {4, 8}
    assert scores["0.weight"][1] > 0


def brute_force_greedy(dist: list[torch.Tensor], flat: list[torch.Tensor]) -> list[tuple[int, int]]:
    """The greedy removal written plainly: returns (layer, unit) in removal order."""
    alive = {(li, k) for li, d in enumerate(dist) for k in range(d.shape[0])}
    order = [(li, k) for li, f in enumerate(flat) for k in torch.nonzero(f).flatten().tolist()]
    alive -= set(order)
    while alive:

        def nearest(u):
            li, k = u
            others = [dist[li][k, j].item() for (lj, j) in alive if lj == li and j != k]
            return min(others) if others else math.inf

        best = min(nearest(u) for u in alive)
        pick = max(u for u in alive if nearest(u) == best)  # ties: the last in (layer, index) order
        order.append(pick)
        alive.remove(pick)
    return order


@pytest.mark.parametrize("joint", [False, True])
def test_greedy_removal_matches_a_brute_force_greedy(joint):
    gen = torch.Generator().manual_seed(5)
    dist, flat = [], []
    for n in (7, 1, 9):
        d = torch.rand(n, n, generator=gen, dtype=torch.float64).round(decimals=1)  # ties on purpose
        d = (d + d.t()) / 2
        d.fill_diagonal_(math.inf)
        dist.append(d)
        flat.append(torch.rand(n, generator=gen) < 0.2)
    names = ["a", "b", "c"]
    scores, ranks = _greedy_removal(dict(zip(names, dist)), dict(zip(names, flat)), joint=joint)
    if joint:
        expected = brute_force_greedy(dist, flat)
        got = sorted(
            ((li, k) for li, n in enumerate(names) for k in range(dist[li].shape[0])),
            key=lambda u: int(ranks[names[u[0]]][u[1]]),
        )
        assert got == expected
    else:
        for li, n in enumerate(names):
            expected = [k for _, k in brute_force_greedy([dist[li]], [flat[li]])]
            assert torch.argsort(ranks[n]).tolist() == expected
    for li, n in enumerate(names):
        assert torch.all(scores[n][flat[li]] == -1.0)
    assert scores["b"][0] == -1.0 or math.isinf(scores["b"][0])  # a unit alone in its layer: kept to the last


# ---- flat units, layers and policies ----------------------------------------------------------------


def test_units_that_never_switch_are_flagged_and_removed_first(device):
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(device)
    with torch.no_grad():
        model[1].bias[2] = -100.0  # always off
        model[1].bias[5] = 100.0  # always on
        model[0].weight[6] = 0.0  # no hyperplane at all
    probe = torch.randn(64, 5, generator=gen).to(device)
    scores = kf.criteria.spline_redundancy(model, probe)
    flat = scores.flat["0.weight"]
    assert flat.tolist() == [k in (2, 5, 6) for k in range(8)]
    assert scores.on_fraction["0.weight"][2] == 0.0 and scores.on_fraction["0.weight"][5] == 1.0
    assert sorted(int(k) for k in torch.nonzero(scores.ranks["0.weight"] < 3)) == [2, 5, 6]
    assert torch.all(scores["0.weight"][flat] == -1.0)
    no_probe = kf.criteria.spline_redundancy(model)  # parameter space only: the zero unit
    assert no_probe.flat["0.weight"].tolist() == [k == 6 for k in range(8)] and no_probe.on_fraction is None


class PreActBlock(nn.Module):
    """A pre-activation residual block: registered (bn1, conv1, bn2, conv2), executed bn1 -> conv1
    -> bn2 -> conv2: conv1 feeds bn2, and conv2 feeds no BatchNorm (the sum does)."""

    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


def test_batchnorms_are_paired_by_data_flow():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), PreActBlock(4), PreActBlock(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    scores = kf.criteria.spline_redundancy(model, torch.randn(4, 3, 8, 8))
    assert scores.bn_names == {"0.weight": "1.bn1", "1.conv1.weight": "1.bn2", "2.conv1.weight": "2.bn2"}
    # conv2's output is added to the block's input before any activation: the sum's boundary, not the unit's
    assert set(scores.skipped) == {"1.conv2", "2.conv2", "4"}
    assert all("residual sum" in scores.skipped[n] for n in ("1.conv2", "2.conv2"))
    assert "classifier" in scores.skipped["4"]


def test_registration_order_without_a_probe():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 16, 2),
    )
    traced = kf.criteria.spline_redundancy(model, torch.randn(3, 3, 8, 8))
    registered = kf.criteria.spline_redundancy(model)
    assert traced.bn_names == registered.bn_names == {"0.weight": "1", "3.weight": None}
    for name in traced:  # same measure, same parameters: same scores
        torch.testing.assert_close(traced[name], registered[name])


def test_grouped_convolution_units_in_different_groups_share_no_hyperplane():
    conv = nn.Conv2d(4, 4, 3, groups=2, bias=False)
    with torch.no_grad():
        conv.weight[2] = conv.weight[0]  # same numbers, but unit 2 sees the other input group
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    d = kf.criteria.spline_redundancy(model).distances["0.weight"]
    assert d[0, 2] == 1.0 and d[0, 1] < 1.0


def test_global_and_layerwise_prune_units():
    model, probe = mlp_with_duplicates("cpu")
    layerwise = kf.criteria.spline_redundancy(model, probe, policy="layerwise")
    pruned = layerwise.prune_units(0.25)
    assert {k: v.numel() for k, v in pruned.items()} == {"0.weight": 4, "3.weight": 3}
    for name, idx in pruned.items():
        assert layerwise.ranks[name][idx].tolist() == list(range(idx.numel()))
    glob = kf.criteria.spline_redundancy(model, probe, policy="global")
    pruned = glob.prune_units(0.25)
    assert sum(v.numel() for v in pruned.values()) == 28 - round(0.75 * 28)
    ranks = torch.cat([glob.ranks[n][pruned[n]] for n in pruned])
    assert sorted(ranks.tolist()) == list(range(ranks.numel()))
    assert {7, 11} <= set(pruned["0.weight"].tolist())
    assert all(v.numel() == 0 for v in glob.prune_units(0.0).values())
    with pytest.raises(ValueError, match=r"prune_units: expected sparsity in \[0, 1\), got 1.5"):
        glob.prune_units(1.5)


def test_scores_copy_and_pickle():
    import copy
    import pickle

    model, probe = mlp_with_duplicates("cpu")
    scores = kf.criteria.spline_redundancy(model, probe, policy="global")
    for clone in (copy.deepcopy(scores), pickle.loads(pickle.dumps(scores))):
        assert clone.keys() == scores.keys() and clone.policy == "global"
        assert all(torch.equal(clone.ranks[n], scores.ranks[n]) for n in scores)
        assert {k: v.tolist() for k, v in clone.prune_units(0.5).items()} == {
            k: v.tolist() for k, v in scores.prune_units(0.5).items()
        }


def test_probe_batches_and_one_concatenated_batch_give_the_same_distances():
    model, probe = mlp_with_duplicates("cpu")
    whole = kf.criteria.spline_redundancy(model, probe[:150], "hamming")
    parts = kf.criteria.spline_redundancy(model, [probe[:37], (probe[37:100], None), probe[100:150]], "hamming")
    for name in whole:
        assert torch.equal(whole.distances[name], parts.distances[name])
        assert torch.equal(whole.on_fraction[name], parts.on_fraction[name])


def test_model_state_is_left_as_it_was():
    model, probe = mlp_with_duplicates("cpu")
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kf.criteria.spline_redundancy(model, probe, "hamming")
    assert model.training and not model[1].training and model[4].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


# ---- errors -----------------------------------------------------------------------------------------


def test_errors():
    fn = "koopfast.criteria.spline_redundancy"
    model, probe = mlp_with_duplicates("cpu")
    with pytest.raises(ValueError, match=rf"{fn}: expected measure to be one of \('angle', 'hamming'\), got 'cos'"):
        kf.criteria.spline_redundancy(model, probe, "cos")
    with pytest.raises(ValueError, match=rf"{fn}: expected policy to be one of .* got 'local'"):
        kf.criteria.spline_redundancy(model, probe, policy="local")
    with pytest.raises(ValueError, match=rf"{fn}: expected probe data for measure='hamming'"):
        kf.criteria.spline_redundancy(model, None, "hamming")
    with pytest.raises(ValueError, match=rf"{fn}: expected a model with linear or convolutional layers"):
        kf.criteria.spline_redundancy(nn.Sequential(nn.ReLU()), probe)
    with pytest.raises(ValueError, match=rf"{fn}: expected hidden linear or convolutional layers"):
        kf.criteria.spline_redundancy(nn.Linear(10, 3), probe)
    with pytest.raises(
        ValueError, match=rf"{fn}: expected probe batches that the model accepts, got a batch of shape \[7, 9\]"
    ):
        kf.criteria.spline_redundancy(model, torch.randn(7, 9))
    with pytest.raises(ValueError, match=rf"{fn}: expected probe data with at least one sample, got an empty probe"):
        kf.criteria.spline_redundancy(model, torch.randn(0, 10))
    with pytest.raises(ValueError, match="empty probe"):
        kf.criteria.spline_redundancy(model, [])
    with pytest.raises(TypeError, match=rf"{fn}: expected probe to be a tensor or a re-iterable .* generator"):
        kf.criteria.spline_redundancy(model, (x for x in [probe]))
    with pytest.raises(ValueError, match=rf"{fn}: expected probe batch 0 to have a batch dimension, got a 0-dim"):
        kf.criteria.spline_redundancy(model, torch.tensor(1.0))
    with pytest.raises(TypeError, match=rf"{fn}: expected probe batch 1 to be a tensor"):
        kf.criteria.spline_redundancy(model, [probe, "x"])
    bad = nn.Sequential(nn.Linear(10, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"{fn}: expected BatchNorm '1' \(after layer '0'\) to track running"):
        kf.criteria.spline_redundancy(bad, probe)
    with pytest.raises(TypeError, match=rf"{fn}: expected model to be an nn.Module, got dict"):
        kf.criteria.spline_redundancy({}, probe)


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs CUDA")
def test_cuda_model_matches_cpu_model():
    model, probe = mlp_with_duplicates("cpu")
    cpu = kf.criteria.spline_redundancy(model, probe, "hamming", "global")
    gpu = kf.criteria.spline_redundancy(model.cuda(), probe, "hamming", "global")  # probe moved to the model
    for name in cpu:
        assert torch.equal(cpu.ranks[name], gpu.ranks[name])


@pytest.mark.parametrize("policy", ["layerwise", "global"])
def test_structured_masks_prune_the_greedy_choice(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    scores = kf.criteria.spline_redundancy(model, policy=policy)
    masks = scores.masks(model, 0.5)
    pruned = scores.prune_units(0.5)
    for name, units in pruned.items():
        row_kept = masks[name].reshape(masks[name].shape[0], -1).all(1)
        assert not row_kept[units].any()
        assert int(row_kept.sum()) + units.numel() == masks[name].shape[0]
        bias = name.replace("weight", "bias")
        assert torch.equal(masks[bias], row_kept)


def test_structured_masks_also_silence_the_folded_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    model(torch.randn(32, 6))  # running statistics away from their defaults
    model.eval()
    scores = kf.criteria.spline_redundancy(model, torch.randn(64, 6))
    masks = scores.masks(model, 0.5)
    assert torch.equal(masks["1.weight"], masks["0.bias"]) and torch.equal(masks["1.bias"], masks["0.bias"])
    kf.masks.apply_(model, masks)
    hidden = model[:3](torch.randn(16, 6))
    assert bool((hidden[:, ~masks["0.bias"]] == 0).all()), "pruned units output exactly zero"


class Functional(nn.Module):
    """Activations as function calls: invisible to module hooks, seen in the data flow."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = F.leaky_relu(self.a(x), 0.1)
        h = torch.tanh(self.b(h))
        return self.d(F.relu(self.c(h), inplace=True))


def test_only_layers_with_a_relu_like_activation_are_scored():
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(inplace=True),  # kept
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
        nn.Dropout(0.3),
        nn.PReLU(),  # kept: dropout passes through
        nn.Linear(8, 8),
        nn.ReLU6(),  # a second kink at 6
        nn.Linear(8, 8),
        nn.GELU(),  # smooth
        nn.Linear(8, 8),  # no activation: a linear bottleneck feeding the next layer
        nn.Linear(8, 3),
    ).eval()
    probe = torch.randn(16, 6)
    scores = kf.criteria.spline_redundancy(model, probe)
    assert list(scores) == ["0.weight", "2.weight"] and scores.bn_names["2.weight"] == "3"
    assert set(scores.skipped) == {"6", "8", "10", "11"}
    assert "ReLU6-like" in scores.skipped["6"] and "gelu" in scores.skipped["8"]
    assert "no activation" in scores.skipped["10"] and "classifier" in scores.skipped["11"]
    registered = kf.criteria.spline_redundancy(model)  # registration order: the next activation module
    assert list(registered) == ["0.weight", "2.weight", "10.weight"]
    assert "ReLU6" in registered.skipped["6"] and "GELU" in registered.skipped["8"]
    functional = kf.criteria.spline_redundancy(Functional(), probe)
    assert list(functional) == ["a.weight", "c.weight"] and "tanh" in functional.skipped["b"]


def test_a_model_without_any_spline_layer_says_why():
    fn = "koopfast.criteria.spline_redundancy"
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=rf"{fn}: expected hidden .* ReLU-like .* \('0': its output goes into gelu"):
        kf.criteria.spline_redundancy(model, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"expected hidden .* '0': followed by GELU"):
        kf.criteria.spline_redundancy(model)
    with pytest.raises(ValueError, match=r"koopfast.EarlyBird.spline: expected hidden .* gelu"):
        kf.EarlyBird.spline(model, torch.randn(4, 6))
