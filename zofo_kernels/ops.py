"""Public kernel API: validate, group by dtype, dispatch to a backend.

Every check runs before any weight is touched, so a bad call leaves the tensors as they were.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import contract
from .backends import base

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]

ENV_BACKEND = "ZOFO_BACKEND"


def available_backends() -> Dict[str, base.BackendStatus]:
    """Each backend's availability: ``{"cpu": BackendStatus(name, available, reason), ...}``."""
    return base.statuses()


# --------------------------------------------------------------------------- validation

def _index(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value) if not isinstance(value, torch.Tensor) else int(value.item())
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not low <= v < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {v}")
    return v


def _seed(seed) -> int:
    return _index(seed, "seed", 0, contract.SEED_LIMIT)


def _direction(direction, name="direction") -> int:
    return _index(direction, name, 0, contract.DIRECTION_LIMIT)


def _real(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _distribution(distribution) -> str:
    if distribution not in contract.DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; expected one of {contract.DISTRIBUTIONS}")
    return distribution


def _tensor_list(tensors: TensorList) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    try:
        out = list(tensors)
    except TypeError:
        raise TypeError("tensors must be a tensor or a sequence of tensors") from None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, not a torch.Tensor")
    return out


def _memory_span(t: torch.Tensor) -> Tuple[int, int]:
    """Byte range [lo, hi) that ``t`` may touch."""
    size = t.element_size()
    lo = t.data_ptr()
    hi = lo + size
    for n, st in zip(t.shape, t.stride()):
        if st >= 0:
            hi += (n - 1) * st * size
        else:
            lo += (n - 1) * st * size
    return lo, hi


def _check_tensors(tensors: List[torch.Tensor]) -> torch.device:
    device = None
    for i, t in enumerate(tensors):
        if t.dtype not in base.DTYPE_CODES:
            kind = "floating-point " if t.is_floating_point() else ""
            raise TypeError(
                f"tensors[{i}] has {kind}dtype {t.dtype}; supported storage dtypes are "
                "float32, bfloat16 and float16")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(
                f"tensors[{i}] is on {t.device} but tensors[0] is on {device}; one call takes "
                "tensors of one device (call once per device, with offsets)")
        if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"tensors[{i}] has internally overlapping memory (e.g. an expanded view); "
                "it cannot be updated in place element by element")
    spans = sorted((_memory_span(t), i) for i, t in enumerate(tensors) if t.numel() > 0)
    for ((lo_a, hi_a), a), ((lo_b, hi_b), b) in zip(spans, spans[1:]):
        if lo_b < hi_a:
            raise ValueError(
                f"tensors[{a}] and tensors[{b}] share memory; each element must be updated once")
    return device if device is not None else torch.device("cpu")


def canonical_offsets(tensors: Sequence[torch.Tensor]) -> List[int]:
    """Offsets of tensors laid end to end in the order given (the canonical layout)."""
    out, pos = [], 0
    for t in tensors:
        out.append(pos)
        pos += t.numel()
    return out


def _offsets(tensors: List[torch.Tensor], offsets) -> List[int]:
    if offsets is None:
        offs = canonical_offsets(tensors)
    else:
        offs = list(offsets)
        if len(offs) != len(tensors):
            raise ValueError(f"offsets has {len(offs)} entries but there are {len(tensors)} tensors")
        offs = [_index(o, f"offsets[{i}]", 0, contract.INDEX_LIMIT) for i, o in enumerate(offs)]
    ranges = sorted((o, o + t.numel(), i) for i, (o, t) in enumerate(zip(offs, tensors))
                    if t.numel() > 0)
    for (a0, a1, a), (b0, b1, b) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise ValueError(
                f"offsets give tensors[{a}] indices [{a0}, {a1}) and tensors[{b}] indices "
                f"[{b0}, {b1}): they overlap, so both would get the same noise")
    if ranges and max(r[1] for r in ranges) > contract.INDEX_LIMIT:
        raise ValueError("offsets + numel exceed the 2**63 global index space")
    return offs


def _projected_grads(projected_grads, device: torch.device) -> torch.Tensor:
    if isinstance(projected_grads, torch.Tensor):
        if projected_grads.dim() > 1:
            raise ValueError("projected_grads must be a sequence of scalars or a 1-D tensor")
        items = list(projected_grads.reshape(-1).unbind(0))
    else:
        try:
            items = list(projected_grads)
        except TypeError:
            raise TypeError("projected_grads must be a sequence with one scalar per direction") from None
    if not items:
        raise ValueError("projected_grads is empty: give one scalar per direction (q >= 1)")
    if all(not isinstance(g, torch.Tensor) for g in items):
        return torch.tensor([_real(g, f"projected_grads[{k}]") for k, g in enumerate(items)],
                            dtype=torch.float32, device=device)
    parts = []
    for k, g in enumerate(items):
        if isinstance(g, torch.Tensor):
            if g.numel() != 1:
                raise ValueError(f"projected_grads[{k}] must be a scalar, got shape {tuple(g.shape)}")
            if g.dtype.is_complex or g.dtype == torch.bool:
                raise TypeError(f"projected_grads[{k}] has dtype {g.dtype}; expected a real number")
            parts.append(g.detach().reshape(()).to(device=device, dtype=torch.float32))
        else:
            parts.append(torch.tensor(_real(g, f"projected_grads[{k}]"), dtype=torch.float32,
                                      device=device))
    return torch.stack(parts)


# --------------------------------------------------------------------------- dispatch

def _backend(device: torch.device, backend: Optional[str]) -> base.Backend:
    return base.select(device, backend, os.environ.get(ENV_BACKEND))


def _groups(tensors: List[torch.Tensor], offsets: List[int]):
    """(dtype, [contiguous tensors], [offsets], [(original, staging)]) per dtype.

    Non-contiguous tensors without overlap are processed through a contiguous staging copy
    that is written back afterwards (a temporary the size of that one tensor)."""
    groups: Dict[torch.dtype, Tuple[list, list, list]] = {}
    for t, off in zip(tensors, offsets):
        if t.numel() == 0:
            continue
        ts, offs, staged = groups.setdefault(t.dtype, ([], [], []))
        if t.is_contiguous():
            ts.append(t)
        else:
            c = t.contiguous()
            staged.append((t, c))
            ts.append(c)
        offs.append(off)
    return groups


def _run(tensors, offsets, backend, call):
    device = _check_tensors(tensors)
    impl = _backend(device, backend)
    with torch.no_grad():
        for ts, offs, staged in _groups(tensors, offsets).values():
            call(impl, [t.detach() for t in ts], offs)
            for original, staging in staged:
                original.copy_(staging)


def noise(seed, start, numel, distribution: str = "gaussian", direction: int = 0,
          backend: Optional[str] = None, device="cpu") -> torch.Tensor:
    """z for global indices [start, start + numel) as a float32 tensor on ``device``."""
    seed = _seed(seed)
    start = _index(start, "start", 0, contract.INDEX_LIMIT)
    numel = _index(numel, "numel", 0, contract.INDEX_LIMIT)
    if start + numel > contract.INDEX_LIMIT:
        raise ValueError("start + numel exceeds the 2**63 global index space")
    distribution = _distribution(distribution)
    direction = _direction(direction)
    device = torch.device(device)
    return _backend(device, backend).noise(seed, start, numel, distribution, direction, device)


def perturb_(tensors: TensorList, seed, scale, distribution: str = "gaussian", direction: int = 0,
             offsets=None, backend: Optional[str] = None, *, restore_scale=0.0,
             restore_direction: Optional[int] = None) -> None:
    """p <- p + scale * z for every tensor, in place (rounded to nearest in the storage dtype).

    With ``restore_scale`` (and ``restore_direction``) the same pass first applies
    p <- rn(p + restore_scale * z_restore): this is how a q-direction step switches from
    direction k to k + 1 in one sweep over the weights.
    """
    tensors = _tensor_list(tensors)
    seed = _seed(seed)
    scale = _real(scale, "scale")
    distribution = _distribution(distribution)
    direction = _direction(direction)
    restore_scale = _real(restore_scale, "restore_scale")
    if restore_scale != 0.0 and restore_direction is None:
        raise ValueError("restore_scale is set but restore_direction is not")
    restore_direction = _direction(restore_direction or 0, "restore_direction")
    offs = _offsets(tensors, offsets)
    _run(tensors, offs, backend, lambda impl, ts, os_: impl.perturb(
        ts, os_, seed, distribution, scale, direction, restore_scale, restore_direction))


def zo_update_(tensors: TensorList, seed, *, lr, projected_grads, restore_scale=0.0,
               restore_direction: Optional[int] = None, weight_decay=0.0,
               distribution: str = "gaussian", offsets=None, backend: Optional[str] = None,
               stochastic_rounding: bool = True) -> None:
    """One fused pass: remove the perturbation still applied, then the ZO-SGD update.

    p <- rn(p + restore_scale * z_r)  (skipped when restore_scale == 0; ``restore_direction``
    defaults to the last direction q - 1), then p <- p - lr * (sum_k g_k z_k + weight_decay * p),
    stochastically rounded for bfloat16/float16 storage when ``stochastic_rounding`` (bits
    from the purpose-1 stream of ``seed``), rounded to nearest otherwise.
    ``projected_grads``: one scalar per direction k = 0 .. q-1 (floats or 0-d tensors; device
    tensors are read on the device, without a host synchronisation).
    """
    tensors = _tensor_list(tensors)
    seed = _seed(seed)
    lr = _real(lr, "lr")
    weight_decay = _real(weight_decay, "weight_decay")
    restore_scale = _real(restore_scale, "restore_scale")
    distribution = _distribution(distribution)
    if not isinstance(stochastic_rounding, bool):
        raise TypeError("stochastic_rounding must be True or False")
    offs = _offsets(tensors, offsets)
    device = _check_tensors(tensors)
    grads = _projected_grads(projected_grads, device)
    q = grads.numel()
    if q >= contract.DIRECTION_LIMIT:
        raise ValueError("too many directions")
    restore_direction = q - 1 if restore_direction is None else _direction(
        restore_direction, "restore_direction")
    _run(tensors, offs, backend, lambda impl, ts, os_: impl.update(
        ts, os_, seed, distribution, lr, grads, restore_scale, restore_direction, weight_decay,
        stochastic_rounding))
