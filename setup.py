"""Build of zofo_kernels: Python package plus native modules compiled by CMake.

    pip install .            # or: pip install -e .;  pip wheel .;  python -m build

Native modules (see CMakeLists.txt), in the package of the native backend, NATIVE_PKG
(zofo_kernels.core.backends.native):
  _C_generic, _C_avx2, _C_avx512
                        C++ CPU kernels (OpenMP), one module per CPU variant (x86-64
                        baseline, x86-64-v3, x86-64-v4; only _C_generic on other CPUs);
                        always built. The package imports the best one the CPU runs, at
                        load (zofo_kernels/core/backends/native/loader.py), so one wheel
                        runs on any x86-64.
  _C_cuda               CUDA kernels; built when ZOFO_BUILD_CUDA says so.

Environment variables:
  ZOFO_BUILD_CUDA    1: build the CUDA module, fail if nvcc is missing; 0: skip it;
                     unset: build it when nvcc is found AND an NVIDIA GPU is visible
                     (/dev/nvidiactl or `nvidia-smi -L`), so CPU-only machines build fast.
  ZOFO_CUDA_ARCHS    CUDA architectures, default "80;90" (sm_80, sm_90), e.g. "90" or "80;86".
  ZOFO_CPU_VARIANTS  CPU variants to build, comma-separated, default "auto" (= generic,avx2,
                     avx512 on x86-64, generic elsewhere); add "native" (e.g. "auto,native")
                     for a -march=native module that is used only when forced with
                     ZOFO_CPU_VARIANT=native (benchmarks). Results are identical in all.
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: number of CPUs).

Build folders: CMake configures in <build_temp>/cmake. The folder remembers the tools it was
configured with (cmake, ninja, pybind11, Python); when they differ (each isolated `pip
install .` / `pip wheel .` / `python -m build` has its own temporary build environment) the
folder is wiped and configured afresh, so repeated builds from one checkout work. Modules of
variants not built this time, and Python files of modules no longer in the checkout, are
removed from the build output, so nothing stale ships.

The build needs only the packages of [build-system] in pyproject.toml (setuptools, wheel,
cmake, ninja, pybind11) and a C++17 compiler; it does not import or link torch.
"""

import importlib.machinery
import json
import os
import platform
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# the package that holds the compiled modules, beside their loader
NATIVE_PKG = "zofo_kernels.core.backends.native"


class CMakeExtension(Extension):
    """An extension module produced by the CMake target of the same short name."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "on", "true", "yes")


def _falsy(value: str) -> bool:
    return value.strip().lower() in ("0", "off", "false", "no")


def find_nvcc():
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def gpu_visible() -> bool:
    if os.path.exists("/dev/nvidiactl"):
        return True
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def cuda_build_decision():
    """(build CUDA?, nvcc path or None, why) from ZOFO_BUILD_CUDA and the machine."""
    env = os.environ.get("ZOFO_BUILD_CUDA", "")
    nvcc = find_nvcc()
    if _truthy(env):
        if nvcc is None:
            raise RuntimeError(
                "ZOFO_BUILD_CUDA=1 but no nvcc was found (looked at $CUDACXX, $CUDA_HOME/bin, "
                "$CUDA_PATH/bin, PATH and /usr/local/cuda/bin); install a CUDA toolkit or "
                "unset ZOFO_BUILD_CUDA")
        return True, nvcc, "ZOFO_BUILD_CUDA=1"
    if _falsy(env):
        return False, None, "ZOFO_BUILD_CUDA=0"
    if env.strip():
        raise RuntimeError(f"ZOFO_BUILD_CUDA must be 1 or 0, got {env!r}")
    if nvcc is None:
        return False, None, "no nvcc found"
    if not gpu_visible():
        return False, None, "nvcc found but no NVIDIA GPU visible (set ZOFO_BUILD_CUDA=1 to force)"
    return True, nvcc, "nvcc and an NVIDIA GPU found"


def _tool(name: str, module: str, attr: str):
    """A build tool from PATH, else from the pip package that ships it."""
    path = shutil.which(name)
    if path:
        return path
    try:
        mod = __import__(module)
        cand = os.path.join(getattr(mod, attr), name)
        if os.path.isfile(cand):
            return cand
    except ImportError:
        pass
    return None


X86_64 = platform.machine().lower() in ("x86_64", "amd64", "x64")
KNOWN_VARIANTS = ("generic", "avx2", "avx512", "native")


def cpu_variants():
    """The CPU variants to build, from ZOFO_CPU_VARIANTS (default "auto")."""
    if os.environ.get("ZOFO_NATIVE_ARCH"):
        print("zofo_kernels: ZOFO_NATIVE_ARCH is no longer used: the CPU kernels are built for "
              "several instruction sets and chosen at load (see ZOFO_CPU_VARIANTS)", flush=True)
    raw = os.environ.get("ZOFO_CPU_VARIANTS", "auto").replace(";", ",")
    auto = ["generic", "avx2", "avx512"] if X86_64 else ["generic"]
    out = []
    for item in (x.strip().lower() for x in raw.split(",")):
        names = auto if item in ("", "auto") else [item]
        for n in names:
            if n not in KNOWN_VARIANTS:
                raise RuntimeError(f"ZOFO_CPU_VARIANTS: unknown variant {n!r}; expected auto or "
                                   f"some of {', '.join(KNOWN_VARIANTS)}")
            if n in ("avx2", "avx512") and not X86_64:
                raise RuntimeError(f"ZOFO_CPU_VARIANTS: {n} needs an x86-64 machine")
            if n not in out:
                out.append(n)
    if "generic" not in out:
        # the loader asks the generic module for the CPU's features; it runs everywhere
        out.insert(0, "generic")
    return out


BUILD_CUDA, NVCC, CUDA_WHY = cuda_build_decision()
CPU_VARIANTS = cpu_variants()


def _prepare_build_dir(build_dir: str, stamp: dict) -> None:
    """Wipe ``build_dir`` when it was configured with other tools or options than ``stamp``
    (a CMake cache names absolute paths of cmake, ninja and pybind11, which live in a
    temporary environment under build isolation and are gone at the next build)."""
    path = os.path.join(build_dir, "zofo_build_stamp.json")
    old = None
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = None
    if old != stamp and os.path.isdir(build_dir) and os.listdir(build_dir):
        why = "no record of its tools" if old is None else "other tools or options"
        print(f"zofo_kernels: {build_dir} was configured with {why}; configuring afresh",
              flush=True)
        shutil.rmtree(build_dir)
    os.makedirs(build_dir, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(stamp, fh, indent=1, sort_keys=True)


def _remove_stale_modules(extdir: str, keep) -> None:
    """Remove native modules of this package in ``extdir`` that this build does not make
    (another variant set, a former CUDA build, the old single ``_C`` module)."""
    if not os.path.isdir(extdir):
        return
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for fname in os.listdir(extdir):
        suffix = next((x for x in suffixes if fname.endswith(x)), None)
        if suffix is None:
            continue
        mod = fname[: -len(suffix)]
        if (mod == "_C" or mod.startswith("_C_")) and mod not in keep:
            print(f"zofo_kernels: removing stale module {os.path.join(extdir, fname)}",
                  flush=True)
            os.remove(os.path.join(extdir, fname))


def _remove_stale_sources(pkg_dir: str, keep) -> None:
    """Remove Python files under ``pkg_dir`` (the package in build/lib) that this build did
    not write: build/lib outlives builds, and the wheel takes all of it, so a module deleted
    or renamed in the checkout would otherwise ship again."""
    keep = {os.path.abspath(p) for p in keep}
    for dirpath, _, files in os.walk(pkg_dir):
        for fname in files:
            full = os.path.abspath(os.path.join(dirpath, fname))
            if fname.endswith((".py", ".pyc")) and full not in keep:
                print(f"zofo_kernels: removing stale {full}", flush=True)
                os.remove(full)


class CleanBuildPy(build_py):
    """build_py that also removes stale Python files of earlier builds from build/lib."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            _remove_stale_sources(os.path.join(self.build_lib, "zofo_kernels"),
                                  self.get_outputs(include_bytecode=True))


def cmake_configure(cmake: str, build_dir: str, args, extra=()) -> None:
    """Configure ``build_dir`` with ``args`` (plus ``extra``, which may change between builds
    without a fresh start, e.g. the output folder), first wiping it if it was configured
    with other tools or ``args``."""
    _prepare_build_dir(build_dir, {"cmake": os.path.realpath(cmake), "args": list(args),
                                   "cxx": os.environ.get("CXX", "")})
    subprocess.check_call([cmake, "-S", ROOT, "-B", build_dir] + list(args) + list(extra))


class CMakeBuild(build_ext):
    """Configures CMake once per build and builds the targets of all extensions in one go."""

    def run(self):
        inplace = bool(self.inplace)
        super().run()  # builds into build_lib, then copies into the source tree if inplace
        if inplace:  # editable install: the package folder of the checkout is the output
            _remove_stale_modules(os.path.join(ROOT, *NATIVE_PKG.split(".")),
                                  {e.name.rsplit(".", 1)[-1] for e in self.extensions})

    def build_extensions(self):
        exts = [e for e in self.extensions if isinstance(e, CMakeExtension)]
        for ext in self.extensions:
            if not isinstance(ext, CMakeExtension):
                super().build_extension(ext)
        if not exts:
            return
        cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
        if cmake is None:
            raise RuntimeError("cmake is required to build zofo_kernels (pip install cmake)")
        import pybind11

        extdir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(exts[0].name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DZOFO_CPU_VARIANTS={';'.join(CPU_VARIANTS)}",
            f"-DZOFO_BUILD_CUDA={'ON' if BUILD_CUDA else 'OFF'}",
        ]
        if BUILD_CUDA:
            archs = os.environ.get("ZOFO_CUDA_ARCHS", "80;90").replace(",", ";").strip()
            args += [f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DZOFO_CUDA_ARCHS={archs}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        ninja = _tool("ninja", "ninja", "BIN_DIR")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _remove_stale_modules(extdir, {e.name.rsplit(".", 1)[-1] for e in exts})
        print(f"zofo_kernels: building {', '.join(e.name for e in exts)} (CPU variants: "
              f"{', '.join(CPU_VARIANTS)}; CUDA module: {'yes' if BUILD_CUDA else 'no'}, "
              f"{CUDA_WHY})", flush=True)
        cmake_configure(cmake, build_dir, args, [f"-DZOFO_OUTPUT_DIR={extdir}"])
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", build_dir, "-j", jobs, "--target"]
                              + [e.target for e in exts])
        for ext in exts:
            built = self.get_ext_fullpath(ext.name)
            if not os.path.isfile(built):
                raise RuntimeError(f"CMake target {ext.target} did not produce {built}")


ext_modules = [CMakeExtension(f"{NATIVE_PKG}._C_{v}", f"_C_{v}") for v in CPU_VARIANTS]
if BUILD_CUDA:
    ext_modules.append(CMakeExtension(f"{NATIVE_PKG}._C_cuda", "_C_cuda"))

if __name__ == "__main__":  # also under setuptools' PEP 517 backend; tests import the helpers
    # Metadata and dependencies: pyproject.toml [project].
    setup(
        packages=find_packages(include=["zofo_kernels", "zofo_kernels.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": CMakeBuild, "build_py": CleanBuildPy},
        zip_safe=False,
    )
