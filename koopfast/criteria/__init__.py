"""Pruning criteria: each returns ``dict[name, Tensor]`` of scores shaped like the parameters,
higher = keep, ready for :func:`koopfast.masks.global_topk`.
"""

from koopfast.criteria.gradflow import (
    GradientFlow,
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

__all__ = [
    "GradientFlow",
    "KoopmanScores",
    "biased_loss_preservation",
    "cross_entropy",
    "fisher",
    "gradient_flow",
    "gradient_norm_preservation",
    "grasp",
    "koopman_gradient",
    "koopman_magnitude",
    "loss_preservation",
    "magnitude",
]
