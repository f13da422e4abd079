"""Masks: selection from scores, packed storage, application, training, structure, reports, files.

Scores are "higher = keep"; masks are bool tensors (True = keep) or :class:`PackedMask` (8 per
byte) in the structure of the scores or parameters they belong to (``dict[name, ...]`` or list).
"""

from koopfast.masks.topk import global_topk, keep_count, layerwise_topk

__all__ = ["global_topk", "keep_count", "layerwise_topk"]
