"""Wanda (Sun et al., ICLR 2024): score |W_ij| · ‖X_j‖₂, with X_j the j-th input feature of the
layer over every calibration token, compared within each output unit (a row of a Linear weight,
a column of a Hugging Face ``Conv1D``).

The input-feature norms are accumulated by forward pre-hooks in constant memory: one float64
running sum of squares per input channel, whatever the number of calibration batches; nothing
per batch is kept. Distributed: with ``process_group`` (data parallel) or DTensor weights (FSDP2,
``Shard(0)``), the sums of squares are all-reduced over the group, so every rank scores with the
norms of all ranks' tokens; a sharded Linear weight's local rows are scored locally.

Where this differs from the authors' released code (wanda/lib/prune.py, ``prune_wanda``):
- Their code prunes decoder blocks one after another, feeding each block the outputs of the
  blocks already pruned; here all layers are scored from one pass over the dense model (the
  one-shot form of the paper's Algorithm 1). For sequential pruning, call :func:`wanda` per block.
- Their norm is divided by the number of calibration samples (``scaler_row`` is a running mean
  of ‖X_j‖² over samples): a constant shared by all layers, so no ranking changes.
- Their per-row selection sorts ascending with a stable sort and prunes the first
  ``int(columns · sparsity)``: among equal scores the *lower* index is pruned. :meth:`WandaScores.masks`
  keeps ``round((1 − sparsity) · columns)`` entries and, among equal scores, the lower index is
  *kept* (koopfast's tie rule everywhere). Ties of |W|·‖X‖ are rare in real weights.
- Their code prunes the linear layers inside the decoder blocks only (not ``lm_head``); here every
  Linear/Conv1D weight that :func:`koopfast.prunable.prunable` lists is scored unless ``params``
  names a subset (a tied ``lm_head`` is never listed: it is the embedding table).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from koopfast import _distributed as kd
from koopfast import ops
from koopfast._probe import eval_mode, model_device
from koopfast.masks import keep_count
from koopfast.prunable import Prunable, is_hf_conv1d, prunable, resolve_names
from koopfast.scores import ScoreMap

__all__ = ["WandaScores", "wanda"]

Forward = Callable[[nn.Module, Any], Any]


class WandaScores(ScoreMap):
    """Wanda scores, weight name -> float32 tensor shaped like the weight (higher = keep).

    Attributes:
        input_norms: weight name -> float64 ``Tensor[in_features]``, ‖X_j‖₂ over every token seen.
        tokens: weight name -> the number of input rows (tokens) each layer saw.
        skipped: module name -> why its weight was not scored (never called, e.g. the output
            projection of ``nn.MultiheadAttention``, whose forward reads the weight directly).
    """

    input_norms: dict[str, Tensor]
    tokens: dict[str, int]
    skipped: dict[str, str]

    def __init__(
        self,
        scores: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = (),
        *,
        input_norms: dict[str, Tensor] | None = None,
        tokens: dict[str, int] | None = None,
        skipped: dict[str, str] | None = None,
        unit_dims: dict[str, int] | None = None,
    ):
        super().__init__(scores, criterion="wanda")
        self.input_norms = input_norms or {}
        self.tokens = tokens or {}
        self.skipped = skipped or {}
        self.unit_dims = unit_dims or {}

    def masks(self, sparsity: float | Mapping[str, float]) -> dict[str, Tensor]:
        """Boolean masks (True = keep) pruning ``sparsity`` of each output unit's weights: the paper's
        per-output comparison groups. Each unit keeps ``round((1 - sparsity) · in_features)`` entries;
        ties keep the lower input index. ``sparsity`` is one fraction for every layer or a dict
        name -> fraction (a layer budget such as :func:`koopfast.masks.owl_sparsities`; names not
        given keep everything)."""
        fn = "koopfast.criteria.WandaScores.masks"
        if isinstance(sparsity, Mapping):
            unknown = sorted(set(sparsity) - set(self))
            if unknown:
                raise ValueError(f"{fn}: expected sparsity keys among the scored weights, got unknown {unknown}")
        out = {}
        for name, s in self.items():
            dim = self.unit_dims.get(name, 0)
            local = kd.local(s)
            if not bool(torch.isfinite(local).all()):
                raise ValueError(f"{fn}: expected finite scores, got NaN or Inf in {name!r}")
            units = local.movedim(dim, 0)
            rows = units.reshape(units.shape[0], math.prod(units.shape[1:]))  # an FSDP2 shard may hold no rows
            fraction = sparsity.get(name, 0.0) if isinstance(sparsity, Mapping) else sparsity
            keep = keep_count(rows.shape[1], fraction, fn=fn)
            mask = _rows_topk(rows, keep).reshape(local.movedim(dim, 0).shape).movedim(0, dim).contiguous()
            out[name] = kd.Layout(None, 0, 1, sharded=True).wrap(mask, s)  # a DTensor again if s is one
        return out


def _rows_topk(rows: Tensor, keep: int) -> Tensor:
    """Bool mask of the ``keep`` largest entries of each row (ties: the lower column index), with
    koopfast's per-tensor selection: one op call for all rows (the same masks as a stable
    descending ``torch.sort`` per row and a scatter, several times faster; bench/RESULTS.md)."""
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return torch.zeros_like(rows, dtype=torch.bool)
    each = list(rows.contiguous().unbind(0))  # contiguous rows: the kernels' fast path
    thresholds, stats = ops.select_threshold_per_tensor(each, [], "value", [keep] * len(each))
    return torch.stack(ops.topk_mask_per_tensor(each, [], "value", thresholds, stats))


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(
        "koopfast.criteria.wanda: expected batches of tensors, dicts of tensors (keyword arguments) or tuples "
        f"(positional arguments), got {type(batch).__name__}; pass forward=(model, batch) -> output"
    )


def wanda(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    params: Iterable[str] | None = None,
    forward: Forward | None = None,
    process_group: Any = None,
) -> WandaScores:
    """Wanda scores of ``model``'s Linear and Hugging Face ``Conv1D`` weights from calibration
    ``batches`` (see the module docstring for the method and how it differs from the authors' code).

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``, ``model(**batch)`` for a
    dict, ``model(*batch)`` for a tuple). The model runs in eval mode without gradients; every
    module's mode is restored after. ``params`` restricts the scored weights (names or aliases).

    Data parallel: with ``process_group`` (or "default"), every process holds the same model and
    runs its own ``batches`` (possibly none); every process gets the scores of all processes'
    batches. A ``DistributedDataParallel`` model is unwrapped (names are the module's; ``forward``
    gets ``model.module``) and uses ``model.process_group`` unless one is given. FSDP2 (DTensor
    ``Shard(0)`` Linear weights) needs no group; every process must then run the same number of
    batches (each forward is collective).
    """
    fn = "koopfast.criteria.wanda"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
    if isinstance(model, DistributedDataParallel):  # replicated: score the module, in DDP's group
        if process_group is None:
            process_group = model.process_group
        model = model.module
    run = _default_forward if forward is None else forward
    layers = _linear_weights(model, params, fn)
    if not layers:
        raise ValueError(f"{fn}: expected a model with Linear or Conv1D layers to score, got none")
    device = model_device(model)
    sums = {name: torch.zeros(_in_features(e), dtype=torch.float64, device=device) for name, e in layers.items()}
    tokens = dict.fromkeys(layers, 0)
    modules = dict(model.named_modules())

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        width = sums[name].numel()

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, Tensor) or x.shape[-1] != width:
                got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{fn}: expected the input of {name!r} to end in {width} features, got {got}")
            rows = x.detach().reshape(-1, width)
            sums[name] += rows.float().square().sum(0, dtype=torch.float64)
            tokens[name] += rows.shape[0]

        return hook

    handles = [modules[e.module_name].register_forward_pre_hook(hook_for(n)) for n, e in layers.items()]
    try:
        with eval_mode(model):
            for batch in batches:
                run(model, batch)
    finally:
        for h in handles:
            h.remove()

    layout = kd.resolve([e.tensor for e in layers.values()], process_group, fn)
    if layout is not None and layout.world > 1:
        names = list(sums)
        flat = torch.cat(
            [sums[n] for n in names] + [torch.tensor([tokens[n] for n in names], dtype=torch.float64, device=device)]
        )
        kd.all_reduce(flat, layout)
        offset = 0
        for n in names:
            sums[n] = flat[offset : offset + sums[n].numel()]
            offset += sums[n].numel()
        tokens = {n: int(c) for n, c in zip(names, flat[offset:].tolist())}

    skipped = {layers[n].module_name or n: "never called on the calibration batches" for n in layers if not tokens[n]}
    if len(skipped) == len(layers):
        raise ValueError(f"{fn}: expected calibration batches with at least one token, got none")
    scores, norms, unit_dims = {}, {}, {}
    with torch.no_grad():
        for name, e in layers.items():
            if not tokens[name]:
                continue
            norm = sums[name].sqrt()
            if not bool(torch.isfinite(norm).all()):
                raise ValueError(f"{fn}: the inputs of {name!r} hold NaN or Inf (or overflow float64 when squared)")
            conv1d = e.units is not None and e.units.dim == 1
            w = kd.local(e.tensor).detach().float().abs()
            if conv1d and kd.any_dtensor([e.tensor]):
                raise NotImplementedError(
                    f"{fn}: {name!r} is a Hugging Face Conv1D weight sharded along its input features; scoring it "
                    "sharded is not supported"
                )
            scale = norm.float().to(w.device)
            local = w * (scale[:, None] if conv1d else scale[None, :])
            scores[name] = layout.wrap(local, e.tensor) if layout is not None else local
            norms[name], unit_dims[name] = norm, 1 if conv1d else 0
    return WandaScores(scores, input_norms=norms, tokens=tokens, skipped=skipped, unit_dims=unit_dims)


def _linear_weights(model: nn.Module, params: Iterable[str] | None, fn: str) -> dict[str, Prunable]:
    entries = prunable(model)
    modules = dict(model.named_modules())
    layers = {
        name: e
        for name, e in entries.items()
        if e.attr == "weight"
        and e.module_name is not None
        and (isinstance(modules[e.module_name], nn.Linear) or is_hf_conv1d(modules[e.module_name]))
        and e.tensor.dim() == 2
    }
    if params is None:
        return layers
    wanted = resolve_names(model, params, fn=fn, what="params")
    outside = [n for n in wanted if n not in layers]
    if outside:
        raise ValueError(f"{fn}: expected params among the Linear/Conv1D weights {list(layers)}, got {outside}")
    return {n: layers[n] for n in wanted}


def _in_features(e: Prunable) -> int:
    """Input features of a Linear ([out, in]) or Conv1D ([in, out]) weight."""
    conv1d = e.units is not None and e.units.dim == 1
    return int(e.tensor.shape[0] if conv1d else e.tensor.shape[1])
