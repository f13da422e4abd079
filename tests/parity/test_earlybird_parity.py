"""The early-bird presets against independent float64 transcriptions of the authors' rules.

Each transcription is written here from the papers and the conventions documented in
koopfast/earlybird.py (Early-Bird-Tickets main.py; Spline-EB ConvNet/experiments.py and
vis_util.py), in plain torch on float copies, and is fed the same sequence of weights as the
detector: the weights of a BatchNorm convnet and of a BatchNorm MLP after each epoch of a short
training run on scikit-learn's digits (with the initial weights first, which Early-Bird-Tickets
measures before the first epoch).

Rounding bounds. Mask distances: the transcription's ``1 - same / channels`` is the authors' own
float64 expression, and the masks are exact, so the preset must be bit-identical. Spline
distances: Spline-EB computes in float32 (per layer fl32(count) / fl32(values), summed over the
L layers, divided by L); against the float64 value d, that is at most (L + 1) * 2**-24 * d off to
first order, so the tests allow (L + 2) * 2**-24 * d, and also re-evaluate the float32
expression from the float64 transcription's exact counts, which must match bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import koopfast as kf
from koopfast import _digits

EPOCHS = 10
PRUNE = 0.5
BATCH = 64
LR = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from threads, and lose on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split() -> _digits.Split:
    return _digits.load(seed=0)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 18, 3, stride=2, padding=1), nn.BatchNorm2d(18), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(18 * 4 * 4, 24), nn.BatchNorm1d(24), nn.ReLU(),  # Early-Bird-Tickets leaves BatchNorm1d out
        nn.Linear(24, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    return _digits.mlp((48, 32), batchnorm=True, seed=0)


def canvas(split: _digits.Split, n: int = 20) -> torch.Tensor:
    """Spline-EB's kind of probe: alpha * a + beta * b over an n x n grid of (alpha, beta)."""
    grid = torch.linspace(0, 1, n)
    alpha, beta = torch.meshgrid(grid, grid, indexing="ij")
    return alpha.reshape(-1, 1) * split.x_test[0] + beta.reshape(-1, 1) * split.x_test[1]


def trajectory(make, split: _digits.Split) -> list[dict[str, torch.Tensor]]:
    """State dicts of one training run: the initial weights, then after each epoch (SGD, the L1
    penalty on BatchNorm scales of Early-Bird-Tickets, a learning rate that drops after epoch 4)."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    states = [copy.deepcopy(model.state_dict())]
    for epoch in range(EPOCHS):
        for group in opt.param_groups:
            group["lr"] = LR if epoch < 4 else LR / 10
        model.train()
        order = torch.randperm(len(split.y_train), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            opt.zero_grad()
            nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            kf.earlybird.add_bn_l1_subgradient(model, 1e-4, preset="early_bird_tickets")
            opt.step()
        states.append(copy.deepcopy(model.state_dict()))
    return states


@pytest.fixture(scope="module")
def runs(split) -> dict[str, tuple]:
    return {name: (make, trajectory(make, split)) for name, make in (("convnet", convnet), ("mlp", mlp))}


def replay(make, states, detector_for) -> object:
    """A detector built on the initial weights and updated after each epoch, as in training."""
    model = make()
    model.load_state_dict(states[0])
    detector = detector_for(model)
    for state in states[1:]:
        model.load_state_dict(state)
        detector.update()
    return detector


# ---- Early-Bird-Tickets: channel masks from BatchNorm2d scales ----------------------------------------------


def ebt_mask(model: nn.Module, state: dict, ratio: float) -> torch.Tensor:
    """You et al.'s global channel mask: |gamma| over every BatchNorm2d, threshold = the sorted
    value at int(total * ratio), kept iff strictly above it (ties with it pruned)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    gammas = torch.cat([state[f"{n}.weight"].double().abs() for n in names])
    threshold = torch.sort(gammas).values[int(len(gammas) * ratio)]
    return gammas > threshold


def ebt_detect(masks: list[torch.Tensor], keep: int = 5, eps: float = 0.1) -> tuple[list, int | None]:
    """The last `keep` masks; the newest's distance 1 - same / n to each older one; found when
    none exceeds eps. Measurement e sees the weights after e epochs."""
    window, history, found = [], [], None
    for e, mask in enumerate(masks):
        window = [*window, mask][-keep:]
        if len(window) < keep:
            history.append(None)
            continue
        dists = [1 - float((window[-1] == old).sum()) / old.numel() for old in window[:-1]]
        history.append(dists)
        if found is None and all(d <= eps for d in dists):
            found = e
    return history, found


def test_early_bird_tickets_preset_matches_the_transcription_on_a_convnet(runs):
    make, states = runs["convnet"]
    detector = replay(make, states, lambda m: kf.EarlyBird.mask_distance(m, PRUNE, preset="early_bird_tickets"))
    model = make()
    masks = [ebt_mask(model, s, PRUNE) for s in states]
    assert not masks[0].any()  # every initial gamma is 1: all tie with the threshold, nothing is kept
    history, found = ebt_detect(masks)
    assert detector.distances == [h or [] for h in history]  # bit for bit
    assert detector.history == [None if h is None else max(h) for h in history]
    assert found is not None and detector.epoch == found  # the epochs trained when found: their printed epoch
    assert found > 4  # not merely the first full window: the distances decided
    model.load_state_dict(states[-1])
    last = torch.cat(list(kf.EarlyBird.mask_distance(model, PRUNE, preset="early_bird_tickets").masks().values()))
    assert torch.equal(last, masks[-1])


def test_early_bird_tickets_preset_refuses_an_mlp_as_their_code_cannot_run_it(runs):
    make, states = runs["mlp"]
    model = make()
    with pytest.raises(ValueError, match=r"expected a model with BatchNorm2d layers \(Early-Bird-Tickets masks"):
        kf.EarlyBird.mask_distance(model, PRUNE, preset="early_bird_tickets")
    model.load_state_dict(states[-1])
    with pytest.raises((IndexError, ValueError)):  # the transcription fails as their code does: nothing to sort
        ebt_mask(model, states[-1], PRUNE)


# ---- Spline-EB: region codes of BatchNorm1d/2d outputs over a probe ------------------------------------------


def bn_outputs(model: nn.Module, state: dict, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float copies of every BatchNorm1d/2d output over the probe, in eval mode, in run order."""
    model.load_state_dict(state)
    store: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out.detach().double().clone()))
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    ]
    model.eval()
    with torch.no_grad():
        model(probe)
    for h in hooks:
        h.remove()
    return store


def spline_counts(now: dict, before: dict) -> list[tuple[int, int]]:
    """Per layer (run order): values whose sign 1[x > 0] differs, and values."""
    return [(int(((now[k] > 0) != (before[k] > 0)).sum()), now[k].numel()) for k in now]


def spline_detect(outputs: list[dict], lookback: int = 3, thres: float = 0.16):
    """From epoch `lookback` on, the largest distance to the previous `lookback` epochs (per-layer
    normalized Hamming distance averaged over layers, float64); found when it is below thres."""
    history, counts, found = [], [], None
    for e, now in enumerate(outputs):
        if e < lookback:
            history.append(None)
            counts.append(None)
            continue
        per_prev = [spline_counts(now, before) for before in outputs[e - lookback : e]]
        dists = [sum(c / n for c, n in layers) / len(layers) for layers in per_prev]
        history.append(dists)
        counts.append(per_prev)
        if found is None and max(dists) < thres:
            found = e
    return history, counts, found


def float32_average(layers: list[tuple[int, int]]) -> float:
    """Spline-EB's float32 arithmetic on exact counts: fl32(c) / fl32(n) per layer, summed in
    run order, divided by the number of layers."""
    total = torch.tensor(0.0, dtype=torch.float32)
    for c, n in layers:
        total = total + torch.tensor(float(c), dtype=torch.float32) / torch.tensor(float(n), dtype=torch.float32)
    return float(total / torch.tensor(float(len(layers)), dtype=torch.float32))


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_spline_eb_preset_matches_the_transcription(runs, split, name):
    make, states = runs[name]
    probe = canvas(split)
    trained = states[1:]  # Spline-EB measures after each epoch's training: epoch i sees i + 1 epochs
    model = make()
    model.load_state_dict(trained[0])
    detector = kf.EarlyBird.spline(model, probe, preset="spline_eb")
    for state in trained:
        model.load_state_dict(state)
        detector.update()
    outputs = [bn_outputs(make(), s, probe) for s in trained]
    layers = len(outputs[0])
    assert detector.modules == list(outputs[0]) and layers == (3 if name == "convnet" else 2)
    assert max(n for _c, n in spline_counts(outputs[0], outputs[0])) < 2**24  # the preset's exact range
    history, counts, found = spline_detect(outputs)
    bound = (layers + 2) * 2.0**-24
    for got, want, per_prev in zip(detector.distances, history, counts, strict=True):
        if want is None:
            assert got == []
            continue
        assert all(abs(g - w) <= bound * w for g, w in zip(got, want, strict=True))
        assert got == [float32_average(layers) for layers in per_prev]  # their float32 arithmetic, bit for bit
    settled = [max(h) for h in history if h is not None]
    eps32 = float(torch.tensor(0.16, dtype=torch.float32))
    assert all(abs(d - 0.16) > bound * 0.16 + abs(0.16 - eps32) for d in settled)  # no decision within rounding
    assert found is not None and detector.epoch == found  # their epoch index (EB_{epoch}.pth.tar)
    assert found > 3  # not merely the first full window: the distances decided
    assert detector.history[found] < eps32 and all(h >= eps32 for h in detector.history[3:found])


class RunsBackwards(nn.Module):
    """Three BatchNorms registered c, b, a and run a, b, c (or one of them twice)."""

    def __init__(self, twice: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.c, self.b, self.a = nn.BatchNorm1d(7), nn.BatchNorm1d(11), nn.BatchNorm1d(13)
        self.fa, self.fb, self.fc = nn.Linear(64, 13), nn.Linear(13, 11), nn.Linear(11, 7)
        self.twice = twice

    def forward(self, x):
        h = torch.relu(self.a(self.fa(x)))
        h = torch.relu(self.b(self.fb(h)))
        if self.twice:
            h = self.b(h)
        return self.c(self.fc(h))


def test_spline_eb_preset_sums_layers_in_the_order_they_run(split):
    """Spline-EB's hooks store outputs by call count, so its float32 sum runs in execution order,
    which need not be the registration order; over perturbations where the two orders round
    differently, the preset follows execution order."""
    probe = canvas(split)
    model = RunsBackwards()
    differing = 0
    for seed in range(60):
        before = bn_outputs(model, model.state_dict(), probe)
        assert list(before) == ["a", "b", "c"]
        detector = kf.EarlyBird.spline(model, probe, preset="spline_eb", window=1)
        detector.update()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        detector.update()
        layers = spline_counts(bn_outputs(model, model.state_dict(), probe), before)
        assert detector.modules == ["c", "b", "a"]
        assert detector.distances[1] == [float32_average(layers)]
        differing += float32_average(layers) != float32_average(layers[::-1])
    assert differing >= 5  # the test saw the order matter (15 of the 60 perturbations round differently)


def test_spline_eb_preset_refuses_a_batchnorm_that_runs_twice(split):
    model = RunsBackwards(twice=True)
    with pytest.raises(ValueError, match=r"expected each BatchNorm to run once per forward pass"):
        kf.EarlyBird.spline(model, canvas(split), preset="spline_eb").update()
    kf.EarlyBird.spline(model, canvas(split)).update()  # the default codes both runs
