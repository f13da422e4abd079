"""Shared fixtures: the devices every op is tested on, and deterministic seeding."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf


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
