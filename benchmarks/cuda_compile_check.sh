#!/usr/bin/env bash
# Compile check of the CUDA kernels for sm_80 and sm_90 (no GPU needed).
#
#   bash benchmarks/cuda_compile_check.sh            # archs from $ZOFO_CUDA_ARCHS, default "80 90"
#
# 1. nvcc compiles csrc/cuda_kernels.cu to SASS for every arch, warnings as errors, with the
#    flags of the real build (--fmad=false, IEEE division and sqrt), and ptxas reports each
#    kernel's resources (-Xptxas -v): registers, spill stores/loads, stack frame, shared and
#    constant memory per kernel and arch go to a table, $ZOFO_REGISTERS_OUT/registers.md
#    (default benchmarks/results/cuda_compile/, the committed one);
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
flags=(-std=c++17 -O3 --fmad=false --prec-div=true --prec-sqrt=true -Xcompiler=-ffp-contract=off
       -Xcompiler=-fPIC -Werror all-warnings -Icsrc)
"$NVCC" "${flags[@]}" "${gencode[@]}" -Xptxas -v \
  -c csrc/cuda_kernels.cu -o "$TMP/cuda_kernels.o" 2> "$TMP/ptxas.log" \
  || { cat "$TMP/ptxas.log" >&2; exit 1; }
echo "   ok: $(du -h "$TMP/cuda_kernels.o" | cut -f1) object"

# ptxas -v prints, per kernel and arch:
#   ptxas info : Compiling entry function '<mangled>' for 'sm_80'
#   ptxas info : Function properties for <mangled>
#       16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info : Used 48 registers, [used 0 barriers, ][8 bytes smem, ]432 bytes cmem[0][, ...]
REG_OUT="${ZOFO_REGISTERS_OUT:-benchmarks/results/cuda_compile}"
mkdir -p "$REG_OUT"
DEMANGLE="$(command -v cu++filt || command -v c++filt || true)"
NVCC_VERSION="$("$NVCC" --version | tail -n 1)" NVCC_FLAGS="${flags[*]} -Xptxas -v" \
DEMANGLE="$DEMANGLE" python3 - "$TMP/ptxas.log" "$REG_OUT/registers.md" <<'PY'
import os, re, subprocess, sys

log, out = sys.argv[1], sys.argv[2]
demangler = os.environ.get("DEMANGLE")


def short(mangled):
    """void zofo::cudak::groups_kernel<zofo::F16Bits, zofo::cudak::PerturbOp>(...) ->
    groups_kernel<F16Bits, PerturbOp>"""
    if not demangler:
        return mangled
    full = subprocess.run([demangler, mangled], capture_output=True, text=True).stdout.strip()
    name, depth, cut = full, 0, len(full)
    for i, ch in enumerate(full):  # the parameter list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = full[:cut]
    name = name[5:] if name.startswith("void ") else name
    return re.sub(r"\b[A-Za-z_]\w*::", "", name)


rows, entry = [], None
for line in open(log):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if m:
        entry = {"mangled": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0,
                 "spill_ld": 0}
        continue
    if entry is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                  line)
    if m:
        entry["stack"], entry["spill_st"], entry["spill_ld"] = map(int, m.groups())
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m:
        entry["regs"] = int(m.group(1))
        sm = re.search(r"(\d+) bytes smem", line)
        entry["smem"] = int(sm.group(1)) if sm else 0
        entry["cmem"] = ", ".join(f"{b} B cmem[{k}]"
                                  for b, k in re.findall(r"(\d+) bytes cmem\[(\d+)\]", line)
                                  ) or "not reported"
        rows.append(entry)
        entry = None

if not rows:
    sys.exit(f"no kernel resources found in the ptxas output ({log})")
rows.sort(key=lambda r: (short(r["mangled"]), r["arch"]))
with open(out, "w") as f:
    f.write("# CUDA kernels: registers, spills, shared and constant memory\n\n")
    f.write("Written by `bash benchmarks/cuda_compile_check.sh` from `nvcc -Xptxas -v` "
            "(static facts of the build; no GPU involved).\n\n")
    f.write(f"* nvcc: {os.environ.get('NVCC_VERSION', '?')}\n")
    f.write(f"* flags: `{os.environ.get('NVCC_FLAGS', '?')}`\n")
    f.write("* registers per thread; spill stores/loads, stack frame, shared memory in bytes "
            "per thread/block as ptxas reports them; constant memory per bank (cmem[0]: the "
            "kernel parameters; \"not reported\": ptxas printed no cmem figure for that "
            "arch)\n\n")
    f.write("| kernel | arch | registers | spill stores (B) | spill loads (B) | stack frame (B) "
            "| shared memory (B) | constant memory |\n")
    f.write("|---|---|---:|---:|---:|---:|---:|---|\n")
    for r in rows:
        f.write(f"| `{short(r['mangled'])}` | {r['arch']} | {r['regs']} | {r['spill_st']} | "
                f"{r['spill_ld']} | {r['stack']} | {r['smem']} | {r['cmem']} |\n")
print(f"   ptxas resources of {len(rows)} kernel builds -> {out}")
spills = [r for r in rows if r["spill_st"] or r["spill_ld"]]
if spills:
    print(f"   note: {len(spills)} kernel builds spill registers (see the table)")
PY

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
