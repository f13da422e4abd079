"""Pruning criteria: each returns ``dict[name, Tensor]`` of scores shaped like the parameters,
higher = keep, ready for :func:`koopfast.masks.global_topk`; structured criteria
(:func:`spline_redundancy`) score output units: ``Tensor[units]`` per weight name.
"""

from koopfast.criteria.magnitude import magnitude
from koopfast.criteria.spline import SplineScores, fold_batchnorm, spline_redundancy

__all__ = ["SplineScores", "fold_batchnorm", "magnitude", "spline_redundancy"]
