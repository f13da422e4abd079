"""Saving and loading masks, bit-packed: 1/8 of the size of bool masks, 1/32 of float32 ones."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO

import torch
from torch import Tensor

from koopfast.masks.packed import PackedMask, pack, unpack

__all__ = ["FORMAT", "VERSION", "load", "save"]

FORMAT = "koopfast.masks"
VERSION = 1

PathLike = str | os.PathLike | IO[bytes]


def save(masks: Mapping[str, Tensor | PackedMask], path: PathLike) -> None:
    """Write masks to ``path`` (a file name or a binary file object) in bit-packed form.

    The file is a ``torch.save`` of plain data: ``{"format": "koopfast.masks", "version": 1,
    "names": [...], "shapes": [[...], ...], "bits": [uint8 tensors on the CPU]}``, each ``bits``
    entry in the packed format of :mod:`koopfast.masks.packed` (numpy.packbits, little bit
    order), so it can be read with ``torch.load(path, weights_only=True)`` alone.

    Args:
        masks: ``dict[name, mask]`` of bool tensors and :class:`PackedMask` es (any devices).
    """
    fn = "koopfast.masks.save"
    if not isinstance(masks, Mapping):
        raise TypeError(f"{fn}: expected masks as a dict of named masks, got {type(masks).__name__}")
    for name in masks:
        if not isinstance(name, str):
            raise TypeError(f"{fn}: expected mask names to be strings, got {type(name).__name__} {name!r}")
    try:
        packed = pack(masks)
    except TypeError as exc:
        raise TypeError(str(exc).replace("koopfast.masks.pack", fn)) from None
    state = {
        "format": FORMAT,
        "version": VERSION,
        "names": list(packed),
        "shapes": [list(p.shape) for p in packed.values()],
        "bits": [p.bits.cpu() for p in packed.values()],
    }
    torch.save(state, path)


def load(
    path: PathLike, *, device: torch.device | str | None = None, packed: bool = False
) -> dict[str, Tensor] | dict[str, PackedMask]:
    """Read masks written by :func:`save`.

    Args:
        path: file name or binary file object.
        device: where to put the masks (default: the CPU).
        packed: return :class:`PackedMask` es instead of bool tensors.

    Returns:
        ``dict[name, mask]`` in the order they were saved.

    Raises:
        ValueError: not a koopfast masks file, an unknown format version, or inconsistent content.
    """
    fn = "koopfast.masks.load"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{fn}: expected a koopfast masks file (format {FORMAT!r}), got {got!r}")
    if state.get("version") != VERSION:
        raise ValueError(f"{fn}: expected masks file version {VERSION}, got {state.get('version')!r}")
    names, shapes, bits = state.get("names"), state.get("shapes"), state.get("bits")
    if not (isinstance(names, list) and isinstance(shapes, list) and isinstance(bits, list)) or not (
        len(names) == len(shapes) == len(bits)
    ):
        raise ValueError(f"{fn}: expected equally long lists of names, shapes and bits, got a damaged file")
    out: dict[str, PackedMask] = {}
    for name, shape, b in zip(names, shapes, bits):
        try:
            out[name] = PackedMask(b if device is None else b.to(device), torch.Size(shape))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{fn}: expected mask {name!r} to match its shape {shape}: {exc}") from None
    return out if packed else unpack(out)
