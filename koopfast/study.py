"""``koopfast study``: the papers' comparisons, repeated over seeds, with confidence intervals.

Each comparison is one quantity measured once per seed (a seed changes the data split, the
initialization and the minibatch order) on scikit-learn's digits (bundled: nothing is downloaded):

- Lubana & Dick (ICLR 2021), an MLP 64-256-128-10 pruned after 100 SGD steps and fine-tuned with
  the pruned weights held at zero (the setup of examples/gradflow_digits.py):
  ``magnitude_vs_loss_preservation`` = accuracy(magnitude) - accuracy(|θg|) at 98 % sparsity;
  ``gnp_vs_grasp`` = accuracy(|θHg|) - accuracy(GraSP) at 90 % sparsity.
- Redman et al. (ICLR 2022), an MLP 64-128-10, exact DMD of a 65-step window (one snapshot per
  step) at the start of training ("early") and after 1500 steps ("late", examples/koopman_digits.py):
  ``kmp_overlap_late_minus_early`` = overlap of the KMP and global-magnitude masks, late - early;
  ``kmp_accuracy_gap_late`` = accuracy(KMP) - accuracy(magnitude) right after pruning, late, which
  the paper says is about 0 (an equivalence claim: supported when the whole interval lies within
  ``±EQUIVALENCE_MARGIN``); ``kmp_accuracy_gap_early_minus_late`` = |gap| early - |gap| late.
- Early birds (You et al. ICLR 2020; You, Balestriero et al. TMLR 2022), an MLP with BatchNorm
  64-128-64-10 trained with the L1 penalty on BatchNorm scales, both detectors updated after every
  epoch (the setup of examples/earlybird_digits.py): ``spline_fires_before_mask_distance`` =
  detection epoch of the mask-distance detector - that of the spline detector.

Statistics: per comparison the mean over seeds and a 95 % confidence interval from Student's t
distribution with n - 1 degrees of freedom (mean ± t₀.₉₇₅,ₙ₋₁ · s / √n, s the sample standard
deviation); the seeds are independent runs, so the interval assumes only roughly normal per-seed
values. A claim "quantity > 0" is *supported* when the interval lies above 0, *not supported* when
it lies below, and *inconclusive* when it contains 0. A seed where an early-bird detector never
fired has no detection epoch: it is listed and left out of that comparison's n.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import koopfast as kf
from koopfast import _digits

EQUIVALENCE_MARGIN = 0.02  # accuracy points within which "KMP ≈ magnitude" counts as equal
CONFIDENCE = 0.95


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of the study; ``quick()`` gives the CI sizes."""

    seeds: int = 20  # with 5, three of the six comparisons are inconclusive (docs/study.md)
    first_seed: int = 0
    gradflow_pretrain: int = 100  # SGD steps before pruning ("early on")
    gradflow_fine_tune: int = 150
    koopman_late: int = 1500  # steps before the "late" window
    koopman_window: int = 65  # recorded steps per window (65 + 1 snapshots)
    koopman_sparsity: float = 0.5
    earlybird_epochs: int = 30
    quick: bool = False

    def __post_init__(self):
        fn = "koopfast.study.StudyConfig"
        for name in ("seeds", "gradflow_pretrain", "koopman_window", "earlybird_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "seeds" else 1):
                low = 2 if name == "seeds" else 1
                raise ValueError(f"{fn}: expected {name} to be an int >= {low}, got {value!r}")
        for name in ("gradflow_fine_tune", "koopman_late", "first_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{fn}: expected {name} to be an int >= 0, got {value!r}")
        if not 0 < self.koopman_sparsity < 1:
            raise ValueError(f"{fn}: expected koopman_sparsity in (0, 1), got {self.koopman_sparsity!r}")

    @classmethod
    def quick_config(cls, seeds: int = 3) -> StudyConfig:
        """Small sizes for CI: shorter fine-tuning and early-bird runs (the Koopman study keeps its
        1500 steps: it is cheap, and 600 steps are too few to converge)."""
        return cls(seeds=seeds, gradflow_fine_tune=60, earlybird_epochs=12, quick=True)


@dataclass(frozen=True)
class Comparison:
    """One quantity over seeds, its t interval and what the interval says about the claim."""

    name: str
    paper: str
    claim: str
    quantity: str
    unit: str
    kind: str  # "positive": claim is quantity > 0; "equivalent": claim is |quantity| < margin
    per_seed: list[float | None]
    mean: float
    low: float
    high: float
    n: int
    verdict: str
    margin: float | None = None


@dataclass
class StudyResult:
    config: dict
    confidence: float = CONFIDENCE
    interval: str = "Student t over seeds: mean ± t(0.975, n-1) · s/√n"
    seeds: list[int] = field(default_factory=list)
    measurements: dict[str, list[dict]] = field(default_factory=dict)  # per study, per seed
    comparisons: list[Comparison] = field(default_factory=list)
    chance_accuracy: float = 0.1
    seconds: float = 0.0


# ---- statistics ----------------------------------------------------------------------------------------


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the Student t confidence interval of the mean of independent values.
    With fewer than two values the interval is unbounded."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, -math.inf, math.inf
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, -math.inf, math.inf
    from scipy.stats import t  # scipy comes with scikit-learn, which the digits need

    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = float(t.ppf(0.5 + confidence / 2, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def verdict(kind: str, low: float, high: float, margin: float | None = None) -> str:
    if kind == "positive":
        if low > 0:
            return "supported"
        if high < 0:
            return "not supported"
        return "inconclusive: interval contains 0"
    if kind == "equivalent":
        if -margin < low and high < margin:
            return f"supported: interval within ±{margin}"
        if low >= margin or high <= -margin:
            return f"not supported: interval outside ±{margin}"
        return f"inconclusive: interval crosses ±{margin}"
    raise ValueError(f"koopfast.study.verdict: expected kind 'positive' or 'equivalent', got {kind!r}")


def compare(name, paper, claim, quantity, unit, per_seed, kind="positive", margin=None) -> Comparison:
    mean, low, high = t_interval(v for v in per_seed if v is not None)
    n = sum(v is not None for v in per_seed)
    return Comparison(name, paper, claim, quantity, unit, kind, list(per_seed), mean, low, high, n,
                      verdict(kind, low, high, margin), margin)  # fmt: skip


# ---- one seed of each study ------------------------------------------------------------------------------


def _calibration(split: _digits.Split, seed: int, n: int = 20, size: int = 64):
    idx = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))[: n * size]
    return [(split.x_train[i], split.y_train[i]) for i in idx.reshape(n, size)]


def _fine_tuned(model, split, masks, steps: int, lr: float, seed: int) -> float:
    """Test accuracy after ``steps`` SGD steps with the pruned entries held at zero; the model's
    weights are restored afterwards."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        with kf.masks.Masked(model, masks, opt):
            _digits.train(model, split, steps=steps, optimizer=opt, seed=seed)
            return _digits.accuracy(model, split.x_test, split.y_test)
    finally:
        model.load_state_dict(state)


GRADFLOW_CASES = (("magnitude", 0.98), ("loss_preservation", 0.98), ("gradient_norm_preservation", 0.9), ("grasp", 0.9))


def gradflow_seed(config: StudyConfig, seed: int) -> dict:
    split = _digits.load(seed=seed)
    model = _digits.mlp((256, 128), seed=seed)
    _digits.train(model, split, steps=config.gradflow_pretrain, seed=seed)
    flow = kf.criteria.gradient_flow(model, kf.criteria.cross_entropy(), _calibration(split, seed + 1), hvp="exact")
    row = {"seed": seed, "dense": _digits.accuracy(model, split.x_test, split.y_test)}
    for measure, sparsity in GRADFLOW_CASES:
        masks = flow.masks(measure, sparsity)
        row[f"{measure}@{sparsity:g}"] = _fine_tuned(model, split, masks, config.gradflow_fine_tune, 0.05, seed + 2)
    return row


def _pruned_accuracy(model, split, masks) -> float:
    """Test accuracy right after pruning; the model's weights are restored afterwards."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        kf.masks.apply_(model, masks)
        return _digits.accuracy(model, split.x_test, split.y_test)
    finally:
        model.load_state_dict(state)


def _window(model, split, opt, steps: int, seed: int) -> kf.TrajectoryRecorder:
    rec = kf.TrajectoryRecorder(model, capacity=steps + 1)
    rec.record()
    _digits.train(model, split, steps=steps, seed=seed, optimizer=opt, after_step=lambda _: rec.record())
    return rec


def _overlap(a: dict, b: dict) -> float:
    kept = sum(int(m.sum()) for m in a.values())
    return sum(int((a[n] & b[n]).sum()) for n in a) / max(kept, 1)


def koopman_seed(config: StudyConfig, seed: int) -> dict:
    split = _digits.load(seed=seed)
    row: dict = {"seed": seed}
    for phase, pretrain in (("early", 0), ("late", config.koopman_late)):
        model = _digits.mlp((128,), seed=seed)
        opt = _digits.train(model, split, steps=pretrain, seed=seed + 5) if pretrain else None
        rec = _window(model, split, opt, config.koopman_window, seed)
        kmp = kf.masks.global_topk(kf.criteria.koopman_magnitude(kf.DMD().fit(rec)), config.koopman_sparsity)
        mag = kf.masks.global_topk(kf.criteria.magnitude(model), config.koopman_sparsity)
        row[f"dense_{phase}"] = _digits.accuracy(model, split.x_test, split.y_test)
        row[f"overlap_{phase}"] = _overlap(kmp, mag)
        row[f"kmp_{phase}"] = _pruned_accuracy(model, split, kmp)
        row[f"magnitude_{phase}"] = _pruned_accuracy(model, split, mag)
    return row


def _earlybird_lr(epoch: int, epochs: int) -> float:
    return 0.02 * (0.1 ** ((epoch >= epochs // 2) + (epoch >= 3 * epochs // 4)))


def earlybird_seed(config: StudyConfig, seed: int) -> dict:
    split = _digits.load(seed=seed)
    model = _digits.mlp((128, 64), batchnorm=True, seed=seed)
    probe = torch.linspace(0, 1, 20)
    alpha, beta = torch.meshgrid(probe, probe, indexing="ij")  # Spline-EB's probe: mixtures of two images
    canvas = alpha.reshape(-1, 1) * split.x_test[0] + beta.reshape(-1, 1) * split.x_test[1]
    spline = kf.EarlyBird.spline(model, canvas)
    masks = kf.EarlyBird.mask_distance(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=_earlybird_lr(0, config.earlybird_epochs), momentum=0.9,
                          weight_decay=1e-4)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1000)
    n = len(split.y_train)
    for epoch in range(config.earlybird_epochs):
        for group in opt.param_groups:
            group["lr"] = _earlybird_lr(epoch, config.earlybird_epochs)
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
            kf.earlybird.add_bn_l1_subgradient(model, 1e-4)
            opt.step()
        spline.update()
        masks.update()
    return {
        "seed": seed,
        "dense": _digits.accuracy(model, split.x_test, split.y_test),
        "spline_epoch": None if spline.epoch is None else spline.epoch + 1,  # epochs trained when it fired
        "mask_distance_epoch": None if masks.epoch is None else masks.epoch + 1,
    }


# ---- the study -----------------------------------------------------------------------------------------

STUDIES: dict[str, Callable[[StudyConfig, int], dict]] = {
    "gradflow": gradflow_seed,
    "koopman": koopman_seed,
    "earlybird": earlybird_seed,
}


def comparisons(measurements: dict[str, list[dict]]) -> list[Comparison]:
    out = []
    if "gradflow" in measurements:
        g = measurements["gradflow"]
        out.append(compare(
            "magnitude_vs_loss_preservation", "Lubana & Dick 2021",
            "magnitude pruning beats loss preservation after fine-tuning at high sparsity",
            "accuracy(magnitude) − accuracy(|θg|), fine-tuned, 98 % sparsity", "fraction correct",
            [r["magnitude@0.98"] - r["loss_preservation@0.98"] for r in g],
        ))  # fmt: skip
        out.append(compare(
            "gnp_vs_grasp", "Lubana & Dick 2021",
            "preserving the gradient norm beats raising it (GraSP)",
            "accuracy(|θHg|) − accuracy(GraSP), fine-tuned, 90 % sparsity", "fraction correct",
            [r["gradient_norm_preservation@0.9"] - r["grasp@0.9"] for r in g],
        ))  # fmt: skip
    if "koopman" in measurements:
        k = measurements["koopman"]
        out.append(compare(
            "kmp_overlap_late_minus_early", "Redman et al. 2022",
            "KMP and magnitude masks agree more at convergence than early in training",
            "mask overlap(KMP, magnitude) late − early", "fraction of kept weights",
            [r["overlap_late"] - r["overlap_early"] for r in k],
        ))  # fmt: skip
        out.append(compare(
            "kmp_accuracy_gap_late", "Redman et al. 2022",
            "at convergence KMP ≈ global magnitude pruning (accuracy right after pruning)",
            "accuracy(KMP) − accuracy(magnitude), late", "fraction correct",
            [r["kmp_late"] - r["magnitude_late"] for r in k], kind="equivalent", margin=EQUIVALENCE_MARGIN,
        ))  # fmt: skip
        out.append(compare(
            "kmp_accuracy_gap_early_minus_late", "Redman et al. 2022",
            "KMP and magnitude pruning differ more early in training than at convergence",
            "|accuracy(KMP) − accuracy(magnitude)| early − late", "fraction correct",
            [abs(r["kmp_early"] - r["magnitude_early"]) - abs(r["kmp_late"] - r["magnitude_late"]) for r in k],
        ))  # fmt: skip
    if "earlybird" in measurements:
        e = measurements["earlybird"]
        out.append(compare(
            "spline_fires_before_mask_distance", "You et al. 2020 / You, Balestriero et al. 2022",
            "the spline early bird fires before the mask-distance early bird",
            "detection epoch(mask distance) − detection epoch(spline)", "epochs",
            [None if r["spline_epoch"] is None or r["mask_distance_epoch"] is None
             else r["mask_distance_epoch"] - r["spline_epoch"] for r in e],
        ))  # fmt: skip
    return out


def run(
    config: StudyConfig,
    studies: Iterable[str] = tuple(STUDIES),
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> StudyResult:
    """Runs each study once per seed and derives the comparisons."""
    studies = tuple(studies)
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise ValueError(f"koopfast.study.run: expected studies among {tuple(STUDIES)}, got {unknown}")
    wrap = progress or (lambda it, desc: it)
    start = time.perf_counter()
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    result = StudyResult(config=asdict(config), seeds=seeds)
    for name in studies:
        result.measurements[name] = [STUDIES[name](config, seed) for seed in wrap(seeds, name)]
    result.comparisons = comparisons(result.measurements)
    result.seconds = time.perf_counter() - start
    return result


# ---- output --------------------------------------------------------------------------------------------


def _number(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:+.{digits}f}".replace("-", "−")


def markdown(result: StudyResult) -> str:
    """The table: one row per comparison."""
    lines = [
        f"Seeds {result.seeds[0]}–{result.seeds[-1]} ({len(result.seeds)}); 95 % confidence intervals of the mean "
        f"from Student's t over seeds (mean ± t(0.975, n−1)·s/√n); scikit-learn's digits"
        f"{' (--quick sizes)' if result.config['quick'] else ''}.",
        "",
        "| comparison | paper | quantity (unit) | mean | 95 % CI | n | per seed | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result.comparisons:
        seeds = ", ".join(_number(v, 0 if c.unit == "epochs" else 3) for v in c.per_seed)
        cells = [c.claim, c.paper, f"{c.quantity} ({c.unit})", _number(c.mean),
                 f"[{_number(c.low)}, {_number(c.high)}]", str(c.n), seeds, c.verdict]  # fmt: skip
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")  # |θg| is not a cell edge
    return "\n".join(lines) + "\n"


def rounded(value, digits: int = 6):
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def as_json(result: StudyResult) -> dict:
    data = rounded(asdict(result))
    for c in data["comparisons"]:  # JSON has no infinity: an unbounded interval end is null
        for key in ("low", "high", "mean"):
            if isinstance(c[key], float) and not math.isfinite(c[key]):
                c[key] = None
    return data


def write(result: StudyResult, out: Path) -> list[Path]:
    """study.md, study.json and the figures in ``out`` (the figures drawn from the JSON's numbers);
    returns the paths written."""
    from koopfast import plots

    out.mkdir(parents=True, exist_ok=True)
    data = as_json(result)
    paths = [out / "study.md", out / "study.json"]
    paths[0].write_text(markdown(result))
    paths[1].write_text(json.dumps(data, indent=2, allow_nan=False))
    return paths + plots.study_figures(data, out)
