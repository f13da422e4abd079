"""Gradient-flow criteria (Lubana & Dick, ICLR 2021) on scikit-learn's digits.

An MLP (64-256-128-10) is trained briefly (pruning "early on"), scored with each measure from 20
minibatches (model in eval mode, as the authors do), pruned globally at several sparsities,
fine-tuned for a short while with the pruned weights held at zero, and evaluated. Unstructured
(per weight) by default; --filter prunes whole hidden units by the per-unit scores instead.

    python examples/gradflow_digits.py [--pretrain 100] [--fine-tune 150] [--filter]
"""

from __future__ import annotations

import argparse

import torch

import koopfast as kf
from koopfast import _digits

CRITERIA = kf.criteria.gradflow.MEASURES  # every gradient-flow measure


def run(args) -> None:
    split = _digits.load(seed=0)
    model = _digits.mlp((256, 128), seed=0)
    _digits.train(model, split, steps=args.pretrain, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(split.x_train), generator=gen)[: 20 * 64].reshape(20, 64)
    batches = [(split.x_train[i], split.y_train[i]) for i in idx]
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches, hvp="exact", fisher=True)
    granularity = "filter" if args.filter else "unstructured"
    print(
        f"{'per-unit' if args.filter else 'unstructured'} global pruning after {args.pretrain} steps "
        f"(dense accuracy {_digits.accuracy(model, split.x_test, split.y_test):.3f}); "
        f"accuracy right after pruning / after {args.fine_tune} fine-tuning steps"
    )
    sparsities = (0.5, 0.8, 0.9) if args.filter else (0.8, 0.9, 0.95, 0.98)
    print(f"{'criterion':28s}" + "".join(f"{s:>16.0%}" for s in sparsities))
    for measure in CRITERIA:
        scores = flow.scores(measure, granularity)
        cells = []
        for sparsity in sparsities:
            model.load_state_dict(state)
            if args.filter:  # whole hidden units (the output layer's units are the classes: kept)
                hidden = {n: s for n, s in scores.items() if n != "4.weight"}
                masks = kf.masks.structured_topk(hidden, model, sparsity)
            else:
                masks = kf.masks.global_topk(scores, sparsity)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            with kf.masks.Masked(model, masks, opt):  # prunes now, keeps pruned entries at zero
                before = _digits.accuracy(model, split.x_test, split.y_test)
                _digits.train(model, split, steps=args.fine_tune, optimizer=opt, seed=2)
            cells.append(f"{before:.3f} / {_digits.accuracy(model, split.x_test, split.y_test):.3f}")
        print(f"{measure:28s}" + "".join(f"{c:>16s}" for c in cells))
    model.load_state_dict(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", type=int, default=100, help="training steps before pruning (default 100)")
    parser.add_argument("--fine-tune", type=int, default=150, help="fine-tuning steps after pruning (default 150)")
    parser.add_argument("--filter", action="store_true", help="prune whole hidden units (per-unit scores)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
