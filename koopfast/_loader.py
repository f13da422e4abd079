"""Loads the compiled core, koopfast._C, after torch and only if it matches the installed torch."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from types import ModuleType

import torch

_REBUILD = (
    "Rebuild koopfast against the installed torch: from a koopfast checkout run\n"
    "  python -m pip install --no-build-isolation --no-deps --force-reinstall .\n"
    "(or `make setup`; see README.md, 'Install')."
)


def _installed_elsewhere() -> Path | None:
    """Where an installed koopfast lives, if that is not the package being imported (a source
    checkout on sys.path before the installed package shadows it)."""
    here = Path(__file__).resolve().parent
    try:
        installed = Path(str(importlib.metadata.distribution("koopfast").locate_file("koopfast"))).resolve()
    except importlib.metadata.PackageNotFoundError:
        return None
    complete = (installed / "__init__.py").exists() and (installed / "_build_config.py").exists()  # not editable
    return installed if installed != here and complete else None


def load_extension() -> ModuleType:
    try:
        config = importlib.import_module("koopfast._build_config")
    except ImportError as exc:
        elsewhere = _installed_elsewhere()
        if elsewhere is not None:
            raise ImportError(
                f"koopfast was imported from the source folder {Path(__file__).resolve().parent}, which has no "
                f"compiled core, instead of the installed koopfast in {elsewhere}: the current directory (or "
                "PYTHONPATH) puts the checkout first on sys.path. Run Python from another directory, or install "
                "the checkout editable (`python -m pip install --no-build-isolation -e .`, as `make setup` does)."
            ) from exc
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
