#!/usr/bin/env bash
# Sets up .venv and builds koopfast into it (editable), from a fresh clone, idempotently.
#
# torch: reused from the interpreter if it has one (the GPU machines have torch and no network),
# else torch 2.13.0 is installed. Build and test tools are installed only where missing. The C++
# core is rebuilt only when its sources, the build files or torch changed since the last build
# (a stamp in .venv): a second `make test` starts testing within seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.koopfast-build-stamp"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: creating $VENV, reusing torch $("$PYTHON" -c 'import torch; print(torch.__version__)') from $(command -v "$PYTHON")"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    echo "setup: creating $VENV (a few seconds)"
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$PWD/$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (about 30 s from a local cache; otherwise a download of ~200 MB)"
  "$PY" -m pip install -q torch==2.13.0
fi

# (run from / so that the checkout's own folders, such as cmake/, are not taken for packages)
missing=$(cd / && "$PY" - <<'PYEOF'
import importlib.metadata
import importlib.util
need = {"scikit_build_core": "scikit-build-core", "pybind11": "pybind11", "ninja": "ninja",
        "numpy": "numpy", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
        "hypothesis": "hypothesis", "ruff": "ruff", "mypy": "mypy", "sklearn": "scikit-learn",
        "pydmd": "pydmd",  # PyDMD: the peer the DMD benchmark and tests compare against
        "matplotlib": "matplotlib", "tqdm": "tqdm",  # the command line's plots and progress bars
        # the model zoo (Hugging Face models built from small configs, nothing downloaded) and
        # koopfast.structure's dependency graph
        "transformers": "transformers>=5", "torch_pruning": "torch-pruning>=1.6"}
missing = [pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None]
# CMake >= 3.26 is needed (C++20 for CUDA); the PyPI package provides it where the system's is older.
try:
    major, minor = (int(x) for x in importlib.metadata.version("cmake").split(".")[:2])
    if (major, minor) < (3, 26):
        missing.append("cmake>=3.26")
except importlib.metadata.PackageNotFoundError:
    missing.append("cmake>=3.26")
print(" ".join(missing))
PYEOF
)
if [ -n "$missing" ]; then
  echo "setup: installing $missing (about a minute the first time)"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $missing
fi

# compressed-tensors 0.14.0.1, the last release with the BitmaskCompressor that
# tests/llm/test_compressed_tensors.py checks kf.masks.export_compressed against. Its metadata asks
# for transformers<5, which the model zoo's transformers>=5 does not meet, but what those tests use
# (BitmaskCompressor, ModelCompressor, SparsityCompressionConfig, unpack_bitmasks) works with
# transformers 5: it is installed without its dependencies, after the ones it imports (pydantic,
# loguru, and psutil, which its metadata omits). Installed only where no compressed-tensors is, a few
# seconds. Not fatal (`make run` does not need it): without it those tests skip; .ci/run requires it.
if ! (cd / && "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('compressed_tensors') is None)"); then
  echo "setup: installing compressed-tensors 0.14.0.1 for its tests, without its transformers<5 pin"
  if ! { "$PY" -m pip install -q "pydantic>=2" loguru psutil &&
         "$PY" -m pip install -q --no-deps compressed-tensors==0.14.0.1; }; then
    echo "setup: warning: compressed-tensors was not installed; tests/llm/test_compressed_tensors.py will skip"
  fi
fi

# What the compiled core depends on: its sources, the build files, torch and the interpreter.
stamp=$( { (cd / && "$PY" -c 'import sys, torch; print(sys.executable, torch.__version__)');
          find csrc cmake CMakeLists.txt pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum; } \
        | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp" ] && (cd / && "$PY" -c "import koopfast" 2>/dev/null); then
  echo "setup: koopfast's C++ core is current (no rebuild; Python changes need none)"
  exit 0
fi
rm -f "$STAMP"
echo "setup: building koopfast: compiling the C++ core (1-2 minutes on 2 cores the first time; seconds after a small change)"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
(cd / && "$PY" -c "import koopfast; print('setup: koopfast', koopfast.__version__, koopfast.build_info())")
echo "$stamp" > "$STAMP"
