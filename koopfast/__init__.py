"""koopfast: fast neural-network pruning criteria on C++/CUDA kernels registered as torch ops.

Importing koopfast loads its compiled core (registering ``torch.ops.koopfast``) after torch.
"""

from typing import Any

from koopfast._loader import load_extension as _load_extension

_C = _load_extension()

from koopfast import criteria, earlybird, masks, ops, prunable, prune, reference, scores, structure  # noqa: E402  (after the core)
from koopfast.dmd import DMD  # noqa: E402
from koopfast.earlybird import EarlyBird  # noqa: E402
from koopfast.scores import ScoreMap  # noqa: E402
from koopfast.trajectory import TrajectoryRecorder  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """What the compiled core was built with: ``backends`` (``["cpu"]`` or ``["cpu", "cuda"]``),
    ``openmp`` (the ``_OPENMP`` date or None), ``cuda_version``, ``cuda_archs`` (CMake's list),
    ``torch_version`` (must equal ``torch.__version__``) and ``compiler``."""
    return dict(_C.build_info())


__all__ = [
    "DMD",
    "EarlyBird",
    "ScoreMap",
    "TrajectoryRecorder",
    "__version__",
    "build_info",
    "criteria",
    "earlybird",
    "masks",
    "ops",
    "prunable",
    "prune",
    "reference",
    "scores",
    "structure",
]
