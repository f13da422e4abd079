"""ShrinkBench's global threshold, as the Koopman pruning authors' code applies it.

The Koopman pruning repository (william-redman/Koopman_pruning, ``koopman_magnitude_pruning.py``,
class ``KoopGlobalMagWeight.model_masks``) builds on ShrinkBench (JJGO/shrinkbench) and takes
three conventions from it, reproduced here exactly:

* **Threshold** (``strategies/utils.py``, ``fraction_threshold``): ``np.quantile(scores, 1 -
  fraction)`` over *every* recorded entry — the whole flattened fixed point, classifier included —
  with NumPy's default "linear" interpolation: position (n − 1)·q in the ascending order, the
  threshold interpolated between its two neighbours as ``_lerp`` does (difference in float32,
  interpolation in float64, from the upper neighbour when the weight is ≥ ½). ``fraction`` is
  ShrinkBench's fraction of prunable entries to keep (``VisionPruning`` derives it from the
  compression ratio); ``sparsity=s`` means ``fraction = 1 − s``.
* **Comparison** (``threshold_mask``): an entry is pruned iff ``-t < score < t``: kept iff
  ``score ≥ t``, ties at the threshold all kept (so more than the fraction may survive). The
  threshold is compared in float32: NumPy 1.x (the code is from 2022) casts the float64 quantile
  to the float32 array's dtype. NaN scores are an error here (NumPy would keep them).
* **Which tensors** (``pruning/vision.py``, ``VisionPruning.can_prune``; ``pruning/abstract.py``,
  ``params``): the weight *and* bias of every ``nn.Linear`` and ``nn.Conv2d`` (subclasses too) —
  or of any module with ``is_classifier = False`` — except modules flagged ``is_classifier =
  True`` (ShrinkBench's models flag their last layer, ``models/head.py``); their masks are all
  True (ShrinkBench leaves them unmasked), although their scores count in the threshold.

One process only (the scores of this process's tensors); the authors' code has no sharded mode.
koopfast's own selection, :func:`koopfast.masks.global_topk`, differs on purpose: exactly
round((1 − s)·N) entries survive (ties broken by position), over exactly the tensors scored.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from koopfast import ops

__all__ = ["shrinkbench_masks", "shrinkbench_prunable", "shrinkbench_threshold"]

_FN = "koopfast.criteria.shrinkbench_masks"


def shrinkbench_prunable(model: nn.Module) -> list[str]:
    """Names of the parameters ShrinkBench prunes in ``model`` (``VisionPruning.can_prune``):
    weights and biases of ``nn.Linear``/``nn.Conv2d`` modules not flagged ``is_classifier``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"koopfast.criteria.shrinkbench_prunable: expected an nn.Module, got {type(model).__name__}")
    names: list[str] = []
    for module_name, module in model.named_modules():
        if hasattr(module, "is_classifier"):
            prunable = not module.is_classifier
        else:
            prunable = isinstance(module, (nn.Linear, nn.Conv2d))
        if prunable:
            prefix = f"{module_name}." if module_name else ""
            names.extend(prefix + p for p, _ in module.named_parameters(recurse=False))
    return names


def shrinkbench_threshold(scores: Iterable[Tensor], fraction: float) -> float:
    """``np.quantile(np.concatenate(scores), 1 - fraction)`` of float32 scores, as NumPy 1.x
    computes it (float64 quantile position and interpolation), rounded to float32 as their
    comparison does. Two order statistics are selected without concatenating the scores."""
    tensors = [t.detach().reshape(-1) for t in scores]
    n = sum(t.numel() for t in tensors)
    if n == 0:
        raise ValueError(f"{_FN}: expected at least one score element, got only empty tensors")
    q = 1.0 - float(fraction)
    position = (n - 1) * q
    if position >= n - 1:
        lo = hi = n - 1
    elif position < 0:
        lo = hi = 0
    else:
        lo = math.floor(position)
        hi = lo + 1
    gamma = position - lo if position < n - 1 else float(n)  # NumPy: virtual index − previous (= −1)

    def ascending(i: int) -> Tensor:  # the i-th smallest (0-based) = the (n − i)-th largest
        return ops.select_threshold(tensors, [], "value", n - i)[0].to(torch.float32)

    below = ascending(lo)
    above = below if hi == lo else ascending(hi)
    diff = float(above - below)  # float32 subtraction, as NumPy's _lerp on float32 values
    # _lerp: from the upper neighbour when the weight is >= 1/2 (keeps the result monotone)
    t = float(above) - diff * (1.0 - gamma) if gamma >= 0.5 else float(below) + diff * gamma
    return float(torch.tensor(t, dtype=torch.float64).to(torch.float32))


def shrinkbench_masks(
    scores: Mapping[str, Tensor],
    sparsity: float | None = None,
    *,
    fraction: float | None = None,
    model: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Masks by ShrinkBench's global threshold (module docstring), as the Koopman pruning code
    makes them from :func:`koopfast.criteria.koopman_magnitude` with ``preset="shrinkbench"``.

    Args:
        scores: name -> float32 scores (higher = keep), every recorded tensor: all of them set the
            threshold.
        sparsity: fraction to prune, in [0, 1]; or ``fraction``, ShrinkBench's fraction to keep
            (exactly one of the two).
        model: if given, only the tensors :func:`shrinkbench_prunable` names are masked; the other
            scored tensors (the classifier) keep every entry. Without it every tensor is masked.

    Returns:
        name -> bool mask (True = keep), in the order of ``scores``.
    """
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"{_FN}: expected a non-empty mapping name -> score tensor, got {type(scores).__name__}")
    if (sparsity is None) == (fraction is None):
        raise ValueError(f"{_FN}: expected exactly one of sparsity and fraction")
    value = sparsity if sparsity is not None else fraction
    which = "sparsity" if sparsity is not None else "fraction"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{_FN}: expected {which} to be a float in [0, 1], got {value!r}")
    keep_fraction = 1.0 - float(value) if sparsity is not None else float(value)
    for name, t in scores.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{_FN}: expected float32 scores (as the authors' np.float32), got {got} for {name!r}")
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{_FN}: expected scores without NaN, got NaN in {name!r}")
    pruned = set(scores) if model is None else set(shrinkbench_prunable(model))
    threshold = torch.tensor(shrinkbench_threshold(scores.values(), keep_fraction), dtype=torch.float32)
    return {
        name: ~((t < threshold) & (t > -threshold)) if name in pruned else torch.ones_like(t, dtype=torch.bool)
        for name, t in scores.items()
    }
