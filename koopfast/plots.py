"""PNG figures for ``koopfast demo`` and ``koopfast bench`` (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # an optional dependency of the command line
        raise ImportError("koopfast's plots need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def demo_figures(data: dict, out: Path, labels: dict[str, str]) -> list[Path]:
    """The three figures of ``koopfast demo``, drawn from its results.json data alone (so every
    number a figure shows is in the JSON)."""
    return [
        accuracy_vs_sparsity(data, out / "accuracy_vs_sparsity.png", labels),
        koopman_eigenvalues(data["koopman"], out / "koopman_eigenvalues.png"),
        training_overlap(data, out / "mask_overlap_over_training.png"),
    ]


def accuracy_vs_sparsity(data: dict, path: Path, labels: dict[str, str]) -> Path:
    """Test accuracy after fine-tuning (solid) and right after pruning (dashed) per criterion,
    with the dense model's accuracy and chance level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    criteria = list(dict.fromkeys(r["criterion"] for r in data["pruning"]))
    for i, criterion in enumerate(criteria):
        rows = sorted((r for r in data["pruning"] if r["criterion"] == criterion), key=lambda r: r["sparsity"])
        x = [100 * r["sparsity"] for r in rows]
        color = f"C{i}"
        ax.plot(x, [r["accuracy_fine_tuned"] for r in rows], "o-", color=color, label=labels[criterion])
        ax.plot(x, [r["accuracy_pruned"] for r in rows], "x--", color=color, alpha=0.5)
    ax.axhline(data["dense_accuracy"], color="k", lw=1, ls=":", label=f"dense ({data['dense_accuracy']:.3f})")
    low, high = data["one_class_accuracy"]
    ax.axhspan(low, high, color="0.6", alpha=0.4, label=f"chance: one class for everything ({low:.3f}-{high:.3f})")
    ax.set_xlabel("sparsity (% of weights pruned; % of hidden units for spline redundancy)")
    ax.set_ylabel(f"test accuracy ({data['test_samples']} held-out digits)")
    ax.set_title("Accuracy after pruning: fine-tuned (solid), right after pruning (dashed)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path)


def koopman_eigenvalues(koopman: dict, path: Path) -> Path:
    """DMD eigenvalues in the complex plane with the unit circle, colored by residual; the one
    nearest 1 marked."""
    plt = _pyplot()
    lam = torch.tensor([complex(re, im) for re, im in koopman["eigenvalues"]])
    residuals = torch.tensor(koopman["residuals"]).clamp_max(1.0)
    nearest = complex(*koopman["nearest_to_one"])
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 5))
    t = torch.linspace(0, 2 * math.pi, 400)
    for a in (ax, zoom):
        a.plot(torch.cos(t), torch.sin(t), "k-", lw=0.8, label="unit circle")
        points = a.scatter(lam.real, lam.imag, s=14, c=residuals, cmap="viridis", vmin=0, vmax=1, label="eigenvalues")
        a.scatter(
            [nearest.real],
            [nearest.imag],
            s=90,
            facecolors="none",
            edgecolors="r",
            label=f"nearest 1: {nearest.real:.5f}{nearest.imag:+.5f}i",
        )
        a.set_xlabel("Re λ")
        a.set_ylabel("Im λ")
        a.grid(alpha=0.3)
    ax.set_aspect("equal")
    ax.set_title(f"Koopman (DMD) eigenvalues, {len(lam)} modes (color: residual)")
    ax.legend(fontsize=8, loc="lower left")
    zoom.set_xlim(0.9, 1.02)
    zoom.set_ylim(-0.06, 0.06)
    zoom.set_title("near λ = 1 (the fixed point)")
    fig.colorbar(points, ax=zoom, label="relative residual ‖Yv − λXv‖ / ‖Xv‖ (clipped at 1)")
    return _save(plt, fig, path)


def training_overlap(data: dict, path: Path) -> Path:
    """Per epoch: test accuracy and the KMP/magnitude mask overlap (top); the early-bird
    distances with their thresholds and the epochs the detectors fired (bottom)."""
    plt = _pyplot()
    training = data["training"]
    epochs = [r["epoch"] for r in training]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(epochs, [r["test_accuracy"] for r in training], "s-", color="C1", label="test accuracy")
    top.plot(
        epochs,
        [r["kmp_magnitude_overlap"] for r in training],
        "o-",
        color="C0",
        label="KMP ∩ magnitude masks at 90 % sparsity (kept in common / kept)",
    )
    top.set_ylabel("accuracy / overlap")
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="lower right")
    top.set_title("Over training: accuracy, KMP/magnitude mask overlap, early-bird distances")
    for key, name, label, color in (
        ("spline_eb_distance", "spline", "spline codes (Hamming)", "C2"),
        ("mask_eb_distance", "mask_distance", "BatchNorm channel masks", "C3"),
    ):
        pts = [(e, r[key]) for e, r in zip(epochs, training) if r[key] is not None]
        if pts:
            bottom.plot(*zip(*pts), "^-", color=color, label=f"{label}: max distance to the previous epochs")
        eb = data["early_bird"][name]
        bottom.axhline(eb["eps"], color=color, ls="--", lw=1, label=f"{label}: threshold ε = {eb['eps']}")
        if eb["epoch"]:
            bottom.axvline(eb["epoch"], color=color, ls=":", lw=1.5)
            bottom.annotate(f"fired, epoch {eb['epoch']}", (eb["epoch"], 0.95), color=color, fontsize=8,
                            rotation=90, va="top", xycoords=("data", "axes fraction"))  # fmt: skip
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("normalized distance")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7, loc="upper right")
    return _save(plt, fig, path)


def bench_speedups(rows, device: str, path: Path) -> Path:
    """Horizontal bars: each method's speed relative to its case's baseline (log scale); koopfast
    in blue, PyTorch and peers in grey, references (a plain streaming read) as hatched outlines."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    rows = [r for r in rows if r.ratio is not None]
    labels = [f"{r.case} | {r.method}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(rows) + 2.0))
    reference = [r.method.startswith("stream read") for r in rows]  # the bandwidth floor, not a method to use
    methods = [r.ratio for r, ref in zip(rows, reference) if not ref] or [r.ratio for r in rows]
    right = max(methods) * 3  # the axis fits the methods; a reference bar beyond it is cut and labelled
    for i, (r, ref) in enumerate(zip(rows, reference)):
        if ref:
            ax.barh(i, min(r.ratio, right), facecolor="none", edgecolor="0.4", hatch="///")
            if r.ratio > right:
                ax.annotate(f"{r.ratio:.0f}× →", (right, i), ha="right", va="center", fontsize=7, color="0.2",
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip
        else:
            ax.barh(i, r.ratio, color="C0" if r.method.startswith("koopfast") else "C7")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=right)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed relative to the case's baseline (×, log scale; > 1 is faster)")
    ax.set_title(f"koopfast bench: speed relative to each case's baseline\n{device}", fontsize=9)
    ax.legend(
        handles=[
            Patch(color="C0", label="koopfast"),
            Patch(color="C7", label="PyTorch and peers"),
            Patch(facecolor="none", edgecolor="0.4", hatch="///", label="reference: a plain streaming read"),
        ],
        fontsize=7,
        loc="lower right",
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
