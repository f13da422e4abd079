"""Pruning criteria: each returns ``dict[name, Tensor]`` of scores shaped like the parameters,
higher = keep, ready for :func:`koopfast.masks.global_topk`.
"""

from koopfast.criteria.koopman import KoopmanScores, koopman_gradient, koopman_magnitude
from koopfast.criteria.magnitude import magnitude

__all__ = ["KoopmanScores", "koopman_gradient", "koopman_magnitude", "magnitude"]
