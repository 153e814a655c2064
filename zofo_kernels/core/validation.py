"""The checks of user-given settings, shared by the kernel API and the optimizers: each value
is checked once, here, and refused with an error that names it.

Real numbers: :func:`finite_real` (any finite real), :func:`real` (an optimizer setting, > 0 or
>= 0 where asked), :func:`kernel_scalar` and :func:`float32_real` (values the kernels use in
float32: finite after rounding, and a non-zero value that rounds to 0 is refused as a silent
no-op). Integers: :func:`integer`. Names from a fixed set: :func:`choice`; a kernel backend:
:func:`check_backend`. A closure's loss: :func:`loss_value`.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

from zofo_kernels.core.backends import base as backends

F32_MAX = float(np.finfo(np.float32).max)


def as_float32(v: float) -> float:
    """``v`` rounded to float32 (round to nearest even), as a Python float (inf on overflow)."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(v))


def check_float32(v: float, name: str, *, nonzero: bool = False) -> float:
    """Refuse a finite Python float that the kernels' rounding to float32 would turn into
    +-inf, and (``nonzero``) a non-zero one that would round to 0, making the call a silent
    no-op. Returns ``v`` unchanged."""
    f = as_float32(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} = {v!r} overflows float32 (the kernels compute in float32; "
                         f"|{name}| must be at most {F32_MAX:.7g})")
    if nonzero and v != 0.0 and f == 0.0:
        raise ValueError(f"{name} = {v!r} rounds to 0 in float32 (the kernels compute in "
                         "float32), so the call would silently do nothing")
    return v


def finite_real(value, name: str, *, allow_tensor: bool = False) -> float:
    """``value`` as a finite Python float, or a clear error naming ``name`` (booleans are
    refused; ``allow_tensor``: a one-element tensor is taken by its value). The one check of
    a real-valued setting, for the kernel API and the optimizers alike."""
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def kernel_scalar(value, name: str, *, nonzero: bool = False) -> float:
    """A scalar argument of a kernel call: a finite real (or one-element tensor) that survives
    float32 (and, with ``nonzero``, does not round to 0 unless it is 0)."""
    return check_float32(finite_real(value, name, allow_tensor=True), name, nonzero=nonzero)


def real(value, name: str, *, positive: bool = False, nonneg: bool = False) -> float:
    """A real-valued optimizer setting: finite, and > 0 or >= 0 where asked."""
    v = finite_real(value, name)
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def float32_real(value, name: str, *, positive: bool = False, nonneg: bool = False) -> float:
    """A real optimizer setting the kernels will use in float32 (a learning rate, eps, a
    weight decay): :func:`real`, finite after rounding to float32, and not a non-zero value
    that rounds to 0 (a silent no-op)."""
    v = real(value, name, positive=positive, nonneg=nonneg)
    return check_float32(v, name, nonzero=True)


def integer(value, name: str, low: int, high: Optional[int] = None) -> int:
    """An integer setting in [low, high) (``high`` None: no upper bound); booleans and
    integral floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v >= high):
        hi = "" if high is None else f" and < {high}"
        raise ValueError(f"{name} must be >= {low}{hi}, got {v}")
    return v


def choice(value, name: str, options: Sequence[str]) -> str:
    """One of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def check_backend(backend: Optional[str]) -> Optional[str]:
    """None (the fastest available backend, chosen per call) or the name of a backend that
    can run here."""
    if backend is None:
        return None
    if not isinstance(backend, str) or backend not in backends.BACKEND_NAMES:
        raise ValueError(f"backend must be None or one of {backends.BACKEND_NAMES}, "
                         f"got {backend!r}")
    st = backends.get(backend).status()
    if not st.available:
        raise backends.BackendUnavailableError(f"backend {backend!r} is unavailable: {st.reason}")
    return backend


def loss_value(loss) -> float:
    """A closure's loss as a Python float (a real number or a one-element tensor)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"the loss must be a real number or a scalar tensor, got {type(loss).__name__}")
    return float(loss)
