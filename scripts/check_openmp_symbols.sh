#!/usr/bin/env bash
# The extension must need no OpenMP symbol version newer than torch's bundled libgomp provides:
# torch loads its own (older) libgomp first, and an extension needing e.g. OMP_5.1 then fails to
# import ("version OMP_5.1 not found"; build.md, item 7).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
so=$("$PY" -c "import koopfast._C as m; print(m.__file__)")
torch_lib=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
gomp=$(find "$torch_lib" -maxdepth 1 -name 'libgomp*.so*' | head -1)
if [ -z "$gomp" ]; then
  echo "check_openmp_symbols: torch ships no libgomp in $torch_lib; nothing to compare against" >&2
  exit 1
fi
provided=$(objdump -T "$gomp" | grep -oE '\b(GOMP|OMP)_[0-9.]+\b' | sort -u)
needed=$(objdump -T "$so" | grep 'UND' | grep -oE '\b(GOMP|OMP)_[0-9.]+\b' | sort -u || true)
missing=$(comm -23 <(echo "$needed") <(echo "$provided") | grep . || true)
echo "check_openmp_symbols: $(basename "$so") needs: $(echo $needed); $(basename "$gomp") provides up to: $(echo "$provided" | tail -1)"
if [ -n "$missing" ]; then
  echo "check_openmp_symbols: needed but not provided by torch's libgomp: $missing" >&2
  exit 1
fi
