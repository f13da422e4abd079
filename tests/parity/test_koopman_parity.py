"""KMP with ShrinkBench's threshold against an independent float64 transcription of the Koopman
pruning authors' math (william-redman/Koopman_pruning: koopman_tools.py ExactDMD,
koopman_magnitude_pruning.py KoopGlobalMagWeight; JJGO/shrinkbench: strategies/utils.py,
pruning/vision.py), on a BatchNorm convnet and an MLP learning digits: bit-identical masks.

The transcription is written from their formulas, not from koopfast: W is collected by flattening
the parameters whose names contain "linear" or "conv" after every step (their train.py addition),
the DMD is a float64 thin SVD of X, and the masks come from ``np.quantile`` and their comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import koopfast as kf
from koopfast import _digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread trains them faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvNet(nn.Module):
    """Conv → BN → ReLU twice, a hidden linear layer and a flagged classifier (ShrinkBench's way)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.linear1 = nn.Linear(8 * 4 * 4, 32)
        self.linear2 = nn.Linear(32, 10)
        self.linear2.is_classifier = True

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8))))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.linear2(torch.relu(self.linear1(x.flatten(1))))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear1 = nn.Linear(64, 48)
        self.linear2 = nn.Linear(48, 24)
        self.linear3 = nn.Linear(24, 10)
        self.linear3.is_classifier = True

    def forward(self, x):
        return self.linear3(torch.relu(self.linear2(torch.relu(self.linear1(x)))))


def their_flat_params(model) -> np.ndarray:
    """Their train.py addition: named parameters with "linear" or "conv" in the name, flattened."""
    return torch.cat(
        [p.detach().reshape(-1) for n, p in model.named_parameters() if "linear" in n or "conv" in n]
    ).numpy()


def record(model, warmup: int, steps: int):
    split = _digits.load(seed=0)
    opt = _digits.train(model, split, steps=warmup, seed=5)
    rec = kf.TrajectoryRecorder(model, capacity=steps)
    columns = []

    def after(_):
        rec.record()
        columns.append(their_flat_params(model))

    _digits.train(model, split, steps=steps, seed=0, optimizer=opt, after_step=after)
    return rec, np.stack(columns, axis=1)  # W: N × T, float32 as they store it


def their_fixed_point(w: np.ndarray) -> np.ndarray:
    """ExactDMD (Tu et al. 2014) in float64: φ = λ⁻¹ Y V Σ⁻¹ w for argmin |λ − 1|, then
    np.float32(φ) (the real part) and np.abs, as KoopGlobalMagWeight.model_masks does."""
    w64 = torch.from_numpy(w).double()
    x, y = w64[:, :-1], w64[:, 1:]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    a_tilde = u.T @ y @ vh.T @ torch.diag(1 / s)
    lam, vecs = torch.linalg.eig(a_tilde)
    i = int(torch.argmin((lam - 1).abs()))
    phi = (1 / lam[i]) * ((y @ vh.T @ torch.diag(1 / s)).to(torch.complex128) @ vecs[:, i])
    return np.abs(phi.real.numpy().astype(np.float32))


def their_masks(model, abs_fixed_pt: np.ndarray, fraction: float) -> dict[str, np.ndarray]:
    """fraction_threshold over the whole fixed point, map_fixed_pt_importances onto the prunable
    modules (weight, then bias) in module order, threshold_mask; unprunable modules unmasked."""
    threshold = np.quantile(abs_fixed_pt, np.float64(1 - fraction))  # NumPy 1.x: a float64 quantile
    threshold = np.float32(threshold)  # ... which NumPy 1.x casts to the float32 array's dtype
    masks, counter = {}, 0
    for module_name, module in model.named_modules():
        prunable = (
            not module.is_classifier if hasattr(module, "is_classifier") else isinstance(module, (nn.Linear, nn.Conv2d))
        )
        if not prunable:
            continue
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if p is None:
                continue
            imp = abs_fixed_pt[counter : counter + p.numel()].reshape(p.shape)
            counter += p.numel()
            masks[f"{module_name}.{attr}"] = ~np.logical_and(imp < threshold, imp > -threshold)
    return masks


@pytest.mark.parametrize("make, warmup, steps", [(ConvNet, 60, 30), (MLP, 200, 40)])
def test_shrinkbench_preset_masks_are_bit_identical_to_the_authors(make, warmup, steps):
    model = make()
    rec, w = record(model, warmup, steps)
    names = [n for n, _ in model.named_parameters() if "linear" in n or "conv" in n]
    assert list(rec.names) == names  # the same tensors, in the same order, as their W
    theirs = their_fixed_point(w)
    kmp = kf.criteria.koopman_magnitude(kf.DMD().fit(rec), preset="shrinkbench")
    ours = torch.cat([v.reshape(-1) for v in kmp.values()]).numpy()
    # The scores agree to float64 rounding before the float32 cast (a few % of them land one
    # float32 ulp apart, or ~1e-8 of the largest for the smallest scores); the masks exactly.
    assert np.abs(ours - theirs).max() <= 1e-6 * theirs.max()
    for fraction in (0.5, 0.2, 0.1, 0.05):
        expected = their_masks(model, theirs, fraction)
        got = kf.criteria.shrinkbench_masks(kmp, fraction=fraction, model=model)
        classifier = [n for n in got if n not in expected]
        assert classifier and all(bool(got[n].all()) for n in classifier)  # kept whole, as ShrinkBench does
        for name, mask in expected.items():
            assert np.array_equal(got[name].numpy(), mask), (fraction, name)


def test_threshold_convention_on_ties_and_edges():
    """Ties at the threshold are all kept (non-strict ≥), the threshold is NumPy's linear
    quantile over every scored tensor, and fraction 1 keeps everything; sparsity = 1 − fraction."""
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a.weight": (torch.randint(0, 5, (7, 5), generator=gen) / 4).float(),
        "b.weight": (torch.randint(0, 5, (13,), generator=gen) / 4).float(),
    }
    flat = torch.cat([v.reshape(-1) for v in scores.values()]).numpy()
    for fraction in (0.0, 0.3, 0.5, 0.77, 1.0):
        t = np.float32(np.quantile(flat, np.float64(1 - fraction)))
        masks = kf.criteria.shrinkbench_masks(scores, fraction=fraction)
        kept = np.concatenate([m.reshape(-1).numpy() for m in masks.values()])
        assert np.array_equal(kept, flat >= t)
        assert kf.criteria.shrinkbench_threshold(scores.values(), fraction) == float(t)
    assert all(bool(m.all()) for m in kf.criteria.shrinkbench_masks(scores, sparsity=0.0).values())
    half = kf.criteria.shrinkbench_masks(scores, sparsity=0.5)
    assert sum(int(m.sum()) for m in half.values()) > round(0.5 * flat.size)  # ties kept: more than half
    with pytest.raises(ValueError, match=r"shrinkbench_masks: expected exactly one of sparsity and fraction"):
        kf.criteria.shrinkbench_masks(scores, sparsity=0.5, fraction=0.5)
    with pytest.raises(ValueError, match=r"shrinkbench_masks: expected sparsity to be a float in \[0, 1\], got 2"):
        kf.criteria.shrinkbench_masks(scores, sparsity=2)
    with pytest.raises(TypeError, match=r"expected float32 scores .* got torch.float64 for 'a.weight'"):
        kf.criteria.shrinkbench_masks({"a.weight": scores["a.weight"].double()}, sparsity=0.5)
    with pytest.raises(ValueError, match=r"expected scores without NaN, got NaN in 'b.weight'"):
        kf.criteria.shrinkbench_masks({**scores, "b.weight": torch.full((3,), float("nan"))}, sparsity=0.5)


def test_shrinkbench_prunable_follows_vision_pruning():
    net = ConvNet()
    assert kf.criteria.shrinkbench_prunable(net) == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "linear1.weight",
        "linear1.bias",
    ]
    seq = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert kf.criteria.shrinkbench_prunable(seq) == ["1.weight", "1.bias"]  # Conv1d is not a Conv2d
