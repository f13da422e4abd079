"""Bit-packed masks: 8 mask elements per byte, 1/8 of a bool mask and 1/32 of a float32 one.

Format: a mask of n elements is ``ceil(n / 8)`` uint8 bytes; bit i (least significant first) of
byte j is element 8j + i of the mask flattened in row-major order. This is
``numpy.packbits(mask.ravel(), bitorder="little")``, so packed masks are portable and can be
read without koopfast.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import torch
from torch import Tensor

from koopfast import ops

__all__ = ["PackedMask", "pack", "unpack"]


@dataclass(frozen=True, eq=False)
class PackedMask:
    """A bool mask of ``shape`` stored as ``bits``: 1-D uint8, ``ceil(numel / 8)`` bytes."""

    bits: Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if not isinstance(self.bits, Tensor) or self.bits.dtype != torch.uint8 or self.bits.dim() != 1:
            got = (
                f"{self.bits.dtype} of shape {list(self.bits.shape)}"
                if isinstance(self.bits, Tensor)
                else type(self.bits).__name__
            )
            raise TypeError(f"koopfast.masks.PackedMask: expected bits to be a 1-D uint8 tensor, got {got}")
        if self.bits.numel() != (self.numel + 7) // 8:
            raise ValueError(
                f"koopfast.masks.PackedMask: expected {(self.numel + 7) // 8} bytes for shape {list(self.shape)}, "
                f"got {self.bits.numel()}"
            )

    @classmethod
    def from_bool(cls, mask: Tensor) -> PackedMask:
        packed: PackedMask = pack(mask)
        return packed

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.bits.device

    @property
    def nbytes(self) -> int:
        return self.bits.numel()

    def unpack(self) -> Tensor:
        """The bool mask: contiguous, of ``shape``, on ``device``."""
        return ops.unpack_masks([self.bits], [self.numel])[0].view(self.shape)

    def count(self) -> int:
        """The number of kept (True) elements."""
        return int(ops.count_masks([self.bits], [self.numel])[0])

    def to(self, device: torch.device | str) -> PackedMask:
        return PackedMask(self.bits.to(device), self.shape)

    def __repr__(self) -> str:
        return f"PackedMask(shape={list(self.shape)}, device={self.device}, {self.nbytes} bytes)"


MaskLike = Tensor | PackedMask


def _structure(masks: object, fn: str) -> tuple[list[Any], list[Any], str]:
    """(keys, values, kind) of a dict, a list or a single mask."""
    if isinstance(masks, (Tensor, PackedMask)):
        return [None], [masks], "single"
    if isinstance(masks, Mapping):
        return list(masks.keys()), list(masks.values()), "dict"
    if isinstance(masks, Sequence) and not isinstance(masks, str):
        return list(range(len(masks))), list(masks), "list"
    raise TypeError(f"{fn}: expected masks as a dict, a list or a single mask, got {type(masks).__name__}")


_V = TypeVar("_V")


def _rebuild(keys: list[Any], values: list[_V], kind: str) -> _V | dict[Any, _V] | list[_V]:
    if kind == "single":
        return values[0]
    return dict(zip(keys, values)) if kind == "dict" else values


def _by_device(tensors: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


_K = TypeVar("_K", bound=Hashable)


@overload
def pack(masks: MaskLike) -> PackedMask: ...
@overload
def pack(masks: Mapping[_K, MaskLike]) -> dict[_K, PackedMask]: ...
@overload
def pack(masks: Sequence[MaskLike]) -> list[PackedMask]: ...
def pack(
    masks: MaskLike | Mapping[Any, MaskLike] | Sequence[MaskLike],
) -> PackedMask | dict[Any, PackedMask] | list[PackedMask]:
    """Bool masks -> :class:`PackedMask` es, in the same structure (dict, list or single mask).

    One kernel launch per device for all masks; packed masks given are passed through.
    """
    fn = "koopfast.masks.pack"
    keys, values, kind = _structure(masks, fn)
    out: list[Any] = list(values)
    todo: list[int] = []
    for i, (k, v) in enumerate(zip(keys, values)):
        if isinstance(v, PackedMask):
            continue
        if not isinstance(v, Tensor) or v.dtype != torch.bool:
            got = v.dtype if isinstance(v, Tensor) else type(v).__name__
            name = "the mask" if kind == "single" else f"mask {k!r}"
            raise TypeError(f"{fn}: expected {name} to be a bool tensor or a PackedMask, got {got}")
        todo.append(i)
    bools = [values[i] for i in todo]
    for idx in _by_device(bools).values():
        packed = ops.pack_masks([bools[i] for i in idx])
        for i, bits in zip(idx, packed):
            out[todo[i]] = PackedMask(bits, bools[i].shape)
    done: list[PackedMask] = out  # every entry is packed by now
    return _rebuild(keys, done, kind)


@overload
def unpack(masks: MaskLike) -> Tensor: ...
@overload
def unpack(masks: Mapping[_K, MaskLike]) -> dict[_K, Tensor]: ...
@overload
def unpack(masks: Sequence[MaskLike]) -> list[Tensor]: ...
def unpack(
    masks: MaskLike | Mapping[Any, MaskLike] | Sequence[MaskLike],
) -> Tensor | dict[Any, Tensor] | list[Tensor]:
    """:class:`PackedMask` es -> bool masks, in the same structure; bool masks are passed through."""
    keys, values, kind = _structure(masks, "koopfast.masks.unpack")
    out: list[Any] = list(values)
    todo = [i for i, v in enumerate(values) if isinstance(v, PackedMask)]
    packed = [values[i] for i in todo]
    for idx in _by_device([p.bits for p in packed]).values():
        bools = ops.unpack_masks([packed[i].bits for i in idx], [packed[i].numel for i in idx])
        for i, b in zip(idx, bools):
            out[todo[i]] = b.view(packed[i].shape)
    done: list[Tensor] = out  # every entry is a bool tensor by now
    return _rebuild(keys, done, kind)
