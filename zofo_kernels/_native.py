"""Loader of the native modules, recording why one could not be loaded.

``_C`` holds the C++ CPU kernels and is always built by ``pip install``; ``_C_cuda`` holds the
CUDA kernels and exists only when the package was built with a CUDA toolkit. Import errors
are kept (not raised) so that ``import zofo_kernels`` always works and each backend can say
in its status why it is unavailable.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional, Tuple

_cache = {}


def _load(name: str) -> Tuple[Optional[object], Optional[str]]:
    if name not in _cache:
        full = f"{__package__}.{name}"
        if importlib.util.find_spec(full) is None:
            _cache[name] = (None, f"module {full} was not built")
        else:
            try:
                _cache[name] = (importlib.import_module(full), None)
            except ImportError as exc:  # e.g. a missing shared library or a bad build
                _cache[name] = (None, f"importing {full} failed: {type(exc).__name__}: {exc}")
    return _cache[name]


def cpu_module():
    """(module, None) or (None, reason) for the C++ CPU extension ``_C``."""
    return _load("_C")


def cuda_module():
    """(module, None) or (None, reason) for the CUDA extension ``_C_cuda``."""
    return _load("_C_cuda")
