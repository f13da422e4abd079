"""Early-bird tickets on scikit-learn's digits: when do the two detectors fire, and what is the
ticket they point to worth?

An MLP with BatchNorm (64-128-64-10) is trained for 30 epochs on 1,200 of the 1,797 8x8 digit images (the
rest is the test set), with the L1 penalty on BatchNorm scales that You et al. (ICLR 2020) train
with. After every epoch both detectors are updated:

- ``kf.EarlyBird.spline``: region codes of every BatchNorm output over a probe canvas (a 20 x 20
  grid of mixtures of two test images, the authors' kind of probe), window 3, eps 0.16;
- ``kf.EarlyBird.mask_distance``: the global BatchNorm-|gamma| channel mask at 50 %, window 4
  (the last 5 masks), eps 0.1.

Beside them runs ``kf.EarlyBird.spline(..., preset="spline_eb")``, the rule with Spline-EB's own
float32 arithmetic: it fires at the same epoch unless a distance lies within float32 rounding of
eps. (``preset="early_bird_tickets"`` masks BatchNorm2d channels only, as their code does, so it
does not apply to this MLP; tests/parity runs it on a convnet.)

At the epoch a detector fires, the ticket is drawn from the model of that epoch: half of the
hidden units are pruned (their weights, biases and BatchNorm parameters zeroed and kept at zero),
and the pruned network trains on from there until epoch 30, so that dense and ticket runs see the
same number of epochs. Tickets: the detector's own criterion (BatchNorm |gamma| for the mask
detector; ``kf.criteria.spline_redundancy`` with its global greedy order for the spline detector)
and random units at the same epoch, as the baseline a criterion must beat.

Run: ``python examples/earlybird_digits.py`` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import koopfast as kf

EPOCHS = 30
PRUNE = 0.5
SEED = 0


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    train, test = order[:1200], order[1200:]
    return x[train], y[train], x[test], y[test]


def canvas(a: torch.Tensor, b: torch.Tensor, n: int = 20) -> torch.Tensor:
    """alpha * a + beta * b over an n x n grid of (alpha, beta) in [0, 1]^2 (Spline-EB's probe)."""
    grid = torch.linspace(0, 1, n)
    alpha, beta = torch.meshgrid(grid, grid, indexing="ij")
    return alpha.reshape(-1, 1, 1, 1) * a + beta.reshape(-1, 1, 1, 1) * b


def make_model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip


def learning_rate(epoch: int) -> float:
    return 0.02 * (0.1 ** ((epoch >= EPOCHS // 2) + (epoch >= 3 * EPOCHS // 4)))


def train_epoch(model, opt, x, y, epoch, keep: dict | None = None) -> None:
    model.train()
    for group in opt.param_groups:
        group["lr"] = learning_rate(epoch)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + epoch))
    for i in range(0, len(y), 32):
        idx = order[i : i + 32]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        kf.earlybird.add_bn_l1_subgradient(model, 1e-4)
        opt.step()
        if keep is not None:
            apply_unit_masks(model, keep)


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=learning_rate(0), momentum=0.9, weight_decay=1e-4)


# ---- tickets: units pruned by zeroing everything that makes them ---------------------------------------


def apply_unit_masks(model: nn.Module, keep: dict[str, tuple[str | None, torch.Tensor]]) -> None:
    """keep[layer] = (its BatchNorm, bool mask of kept units): zero the pruned units' parameters."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, (bn, mask) in keep.items():
            drop = ~mask
            modules[layer].weight[drop] = 0
            if modules[layer].bias is not None:
                modules[layer].bias[drop] = 0
            if bn is not None:
                modules[bn].weight[drop] = 0
                modules[bn].bias[drop] = 0


def spline_ticket(model, probe) -> dict:
    scores = kf.criteria.spline_redundancy(model, probe, measure="angle", policy="global")
    out = {}
    for name, pruned in scores.prune_units(PRUNE).items():
        mask = torch.ones(scores[name].numel(), dtype=torch.bool)
        mask[pruned] = False
        out[name.removesuffix(".weight")] = (scores.bn_names[name], mask)
    return out


def layers_and_bns(model, probe) -> dict[str, str | None]:
    return {n.removesuffix(".weight"): bn for n, bn in kf.criteria.spline_redundancy(model, probe).bn_names.items()}


def bn_ticket(model, probe, detector: kf.earlybird.MaskDistanceEarlyBird) -> dict:
    masks = detector.masks()
    return {layer: (bn, masks[bn]) for layer, bn in layers_and_bns(model, probe).items() if bn in masks}


def random_ticket(model, probe, seed: int) -> dict:
    pairs = layers_and_bns(model, probe)
    modules = dict(model.named_modules())
    sizes = {layer: modules[layer].weight.shape[0] for layer in pairs}
    total = sum(sizes.values())
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: round((1 - PRUNE) * total)]] = True
    out, start = {}, 0
    for layer, n in sizes.items():
        out[layer] = (pairs[layer], keep[start : start + n])
        start += n
    return out


def train_ticket(snapshot: nn.Module, keep: dict, first_epoch: int, data) -> tuple[float, float]:
    x, y, xt, yt = data
    model = copy.deepcopy(snapshot)
    apply_unit_masks(model, keep)
    pruned_acc = accuracy(model, xt, yt)
    opt = optimizer(model)
    for epoch in range(first_epoch, EPOCHS):
        train_epoch(model, opt, x, y, epoch, keep)
    return pruned_acc, accuracy(model, xt, yt)


def main() -> None:
    torch.set_num_threads(1)  # a model this small gains nothing from threads (and loses on a busy machine)
    start = time.perf_counter()
    data = digits()
    x, y, xt, yt = data
    probe = canvas(xt[0], xt[1])
    model = make_model()
    opt = optimizer(model)
    spline = kf.EarlyBird.spline(model, probe)
    masks = kf.EarlyBird.mask_distance(model, PRUNE)
    spline_eb = kf.EarlyBird.spline(model, probe, preset="spline_eb")
    snapshots: dict[str, nn.Module] = {}
    print(f"digits: {len(y)} train / {len(yt)} test images; probe canvas {tuple(probe.shape)}")
    print("epoch  test acc  spline dist  mask dist")
    for epoch in range(EPOCHS):
        train_epoch(model, opt, x, y, epoch)
        for name, detector in (("spline", spline), ("mask_distance", masks)):
            if not detector.detected and detector.update():
                snapshots[name] = copy.deepcopy(model)
            elif detector.detected:
                detector.update()
        spline_eb.update()
        s, m = spline.history[-1], masks.history[-1]
        print(f"{epoch:5d}  {accuracy(model, xt, yt):8.4f}  {'' if s is None else f'{s:11.4f}':>11}  "
              f"{'' if m is None else f'{m:9.4f}':>9}")  # fmt: skip
    dense_acc = accuracy(model, xt, yt)
    print(f"\ndense model after {EPOCHS} epochs: test accuracy {dense_acc:.4f}")
    print(f"spline codes kept on the device: {spline.memory_bytes} bytes for {spline.window} epochs "
          f"(float32 copies would take {32 * spline.memory_bytes} bytes or more)")  # fmt: skip
    gap = max((abs(a - b) for a, b in zip(spline.history, spline_eb.history) if a is not None), default=0.0)
    print(f"spline_eb preset (Spline-EB's float32 arithmetic): EB epoch {spline_eb.epoch} "
          f"(default {spline.epoch}); largest distance difference {gap:.1e}")  # fmt: skip
    rows = []
    for name, detector in (("spline", spline), ("mask_distance", masks)):
        if detector.epoch is None:
            print(f"{name}: no early bird within {EPOCHS} epochs")
            continue
        snap = snapshots[name]
        first = detector.epoch + 1
        own = spline_ticket(snap, probe) if name == "spline" else bn_ticket(snap, probe, masks_of(snap))
        for label, keep in ((f"{name} criterion", own), ("random units", random_ticket(snap, probe, seed=7))):
            pruned_acc, final_acc = train_ticket(snap, keep, first, data)
            kept = "/".join(str(int(mask.sum())) for _, mask in keep.values())
            rows.append((name, detector.epoch, label, kept, pruned_acc, final_acc))
    print(
        f"\nearly-bird tickets ({PRUNE:.0%} of hidden units pruned at the detection epoch, trained to epoch {EPOCHS}):"
    )
    print("detector       EB epoch  ticket                   units kept  acc after pruning  final acc  vs dense")
    for name, epoch, label, kept, pruned_acc, final_acc in rows:
        print(f"{name:13s}  {epoch:8d}  {label:23s}  {kept:>10s}  {pruned_acc:17.4f}  {final_acc:9.4f}  "
              f"{final_acc - dense_acc:+8.4f}")  # fmt: skip
    print(f"\n(total {time.perf_counter() - start:.1f} s)")


def masks_of(snapshot: nn.Module) -> kf.earlybird.MaskDistanceEarlyBird:
    return kf.EarlyBird.mask_distance(snapshot, PRUNE)


if __name__ == "__main__":
    main()
