"""Export of pruned weights in the compressed-tensors ``sparse-bitmask`` format, the format that
llm-compressor writes and the serving stacks reading compressed-tensors checkpoints load.

Each compressed weight ``<module>.weight`` of shape [rows, cols] becomes four tensors
(compressed-tensors' ``BitmaskCompressor`` and ``BitmaskTensor``,
compressed_tensors/compressors/sparse_compressors/sparse_bitmask.py, releases up to 0.14):

- ``<module>.compressed``: the nonzero values in row-major order, 1-D, the weight's dtype;
- ``<module>.bitmask``: uint8 [rows, ceil(cols / 8)], ``numpy.packbits(w != 0, axis=-1,
  bitorder="little")``: bit i of byte j of a row is column 8j + i, each row padded to whole bytes;
- ``<module>.shape``: int64 [2], the dense shape;
- ``<module>.row_offsets``: int64 [rows], the index in ``compressed`` where each row starts.

Every other tensor is stored as it is. The configuration their loader reads
(``ModelCompressor.from_compression_config``; ``config.json``'s ``quantization_config`` in a
Hugging Face checkpoint) names the format, the compressed modules as ``targets``, the fraction of
zeros among them as ``global_sparsity`` and ``sparsity_structure`` ("2:4" when every compressed
weight keeps at most 2 of each 4 consecutive entries of its rows, else "unstructured").

As in their compressor, the bitmask marks the *nonzero* entries of the masked weight, so a kept
weight that is exactly zero is stored as absent (it decompresses to +0.0: a kept -0.0 loses its
sign, nothing else changes). Releases after 0.14 dropped the sparse compressors; the format is the
one their 0.14 release writes and reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from koopfast.masks.packed import PackedMask

__all__ = ["FORMAT", "CompressedExport", "export_compressed"]

FORMAT = "sparse-bitmask"
# The compressed-tensors release whose BitmaskCompressor this module reproduces (written as the
# config's "version"; their loader reads and discards it).
REFERENCE_VERSION = "0.14.0.1"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUFFIXES = ("compressed", "bitmask", "shape", "row_offsets")


@dataclass
class CompressedExport:
    """What :func:`export_compressed` produced.

    Attributes:
        tensors: the compressed state dict (CPU tensors), the contents of ``model.safetensors``.
        config: the compression config: ``{"quant_method": "compressed-tensors", "version": ...,
            "sparsity_config": {...}, ...}``, the ``quantization_config`` entry of ``config.json``.
        files: the files written (empty when no folder was given).
    """

    tensors: dict[str, Tensor]
    config: dict[str, Any]
    files: list[str] = field(default_factory=list)


def export_compressed(
    model_or_state: nn.Module | Mapping[str, Tensor],
    masks: Mapping[str, Tensor | PackedMask],
    out: str | os.PathLike[str] | MutableMapping[str, Tensor] | None = None,
) -> CompressedExport:
    """Compresses the weights named in ``masks`` (``<module>.weight`` keys of the state dict,
    2-D) as ``weight * mask`` in the bitmask format; other tensors pass through unchanged.

    Args:
        model_or_state: a model (its ``state_dict()`` is read) or a state dict.
        masks: weight name -> bool mask (True = keep) or :class:`PackedMask` of the weight's shape.
        out: a folder (created if needed) to write ``model.safetensors`` and ``config.json``
            into (a Hugging Face model's own config is written with ``quantization_config``
            added), or a dict to fill with the compressed tensors, or None.

    Returns:
        :class:`CompressedExport`. Nothing is written or filled when an argument is invalid.
    """
    fn = "koopfast.masks.export_compressed"
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        state = dict(model_or_state)
    else:
        raise TypeError(
            f"{fn}: expected model_or_state to be an nn.Module or a state dict, got {type(model_or_state).__name__}"
        )
    if not isinstance(masks, Mapping) or not masks:
        raise TypeError(
            f"{fn}: expected masks as a non-empty dict of weight name -> mask, got "
            f"{type(masks).__name__ if not isinstance(masks, Mapping) else 'an empty dict'}"
        )
    if out is not None and not isinstance(out, (str, os.PathLike, MutableMapping)):
        raise TypeError(f"{fn}: expected out to be a folder path, a dict or None, got {type(out).__name__}")

    bools = _checked_masks(state, masks, fn)
    produced = {f"{name[: -len('.weight')]}.{suffix}" for name in bools for suffix in _SUFFIXES}
    collisions = sorted(produced & (state.keys() - bools.keys()))
    if collisions:
        raise ValueError(f"{fn}: the compressed keys {collisions} would overwrite tensors of the same name")
    tensors: dict[str, Tensor] = {}
    zeros = total = 0
    two_four = True
    for name, value in state.items():
        if name not in bools:
            tensors[name] = value.detach().cpu()
            continue
        w = value.detach()
        kept = torch.where(bools[name].to(w.device), w, torch.zeros((), dtype=w.dtype, device=w.device))
        present = kept != 0
        prefix = name[: -len(".weight")]
        counts = present.sum(dim=-1)
        tensors[f"{prefix}.shape"] = torch.tensor(list(w.shape))
        tensors[f"{prefix}.compressed"] = kept[present].cpu()
        tensors[f"{prefix}.bitmask"] = _row_packed(present).cpu()
        tensors[f"{prefix}.row_offsets"] = (torch.cumsum(counts, 0) - counts).cpu()
        zeros += w.numel() - int(counts.sum())
        total += w.numel()
        two_four = two_four and _keeps_two_of_four(present)

    sparsity_config = {
        "format": FORMAT,
        "targets": sorted(name[: -len(".weight")] for name in bools),
        "ignore": None,
        "global_sparsity": zeros / total if total else 0.0,
        "sparsity_structure": "2:4" if two_four else "unstructured",
    }
    config = {
        "quant_method": "compressed-tensors",
        "version": REFERENCE_VERSION,
        "sparsity_config": sparsity_config,
        "transform_config": {},
    }
    result = CompressedExport(tensors, config)
    if isinstance(out, MutableMapping):
        out.update(tensors)
    elif out is not None:
        result.files = _write(os.fspath(out), tensors, config, model_or_state)
    return result


def _checked_masks(state: Mapping[str, Tensor], masks: Mapping[str, Tensor | PackedMask], fn: str) -> dict[str, Tensor]:
    """Bool masks by name, after every check (nothing is produced if one fails)."""
    out = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not name.endswith(".weight"):
            raise ValueError(f"{fn}: expected mask names of weights ('<module>.weight'), got {name!r}")
        if name not in state:
            raise KeyError(f"{fn}: expected mask names among the state dict's keys, got {name!r}")
        w = state[name]
        if w.dim() != 2:
            raise ValueError(
                f"{fn}: expected 2-D weights (the bitmask format stores rows), got {name!r} of shape {list(w.shape)}"
            )
        if w.dtype not in _FLOATS:
            raise TypeError(f"{fn}: expected {name!r} to be float16, bfloat16, float32 or float64, got {w.dtype}")
        if isinstance(mask, PackedMask):
            mask = mask.unpack()
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{fn}: expected the mask of {name!r} to be bool of shape {list(w.shape)}, got {got}")
        out[name] = mask
    return out


def _row_packed(present: Tensor) -> Tensor:
    """numpy.packbits(present, axis=-1, bitorder="little"): each row padded to whole bytes, packed
    by koopfast's kernel (its flat little-endian order is the same once rows are padded)."""
    rows, cols = present.shape
    width = -(-cols // 8) * 8
    padded = present if width == cols else torch.nn.functional.pad(present, (0, width - cols))
    return PackedMask.from_bool(padded.contiguous()).bits.view(rows, width // 8)


def _keeps_two_of_four(present: Tensor) -> bool:
    rows, cols = present.shape
    return cols % 4 == 0 and bool((present.reshape(rows, -1, 4).sum(-1) <= 2).all())


def _write(folder: str, tensors: dict[str, Tensor], config: dict[str, Any], source: Any) -> list[str]:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    # safetensors refuses tensors sharing memory (tied weights): store each storage's later names as copies.
    seen: set[tuple[int, object]] = set()
    flat = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (0, id(v))
        flat[k] = v.contiguous() if key not in seen else v.clone().contiguous()
        seen.add(key)
    weights = os.path.join(folder, "model.safetensors")
    save_file(flat, weights, metadata={"format": "pt"})
    to_dict = getattr(getattr(source, "config", None), "to_dict", None)  # a Hugging Face model's config
    document: dict[str, Any] = dict(to_dict()) if callable(to_dict) else {}
    document["quantization_config"] = config
    path = os.path.join(folder, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, sort_keys=True, default=str)
    return [weights, path]
