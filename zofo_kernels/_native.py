"""Loader of the native modules, recording why one could not be loaded.

``_C`` holds the C++ CPU kernels and is always built by ``pip install``; ``_C_cuda`` holds the
CUDA kernels and exists only when the package was built with a CUDA toolkit. Import errors
are kept (not raised) so that ``import zofo_kernels`` always works and each backend can say
in its status why it is unavailable.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional, Tuple

_cache = {}


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


def _load(name: str) -> Tuple[Optional[object], Optional[str]]:
    if name not in _cache:
        full = f"{__package__}.{name}"
        if importlib.util.find_spec(full) is None:
            _cache[name] = (None, f"module {full} was not built")
        else:
            try:
                _cache[name] = (_import_passive(full), None)
            except ImportError as exc:  # e.g. a missing shared library or a bad build
                _cache[name] = (None, f"importing {full} failed: {type(exc).__name__}: {exc}")
    return _cache[name]


def cpu_module():
    """(module, None) or (None, reason) for the C++ CPU extension ``_C``."""
    return _load("_C")


def cuda_module():
    """(module, None) or (None, reason) for the CUDA extension ``_C_cuda``."""
    return _load("_C_cuda")
