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


def accuracy_vs_sparsity(result, path: Path, labels: dict[str, str]) -> Path:
    """Test accuracy after fine-tuning (solid) and right after pruning (dashed) per criterion."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    criteria = list(dict.fromkeys(r["criterion"] for r in result.pruning))
    for i, criterion in enumerate(criteria):
        rows = sorted((r for r in result.pruning if r["criterion"] == criterion), key=lambda r: r["sparsity"])
        x = [100 * r["sparsity"] for r in rows]
        color = f"C{i}"
        ax.plot(x, [r["accuracy_fine_tuned"] for r in rows], "o-", color=color, label=labels[criterion])
        ax.plot(x, [r["accuracy_pruned"] for r in rows], "x--", color=color, alpha=0.5)
    ax.axhline(result.dense_accuracy, color="k", lw=1, ls=":", label=f"dense ({result.dense_accuracy:.3f})")
    ax.set_xlabel("sparsity (% of weights pruned; % of hidden units for spline redundancy)")
    ax.set_ylabel("test accuracy (digits)")
    ax.set_title("Accuracy after pruning: fine-tuned (solid), right after pruning (dashed)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(plt, fig, path)


def koopman_eigenvalues(kmd, path: Path) -> Path:
    """DMD eigenvalues in the complex plane with the unit circle; the one nearest 1 marked."""
    plt = _pyplot()
    lam = kmd.eigenvalues
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 5))
    t = torch.linspace(0, 2 * math.pi, 400)
    i = kmd.nearest(1.0)
    for a in (ax, zoom):
        a.plot(torch.cos(t), torch.sin(t), "k-", lw=0.8, label="unit circle")
        points = a.scatter(
            lam.real,
            lam.imag,
            s=14,
            c=kmd.residuals.clamp_max(1.0),
            cmap="viridis",
            vmin=0,
            vmax=1,
            label="eigenvalues",
        )
        a.scatter(
            [float(lam[i].real)],
            [float(lam[i].imag)],
            s=90,
            facecolors="none",
            edgecolors="r",
            label=f"nearest 1: {complex(lam[i]).real:.5f}{complex(lam[i]).imag:+.5f}i",
        )
        a.set_xlabel("Re λ")
        a.set_ylabel("Im λ")
        a.grid(alpha=0.3)
    ax.set_aspect("equal")
    ax.set_title(f"Koopman (DMD) eigenvalues, {kmd.n_modes} modes (color: residual)")
    ax.legend(fontsize=8, loc="lower left")
    zoom.set_xlim(0.9, 1.02)
    zoom.set_ylim(-0.06, 0.06)
    zoom.set_title("near λ = 1 (the fixed point)")
    fig.colorbar(points, ax=zoom, label="relative residual ‖Yv − λXv‖ / ‖Xv‖ (clipped at 1)")
    return _save(plt, fig, path)


def training_overlap(result, path: Path) -> Path:
    """Per epoch: KMP/magnitude mask overlap, test accuracy, and the early-bird distances."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in result.training]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(
        epochs, [r["kmp_magnitude_overlap"] for r in result.training], "o-", label="KMP ∩ magnitude mask overlap (90 %)"
    )
    ax.plot(epochs, [r["test_accuracy"] for r in result.training], "s-", label="test accuracy")
    for key, label, color in (
        ("spline_eb_distance", "spline early-bird distance", "C2"),
        ("mask_eb_distance", "BN-mask early-bird distance", "C3"),
    ):
        pts = [(e, r[key]) for e, r in zip(epochs, result.training) if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), "^--", color=color, label=label)
    for name, color in (("spline", "C2"), ("mask_distance", "C3")):
        epoch = result.early_bird[name]["epoch"]
        if epoch:
            ax.axvline(epoch, color=color, ls=":", lw=1.5)
            ax.annotate(f"{name} EB", (epoch, 0.02), color=color, fontsize=8, rotation=90)
    ax.set_xlabel("epoch")
    ax.set_ylabel("overlap / accuracy / normalized distance")
    ax.set_ylim(0, 1.02)
    ax.set_title("Over training: masks converge, early birds fire")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    return _save(plt, fig, path)


def bench_speedups(rows, device: str, path: Path) -> Path:
    """Horizontal bars: each method's speed relative to its case's baseline (log scale)."""
    plt = _pyplot()
    rows = [r for r in rows if r.ratio is not None]
    labels = [f"{r.case} | {r.method}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(rows) + 1.5))
    colors = ["C0" if r.method.startswith("koopfast") else "C7" for r in rows]
    ax.barh(range(len(rows)), [r.ratio for r in rows], color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed relative to the case's baseline (×, log scale; > 1 is faster)")
    ax.set_title(f"koopfast bench on {device} (blue: koopfast, grey: PyTorch and peers)", fontsize=10)
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
