"""The gradient-flow measures as strategy objects: one per measure, each knowing its operand, its
per-parameter score, its per-unit reduction and how the selection kernel fuses it.

Every measure is a frozen instance of a small class (in the spirit of Torch-Pruning's importance
classes): ``operand`` names the second operand next to θ (None, ``"grad"`` ḡ, ``"hg"`` Hḡ or
``"grad_sq"`` E[g²]); ``elementwise(θ, b)`` is the unstructured score; ``per_unit(rows, other)`` the
score of each output unit from the units' rows (one row per unit); ``fused`` the ``by=`` of
:func:`koopfast.masks.global_topk` that computes ``elementwise`` inside the selection kernel.
``measure_of(name, variant)`` validates and returns one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from koopfast._types import ScoreBy

__all__ = [
    "ALL_MEASURES",
    "BN_MEASURES",
    "MEASURES",
    "BiasedLossPreservation",
    "Fisher",
    "GradientMeasure",
    "GradientNormPreservation",
    "Grasp",
    "LossPreservation",
    "Magnitude",
    "Nvidia",
    "measure_of",
]

Operand = Literal["grad", "hg", "grad_sq"]


@dataclass(frozen=True)
class GradientMeasure(ABC):
    """One measure: θ and at most one other operand per tensor in, scores (higher = keep) out."""

    name: ClassVar[str]
    operand: ClassVar[Operand | None]
    fused: ClassVar[ScoreBy]  # by= of koopfast.masks.global_topk
    variants: ClassVar[tuple[str, ...]] = ("abs",)
    variant: str = "abs"

    @abstractmethod
    def elementwise(self, theta: Tensor, b: Tensor | None, theta0: Tensor | None = None) -> Tensor:
        """Per-entry scores; ``theta0`` (θ at initialization) only for variants that use it."""

    def per_unit(self, rows: Tensor, other: Tensor | None, rows0: Tensor | None = None) -> Tensor:
        """Scores of the units whose entries are the rows of ``rows`` (``other``, ``rows0`` likewise)."""
        return self.elementwise(rows, other, rows0).sum(1)

    @property
    def needs_hg(self) -> bool:
        return self.operand == "hg"


@dataclass(frozen=True)
class Magnitude(GradientMeasure):
    """|θ|; per unit ‖θ_f‖₂ (the authors' "mag_based"; on BatchNorm scales their "bn", |γ|)."""

    name: ClassVar[str] = "magnitude"
    operand: ClassVar[Operand | None] = None
    fused: ClassVar[ScoreBy] = "abs"

    def elementwise(self, theta: Tensor, b: Tensor | None, theta0: Tensor | None = None) -> Tensor:
        return theta.abs()

    def per_unit(self, rows: Tensor, other: Tensor | None, rows0: Tensor | None = None) -> Tensor:
        norms: Tensor = rows.norm(dim=1)  # Tensor.norm is typed Any in torch's stubs
        return norms


@dataclass(frozen=True)
class LossPreservation(GradientMeasure):
    """|θ g| (SNIP-style); per unit Σ|θg| (their "loss_based"), or |Σθg| with variant "tfo"."""

    name: ClassVar[str] = "loss_preservation"
    operand: ClassVar[Operand | None] = "grad"
    fused: ClassVar[ScoreBy] = "abs_product"
    variants: ClassVar[tuple[str, ...]] = ("abs", "tfo")

    def elementwise(self, theta: Tensor, b: Tensor | None, theta0: Tensor | None = None) -> Tensor:
        assert b is not None  # this measure has an operand: its caller passes it
        return (theta * b).abs()

    def per_unit(self, rows: Tensor, other: Tensor | None, rows0: Tensor | None = None) -> Tensor:
        assert other is not None  # this measure has an operand: its caller passes it
        return (rows * other).sum(1).abs() if self.variant == "tfo" else (rows * other).abs().sum(1)


@dataclass(frozen=True)
class BiasedLossPreservation(GradientMeasure):
    """θ² |g|, per unit the sum (their "biased_loss"); variant "init": |θ − θ₀| |θ g| (their
    distance-from-initialization option, ``--use_init``), θ₀ given to the scores."""

    name: ClassVar[str] = "biased_loss_preservation"
    operand: ClassVar[Operand | None] = "grad"
    fused: ClassVar[ScoreBy] = "square_times_abs"
    variants: ClassVar[tuple[str, ...]] = ("abs", "init")

    def elementwise(self, theta: Tensor, b: Tensor | None, theta0: Tensor | None = None) -> Tensor:
        assert b is not None  # this measure has an operand: its caller passes it
        if self.variant == "init":
            assert theta0 is not None  # variant "init": GradientFlow.scores checked init=
            return (theta - theta0).abs() * (theta * b).abs()
        return theta * theta * b.abs()


@dataclass(frozen=True)
class GradientNormPreservation(GradientMeasure):
    """|θ Hg|; per unit |θ_fᵀ(Hg)_f| (their "grad_preserve", the authors' proposal)."""

    name: ClassVar[str] = "gradient_norm_preservation"
    operand: ClassVar[Operand | None] = "hg"
    fused: ClassVar[ScoreBy] = "abs_product"

    def elementwise(self, theta: Tensor, b: Tensor | None, theta0: Tensor | None = None) -> Tensor:
        assert b is not None  # this measure has an operand: its caller passes it
        return (theta * b).abs()

    def per_unit(self, rows: Tensor, other: Tensor | None, rows0: Tensor | None = None) -> Tensor:
        assert other is not None  # this measure has an operand: its caller passes it
        return (rows * other).sum(1).abs()


@dataclass(frozen=True)
class Grasp(GradientMeasure):
    """θ Hg, signed (the most negative pruned first); per unit θ_fᵀ(Hg)_f (their "grasp")."""

    name: ClassVar[str] = "grasp"
    operand: ClassVar[Operand | None] = "hg"
    fused: ClassVar[ScoreBy] = "product"

    def elementwise(self, theta: Tensor, b: Tensor | None, theta0: Tensor | None = None) -> Tensor:
        assert b is not None  # this measure has an operand: its caller passes it
        return theta * b


@dataclass(frozen=True)
class Fisher(GradientMeasure):
    """θ² E[g_b²]; per unit the sum (their "fisher")."""

    name: ClassVar[str] = "fisher"
    operand: ClassVar[Operand | None] = "grad_sq"
    fused: ClassVar[ScoreBy] = "square_times_abs"

    def elementwise(self, theta: Tensor, b: Tensor | None, theta0: Tensor | None = None) -> Tensor:
        assert b is not None  # this measure has an operand: its caller passes it
        return theta * theta * b


@dataclass(frozen=True)
class Nvidia(Fisher):
    """γ² E[g_γ²] + β² E[g_β²] per channel of a BatchNorm (their "nvidia", Molchanov et al., CVPR
    2019): the Fisher measure of both affine BatchNorm parameters; needs ``source="bn"``."""

    name: ClassVar[str] = "nvidia"


_CLASSES: dict[str, type[GradientMeasure]] = {
    cls.name: cls
    for cls in (Magnitude, LossPreservation, BiasedLossPreservation, GradientNormPreservation, Grasp, Fisher, Nvidia)
}
MEASURES: tuple[str, ...] = tuple(n for n in _CLASSES if n != "nvidia")  # measures of any scored tensor
BN_MEASURES: tuple[str, ...] = ("nvidia",)  # measures of BatchNorm channels (source="bn") only
ALL_MEASURES: tuple[str, ...] = MEASURES + BN_MEASURES


def measure_of(name: str, variant: str, fn: str) -> GradientMeasure:
    """The measure called ``name`` (one of ALL_MEASURES) with its ``variant``, validated."""
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{fn}: expected a measure among {ALL_MEASURES}, got {name!r}")
    if variant not in ("abs", "tfo", "init"):
        raise ValueError(f"{fn}: expected variant 'abs', 'tfo' or 'init', got {variant!r}")
    if variant not in cls.variants:
        owner = {"tfo": "loss_preservation", "init": "biased_loss_preservation"}[variant]
        raise ValueError(f"{fn}: variant {variant!r} applies to {owner} only")
    return cls(variant)
