"""Shared fixtures: the devices every op is tested on, and deterministic seeding; the `cuda`
marker that selects the tests which run on CUDA (``pytest -m cuda``, as scripts/gpu_check.sh does)."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

import koopfast as kf

# The model zoo's cases (tests/zoo/zoo.py) serve the zoo tests and the LLM tests (tests/llm).
sys.path.insert(0, str(Path(__file__).resolve().parent / "zoo"))


def available_devices() -> list[str]:
    devices = ["cpu"]
    if "cuda" in kf.build_info()["backends"] and torch.cuda.is_available():
        devices.append("cuda")
    return devices


DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "cuda: runs on CUDA where a GPU is present (set by tests/conftest.py: the CUDA case of a "
        "device-parametrized test, or a test whose code names CUDA or DEVICES); `pytest -m cuda` selects them",
    )


def _on_cuda(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "cuda") or (
        isinstance(value, str) and re.fullmatch(r"cuda(:\d+)?", value) is not None
    )


def _is_device(name: str) -> bool:
    return name == "cpu" or _on_cuda(name)


_NAMES_CUDA = re.compile(r"\bDEVICES\b|cuda")


def runs_on_cuda(item) -> bool:
    """A parametrized test runs on CUDA when one of its parameters is a CUDA device (its CPU case
    does not); any other test when its code (decorators included) names CUDA or loops over DEVICES."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    devices = [v for v in params.values() if isinstance(v, torch.device) or (isinstance(v, str) and _is_device(v))]
    if devices:
        return any(_on_cuda(v) for v in devices)
    try:
        source = inspect.getsource(inspect.unwrap(item.function))
    except (AttributeError, OSError, TypeError):
        return False
    return _NAMES_CUDA.search(source) is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if runs_on_cuda(item):
            item.add_marker(pytest.mark.cuda)
