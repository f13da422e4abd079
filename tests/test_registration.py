"""The op pattern itself: every registered op has samples and passes opcheck; import guards."""

from __future__ import annotations

import importlib

import pytest
import torch

import koopfast as kf
from koopfast import _loader

from op_samples import SAMPLES


def registered_ops() -> list[str]:
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("koopfast::"))


def test_every_registered_op_has_samples_and_a_reference_twin():
    ops = registered_ops()
    assert ops, "no koopfast ops registered"
    assert set(ops) == set(SAMPLES), f"ops without samples: {set(ops) - set(SAMPLES)}"
    for name in ops:
        assert callable(getattr(kf.ops, name)), name
        assert callable(getattr(kf.reference, name)), name


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name, device):
    op = getattr(torch.ops.koopfast, name).default
    for args in SAMPLES[name](device):
        torch.library.opcheck(op, args)


def test_build_info_matches_the_installed_torch():
    info = kf.build_info()
    assert info["torch_version"] == torch.__version__
    assert "cpu" in info["backends"]
    assert info["openmp"] is not None, "built without OpenMP: at::parallel_for would run serially"


def test_import_refuses_a_module_built_for_another_torch(monkeypatch):
    config = importlib.import_module("koopfast._build_config")
    monkeypatch.setattr(config, "TORCH_VERSION", "0.0.1+other")
    with pytest.raises(ImportError, match=r"(?s)compiled against torch 0\.0\.1\+other.*--no-build-isolation"):
        _loader.load_extension()


def test_import_explains_a_missing_build(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "koopfast._build_config":
            raise ImportError("No module named 'koopfast._build_config'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match="never built"):
        _loader.load_extension()
