"""Developer benchmark suite (pytest-benchmark). Cases and checks come from koopfast.benchmarks,
the same code the ``koopfast bench`` command runs.

    pytest bench                      # full sizes
    pytest bench --quick              # small sizes (CI)
    pytest bench --device cuda        # on the GPU

With ``--benchmark-json FILE`` the JSON holds what a reader needs to trust it: pytest-benchmark's own
datetime and commit_info, koopfast's versions, device and thread count in machine_info, the command
line and the --quick/--device flags under "koopfast_run", and per benchmark its spread (median /
fastest round) in extra_info; a benchmark whose spread exceeds harness.NOISY_SPREAD also raises a
NoisyBenchmark warning in pytest's summary.
"""

from __future__ import annotations

import shlex
import warnings

import pytest
import torch

from koopfast.benchmarks import harness, provenance


class NoisyBenchmark(UserWarning):
    """The median round was more than harness.NOISY_SPREAD times the fastest: the machine was busy."""


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


def _device(config) -> torch.device:
    return torch.device(config.getoption("--device"))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Stable facts only (pytest-benchmark warns when compared runs' machine_info differ)."""
    import koopfast

    machine_info["koopfast"] = {
        "koopfast": koopfast.__version__,
        "torch": torch.__version__,
        "backends": list(koopfast.build_info()["backends"]),
        "device": provenance.device_details(_device(config)),
        "torch_threads": torch.get_num_threads(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["koopfast_run"] = {
        "command": shlex.join(["pytest", *config.invocation_params.args]),
        "quick": config.getoption("--quick"),
        "device": str(_device(config)),
        **{f"git_{k}": v for k, v in provenance.git_state().items()},
        "noisy_spread_threshold": harness.NOISY_SPREAD,
    }


@pytest.fixture(autouse=True)
def _spread(request):
    """Each benchmark's spread (median / fastest round) into its extra_info; a warning if noisy."""
    bench = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    yield
    if bench is None or bench.stats is None or bench.stats["min"] <= 0:
        return
    spread = bench.stats["median"] / bench.stats["min"]
    bench.extra_info["spread"] = spread
    bench.extra_info["noisy"] = spread > harness.NOISY_SPREAD
    if spread > harness.NOISY_SPREAD:
        warnings.warn(
            NoisyBenchmark(
                f"{request.node.nodeid}: median {spread:.2f}x the fastest round (> {harness.NOISY_SPREAD}): "
                "the machine was busy; rerun before trusting this comparison"
            ),
            stacklevel=1,
        )
