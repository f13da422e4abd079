"""Layer budgets: how much of each layer to prune for a target overall sparsity.

Three budgets, all selected by the same kernel: uniform (every tensor at the target:
:func:`koopfast.masks.layerwise_topk` with a float, or ``WandaScores.masks(s)`` per output
unit), global (one threshold over all tensors: :func:`koopfast.masks.global_topk`), and
outlier-weighted layerwise sparsity, :func:`owl_sparsities` (OWL, Yin et al., ICML 2024), whose
per-tensor sparsities go to ``layerwise_topk(scores, sparsities)`` or ``WandaScores.masks(sparsities)``.

OWL, as in the authors' code (luuyin/OWL, lib/prune_all.py, ``prune_wanda_outlier``): the scores
of all linear layers of one decoder block form one group; the group's outlier ratio D is the
percentage of its scores above ``m`` times their mean; the ratios are mapped linearly onto
[0, 2·lam] (min to 0, max to 2·lam) and shifted so that their mean is the target density 1 − s;
each block is pruned at sparsity 1 − (its density), so sparsities run from s − lam to s + lam and
blocks with more outliers are pruned less. Differences, both only where blocks differ in size or
the budget leaves [0, 1):
- the shift makes the *parameter-weighted* mean of the sparsities equal ``sparsity`` (so the model
  is pruned by the fraction asked); the authors shift the unweighted mean over blocks, the same
  when every block has the same number of weights (every decoder-only transformer).
  ``weighting="layers"`` reproduces theirs.
- a sparsity outside [0, 1) raises here (lower ``lam``); their code raises a layer at or below 0
  to 0.01 (reproduced with ``weighting="layers"``).
- when every block has the same outlier ratio their code divides by zero; here every block gets
  the target.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor

from koopfast import _distributed as kd

__all__ = ["block_of", "outlier_ratios", "owl_sparsities"]

_INDEX = re.compile(r"^((?:.*?\.)?\d+)(?:\.|$)")


def block_of(name: str) -> str:
    """The decoder block a tensor belongs to: its name up to the first all-digit component
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``, ``0.weight`` -> ``0``); a name
    without one (``lm_head.weight``) is a group of its own."""
    match = _INDEX.match(name)
    return match.group(1) if match else name


def _groups(scores: Mapping[str, Tensor], group: Callable[[str], str] | None, fn: str) -> dict[str, list[str]]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError(f"{fn}: expected scores as a non-empty dict of tensors, got {type(scores).__name__}")
    key = block_of if group is None else group
    out: dict[str, list[str]] = {}
    for name, t in scores.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{fn}: expected {name!r} to be a floating-point tensor, got {got}")
        if kd.any_dtensor([t]):
            raise NotImplementedError(f"{fn}: DTensor scores are not supported; pass full (local) tensors")
        if t.numel() == 0:
            raise ValueError(f"{fn}: expected non-empty score tensors, got {name!r} of shape {list(t.shape)}")
        out.setdefault(str(key(name)), []).append(name)
    return out


def outlier_ratios(
    scores: Mapping[str, Tensor], m: float = 5.0, *, group: Callable[[str], str] | None = None
) -> dict[str, float]:
    """Per group (default: decoder block, :func:`block_of`), the percentage of its scores above
    ``m`` times their mean (OWL's layerwise outlier distribution, with Wanda scores)."""
    fn = "koopfast.masks.outlier_ratios"
    groups = _groups(scores, group, fn)
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
        raise ValueError(f"{fn}: expected m > 0, got {m!r}")
    out = {}
    with torch.no_grad():
        for key, names in groups.items():
            tensors = [scores[n].detach() for n in names]
            count = sum(t.numel() for t in tensors)
            total = sum(t.sum(dtype=torch.float64) for t in tensors)
            if not bool(torch.isfinite(torch.as_tensor(total))):
                raise ValueError(f"{fn}: expected finite scores, got NaN or Inf in group {key!r}")
            threshold = float(total) / count * m
            # compared in float64: the threshold is not rounded to the scores' dtype
            above = sum(int((t.double() > threshold).sum()) for t in tensors)
            out[key] = 100.0 * above / count
    return out


def owl_sparsities(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    lam: float = 0.08,
    m: float = 5.0,
    group: Callable[[str], str] | None = None,
    weighting: Literal["parameters", "layers"] = "parameters",
) -> dict[str, float]:
    """OWL's per-tensor sparsities (name -> sparsity) for the target ``sparsity``, from Wanda (or
    any nonnegative) scores; see the module docstring for the method and the differences.

    Args:
        scores: name -> score tensor (higher = keep), e.g. :func:`koopfast.criteria.wanda`'s.
        sparsity: the target fraction to prune, in [0, 1).
        lam: the half-width λ of the range of sparsities, s ± λ (the authors' ``--Lamda``, 0.08
            for LLaMA at 70 %).
        m: the outlier threshold multiple of the mean score (their ``--Hyper_m``, 5).
        group: name -> group key (default :func:`block_of`: the decoder block).
        weighting: 'parameters' (the weighted mean of the sparsities by tensor size is
            ``sparsity``) or 'layers' (the authors' unweighted mean over groups and 0.01 floor).
    """
    fn = "koopfast.masks.owl_sparsities"
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{fn}: expected sparsity in [0, 1), got {sparsity!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"{fn}: expected lam >= 0, got {lam!r}")
    if weighting not in ("parameters", "layers"):
        raise ValueError(f"{fn}: expected weighting 'parameters' or 'layers', got {weighting!r}")
    groups = _groups(scores, group, fn)
    try:
        ratios = outlier_ratios(scores, m, group=group)
    except (ValueError, TypeError) as exc:
        raise type(exc)(str(exc).replace("koopfast.masks.outlier_ratios", fn)) from None
    keys = list(groups)
    low, high = min(ratios.values()), max(ratios.values())
    spread = [(ratios[k] - low) / (high - low) * 2 * lam if high > low else 0.0 for k in keys]
    sizes = [sum(scores[n].numel() for n in groups[k]) for k in keys]
    if weighting == "parameters":
        mean = sum(s * w for s, w in zip(spread, sizes)) / sum(sizes)
    else:
        mean = sum(spread) / len(spread)
    out = {}
    for k, r in zip(keys, spread):
        s = sparsity + mean - r  # density (1 - sparsity) + r - mean, as a sparsity
        if weighting == "layers" and s <= 0:
            s = 0.01
        if not 0.0 <= s < 1.0:
            raise ValueError(
                f"{fn}: expected every budget in [0, 1), got sparsity {s:.4f} for group {k!r} (lam={lam} is too "
                f"wide for sparsity={sparsity}: lower it)"
            )
        for n in groups[k]:
            out[n] = s
    return out
