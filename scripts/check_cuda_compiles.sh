#!/usr/bin/env bash
# Compiles every CUDA source with nvcc against the installed torch's headers, without a GPU and
# without a CUDA build of torch: a CPU torch wheel lacks only the generated
# c10/cuda/impl/cuda_cmake_macros.h, for which a one-line stand-in is supplied (build.md, item 9).
# Catches compile errors in CUDA code on machines that cannot link or run it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "check_cuda_compiles: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi
ARCH=${CUDA_CHECK_ARCH:-sm_90}
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
includes=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))")
abi=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
mapfile -t sources < <(find csrc -name '*.cu' | sort)
echo "check_cuda_compiles: $("$NVCC" --version | tail -1); ${#sources[@]} sources for $ARCH"
export NVCC ARCH stub includes abi
printf '%s\n' "${sources[@]}" | xargs -P "$(nproc)" -I{} bash -c '
  out="$stub/$(basename {}).o"
  if "$NVCC" -c -std=c++20 -arch="$ARCH" --expt-relaxed-constexpr -Xcompiler -fPIC \
       -D_GLIBCXX_USE_CXX11_ABI="$abi" -Icsrc -I"$stub" $includes {} -o "$out"; then
    echo "  ok   {}"
  else
    echo "  FAIL {}" >&2
    exit 255
  fi'
