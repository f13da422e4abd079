"""Type aliases shared by the public modules."""

from __future__ import annotations

from typing import Literal

# How a score is computed from one operand a, or two operands (a, b), inside the selection kernels.
ScoreBy = Literal["value", "abs", "product", "abs_product", "square_times_abs"]
UNARY_SCORES: tuple[str, ...] = ("value", "abs")
BINARY_SCORES: tuple[str, ...] = ("product", "abs_product", "square_times_abs")
