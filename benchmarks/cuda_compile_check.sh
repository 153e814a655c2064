#!/usr/bin/env bash
# Compile check of the CUDA kernels for sm_80 and sm_90 (no GPU needed).
#
#   bash benchmarks/cuda_compile_check.sh            # archs from $ZOFO_CUDA_ARCHS, default "80 90"
#
# 1. nvcc compiles csrc/cuda_kernels.cu to SASS for every arch, warnings as errors, with the
#    flags of the real build (--fmad=false, IEEE division and sqrt);
# 2. when pybind11 and cmake are importable/installed, the whole module _C_cuda is built with
#    CMake in a temporary folder and imported: without a GPU it must load and report the CUDA
#    error instead of crashing.
# Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ ! -x "$NVCC" ]; then
  echo "cuda_compile_check: nvcc not found" >&2
  exit 1
fi
ARCHS="${ZOFO_CUDA_ARCHS:-80 90}"
ARCHS="${ARCHS//[;,]/ }"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

"$NVCC" --version | tail -n 2
gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done
echo "== nvcc: csrc/cuda_kernels.cu for sm_${ARCHS// /, sm_}"
"$NVCC" -std=c++17 -O3 --fmad=false --prec-div=true --prec-sqrt=true -Xcompiler=-ffp-contract=off \
  -Xcompiler=-fPIC -Werror all-warnings -Icsrc "${gencode[@]}" \
  -c csrc/cuda_kernels.cu -o "$TMP/cuda_kernels.o"
echo "   ok: $(du -h "$TMP/cuda_kernels.o" | cut -f1) object"

if python -c "import pybind11" 2>/dev/null && command -v cmake >/dev/null 2>&1; then
  echo "== cmake: module _C_cuda (static cudart)"
  gen=()
  if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
  cmake -S . -B "$TMP/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v python)" \
    -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    -DZOFO_BUILD_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" \
    -DZOFO_CUDA_ARCHS="${ARCHS// /;}" -DCMAKE_CUDA_ARCHITECTURES="${ARCHS// /;}" \
    -DZOFO_OUTPUT_DIR="$TMP/out" > "$TMP/configure.log" || { cat "$TMP/configure.log"; exit 1; }
  cmake --build "$TMP/build" --target _C_cuda -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" > "$TMP/build.log" \
    || { cat "$TMP/build.log"; exit 1; }
  PYTHONPATH="$TMP/out" python - <<'PY'
import _C_cuda as m
count, err = m.device_count()
print(f"   ok: _C_cuda imports; archs {m.cuda_archs}; devices {count}; {err or 'no error'}")
PY
else
  echo "== pybind11 or cmake missing: module build skipped (nvcc check passed)"
fi
