"""Loader of the native modules, recording why one could not be loaded.

The C++ CPU kernels are built once per CPU variant (see CMakeLists.txt), all from the same
sources with ``-ffp-contract=off`` and no fast-math, so every variant computes the same bits:

* ``_C_generic``: x86-64 baseline, runs on any x86-64 CPU (the only variant elsewhere);
* ``_C_avx2``: x86-64-v3 (AVX2, FMA never contracted, BMI1/2, F16C, LZCNT, MOVBE);
* ``_C_avx512``: x86-64-v4 (v3 plus AVX-512 F/BW/CD/DQ/VL);
* ``_C_native``: ``-march=native`` of the build machine, only built on request
  (``ZOFO_CPU_VARIANTS``) and only used when forced, for benchmarks.

The variant is chosen once per process, at the first use: the best built one whose
instruction sets the CPU has and the OS enables (asked through the generic module's
``cpu_features()``: CPUID and XGETBV). ``ZOFO_CPU_VARIANT=generic|avx2|avx512|native`` forces
one (``auto`` or unset: choose). A variant this CPU cannot run is never imported (that would
kill the process with an illegal instruction); the backend then reports why it is unavailable.

``_C_cuda`` holds the CUDA kernels and exists only when the package was built with a CUDA
toolkit. Import errors are kept (not raised) so that ``import zofo_kernels`` always works and
each backend can say in its status why it is unavailable.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Dict, List, Optional, Tuple

VARIANT_ENV = "ZOFO_CPU_VARIANT"
# Preference order of the automatic choice (best first); "native" is never chosen by itself.
AUTO_ORDER = ("avx512", "avx2", "generic")
CPU_VARIANTS = AUTO_ORDER + ("native",)

# What each variant's instruction set needs (cpu_features() keys), beyond the baseline.
_V2 = ("cx16", "lahf_lm", "popcnt", "sse3", "sse4_1", "sse4_2", "ssse3")
_V3 = _V2 + ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "lzcnt", "movbe", "os_avx")
_V4 = _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "os_avx512")
REQUIRED_FEATURES = {"generic": (), "avx2": _V3, "avx512": _V4}
DESCRIPTIONS = {
    "generic": "x86-64 baseline",
    "avx2": "x86-64-v3: AVX2/FMA/BMI2",
    "avx512": "x86-64-v4: AVX-512 F/BW/CD/DQ/VL",
    "native": "-march=native of the build machine",
}

_cache = {}
_choice: Optional[Tuple[Optional[str], str]] = None


def _import_passive(full: str):
    """Import ``full`` with its OpenMP runtime told to sleep, not spin, between regions.

    torch ships its own OpenMP runtime; ours is the system one. Two runtimes whose idle
    threads spin fight over the cores: on a small machine each side then waits for a
    scheduler time slice (~10 ms) when the other has just run. libgomp reads
    OMP_WAIT_POLICY once, when it is loaded, so it is set only around this import (torch's
    runtime is already initialised by then) and only if the user has not chosen a policy.
    """
    key = "OMP_WAIT_POLICY"
    if key in os.environ:
        return importlib.import_module(full)
    os.environ[key] = "PASSIVE"
    try:
        return importlib.import_module(full)
    finally:
        os.environ.pop(key, None)


def _built(name: str) -> bool:
    return importlib.util.find_spec(f"{__package__}.{name}") is not None


def _load(name: str) -> Tuple[Optional[object], Optional[str]]:
    if name not in _cache:
        full = f"{__package__}.{name}"
        if not _built(name):
            _cache[name] = (None, f"module {full} was not built")
        else:
            try:
                _cache[name] = (_import_passive(full), None)
            except ImportError as exc:  # e.g. a missing shared library or a bad build
                _cache[name] = (None, f"importing {full} failed: {type(exc).__name__}: {exc}")
    return _cache[name]


# --------------------------------------------------------------------------- CPU variants

def built_cpu_variants() -> List[str]:
    """The CPU variants whose module exists in this installation."""
    return [v for v in CPU_VARIANTS if _built(f"_C_{v}")]


def cpu_features() -> Dict[str, bool]:
    """Instruction-set extensions of this CPU that the OS enables ({} if the generic module
    is unavailable; {"x86_64": False} on other architectures)."""
    mod, _ = _load("_C_generic")
    return dict(mod.cpu_features()) if mod is not None else {}


def cpu_variant_support(variant: str) -> Tuple[bool, str]:
    """(whether this CPU can run ``variant``, why not / what it is)."""
    if variant not in CPU_VARIANTS:
        return False, f"unknown CPU variant {variant!r}; expected one of {', '.join(CPU_VARIANTS)}"
    if variant == "native":
        return True, "compiled for the build machine's CPU (runs only where that CPU's " \
                     "instruction sets are present)"
    if variant == "generic":
        return True, DESCRIPTIONS[variant]
    feats = cpu_features()
    if not feats:
        return False, "the CPU features are unknown (the generic module is unavailable)"
    if not feats.get("x86_64"):
        return False, f"{variant} is an x86-64 variant"
    missing = [f for f in REQUIRED_FEATURES[variant] if not feats.get(f)]
    if missing:
        return False, f"this CPU (or OS) lacks {', '.join(missing)}"
    return True, DESCRIPTIONS[variant]


def runnable_cpu_variants() -> List[str]:
    """Built variants this CPU can run (best first; "native" last, if it was built)."""
    return [v for v in built_cpu_variants() if cpu_variant_support(v)[0]]


def cpu_choice() -> Tuple[Optional[str], str]:
    """(variant chosen for this process or None, how it was chosen / why none), cached."""
    global _choice
    if _choice is None:
        _choice = _choose()
    return _choice


def _choose() -> Tuple[Optional[str], str]:
    forced = os.environ.get(VARIANT_ENV, "").strip().lower()
    built = built_cpu_variants()
    if forced and forced != "auto":
        if forced not in CPU_VARIANTS:
            return None, (f"{VARIANT_ENV}={forced!r} is not a CPU variant; expected auto or "
                          f"one of {', '.join(CPU_VARIANTS)}")
        if forced not in built:
            return None, (f"{VARIANT_ENV}={forced} but module {__package__}._C_{forced} was "
                          f"not built (built: {', '.join(built) or 'none'})")
        ok, why = cpu_variant_support(forced)
        if not ok:
            return None, f"{VARIANT_ENV}={forced} but {why}"
        return forced, f"forced by {VARIANT_ENV}={forced}"
    if not built:
        return None, f"no CPU module was built (expected {__package__}._C_generic)"
    for v in AUTO_ORDER:
        if v in built:
            ok, why = cpu_variant_support(v)
            if ok:
                return v, f"chosen at load for this CPU, {why}; built: {', '.join(built)}"
    return None, f"no built CPU variant runs on this CPU (built: {', '.join(built)})"


def cpu_module(variant: Optional[str] = None) -> Tuple[Optional[object], Optional[str]]:
    """(module, None) or (None, reason) for the C++ CPU kernels: the variant chosen for this
    process, or the named ``variant`` (never imported if this CPU cannot run it)."""
    if variant is None:
        variant, how = cpu_choice()
        if variant is None:
            return None, how
    else:
        if variant not in CPU_VARIANTS:
            return None, cpu_variant_support(variant)[1]
        if not _built(f"_C_{variant}"):
            return None, f"module {__package__}._C_{variant} was not built"
        ok, why = cpu_variant_support(variant)
        if not ok:
            return None, f"CPU variant {variant} cannot run here: {why}"
    return _load(f"_C_{variant}")


def cuda_module():
    """(module, None) or (None, reason) for the CUDA extension ``_C_cuda``."""
    return _load("_C_cuda")
