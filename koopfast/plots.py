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


def _extremes(rows: list[dict], key: str, labels: dict[str, str]) -> str:
    """Which criterion keeps the most and which the least accuracy at the highest sparsity."""
    top = max(r["sparsity"] for r in rows)
    at_top = [r for r in rows if r["sparsity"] == top]
    best, worst = max(at_top, key=lambda r: r[key]), min(at_top, key=lambda r: r[key])
    return (f"at {top:.0%}: best {labels[best['criterion']]} ({best[key]:.3f}),\n"
            f"worst {labels[worst['criterion']]} ({worst[key]:.3f})")  # fmt: skip


def accuracy_vs_sparsity(data: dict, path: Path, labels: dict[str, str]) -> Path:
    """Test accuracy per criterion and sparsity: right after pruning (left) and after fine-tuning
    (right), with the dense model's accuracy and the chance band; the legend beside the axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4), sharey=True)
    criteria = list(dict.fromkeys(r["criterion"] for r in data["pruning"]))
    low, high = data["one_class_accuracy"]
    epochs = data["config"]["fine_tune_epochs"]
    for ax, key, when in (
        (axes[0], "accuracy_pruned", "right after pruning"),
        (axes[1], "accuracy_fine_tuned", f"after {epochs} epochs of fine-tuning"),
    ):
        for i, criterion in enumerate(criteria):
            rows = sorted((r for r in data["pruning"] if r["criterion"] == criterion), key=lambda r: r["sparsity"])
            ax.plot([100 * r["sparsity"] for r in rows], [r[key] for r in rows], "o-", color=f"C{i}",
                    label=labels[criterion], alpha=0.85)  # fmt: skip
        ax.axhline(data["dense_accuracy"], color="k", lw=1, ls=":", label=f"dense ({data['dense_accuracy']:.3f})")
        ax.axhspan(low, high, color="0.6", alpha=0.4, label=f"chance: one class for everything ({low:.3f}-{high:.3f})")
        ax.set_xlabel("sparsity (% of weights pruned;\n% of hidden units for spline redundancy)")
        ax.set_title(f"{when}\n{_extremes(data['pruning'], key, labels)}", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy ({data['test_samples']} held-out digits, fraction correct)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    hidden = "-".join(map(str, (64, *data["config"]["hidden"], 10)))
    fig.suptitle(f"Test accuracy after pruning an MLP {hidden} (BatchNorm) trained on digits, per criterion")
    return _save(plt, fig, path)


def koopman_eigenvalues(koopman: dict, path: Path) -> Path:
    """DMD eigenvalues in the complex plane with the unit circle, colored by residual; the one
    nearest 1 marked; the titles say how far out they reach and how near 1 the nearest is."""
    plt = _pyplot()
    lam = torch.tensor([complex(re, im) for re, im in koopman["eigenvalues"]])
    residuals = torch.tensor(koopman["residuals"]).clamp_max(1.0)
    nearest = complex(*koopman["nearest_to_one"])
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 5.6))
    t = torch.linspace(0, 2 * math.pi, 400)
    width = max(4 * abs(nearest - 1), 0.02)
    for a in (ax, zoom):
        a.plot(torch.cos(t), torch.sin(t), "k-", lw=0.8, label="unit circle |λ| = 1")
        points = a.scatter(lam.real, lam.imag, s=14, c=residuals, cmap="viridis", vmin=0, vmax=1,
                           label="DMD eigenvalues (color: residual)")  # fmt: skip
        a.scatter([nearest.real], [nearest.imag], s=90, facecolors="none", edgecolors="r",
                  label=f"nearest 1: {nearest.real:.5f}{nearest.imag:+.5f}i")  # fmt: skip
        a.set_xlabel("Re λ")
        a.set_ylabel("Im λ")
        a.grid(alpha=0.3)
    ax.set_aspect("equal")
    outside = int((lam.abs() > 1 + 1e-6).sum())
    reach = float(lam.abs().max())
    ax.set_title(f"{len(lam)} DMD eigenvalues of the last {koopman['window']} snapshots:\n"
                 f"|λ| up to {reach:.3f} ({outside} outside the unit circle)", fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    zoom.set_xlim(1 - width, 1 + width)
    zoom.set_ylim(-width, width)
    zoom.set_aspect("equal")
    near = int(((lam - 1).abs() < width).sum())
    zoom.set_title(f"within {width:.2g} of λ = 1: {near} eigenvalue(s);\nnearest |λ − 1| = "
                   f"{koopman['distance_to_one']:.1e}, residual {koopman['residual']:.3f}", fontsize=10)  # fmt: skip
    fig.colorbar(points, ax=zoom, label="relative residual ‖Yv − λXv‖ / ‖Xv‖ (clipped at 1)")
    return _save(plt, fig, path)


def training_overlap(data: dict, path: Path) -> Path:
    """Per epoch, each on its own axes: test accuracy with chance level; the KMP/magnitude mask
    overlap; the early-bird distances with their thresholds and the epochs the detectors fired."""
    plt = _pyplot()
    training = data["training"]
    epochs = [r["epoch"] for r in training]
    fig, (acc, over, dist) = plt.subplots(3, 1, figsize=(10, 9.5), sharex=True)
    accuracy = [r["test_accuracy"] for r in training]
    acc.plot(epochs, accuracy, "s-", color="C1", label="test accuracy")
    acc.axhline(data["chance_accuracy"], color="0.5", ls="--", lw=1, label=f"chance ({data['chance_accuracy']:.2f})")
    acc.set_ylabel("test accuracy\n(fraction correct)")
    acc.set_ylim(0, 1.02)
    acc.set_title(f"test accuracy: {accuracy[0]:.3f} after epoch 1, {accuracy[-1]:.3f} after epoch {epochs[-1]}",
                  fontsize=10)  # fmt: skip
    overlap = [r["kmp_magnitude_overlap"] for r in training]
    label = "KMP ∩ magnitude masks at 90 % sparsity\n(kept in common / kept)"
    over.plot(epochs, overlap, "o-", color="C0", label=label)
    over.set_ylabel("mask overlap\n(fraction of kept weights)")
    over.set_ylim(0, 1.02)
    low, high = min(overlap), max(overlap)
    over.set_title(
        f"KMP and magnitude masks do not settle: overlap {low:.2f}-{high:.2f} over training\n"
        f"({overlap[0]:.2f} after epoch 1, {overlap[-1]:.2f} after epoch {epochs[-1]})"
        if high - low > 0.1 else
        f"KMP and magnitude masks: overlap {low:.2f}-{high:.2f} over training", fontsize=10,
    )  # fmt: skip
    fired = []
    for key, name, label, color in (
        ("spline_eb_distance", "spline", "spline codes (Hamming)", "C2"),
        ("mask_eb_distance", "mask_distance", "BatchNorm channel masks", "C3"),
    ):
        pts = [(e, r[key]) for e, r in zip(epochs, training) if r[key] is not None]
        if pts:
            dist.plot(*zip(*pts), "^-", color=color, label=f"{label}: max distance to the previous epochs")
        eb = data["early_bird"][name]
        dist.axhline(eb["eps"], color=color, ls="--", lw=1, label=f"{label}: threshold ε = {eb['eps']}")
        if eb["epoch"]:
            dist.axvline(eb["epoch"], color=color, ls=":", lw=1.5, label=f"{label}: fired at epoch {eb['epoch']}")
            fired.append(f"{label.split(' (')[0]} at epoch {eb['epoch']}")
        else:
            fired.append(f"{label.split(' (')[0]} never")
    dist.set_title("early-bird distances to the previous epochs; fired (below ε):\n" + ", ".join(fired), fontsize=10)
    dist.set_xlabel("epoch")
    dist.set_ylabel("normalized distance\n(fraction of bits)")
    dist.set_ylim(bottom=0)
    for a in (acc, over, dist):
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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
    fig.savefig(path, dpi=120, bbox_inches="tight")  # legends beside or below the axes stay in the image
    plt.close(fig)
    return path


# ---- koopfast study ----------------------------------------------------------------------------------------


def study_figures(data: dict, out: Path) -> list[Path]:
    """The figures of ``koopfast study``, one per paper, drawn from its study.json data alone:
    the measured values (left panels) and the compared differences (right), each as the mean over
    seeds with its 95 % Student t interval as error bars and every seed as a dot."""
    comparisons = {c["name"]: c for c in data["comparisons"]}
    m, config, chance = data["measurements"], data["config"], data["chance_accuracy"]
    n = len(data["seeds"])
    paths = []
    if "gradflow" in m:
        rows = m["gradflow"]
        groups = [
            ("magnitude\n98 %", [r["magnitude@0.98"] for r in rows]),
            ("|θg| (loss\npreservation)\n98 %", [r["loss_preservation@0.98"] for r in rows]),
            ("|θHg| (grad-norm\npreservation)\n90 %", [r["gradient_norm_preservation@0.9"] for r in rows]),
            ("GraSP\n90 %", [r["grasp@0.9"] for r in rows]),
        ]
        panel = {
            "title": f"pruned after {config['gradflow_pretrain']} steps, fine-tuned {config['gradflow_fine_tune']}",
            "ylabel": "test accuracy (fraction correct)",
            "groups": groups, "chance": chance, "dense": [r["dense"] for r in rows],
        }  # fmt: skip
        paths.append(_study_figure(
            out / "study_gradflow.png", [panel],
            [comparisons["magnitude_vs_loss_preservation"], comparisons["gnp_vs_grasp"]],
            f"Lubana & Dick on digits (MLP 64-256-128-10, {n} seeds)",
        ))  # fmt: skip
    if "koopman" in m:
        rows = m["koopman"]
        late, sparsity = config["koopman_late"], config["koopman_sparsity"]
        overlap = {
            "title": f"KMP vs magnitude masks at {sparsity:.0%}",
            "ylabel": "mask overlap (kept in common / kept)",
            "groups": [("early\n(steps 0-65)", [r["overlap_early"] for r in rows]),
                       (f"late\n(after {late} steps)", [r["overlap_late"] for r in rows])],
        }  # fmt: skip
        accuracy = {
            "title": f"right after pruning {sparsity:.0%}",
            "ylabel": "test accuracy (fraction correct)",
            "groups": [("KMP\nearly", [r["kmp_early"] for r in rows]),
                       ("magnitude\nearly", [r["magnitude_early"] for r in rows]),
                       ("KMP\nlate", [r["kmp_late"] for r in rows]),
                       ("magnitude\nlate", [r["magnitude_late"] for r in rows])],
            "chance": chance,
        }  # fmt: skip
        keys = ("kmp_overlap_late_minus_early", "kmp_accuracy_gap_late", "kmp_accuracy_gap_early_minus_late")
        paths.append(_study_figure(
            out / "study_koopman.png", [overlap, accuracy], [comparisons[k] for k in keys],
            f"Redman et al. on digits (MLP 64-128-10, exact DMD of a {config['koopman_window']}-step window, "
            f"{n} seeds)",
        ))  # fmt: skip
    if "earlybird" in m:
        rows = m["earlybird"]
        panel = {
            "title": f"when the detectors fired (of {config['earlybird_epochs']} epochs)",
            "ylabel": "detection epoch (epochs trained when it fired)",
            "groups": [("spline codes\n(ε 0.16, window 3)", [r["spline_epoch"] for r in rows]),
                       ("BatchNorm masks\n(ε 0.1, window 4)", [r["mask_distance_epoch"] for r in rows])],
            "integer": True,
        }  # fmt: skip
        paths.append(_study_figure(
            out / "study_earlybird.png", [panel], [comparisons["spline_fires_before_mask_distance"]],
            f"Early-bird detectors on digits (MLP 64-128-64-10 with BatchNorm, {n} seeds)",
        ))  # fmt: skip
    return paths


def _interval_text(c: dict) -> str:
    if c["low"] is None or c["high"] is None:
        return f"{c['mean']:+.3f} (n = {c['n']}: no interval)"
    return f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"


VERDICT_COLORS = {"supported": "C2", "inconclusive": "C1", "not supported": "C3"}


def _verdict_color(verdict: str) -> str:
    return next(color for word, color in VERDICT_COLORS.items() if verdict.startswith(word))


def _study_figure(path, panels: list[dict], comps: list[dict], heading: str) -> Path:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _pyplot()
    widths = [0.45 + 0.3 * len(p["groups"]) for p in panels] + [2.2]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 + 2.2 * sum(widths), 5.6),
                             gridspec_kw={"width_ratios": widths})  # fmt: skip
    for ax, panel in zip(axes, panels):
        _seed_panel(ax, panel["groups"], panel.get("integer", False))
        if panel.get("dense"):
            mean = sum(panel["dense"]) / len(panel["dense"])
            ax.axhline(mean, color="k", ls=":", lw=1, label=f"dense, before pruning (mean {mean:.3f})")
        if panel.get("chance") is not None:
            chance = panel["chance"]
            ax.axhline(chance, color="0.5", ls="--", lw=1, label=f"chance ({chance:.2f}: ten classes)")
        if not panel.get("integer"):  # fractions: an interval reaching past 0 or 1 is cut at the frame
            ax.set_ylim(-0.03, 1.05)
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
        ax.grid(axis="y", alpha=0.3)

    right = axes[-1]
    for i, c in enumerate(comps):
        y = len(comps) - 1 - i
        values = [v for v in c["per_seed"] if v is not None]
        right.scatter(values, [y + _jitter(k, len(values)) for k in range(len(values))], s=12, color="0.45", zorder=2)
        color = _verdict_color(c["verdict"])
        if c["low"] is not None and c["high"] is not None:
            right.errorbar(c["mean"], y, xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]], fmt="o",
                           color=color, capsize=5, lw=2, zorder=3)  # fmt: skip
        else:
            right.plot(c["mean"], y, "o", color=color)
        if c["kind"] == "equivalent":
            right.fill_between([-c["margin"], c["margin"]], y - 0.4, y + 0.4, color="C2", alpha=0.15)
    right.axvline(0, color="k", lw=1)
    right.set_yticks(range(len(comps)), [_wrap(c["quantity"], 30) for c in reversed(comps)], fontsize=8)
    right.yaxis.tick_right()
    right.set_ylim(-0.6, len(comps) - 0.4)
    units = sorted({c["unit"] for c in comps})
    right.set_xlabel(f"difference ({'; '.join(units)})\n> 0 supports the claim")
    right.set_title("compared: mean, 95 % t interval, each seed", fontsize=10)
    handles = [Line2D([], [], marker="o", ls="", color="0.45", markersize=4, label="one seed")]
    handles += [Line2D([], [], marker="o", color=color, label=f"mean ± 95 % t interval: {word}")
                for word, color in VERDICT_COLORS.items()]  # fmt: skip
    if any(c["kind"] == "equivalent" for c in comps):
        margin = next(c["margin"] for c in comps if c["kind"] == "equivalent")
        handles.append(Patch(color="C2", alpha=0.15, label=f"equivalence margin ±{margin} (claim: ≈ 0)"))
    right.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.26), ncol=2, frameon=False)
    right.grid(axis="x", alpha=0.3)
    lines = [heading] + [f"{c['claim']}: {_interval_text(c)} → {c['verdict']}" for c in comps]
    fig.suptitle("\n".join(lines), fontsize=9.5, x=0.01, ha="left")
    fig.tight_layout()  # it makes room for the suptitle
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _seed_panel(ax, groups, integer: bool) -> None:
    for i, (_, values) in enumerate(groups):
        present = [v for v in values if v is not None]
        ax.scatter([i + _jitter(k, len(present)) for k in range(len(present))], present, s=12, color="0.45",
                   zorder=2, label="one seed" if i == 0 else None)  # fmt: skip
        missing = len(values) - len(present)
        if missing:
            ax.annotate(f"{missing} seed(s): never fired", (i, 0.02), xycoords=("data", "axes fraction"),
                        ha="center", fontsize=7, color="C3")  # fmt: skip
        if not present:
            continue
        mean = sum(present) / len(present)
        low, high = _t_bounds(present)
        ax.errorbar(i, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="C0", capsize=6, lw=2,
                    zorder=3, label="mean ± 95 % t interval" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    if integer:
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _t_bounds(values: list[float]) -> tuple[float, float]:
    from koopfast.study import t_interval

    _, low, high = t_interval(values)
    if not math.isfinite(low):  # one value: no interval to draw
        return values[0], values[0]
    return low, high


def _jitter(k: int, n: int) -> float:
    """Spread of the seed dots around their column, deterministic."""
    return 0.0 if n < 2 else -0.15 + 0.3 * k / (n - 1)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
