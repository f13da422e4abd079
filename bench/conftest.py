"""Developer benchmark suite (pytest-benchmark). Cases and checks come from koopfast.benchmarks,
the same code the ``koopfast bench`` command runs.

    pytest bench                      # full sizes
    pytest bench --quick              # small sizes (CI)
    pytest bench --device cuda        # on the GPU
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes only (CI)")
    parser.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--quick")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


def sync_call(fn, device: torch.device):
    """fn, synchronized on CUDA so that pytest-benchmark's wall clock measures the device work."""
    if device.type != "cuda":
        return fn

    def wrapped():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return wrapped
