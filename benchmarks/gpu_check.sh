#!/usr/bin/env bash
# GPU check, under 8 minutes on one GPU machine (step limits add up to 480 s), no network:
#   1. build the package with the CUDA module for this GPU's architecture;
#   2. list the backends and why any is unavailable;
#   3. run the GPU tests (pytest -m gpu);
#   4. run the kernel benchmark on the GPU (CSV + PNG);
#   5. run the step benchmark (python -m zofo_kernels.apps.bench), if that module exists.
# Everything goes to one results folder: the first argument, else $OUT, else
# benchmarks/results/gpu_check_<date>. Every step has its own time limit; a failing step does
# not stop the next ones; summary.txt lists each step's exit status, and the script exits
# non-zero if any step failed.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

RES="${1:-${OUT:-$REPO/benchmarks/results/gpu_check_$(date -u +%Y%m%d_%H%M%S)}}"
mkdir -p "$RES"
RES="$(cd "$RES" && pwd)"
PY="${PYTHON:-python}"
START=$(date +%s)
FAILED=0
: > "$RES/summary.txt"

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$RES/gpu_check.log"; }

# step NAME SECONDS COMMAND...: run with a time limit, output to RES/NAME.log, status to summary
step() {
  local name="$1" limit="$2"
  shift 2
  log "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RES/$name.log" | sed 's/^/    /' | tee -a "$RES/gpu_check.log"
  if [ $rc -eq 0 ]; then
    echo "$name: ok" >> "$RES/summary.txt"
  else
    [ $rc -eq 124 ] && log "$name: time limit reached"
    echo "$name: FAILED (exit $rc)" >> "$RES/summary.txt"
    FAILED=1
  fi
  return $rc
}

# ------------------------------------------------------------------------------ environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1
  (command -v nvcc >/dev/null && nvcc --version | tail -n 2) || echo "nvcc: not on PATH"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
} > "$RES/env.txt"
sed 's/^/    /' "$RES/env.txt" | tee -a "$RES/gpu_check.log"

# compute capability as "90" (torch first, nvidia-smi as fallback)
ARCH="$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null)"
if [ -z "$ARCH" ]; then
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')"
fi
if [ -z "$ARCH" ]; then
  log "cannot determine the GPU architecture (no CUDA device visible?); building for 80;90"
  ARCH="80;90"
fi
log "GPU architecture: $ARCH"

# ------------------------------------------------------------------------------ 1. build
# No network: reuse the installed build tools (--no-build-isolation) and dependencies.
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
export ZOFO_BUILD_CUDA=1 ZOFO_CUDA_ARCHS="$ARCH"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
step build 130 bash -c '"$0" -m pip install --no-build-isolation --no-deps -e . ||
  { echo "pip install -e failed; trying setup.py build_ext --inplace"; "$0" setup.py build_ext --inplace; }' "$PY"

# ------------------------------------------------------------------------------ 2. backends
step backends 30 "$PY" -c "
import zofo_kernels as z
sts = z.available_backends()
for n, s in sts.items():
    print(f'{n:10s} {s.available!s:5s} {s.reason}')
raise SystemExit(0 if sts['cuda'].available else 'the cuda backend is unavailable on a GPU machine')
"

# ------------------------------------------------------------------------------ 3. GPU tests
step pytest_gpu 100 "$PY" -m pytest python_tests -m gpu -q -ra -p no:cacheprovider \
  --junitxml="$RES/pytest_gpu.xml"

# ------------------------------------------------------------------------------ 4. kernel benchmark
GPU_TAG="$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))" 2>/dev/null || echo gpu)"
KCSV="$RES/kernels_cuda_${GPU_TAG}.csv"
step bench_kernels 90 "$PY" benchmarks/bench_kernels.py --device cuda --backends cuda triton \
  --out "$KCSV"
if [ -s "$KCSV" ]; then
  step plot_kernels 20 "$PY" benchmarks/plot_kernels.py "$KCSV" -o "$RES/kernels_cuda_${GPU_TAG}.png"
fi

# ------------------------------------------------------------------------------ 5. step benchmark
if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('zofo_kernels.apps.bench') else 1)" 2>/dev/null; then
  # issue target: random-init OPT-1.3B in bf16 at batch 16 x 256 tokens
  step bench_steps 110 "$PY" -m zofo_kernels.apps.bench --device cuda --dtype bfloat16 \
    --model opt-1.3b --seq-len 256 --repeats 5 --no-progress --output "$RES/step_bench"
else
  log "zofo_kernels.apps.bench not present: step benchmark skipped"
  echo "bench_steps: skipped (module absent)" >> "$RES/summary.txt"
fi

log "done in $(( $(date +%s) - START ))s; results in $RES"
sed 's/^/    /' "$RES/summary.txt" | tee -a "$RES/gpu_check.log"
exit $FAILED
