"""Score results: a mapping name -> score tensor that keeps what produced it.

Every criterion returns one (:class:`ScoreMap` or a subclass with typed fields), so the
information behind scores (the Koopman mode used, the spline removal order, the gradient-flow
measure) is not an attribute bolted onto a ``dict`` that ``dict(scores)`` or a comprehension
silently drops. The mapping is what :func:`koopfast.masks.global_topk` and friends take; the ways
to derive new scores — :meth:`ScoreMap.replace`, :meth:`ScoreMap.only`, :meth:`ScoreMap.to` —
return the same type with the same fields, and copying or pickling keeps them too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, TypeVar

from torch import Tensor

__all__ = ["ScoreMap"]

S = TypeVar("S", bound="ScoreMap")


class ScoreMap(MutableMapping[str, Tensor]):
    """``MutableMapping[str, Tensor]`` of scores (higher = keep) from one criterion: a dict in use
    (``pop``, ``update``, item assignment), whose fields stay with it.

    Attributes:
        criterion: the criterion that produced the scores, e.g. ``"magnitude"``.
    """

    criterion: str

    def __init__(self, scores: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = (), *, criterion: str = ""):
        tensors = dict(scores)
        for name, t in tensors.items():
            _check_item(name, t)
        self._tensors = tensors
        self.criterion = criterion

    # -- Mapping ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __setitem__(self, name: str, scores: Tensor) -> None:
        _check_item(name, scores)
        self._tensors[name] = scores

    def __delitem__(self, name: str) -> None:
        del self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._fields().items() if not isinstance(v, (dict, Mapping)))
        names = list(self._tensors)[:4] + (["..."] if len(self) > 4 else [])
        return f"{type(self).__name__}({len(self)} tensors {names}; {fields})"

    # -- derived scores, same type and fields --------------------------------------------------------
    def replace(self: S, scores: Mapping[str, Tensor]) -> S:
        """These fields with other tensors (e.g. scores post-processed by the caller)."""
        out = copy.copy(self)
        ScoreMap.__init__(out, scores, criterion=self.criterion)
        return out

    def only(self: S, names: Iterable[str]) -> S:
        """The scores of ``names`` only (in that order); an unknown name raises KeyError."""
        names = list(names)
        missing = [n for n in names if n not in self._tensors]
        if missing:
            raise KeyError(f"koopfast.ScoreMap.only: no scores named {missing}; names: {list(self._tensors)}")
        return self.replace({n: self._tensors[n] for n in names})

    def map(self: S, fn: Callable[[Tensor], Tensor]) -> S:
        """``fn`` applied to every score tensor."""
        return self.replace({n: fn(t) for n, t in self._tensors.items()})

    def to(self: S, *args: Any, **kwargs: Any) -> S:
        """Every score tensor moved/cast with :meth:`torch.Tensor.to`."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def _fields(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "_tensors"}

    def __copy__(self: S) -> S:
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out._tensors = dict(self._tensors)
        return out

    # ScoreMap holds tensors: torch.save/pickle keep the class and every field.
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _check_item(name: object, scores: object) -> None:
    if not isinstance(name, str) or not isinstance(scores, Tensor):
        raise TypeError(
            f"koopfast.ScoreMap: expected str names and Tensor scores, got {type(name).__name__} -> "
            f"{type(scores).__name__}"
        )
