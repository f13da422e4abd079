"""Saving and loading masks, bit-packed: 1/8 of the size of bool masks, 1/32 of float32 ones."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from typing import IO

import torch
from torch import Tensor

from koopfast.masks.packed import PackedMask, pack, unpack

__all__ = ["FORMAT", "VERSION", "load", "save"]

FORMAT = "koopfast.masks"
VERSION = 2  # 2: a checksum over names, shapes and bits; files of version 1 (without one) still load

PathLike = str | os.PathLike[str] | IO[bytes]


def _checksum(names: list[str], shapes: list[list[int]], bits: list[Tensor]) -> str:
    """sha256 over every name, shape and packed byte, in order."""
    h = hashlib.sha256()
    for name, shape, b in zip(names, shapes, bits):
        h.update(name.encode("utf-8") + b"\0")
        h.update(struct.pack(f"<{len(shape) + 1}q", len(shape), *shape))
        h.update(b.contiguous().numpy().tobytes())
    return h.hexdigest()


def save(masks: Mapping[str, Tensor | PackedMask], path: PathLike) -> None:
    """Write masks to ``path`` (a file name or a binary file object) in bit-packed form.

    The file is a ``torch.save`` of plain data: ``{"format": "koopfast.masks", "version": 2,
    "names": [...], "shapes": [[...], ...], "bits": [uint8 tensors on the CPU], "checksum":
    sha256 hex}``, each ``bits`` entry in the packed format of :mod:`koopfast.masks.packed`
    (numpy.packbits, little bit order), so it can be read with ``torch.load(path,
    weights_only=True)`` alone; the checksum covers every name, shape and byte, so that
    :func:`load` detects a damaged file.

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
    meta = [n for n, p in packed.items() if p.bits.is_meta]
    if meta:
        raise ValueError(f"{fn}: expected masks that hold values, got {meta[0]!r} on the meta device")
    names = list(packed)
    shapes = [list(p.shape) for p in packed.values()]
    bits = [p.bits.cpu() for p in packed.values()]
    state = {
        "format": FORMAT,
        "version": VERSION,
        "names": names,
        "shapes": shapes,
        "bits": bits,
        "checksum": _checksum(names, shapes, bits),
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
        ValueError: not a koopfast masks file (empty, truncated, another kind of file), an unknown
            format version, inconsistent content (duplicate names, shapes and bits that do not
            match), or a checksum that does not match (a damaged file).
        OSError: the file cannot be opened (FileNotFoundError, PermissionError), as ``open`` raises.
    """
    fn = "koopfast.masks.load"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{fn}: expected a koopfast masks file, got one that cannot be read ({exc})") from exc
    except Exception as exc:  # the unpickler's and the zip reader's errors: not a masks file
        raise ValueError(
            f"{fn}: expected a koopfast masks file, got an empty, truncated or foreign file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{fn}: expected a koopfast masks file (format {FORMAT!r}), got {got!r}")
    version = state.get("version")
    if version not in (1, VERSION):
        raise ValueError(f"{fn}: expected masks file version 1 or {VERSION}, got {version!r}")
    names, shapes, bits = state.get("names"), state.get("shapes"), state.get("bits")
    if not (isinstance(names, list) and isinstance(shapes, list) and isinstance(bits, list)) or not (
        len(names) == len(shapes) == len(bits)
    ):
        raise ValueError(f"{fn}: expected equally long lists of names, shapes and bits, got a damaged file")
    for name, shape, b in zip(names, shapes, bits):
        if not isinstance(name, str):
            raise ValueError(f"{fn}: expected mask names to be strings, got {type(name).__name__}")
        sizes_ok = isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape)
        if not sizes_ok:
            raise ValueError(f"{fn}: expected the shape of {name!r} to be a list of sizes, got {shape!r}")
        if not (isinstance(b, Tensor) and b.dtype == torch.uint8 and b.dim() == 1):
            raise ValueError(f"{fn}: expected the bits of {name!r} to be a 1-D uint8 tensor, got a damaged file")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{fn}: expected each mask name once, got {duplicates} more than once (a damaged file)")
    if version == VERSION and state.get("checksum") != _checksum(names, shapes, bits):
        raise ValueError(f"{fn}: the file's checksum does not match its content: a damaged file")
    out: dict[str, PackedMask] = {}
    for name, shape, b in zip(names, shapes, bits):
        try:
            out[name] = PackedMask(b if device is None else b.to(device), torch.Size(shape))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{fn}: expected mask {name!r} to match its shape {shape}: {exc}") from None
    return out if packed else unpack(out)
