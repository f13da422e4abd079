#!/usr/bin/env bash
# One command for a GPU machine (torch preinstalled, no network): build koopfast, run every test
# that runs on CUDA (`pytest -m cuda`, see tests/conftest.py), and benchmark the families on the
# GPU at sizes that fill it (`koopfast bench --size large`: device-event timing, each streaming row
# against a device copy of the same bytes), within a time budget (8 minutes by default). Every
# step has a timeout; its log, each family's results.json and one summary.json land in --out.
# The same script runs on a CPU machine (`--device cpu`: quick sizes) so that CI proves it works.
# docs/gpu_check.md describes the steps, the options and the summary.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--budget SECONDS] [--size quick|default|large]
#                             [--only FAMILIES] [--repeat N] [--tests-k EXPR] [--no-tests] [--no-bench] [--rebuild]
#                             [--archive FILE.tar.gz] [--build-timeout S] [--tests-timeout S] [--bench-timeout S]
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

device=cuda out=gpu-check budget=480 size="" only="" repeat="" tests_k="" run_tests=1 run_bench=1 rebuild=0 archive=""
build_cap=240 tests_cap=180 bench_cap=""  # seconds; bench: 120 for select and masks, 75 for the others
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --tests-k) tests_k=$2; shift 2 ;;
    --no-tests) run_tests=0; shift ;;
    --no-bench) run_bench=0; shift ;;
    --rebuild) rebuild=1; shift ;;
    --archive) archive=$2; shift 2 ;;
    --build-timeout) build_cap=$2; shift 2 ;;
    --tests-timeout) tests_cap=$2; shift 2 ;;
    --bench-timeout) bench_cap=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got $device" >&2; exit 2 ;; esac
for seconds in "$budget" "$build_cap" "$tests_cap" "${bench_cap:-0}"; do
  case "$seconds" in ''|*[!0-9]*) echo "gpu_check: budget and timeouts must be whole seconds, got $seconds" >&2; exit 2 ;; esac
done
if [ "$device" = cuda ]; then
  size=${size:-large}
  only=${only:-select,masks,gradflow,codes,koopman}  # most streaming rows first; hvp, distributed: CPU only
else
  size=${size:-quick}
  only=${only:-select}  # CI proves the script; `koopfast bench --quick` covers every family there
  repeat=${repeat:-3}
fi

mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)  # --out and --archive are relative to the caller's directory
[ -n "$archive" ] && archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
cd "$here" || exit 2
steps="$out/steps.tsv"
printf 'step\tstatus\trc\tseconds\ttimeout_s\tlog\n' > "$steps"
# The checkout's .venv where there is one (make setup), else the python3 that holds torch; PYTHON overrides.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=$here/.venv/bin/python; else PY=$(command -v python3); fi
if [ "$device" = cuda ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH  # CMake looks for nvcc on PATH
fi
export PYTHONUNBUFFERED=1
start=$SECONDS
deadline=$((start + budget))
reserve=15  # seconds kept for the summary
failed=0

# step NAME CAP COMMAND...: runs COMMAND with a timeout of CAP seconds (less if the budget is
# nearly spent; skipped if it is spent), output to NAME.log, one line in steps.tsv.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((deadline - reserve - SECONDS)) limit=$cap status rc began
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped\t\t0\t0\t\n' "$name" >> "$steps"
    echo "gpu_check: $name: skipped, the ${budget} s budget is spent"
    failed=1
    return 1
  fi
  echo "gpu_check: $name (timeout ${limit} s): $*"
  began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - began))" "$limit" "$name.log" >> "$steps"
  if [ "$status" = ok ]; then
    echo "gpu_check: $name: ok in $((SECONDS - began)) s"
  else
    echo "gpu_check: $name: $status (exit $rc) after $((SECONDS - began)) s; the end of $out/$name.log:"
    tail -n 15 "$out/$name.log" | sed 's/^/    /'
    failed=1
  fi
  [ "$status" = ok ]
}

# What this machine is: versions, the device, and whether koopfast already imports with what it needs.
step env 60 "$PY" - "$device" <<'PYEOF'
import os, platform, subprocess, sys
import torch
device = sys.argv[1]
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "threads", torch.get_num_threads(), "cores", os.cpu_count())
if device == "cuda":
    assert torch.cuda.is_available(), "--device cuda: torch sees no CUDA device"
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    try:
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print("nvidia-smi:", exc)
PYEOF

has_backend() {  # koopfast imports and was built with the backend the device needs
  "$PY" -c "import sys, koopfast; sys.exit('$device' not in koopfast.build_info()['backends'])" >/dev/null 2>&1
}
if [ "$rebuild" = 1 ] || ! has_backend; then
  if [ "$device" = cuda ]; then export KOOPFAST_CUDA=ON; fi  # fail loudly rather than build without CUDA
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  step build "$build_cap" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    && step build-check 60 "$PY" -c "import sys, koopfast; print(koopfast.build_info()); sys.exit('$device' not in koopfast.build_info()['backends'])"
else
  printf 'build\tnot needed\t\t0\t0\t\n' >> "$steps"
  echo "gpu_check: build: skipped, koopfast already imports with its $device backend (--rebuild to force)"
fi

if [ "$run_tests" = 1 ]; then
  select_k=()
  [ -n "$tests_k" ] && select_k=(-k "$tests_k")
  # -m cuda: the CUDA case of every device-parametrized test and every test that names CUDA
  # (tests/conftest.py). On a CPU machine that is the few tests that loop over the devices.
  step tests "$tests_cap" "$PY" -m pytest -q -m cuda -p no:cacheprovider "${select_k[@]}" --junitxml="$out/tests.xml" tests
fi

if [ "$run_bench" = 1 ]; then
  IFS=, read -r -a families <<< "$only"
  for family in "${families[@]}"; do
    case "$family" in select|masks) cap=${bench_cap:-120} ;; *) cap=${bench_cap:-75} ;; esac
    args=(bench --device "$device" --size "$size" --only "$family" --out "$out/bench-$family")
    [ -n "$repeat" ] && args+=(--repeat "$repeat")
    step "bench-$family" "$cap" "$PY" -m koopfast "${args[@]}"
  done
fi

"$PY" scripts/gpu_check_summary.py "$out" --device "$device" --size "$size" --budget "$budget" \
  --seconds "$((SECONDS - start))" || failed=1
if [ -n "$archive" ]; then  # one file to fetch (a device machine returns at most 8)
  tar czf "$archive" -C "$(dirname "$out")" "$(basename "$out")" || failed=1
fi
echo "gpu_check: $( [ "$failed" = 0 ] && echo 'every step passed' || echo 'SOME STEPS DID NOT PASS' ) in $((SECONDS - start)) s; logs and summary.json in $out"
exit "$failed"
