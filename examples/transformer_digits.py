"""Pruning a small vision transformer on scikit-learn's digits with several koopfast criteria.

A Hugging Face ViT (built from a config, random initial weights, nothing downloaded; 8×8 digits
as 16 patches of 2×2 pixels, 2 layers, 4 heads, width 32, SDPA attention) is trained with AdamW
while a TrajectoryRecorder keeps its last snapshots. Then:

* unstructured: magnitude, Koopman magnitude (KMP, from the recorded trajectory), loss
  preservation |θ ⊙ g| and gradient-norm preservation |θ ⊙ Hg| (exact Hg through SDPA), each
  pruned globally at several sparsities and fine-tuned under ``kf.masks.Masked`` (AdamW; pruned
  weights stay exactly zero);
* structured: half of the attention heads and hidden channels physically removed
  (``kf.structure.prune_channels``, Torch-Pruning's dependency graph) by magnitude and by KMP
  summed per output unit, then fine-tuned: a smaller model, parameter counts printed.

One seed: the table shows what each criterion does here, not which is better in general.

    python examples/transformer_digits.py [--train 600] [--fine-tune 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import koopfast as kf
from koopfast import _digits
from koopfast.benchmarks import models

SPARSITIES = (0.5, 0.7, 0.9)


class DigitViT(nn.Module):
    """A ViT on 8×8 one-channel digits: model(x[batch, 64]) -> logits."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.vit = models.vit(layers=2, width=32, heads=4, image=8, patch=2, labels=10, channels=1)

    def forward(self, x):
        return self.vit(pixel_values=x.view(-1, 1, 8, 8)).logits


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def _fine_tune(model, masks, split, steps, seed) -> tuple[float, float]:
    """Accuracy right after pruning and after ``steps`` AdamW steps with the pruned weights held at 0."""
    opt = _adamw(model)
    with kf.masks.Masked(model, masks, opt):
        before = _digits.accuracy(model, split.x_test, split.y_test)
        _digits.train(model, split, steps=steps, optimizer=opt, seed=seed)
    for name, mask in masks.items():  # what Masked promises
        assert bool((model.get_parameter(name)[~mask] == 0).all()), name
    return before, _digits.accuracy(model, split.x_test, split.y_test)


def run(train_steps: int = 600, fine_tune: int = 200, seed: int = 0, sparsities=SPARSITIES) -> dict:
    split = _digits.load(seed=seed)
    model = DigitViT(seed)
    opt = _adamw(model)
    rec = kf.TrajectoryRecorder(model, capacity=40, window=True)
    _digits.train(model, split, steps=train_steps, optimizer=opt, seed=seed, after_step=lambda _: rec.record())
    dense = _digits.accuracy(model, split.x_test, split.y_test)
    trained = copy.deepcopy(model.state_dict())

    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(len(split.x_train), generator=gen)[: 8 * 64].reshape(8, 64)
    batches = [(split.x_train[i], split.y_train[i]) for i in idx]
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches, hvp="exact")
    kmd = kf.DMD().fit(rec)
    kmp = kf.criteria.koopman_magnitude(kmd)
    criteria = {
        "magnitude": kf.criteria.magnitude(model),
        "KMP (Koopman)": kmp,
        "loss preservation |θg|": flow.scores("loss_preservation"),
        "grad-norm preservation |θHg|": flow.scores("gradient_norm_preservation"),
    }
    unstructured = {}
    for name, scores in criteria.items():
        row = {}
        for sparsity in sparsities:
            model.load_state_dict(trained)
            masks = kf.masks.global_topk(scores, sparsity)
            row[sparsity] = _fine_tune(model, masks, split, fine_tune, seed + 2)
        unstructured[name] = row

    structured = {}
    x = split.x_train[:4]
    for name, scores in (("magnitude", criteria["magnitude"]), ("KMP (Koopman)", kmp)):
        small = DigitViT(seed)
        small.load_state_dict(trained)
        per_unit = kf.criteria.per_unit(scores, small)  # any unstructured score, summed per unit
        per_unit.pop("vit.classifier.weight")  # the ten classes stay
        result = kf.structure.prune_channels(
            small,
            x,
            per_unit,
            0.5,
            ignored_layers=[small.vit.classifier],
            num_heads=kf.structure.attention_heads(small),
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=0.5,
        )
        before = _digits.accuracy(small, split.x_test, split.y_test)
        _digits.train(small, split, steps=fine_tune, optimizer=_adamw(small), seed=seed + 2)
        structured[name] = {
            "params": (result.params_before, result.params_after),
            "accuracy": (before, _digits.accuracy(small, split.x_test, split.y_test)),
        }
    return {
        "dense": dense,
        "test_samples": len(split.y_test),
        "kmp_eigenvalue": complex(kmp.info["eigenvalues"][0]),
        "unstructured": unstructured,
        "structured": structured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600, help="AdamW training steps before pruning")
    parser.add_argument("--fine-tune", type=int, default=200, help="AdamW steps after pruning")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    r = run(args.train, args.fine_tune, args.seed)
    print(
        f"ViT on digits: dense test accuracy {r['dense']:.3f} ({r['test_samples']} test samples, chance 0.10); "
        f"KMP used λ = {r['kmp_eigenvalue']:.5f}"
    )
    print(f"unstructured global pruning: accuracy right after pruning / after {args.fine_tune} fine-tuning steps")
    print(f"{'criterion':30s}" + "".join(f"{s:>16.0%}" for s in SPARSITIES))
    for name, row in r["unstructured"].items():
        print(f"{name:30s}" + "".join(f"{f'{a:.3f} / {b:.3f}':>16s}" for a, b in row.values()))
    print("structured: half the heads and hidden channels removed (Torch-Pruning), then fine-tuned")
    for name, s in r["structured"].items():
        (p0, p1), (a0, a1) = s["params"], s["accuracy"]
        print(f"{name:30s} parameters {p0} -> {p1} ({1 - p1 / p0:.0%} fewer); accuracy {a0:.3f} / {a1:.3f}")


if __name__ == "__main__":
    main()
