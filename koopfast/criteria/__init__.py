"""Pruning criteria: each returns ``dict[name, Tensor]`` of scores shaped like the parameters,
higher = keep, ready for :func:`koopfast.masks.global_topk`; structured criteria
(:func:`spline_redundancy`) score output units: ``Tensor[units]`` per weight name.
"""

from koopfast.criteria.accumulate import AccumulatedScores, ScoreAccumulator
from koopfast.criteria.gradflow import (
    FlowAndPrune,
    GradientFlow,
    GradientFlowScores,
    biased_loss_preservation,
    cross_entropy,
    fisher,
    gradient_flow,
    gradient_norm_preservation,
    grasp,
    loss_preservation,
)
from koopfast.criteria.koopman import KoopmanScores, koopman_gradient, koopman_magnitude
from koopfast.criteria.magnitude import magnitude
from koopfast.criteria.per_unit import per_unit
from koopfast.criteria.shrinkbench import shrinkbench_masks, shrinkbench_prunable, shrinkbench_threshold
from koopfast.criteria.spline import SplineScores, fold_batchnorm, spline_redundancy
from koopfast.criteria.wanda import WandaScores, wanda

__all__ = [
    "AccumulatedScores",
    "FlowAndPrune",
    "GradientFlow",
    "GradientFlowScores",
    "KoopmanScores",
    "ScoreAccumulator",
    "SplineScores",
    "WandaScores",
    "biased_loss_preservation",
    "cross_entropy",
    "fisher",
    "fold_batchnorm",
    "gradient_flow",
    "gradient_norm_preservation",
    "grasp",
    "koopman_gradient",
    "koopman_magnitude",
    "loss_preservation",
    "magnitude",
    "per_unit",
    "shrinkbench_masks",
    "shrinkbench_prunable",
    "shrinkbench_threshold",
    "spline_redundancy",
    "wanda",
]
