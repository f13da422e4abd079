"""``koopfast demo``: every criterion on a real learning problem, end to end, in about a minute.

An MLP with BatchNorm learns scikit-learn's digits (bundled with scikit-learn: nothing is
downloaded). During training a :class:`~koopfast.TrajectoryRecorder` keeps the last snapshots of
the weights (one per step), both early-bird detectors are updated every epoch, and the overlap of
the Koopman (KMP) and magnitude masks is followed. After training, each criterion scores the
model: magnitude, KMP and KGP (from the DMD of the last window of the trajectory), loss
preservation, gradient-norm preservation and GraSP (gradient flow over 20 minibatches), and spline
redundancy (structured: whole hidden units). The model is pruned at each sparsity, fine-tuned
briefly with the pruned weights held at zero, and evaluated on the held-out digits.

Everything is seeded: the same command gives the same numbers on the same machine and torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import koopfast as kf
from koopfast import _digits

UNSTRUCTURED = ("magnitude", "kmp", "kgp", "loss_preservation", "gradient_norm_preservation", "grasp")
STRUCTURED = ("spline_redundancy",)
LABELS = {
    "magnitude": "magnitude |θ|",
    "kmp": "KMP (Koopman magnitude)",
    "kgp": "KGP (Koopman gradient, recon.)",
    "loss_preservation": "loss preservation |θg|",
    "gradient_norm_preservation": "grad-norm preservation |θHg|",
    "grasp": "GraSP θHg",
    "spline_redundancy": "spline redundancy (units)",
}
OVERLAP_SPARSITY = 0.9


@dataclass(frozen=True)
class DemoConfig:
    hidden: tuple[int, ...] = (128, 64)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    fine_tune_epochs: int = 2
    window: int = 64
    seed: int = 0

    def __post_init__(self):
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"koopfast demo: expected positive hidden sizes, got {self.hidden}")
        if self.epochs < 2:
            raise ValueError(f"koopfast demo: expected at least 2 epochs, got {self.epochs}")
        if self.window < 2:
            raise ValueError(f"koopfast demo: expected a Koopman window of at least 2 snapshots, got {self.window}")
        if not self.sparsities or any(not 0 <= s < 1 for s in self.sparsities):
            raise ValueError(f"koopfast demo: expected sparsities in [0, 1), got {self.sparsities}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"koopfast demo: expected fine_tune_epochs >= 0, got {self.fine_tune_epochs}")


@dataclass
class DemoResult:
    config: dict
    parameters: int
    dense_accuracy: float
    test_samples: int = 0
    chance_accuracy: float = 0.1  # ten classes guessed at random
    one_class_accuracy: tuple[float, float] = (0.0, 0.0)  # a collapsed network (one class for all): least, most
    training: list[dict] = field(default_factory=list)  # per epoch
    early_bird: dict = field(default_factory=dict)
    koopman: dict = field(default_factory=dict)
    pruning: list[dict] = field(default_factory=list)  # per criterion and sparsity
    mask_overlap: dict = field(default_factory=dict)
    seconds: float = 0.0


def _steps_per_epoch(split: _digits.Split, batch_size: int) -> int:
    return len(split.x_train) // batch_size


def _probe(split: _digits.Split, n: int = 256) -> torch.Tensor:
    return split.x_test[:n]


def _overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in a.values())
    return sum(int((a[n] & b[n]).sum()) for n in a) / max(kept, 1)


def run(config: DemoConfig, progress: Callable[[Iterable, str], Iterable] | None = None) -> DemoResult:
    """Trains, scores, prunes and fine-tunes. Returns every number (the plots are drawn from them)."""
    wrap = progress or (lambda it, desc: it)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    split = _digits.load(seed=config.seed)
    model = _digits.mlp(config.hidden, batchnorm=True, seed=config.seed)
    params = kf.criteria.magnitude(model)  # the prunable tensors: linear weights and biases
    rec = kf.TrajectoryRecorder(model, capacity=config.window, window=True)
    spline_eb = kf.EarlyBird.spline(model, _probe(split))
    mask_eb = kf.EarlyBird.mask_distance(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    steps = _steps_per_epoch(split, config.batch_size)

    result = DemoResult(
        config=asdict(config),
        parameters=sum(p.numel() for p in params.values()),
        dense_accuracy=0.0,
        test_samples=len(split.y_test),
        chance_accuracy=1 / 10,
        one_class_accuracy=tuple(float(f) / len(split.y_test) for f in torch.bincount(split.y_test).aminmax()),
    )
    for epoch in wrap(range(config.epochs), "training"):
        _digits.train(
            model,
            split,
            steps=steps,
            batch_size=config.batch_size,
            optimizer=opt,
            seed=1000 + epoch,
            after_step=lambda _: rec.record(),
        )
        spline_eb.update()
        mask_eb.update()
        kmd = kf.DMD().fit(rec)
        kmp_mask = kf.masks.global_topk(kf.criteria.koopman_magnitude(kmd), OVERLAP_SPARSITY)
        mag_mask = kf.masks.global_topk({n: model.get_parameter(n) for n in params}, OVERLAP_SPARSITY, by="abs")
        lam = complex(kmd.eigenvalues[kmd.nearest(1.0)])
        result.training.append(
            {
                "epoch": epoch + 1,
                "test_accuracy": _digits.accuracy(model, split.x_test, split.y_test),
                "kmp_magnitude_overlap": _overlap(kmp_mask, mag_mask),
                "koopman_eigenvalue": [lam.real, lam.imag],
                "spline_eb_distance": spline_eb.history[-1],
                "mask_eb_distance": mask_eb.history[-1],
            }
        )
    result.dense_accuracy = _digits.accuracy(model, split.x_test, split.y_test)
    result.early_bird = {
        "spline": {
            "epoch": None if spline_eb.epoch is None else spline_eb.epoch + 1,
            "eps": spline_eb.eps,
            "window": spline_eb.window,
            "memory_bytes": spline_eb.memory_bytes,
        },
        "mask_distance": {
            "epoch": None if mask_eb.epoch is None else mask_eb.epoch + 1,
            "eps": mask_eb.eps,
            "window": mask_eb.window,
            "memory_bytes": mask_eb.memory_bytes,
        },
    }

    # ---- the criteria, on the trained model -----------------------------------------------------------
    kmd = kf.DMD().fit(rec)
    kmp = kf.criteria.koopman_magnitude(kmd)
    gen = torch.Generator().manual_seed(config.seed + 1)
    idx = torch.randperm(len(split.x_train), generator=gen)[: 20 * config.batch_size].reshape(20, -1)
    batches = [(split.x_train[i], split.y_train[i]) for i in idx]
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), batches, hvp="exact")
    spline = kf.criteria.spline_redundancy(model, split.x_train[:512])
    scores = {
        "magnitude": kf.criteria.magnitude(model),
        "kmp": kmp,
        "kgp": kf.criteria.koopman_gradient(kmd),
        "loss_preservation": flow.scores("loss_preservation"),
        "gradient_norm_preservation": flow.scores("gradient_norm_preservation"),
        "grasp": flow.scores("grasp"),
    }
    lam = kmp.info["eigenvalues"][0]
    result.koopman = {
        "window": len(rec),
        "modes": kmd.n_modes,
        "rtol": kmd.rtol_used,
        "eigenvalues": [[float(z.real), float(z.imag)] for z in kmd.eigenvalues],
        "residuals": [float(r) for r in kmd.residuals],  # per mode: ‖Yv − λXv‖ / ‖Xv‖
        "nearest": kmd.nearest(1.0),  # index of the eigenvalue nearest 1 in the two lists above
        "nearest_to_one": [float(lam.real), float(lam.imag)],
        "distance_to_one": float(kmp.info["distance"][0]),
        "residual": float(kmp.info["residuals"][0]),
    }

    # ---- prune, fine-tune, evaluate -----------------------------------------------------------------
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    grid = [(c, s) for c in (*UNSTRUCTURED, *STRUCTURED) for s in config.sparsities]
    final_masks: dict[str, dict[str, torch.Tensor]] = {}
    for criterion, sparsity in wrap(grid, "pruning"):
        model.load_state_dict(trained)
        if criterion == "spline_redundancy":
            masks = spline.masks(model, sparsity)
        else:
            masks = kf.masks.global_topk(scores[criterion], sparsity)
            if abs(sparsity - OVERLAP_SPARSITY) < 1e-9:
                final_masks[criterion] = masks
        opt = torch.optim.SGD(model.parameters(), lr=config.lr / 2, momentum=0.9)
        with kf.masks.Masked(model, masks, opt):
            pruned = _digits.accuracy(model, split.x_test, split.y_test)
            _digits.train(
                model, split, steps=steps * config.fine_tune_epochs, batch_size=config.batch_size, optimizer=opt, seed=2
            )
        report = kf.masks.report(masks)
        result.pruning.append(
            {
                "criterion": criterion,
                "sparsity": sparsity,
                "structured": criterion in STRUCTURED,
                "weights_kept": report.kept / report.total,
                "accuracy_pruned": pruned,
                "accuracy_fine_tuned": _digits.accuracy(model, split.x_test, split.y_test),
            }
        )
    model.load_state_dict(trained)
    if final_masks:
        names = list(final_masks)
        result.mask_overlap = {
            "sparsity": OVERLAP_SPARSITY,
            "criteria": names,
            "matrix": [[_overlap(final_masks[a], final_masks[b]) for b in names] for a in names],
        }
    result.seconds = time.perf_counter() - start
    return result


# ---- output --------------------------------------------------------------------------------------------


def table(result: DemoResult) -> str:
    """Accuracy after pruning (right after -> after fine-tuning) per criterion and sparsity."""
    sparsities = result.config["sparsities"]
    head = f"{'criterion':32s}" + "".join(f"{s:>17.0%}" for s in sparsities)
    lines = [
        f"(test accuracy on {result.test_samples} held-out digits; dense {result.dense_accuracy:.3f}; chance "
        f"{result.chance_accuracy:.2f}: a collapsed network, one class for everything, scores "
        f"{result.one_class_accuracy[0]:.3f}-{result.one_class_accuracy[1]:.3f})",
        head,
        "-" * len(head),
    ]
    for criterion in (*UNSTRUCTURED, *STRUCTURED):
        cells = []
        for s in sparsities:
            row = next(r for r in result.pruning if r["criterion"] == criterion and r["sparsity"] == s)
            cells.append(f"{row['accuracy_pruned']:.3f} -> {row['accuracy_fine_tuned']:.3f}")
        lines.append(f"{LABELS[criterion]:32s}" + "".join(f"{c:>17s}" for c in cells))
    return "\n".join(lines)


def overlap_table(result: DemoResult) -> str:
    if not result.mask_overlap:
        return ""
    names = result.mask_overlap["criteria"]
    short = {
        "magnitude": "mag",
        "kmp": "KMP",
        "kgp": "KGP",
        "loss_preservation": "LP",
        "gradient_norm_preservation": "GNP",
        "grasp": "GraSP",
    }
    lines = ["        " + "".join(f"{short[n]:>7s}" for n in names)]
    for name, row in zip(names, result.mask_overlap["matrix"]):
        lines.append(f"{short[name]:>7s} " + "".join(f"{v:7.2f}" for v in row))
    lines.append(
        "(spline redundancy is not in the matrix: it prunes whole hidden units, so its masks and the per-weight "
        "masks keep different kinds of things)"
    )
    return "\n".join(lines)


def rounded(value, digits: int = 6):
    """Floats rounded to ``digits`` significant digits (float32 results carry noise beyond that:
    0.9800000190734863), recursively through dicts and lists."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write(result: DemoResult, out: Path) -> list[Path]:
    """results.json and the PNG plots in ``out``, the plots drawn from the JSON's numbers alone;
    returns the paths written."""
    from koopfast import plots

    out.mkdir(parents=True, exist_ok=True)
    data = rounded(asdict(result))
    paths = [out / "results.json"]
    paths[0].write_text(json.dumps(data, indent=2))
    paths += plots.demo_figures(data, out, LABELS)
    return paths


def summary(result: DemoResult) -> str:
    eb = result.early_bird
    fired = {k: (f"epoch {v['epoch']}" if v["epoch"] else "did not fire") for k, v in eb.items()}
    k = result.koopman
    lam = complex(*k["nearest_to_one"])
    first, last = result.training[0], result.training[-1]
    return "\n".join(
        [
            f"trained an MLP {'-'.join(map(str, (64, *result.config['hidden'], 10)))} with BatchNorm on digits for "
            f"{result.config['epochs']} epochs: {result.parameters} prunable weights, "
            f"test accuracy {result.dense_accuracy:.3f}",
            f"early-bird detectors: spline codes {fired['spline']} (eps {eb['spline']['eps']}), "
            f"BatchNorm mask distance {fired['mask_distance']} (eps {eb['mask_distance']['eps']})",
            f"Koopman: DMD of the last {k['window']} snapshots, {k['modes']} modes; λ nearest 1 = "
            f"{lam.real:.5f}{lam.imag:+.5f}i (|λ-1| = {k['distance_to_one']:.1e}; its residual ‖Yv − λXv‖/‖Xv‖ = "
            f"{k['residual']:.3f}: how closely the mode follows the recorded snapshots, 0 = exactly)",
            f"KMP vs magnitude masks at {OVERLAP_SPARSITY:.0%}: overlap {first['kmp_magnitude_overlap']:.2f} after "
            f"epoch 1, {last['kmp_magnitude_overlap']:.2f} after epoch {last['epoch']}",
        ]
    )
