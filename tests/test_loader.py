"""The import-time checks of koopfast's compiled core name the real cause."""

from __future__ import annotations

import importlib

import pytest

from koopfast import _loader


class _Installed:
    def __init__(self, folder):
        self.folder = folder

    def locate_file(self, name):
        return self.folder / name


def test_a_source_tree_that_shadows_an_installed_koopfast_is_named(tmp_path, monkeypatch):
    installed = tmp_path / "site-packages"
    (installed / "koopfast").mkdir(parents=True)
    (installed / "koopfast" / "_build_config.py").write_text("TORCH_VERSION = 'x'\n")
    (installed / "koopfast" / "__init__.py").write_text("")
    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "koopfast._build_config":
            raise ImportError("No module named 'koopfast._build_config'")
        return real_import(name, *args)

    monkeypatch.setattr(_loader.importlib, "import_module", import_module)
    monkeypatch.setattr(_loader.importlib.metadata, "distribution", lambda name: _Installed(installed))
    with pytest.raises(ImportError, match=r"imported from the source folder .* instead of the installed koopfast in"):
        _loader.load_extension()


def test_a_koopfast_that_was_never_built_says_how_to_build_it(monkeypatch):
    def import_module(name, *args):
        raise ImportError(name)

    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_loader.importlib, "import_module", import_module)
    monkeypatch.setattr(_loader.importlib.metadata, "distribution", distribution)
    with pytest.raises(ImportError, match=r"compiled core was not found: this koopfast was never built.*Rebuild"):
        _loader.load_extension()
