"""Loads the compiled core, koopfast._C, after torch and only if it matches the installed torch."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_REBUILD = (
    "Rebuild koopfast against the installed torch: from a koopfast checkout run\n"
    "  python -m pip install --no-build-isolation --no-deps --force-reinstall .\n"
    "(or `make setup`; see README.md, 'Install')."
)


def load_extension() -> ModuleType:
    try:
        config = importlib.import_module("koopfast._build_config")
    except ImportError as exc:
        raise ImportError(
            "koopfast's compiled core was not found: this koopfast was never built (an import from "
            f"a source tree without an install?). {_REBUILD}"
        ) from exc
    if torch.__version__ != config.TORCH_VERSION:
        raise ImportError(
            f"koopfast was compiled against torch {config.TORCH_VERSION}, but torch "
            f"{torch.__version__} is installed; its kernels would not load or would misbehave. {_REBUILD}"
        )
    try:
        return importlib.import_module("koopfast._C")
    except ImportError as exc:
        raise ImportError(f"koopfast._C failed to load: {exc}. {_REBUILD}") from exc
