#!/usr/bin/env bash
# Full CUDA build without a GPU: compile + link + registration against a CUDA build of torch.
#
# Installs torch 2.14.1 (a CUDA 13 build; on the CI machines its wheel is cached locally) into a
# separate venv, builds koopfast with KOOPFAST_CUDA=ON into it, imports it, and checks that every
# koopfast op has a CUDA kernel registered. Nothing runs on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CUDA_CHECK_VENV:-build/cuda-check-venv}
TORCH_SPEC=${CUDA_CHECK_TORCH:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$PWD/$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  echo "check_cuda_build: installing $TORCH_SPEC (a CUDA build) into $VENV"
  "$PY" -m pip install -q "$TORCH_SPEC" scikit-build-core pybind11 "cmake>=3.26" ninja numpy
fi
# One architecture is enough to check linking and registration (compile_cuda checks sm_90 too).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
echo "check_cuda_build: building koopfast with KOOPFAST_CUDA=ON for $TORCH_CUDA_ARCH_LIST against torch $("$PY" -c 'import torch; print(torch.__version__)')"
KOOPFAST_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps \
  --config-settings=build-dir=build/cuda-check .
cd / && "$PY" - <<'PYEOF'
import torch

import koopfast as kf

info = kf.build_info()
assert "cuda" in info["backends"], info
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("koopfast::"))
missing = [op for op in ops if "\nCUDA: registered" not in "\n" + torch._C._dispatch_dump(op)]
assert ops and not missing, f"ops without a CUDA kernel: {missing}"
print(f"check_cuda_build: ok: {len(ops)} ops with CUDA kernels for {info['cuda_archs']} (CUDA {info['cuda_version']})")
PYEOF
