"""Masks: selection from scores, packed storage, application, training, structure, reports, files.

Scores are "higher = keep"; masks are bool tensors (True = keep) or :class:`PackedMask` es (8
elements per byte) in the structure of the scores or parameters they belong to
(``dict[name, ...]`` or a list).

- selection: :func:`global_topk`, :func:`layerwise_topk` (exact counts, deterministic ties) and
  :func:`structured_topk` (whole output units); under them :class:`Selection` (scores as the
  kernels take them, for code that builds its own) with :func:`keep_count` / :func:`resolve_keep`;
  layer budgets: :func:`owl_sparsities` (OWL's
  outlier-weighted per-layer sparsities, for ``layerwise_topk`` or ``WandaScores.masks``);
- storage: :class:`PackedMask`, :func:`pack`, :func:`unpack`; files: :func:`save`, :func:`load`;
  :func:`export_compressed` (pruned weights in the compressed-tensors bitmask format);
- semi-structured: :func:`nm_masks` (N:M, e.g. 2:4, along each layer's inputs) and
  :func:`to_semi_structured` (sparse tensor-core weights where the device has them);
- use: :func:`apply_` (zero pruned entries in place, one fused pass) and :class:`Masked` (keep
  them zero through training, no forward hook, no weight copy; one fused gradient pass per step
  for the optimizers of :data:`ZERO_PRESERVING`);
- inspection: :func:`report` (per-tensor and total sparsity, as data and as a table).
"""

from koopfast.masks.apply import apply_
from koopfast.masks.budgets import block_of, outlier_ratios, owl_sparsities
from koopfast.masks.compressed import CompressedExport, export_compressed
from koopfast.masks.io import load, save
from koopfast.masks.packed import PackedMask, pack, unpack
from koopfast.masks.report import LayerSparsity, SparsityReport, report
from koopfast.masks.selection import Selection, keep_count, resolve_keep
from koopfast.masks.semi_structured import nm_masks, to_semi_structured
from koopfast.masks.structured import structured_topk
from koopfast.masks.topk import global_topk, layerwise, layerwise_topk
from koopfast.masks.training import ZERO_PRESERVING, Masked

__all__ = [
    "ZERO_PRESERVING",
    "CompressedExport",
    "LayerSparsity",
    "Masked",
    "PackedMask",
    "Selection",
    "SparsityReport",
    "apply_",
    "block_of",
    "export_compressed",
    "global_topk",
    "keep_count",
    "layerwise",
    "layerwise_topk",
    "load",
    "nm_masks",
    "outlier_ratios",
    "owl_sparsities",
    "pack",
    "report",
    "resolve_keep",
    "save",
    "structured_topk",
    "to_semi_structured",
    "unpack",
]
