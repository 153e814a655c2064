"""Public kernel API: validate, group by dtype, dispatch to a backend.

Every check runs before any weight is touched, so a bad call leaves the tensors as they were:
argument types and ranges, scalars finite after rounding to float32, tensor layout, dtype,
device, inference tensors, overlapping memory (see ``internal_overlap``), offsets, and the
backend's availability. The backend is only called once all of them have passed.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from zofo_kernels.core import contract
from zofo_kernels.core.backends import base
from zofo_kernels.core.validation import kernel_scalar

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]

ENV_BACKEND = "ZOFO_BACKEND"


def available_backends() -> Dict[str, base.BackendStatus]:
    """Each backend's availability: ``{"cpu": BackendStatus(name, available, reason), ...}``."""
    return base.statuses()


# --------------------------------------------------------------------------- validation

def _index(value, name: str, low: int, high: int) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single integer, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an integer, got a {value.dtype} tensor")
        v = int(value.reshape(()).item())
    else:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        try:
            v = operator.index(value)
        except TypeError:
            if isinstance(value, np.ndarray) and value.size != 1:
                raise ValueError(f"{name} must be a single integer, got an array of shape "
                                 f"{value.shape}") from None
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not low <= v < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {v}")
    return v


def _seed(seed) -> int:
    return _index(seed, "seed", 0, contract.SEED_LIMIT)


def _direction(direction, name="direction") -> int:
    return _index(direction, name, 0, contract.DIRECTION_LIMIT)


def _distribution(distribution) -> str:
    if not isinstance(distribution, str) or distribution not in contract.DISTRIBUTIONS:
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


# --------------------------------------------------------------------------- memory overlap
#
# Exact where it matters, conservative where an exact answer would cost too much, never
# "accept when unsure". Addresses are bytes; an element occupies [addr, addr + itemsize).
#
# * One tensor (internal overlap): size-1 dimensions are dropped; a zero stride on a longer
#   dimension is an overlap. Sorted by stride, if every stride is at least the byte extent of
#   all shorter-stride dimensions together, the index -> address map is injective (a mixed
#   radix number), so the elements are distinct. Otherwise the element addresses are
#   enumerated and compared exactly when the tensor has at most ENUMERATE_LIMIT elements;
#   above that the tensor is refused as "not provably free of overlap".
# * Two tensors: disjoint byte spans are disjoint. Otherwise, with g the gcd of every stride
#   (bytes) of both, every element of a tensor starts at the same residue mod g; if the two
#   residue intervals [start mod g, start mod g + itemsize) do not meet mod g, no byte is
#   shared (e.g. the interleaved columns x.view(n, 2)[:, 0] and [:, 1]). Otherwise addresses
#   are enumerated and compared exactly up to ENUMERATE_LIMIT elements, and refused above.

ENUMERATE_LIMIT = 1 << 22


def _dims(t: torch.Tensor) -> List[Tuple[int, int]]:
    es = t.element_size()
    return [(n, abs(st) * es) for n, st in zip(t.shape, t.stride()) if n > 1]


def _memory_span(t: torch.Tensor) -> Tuple[int, int]:
    """Byte range [lo, hi) that ``t`` may touch (``t`` non-empty)."""
    size = t.element_size()
    lo = t.data_ptr()
    hi = lo + size
    for n, st in zip(t.shape, t.stride()):
        if st >= 0:
            hi += (n - 1) * st * size
        else:
            lo += (n - 1) * st * size
    return lo, hi


def _addresses(t: torch.Tensor) -> torch.Tensor:
    """Start address (bytes) of every element of ``t``, int64, in no particular order."""
    es = t.element_size()
    a = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        a = a.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * (st * es)
    return a.reshape(-1) + t.data_ptr()


def _intervals_disjoint(starts: torch.Tensor, sizes: torch.Tensor) -> bool:
    order = torch.argsort(starts)
    s, z = starts[order], sizes[order]
    return bool((s[1:] >= s[:-1] + z[:-1]).all())


def internal_overlap(t: torch.Tensor) -> Optional[str]:
    """None if the elements of strided ``t`` occupy pairwise disjoint bytes, else a reason."""
    if t.numel() <= 1:
        return None
    dims = sorted(_dims(t), key=lambda d: d[1])
    extent = t.element_size()
    for n, st in dims:
        if st == 0:
            return "internally overlapping memory (a zero stride, e.g. an expanded view)"
        if st < extent:
            break
        extent += (n - 1) * st
    else:
        return None
    if t.numel() > ENUMERATE_LIMIT:
        return ("strides that the overlap test cannot prove free of overlap (more than "
                f"{ENUMERATE_LIMIT} elements for the exact test); pass a contiguous copy")
    a = _addresses(t)
    if _intervals_disjoint(a, torch.full_like(a, t.element_size())):
        return None
    return "internally overlapping memory (e.g. an unfold or as_strided view)"


def _pair_overlap(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """None if non-empty ``a`` and ``b`` share no byte, else a reason; each is known to be free
    of internal overlap."""
    (lo_a, hi_a), (lo_b, hi_b) = _memory_span(a), _memory_span(b)
    if hi_a <= lo_b or hi_b <= lo_a:
        return None
    g = 0
    for _, st in _dims(a) + _dims(b):
        g = math.gcd(g, st)
    ea, eb = a.element_size(), b.element_size()
    if g > 0 and ea + eb <= g:
        ra, rb = a.data_ptr() % g, b.data_ptr() % g
        if (rb - ra) % g >= ea and (ra - rb) % g >= eb:
            return None
    if a.numel() + b.numel() > ENUMERATE_LIMIT:
        return ("may share memory (the overlap test cannot prove them disjoint with more than "
                f"{ENUMERATE_LIMIT} elements)")
    xa, xb = _addresses(a), _addresses(b)
    starts = torch.cat([xa, xb])
    sizes = torch.cat([torch.full_like(xa, ea), torch.full_like(xb, eb)])
    if _intervals_disjoint(starts, sizes):
        return None
    return "share memory"


def _check_tensors(tensors: List[torch.Tensor]) -> torch.device:
    device = None
    inference = torch.is_inference_mode_enabled()
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            raise TypeError(
                f"tensors[{i}] has layout {t.layout} (a sparse or other non-strided tensor); "
                "only dense strided tensors can be updated in place")
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
        if t.is_inference() and not inference:
            raise ValueError(
                f"tensors[{i}] is an inference tensor (made under torch.inference_mode()); it "
                "cannot be updated in place outside inference mode")
        reason = internal_overlap(t)
        if reason is not None:
            raise ValueError(f"tensors[{i}] has {reason}; it cannot be updated in place "
                             "element by element")
    if device is not None and device.type == "meta":
        raise ValueError("meta tensors have no data to update")
    spans = sorted((_memory_span(t), i) for i, t in enumerate(tensors) if t.numel() > 0)
    for j, ((lo_a, hi_a), a) in enumerate(spans):
        for (lo_b, _), b in spans[j + 1:]:
            if lo_b >= hi_a:
                break
            reason = _pair_overlap(tensors[a], tensors[b])
            if reason is not None:
                a_, b_ = sorted((a, b))
                raise ValueError(f"tensors[{a_}] and tensors[{b_}] {reason}; each element must "
                                 "be updated once")
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


def _projected_grads(projected_grads, device: torch.device, check_finite: bool) -> torch.Tensor:
    """The q projected gradients as a float32 tensor of shape (q,) on ``device``.

    Every value is checked to be finite after its rounding to float32 before any weight is
    touched. Python numbers and host (CPU) tensors are checked on the host (free). Values held
    in device tensors are checked on the device and the one-bit answer read back: one host
    synchronisation, skipped (with the check) when ``check_finite`` is False."""
    if isinstance(projected_grads, torch.Tensor):
        if projected_grads.dim() > 1:
            raise ValueError("projected_grads must be a sequence of scalars or a 1-D tensor")
        items = list(projected_grads.reshape(-1).unbind(0))
    elif isinstance(projected_grads, (str, bytes)):
        raise TypeError("projected_grads must be a sequence with one scalar per direction")
    else:
        try:
            items = list(projected_grads)
        except TypeError:
            raise TypeError("projected_grads must be a sequence with one scalar per direction") from None
    if not items:
        raise ValueError("projected_grads is empty: give one scalar per direction (q >= 1)")
    if all(not isinstance(g, torch.Tensor) for g in items):
        return torch.tensor([kernel_scalar(g, f"projected_grads[{k}]")
                             for k, g in enumerate(items)], dtype=torch.float32, device=device)
    parts, on_device = [], False
    for k, g in enumerate(items):
        if isinstance(g, torch.Tensor):
            if g.numel() != 1:
                raise ValueError(f"projected_grads[{k}] must be a scalar, got shape {tuple(g.shape)}")
            if g.dtype.is_complex or g.dtype == torch.bool:
                raise TypeError(f"projected_grads[{k}] has dtype {g.dtype}; expected a real number")
            if g.device.type == "cpu":
                v = g.detach().reshape(()).to(torch.float32)
                if not bool(torch.isfinite(v)):
                    raise ValueError(
                        f"projected_grads[{k}] = {g.detach().reshape(()).item()!r} is not "
                        "finite in float32")
            else:
                on_device = True
            parts.append(g.detach().reshape(()).to(device=device, dtype=torch.float32))
        else:
            parts.append(torch.tensor(kernel_scalar(g, f"projected_grads[{k}]"),
                                      dtype=torch.float32, device=device))
    grads = torch.stack(parts)
    if on_device and check_finite and not bool(torch.isfinite(grads).all()):
        raise ValueError(f"projected_grads holds a value that is not finite in float32: "
                         f"{grads.tolist()}")
    return grads


def _masks(masks, tensors: List[torch.Tensor], device: torch.device) -> Optional[List[torch.Tensor]]:
    """None, or one bitmap per tensor as :func:`magnitude_mask` returns them: int32,
    contiguous, ``contract.mask_words(numel)`` words, on the tensors' device, sharing no
    memory with any tensor."""
    if masks is None:
        return None
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    try:
        masks = list(masks)
    except TypeError:
        raise TypeError("mask must be None or a sequence of bitmaps, one per tensor") from None
    if len(masks) != len(tensors):
        raise ValueError(f"mask has {len(masks)} bitmaps but there are {len(tensors)} tensors")
    spans = [_memory_span(t) for t in tensors if t.numel() > 0]
    for i, (m, t) in enumerate(zip(masks, tensors)):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask[{i}] is a {type(m).__name__}, not a torch.Tensor")
        words = contract.mask_words(t.numel())
        if m.dtype != torch.int32 or m.dim() != 1 or m.numel() != words:
            raise ValueError(f"mask[{i}] must be a 1-D int32 tensor of {words} words (one bit "
                             f"per element of tensors[{i}]), got {m.dtype} of shape "
                             f"{tuple(m.shape)}")
        if not m.is_contiguous():
            raise ValueError(f"mask[{i}] is not contiguous")
        if m.device != device:
            raise ValueError(f"mask[{i}] is on {m.device} but the tensors are on {device}")
        if m.numel() > 0:
            lo, hi = _memory_span(m)
            if any(lo < b and a < hi for a, b in spans):
                raise ValueError(f"mask[{i}] shares memory with a tensor it masks")
    return [m.detach() for m in masks]


def _thresholds(thresholds, n: int) -> List[float]:
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().reshape(-1).tolist()
    try:
        values = list(thresholds)
    except TypeError:
        raise TypeError("thresholds must be a sequence with one number per tensor") from None
    if len(values) != n:
        raise ValueError(f"{len(values)} thresholds for {n} tensors")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise TypeError(f"thresholds[{i}] must be a real number, got {v!r}")
        v32 = float(np.float32(v))
        if math.isnan(v32):
            raise ValueError(f"thresholds[{i}] is NaN")
        out.append(v32)
    return out


def _factors(factors, tensors: List[torch.Tensor], device: torch.device, masks,
             directions: Sequence[int]) -> Optional[list]:
    """None, or one entry per tensor as :func:`lowrank_factors` returns them: None or a pair
    (U, V) of contiguous float32 tensors on the tensors' device, (D, m, r) and (D, n, r) with
    (m, n) the tensor's matrix view (``contract.lowrank_shape``), one r for the call, D above
    every direction the call uses, sharing no memory with any tensor."""
    if factors is None:
        return None
    if masks is not None:
        raise ValueError("mask and factors cannot be combined: a step is either sparse or "
                         "low-rank")
    try:
        factors = list(factors)
    except TypeError:
        raise TypeError("factors must be None or a sequence with one entry (None or a (U, V) "
                        "pair) per tensor") from None
    if len(factors) != len(tensors):
        raise ValueError(f"factors has {len(factors)} entries but there are {len(tensors)} "
                         "tensors")
    spans = [_memory_span(t) for t in tensors if t.numel() > 0]
    rank, out = None, []
    for i, (f, t) in enumerate(zip(factors, tensors)):
        if f is None:
            out.append(None)
            continue
        if not (isinstance(f, (tuple, list)) and len(f) == 2
                and all(isinstance(x, torch.Tensor) for x in f)):
            raise TypeError(f"factors[{i}] must be None or a (U, V) pair of tensors")
        u, v = f
        r = int(u.shape[-1]) if u.dim() == 3 else -1
        mn = contract.lowrank_shape(t.shape, r) if r >= 1 else None
        if mn is None or tuple(u.shape[1:]) != (mn[0], r) or tuple(v.shape) != (
                u.shape[0], mn[1], r):
            raise ValueError(f"factors[{i}] must be U of shape (D, m, r) and V of shape "
                             f"(D, n, r) for tensors[{i}] of shape {tuple(t.shape)} viewed as "
                             f"(m, n) = (shape[0], numel / shape[0]), r <= min(m, n); got "
                             f"{tuple(u.shape)} and {tuple(v.shape)}")
        if rank is not None and r != rank:
            raise ValueError(f"factors[{i}] has rank {r} but an earlier tensor rank {rank}: "
                             "one rank per call")
        rank = r
        for name, x in (("U", u), ("V", v)):
            if x.dtype != torch.float32 or not x.is_contiguous() or x.device != device:
                raise ValueError(f"factors[{i}] {name} must be a contiguous float32 tensor on "
                                 f"{device}, got {x.dtype} on {x.device}"
                                 + ("" if x.is_contiguous() else ", not contiguous"))
            lo, hi = _memory_span(x)
            if any(lo < b and a < hi for a, b in spans):
                raise ValueError(f"factors[{i}] {name} shares memory with a tensor it perturbs")
        if max(directions) >= u.shape[0]:
            raise ValueError(f"factors[{i}] hold {u.shape[0]} direction(s) but the call uses "
                             f"direction {max(directions)}")
        out.append((u.detach(), v.detach()))
    return out


# --------------------------------------------------------------------------- dispatch

def _backend(device: torch.device, backend: Optional[str]) -> base.Backend:
    return base.select(device, backend, os.environ.get(ENV_BACKEND))


def _groups(tensors: List[torch.Tensor], offsets: List[int],
            masks: Optional[List[torch.Tensor]] = None, factors: Optional[list] = None):
    """{dtype: ([contiguous tensors], [offsets], [(original, staging)], [masks] or None,
    [factors] or None)}.

    Non-contiguous tensors without overlap are processed through a contiguous staging copy
    that is written back afterwards (a temporary the size of that one tensor); a mask or a
    factor pair follows its tensor (both index the elements in row-major order, which the
    staging copy keeps)."""
    groups: Dict[torch.dtype, Tuple[list, list, list, Optional[list], Optional[list]]] = {}
    for i, (t, off) in enumerate(zip(tensors, offsets)):
        if t.numel() == 0:
            continue
        ts, offs, staged, ms, fs = groups.setdefault(
            t.dtype, ([], [], [], None if masks is None else [],
                      None if factors is None else []))
        if t.is_contiguous():
            ts.append(t)
        else:
            c = t.contiguous()
            staged.append((t, c))
            ts.append(c)
        offs.append(off)
        if ms is not None:
            ms.append(masks[i])
        if fs is not None:
            fs.append(factors[i])
    return groups


def _bump_versions(tensors: List[torch.Tensor]) -> None:
    """Tell autograd that ``tensors`` were modified in place (as any in-place torch op does),
    so a backward through a graph that saved one of them raises instead of using the new
    values. O(1) per tensor: no pass over the data."""
    tracked = [t for t in tensors if not t.is_inference()]
    if tracked:
        torch.autograd.graph.increment_version(tracked)


def _run(tensors, offsets, device, backend, call, masks=None, factors=None):
    """Every check has passed (``device`` is the result of :func:`_check_tensors`): choose the
    backend, then one backend call per dtype group: ``call(impl, tensors, offsets, masks,
    factors)``."""
    impl = _backend(device, backend)
    groups = _groups(tensors, offsets, masks, factors)
    with torch.no_grad():
        for ts, offs, staged, ms, fs in groups.values():
            try:
                call(impl, [t.detach() for t in ts], offs, ms, fs)
                for original, staging in staged:
                    original.copy_(staging)
            finally:
                # the backends write through raw pointers (or into staging copies); the
                # version counter is shared by a tensor, its views and its .detach()
                staging_ids = {id(c) for _, c in staged}
                _bump_versions([t for t in ts if id(t) not in staging_ids])


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = (f"built with CUDA {torch.version.cuda}" if torch.version.cuda
                 else "built without CUDA")
        raise base.BackendUnavailableError(
            f"noise on device {str(device)!r} was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}, {build}); use device='cpu'")
    if device.type == "meta":
        raise ValueError("noise cannot be made on the meta device")
    return device


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
    device = _device(device)
    return _backend(device, backend).noise(seed, start, numel, distribution, direction, device)


def perturb_(tensors: TensorList, seed, scale, distribution: str = "gaussian", direction: int = 0,
             offsets=None, backend: Optional[str] = None, *, restore_scale=0.0,
             restore_direction: Optional[int] = None, mask=None, factors=None) -> None:
    """p <- p + scale * z for every tensor, in place (rounded to nearest in the storage dtype).

    With ``restore_scale`` (and ``restore_direction``) the same pass first applies
    p <- rn(p + restore_scale * z_restore): this is how a q-direction step switches from
    direction k to k + 1 in one sweep over the weights.

    Every argument is checked before any weight is written; a rejected call raises
    ``TypeError``/``ValueError`` (an unavailable backend ``BackendUnavailableError``) and leaves
    every tensor as it was. Scalars must be finite after rounding to float32 and a non-zero
    ``scale``/``restore_scale`` must not round to 0. Autograd sees the call as an in-place
    modification of every tensor (their version counters are bumped).

    ``mask`` (sparse perturbation): one bitmap per tensor, as :func:`magnitude_mask` returns
    them; only elements whose bit is set are changed (z_i becomes m_i * z_i), the others keep
    their bit pattern.

    ``factors`` (low-rank directions): one entry per tensor, as :func:`lowrank_factors`
    returns them; a tensor with a pair (U, V) takes the rank-r z of the contract
    (``contract.lowrank_z`` of U[direction], V[direction]) in place of its dense noise, a
    tensor with None its dense z. Not combinable with ``mask``.
    """
    tensors = _tensor_list(tensors)
    seed = _seed(seed)
    scale = kernel_scalar(scale, "scale", nonzero=True)
    distribution = _distribution(distribution)
    direction = _direction(direction)
    restore_scale = kernel_scalar(restore_scale, "restore_scale", nonzero=True)
    if restore_scale != 0.0 and restore_direction is None:
        raise ValueError("restore_scale is set but restore_direction is not")
    restore_direction = _direction(restore_direction or 0, "restore_direction")
    offs = _offsets(tensors, offsets)
    device = _check_tensors(tensors)
    masks = _masks(mask, tensors, device)
    pairs = _factors(factors, tensors, device, masks,
                     base.call_directions((direction,), restore_scale, restore_direction))
    _run(tensors, offs, device, backend, lambda impl, ts, os_, ms, fs: impl.perturb(
        ts, os_, seed, distribution, scale, direction, restore_scale, restore_direction,
        masks=ms, factors=fs), masks, pairs)


def zo_update_(tensors: TensorList, seed, *, lr, projected_grads, restore_scale=0.0,
               restore_direction: Optional[int] = None, weight_decay=0.0,
               distribution: str = "gaussian", offsets=None, backend: Optional[str] = None,
               stochastic_rounding: bool = True, check_finite: bool = True,
               mask=None, factors=None) -> None:
    """One fused pass: remove the perturbation still applied, then the ZO-SGD update.

    p <- rn(p + restore_scale * z_r)  (skipped when restore_scale == 0; ``restore_direction``
    defaults to the last direction q - 1), then p <- p - lr * (sum_k g_k z_k + weight_decay * p),
    stochastically rounded for bfloat16/float16 storage when ``stochastic_rounding`` (bits
    from the purpose-1 stream of ``seed``), rounded to nearest otherwise.

    ``projected_grads``: one scalar per direction k = 0 .. q-1 (Python numbers, 0-d tensors or
    a 1-D tensor). Each must be finite after rounding to float32, like ``lr``,
    ``weight_decay`` and ``restore_scale`` (non-zero ones of these three must not round to
    0): everything is checked before any weight is written. Numbers and CPU tensors are
    checked on the host at no cost; device tensors are checked on the device and the answer
    read back, one host synchronisation per call. ``check_finite=False`` skips that check
    and its synchronisation (device tensors only; a non-finite value then reaches the
    weights).

    ``mask`` (sparse perturbation): as in :func:`perturb_`; elements whose bit is 0 keep
    their bit pattern (no update, no weight decay, no rounding).

    ``factors`` (low-rank directions): as in :func:`perturb_`; every z_k (and z_r) of a
    tensor with factors is its low-rank z of direction k, so the factors must hold q
    directions (and the restore direction).
    """
    tensors = _tensor_list(tensors)
    seed = _seed(seed)
    lr = kernel_scalar(lr, "lr", nonzero=True)
    weight_decay = kernel_scalar(weight_decay, "weight_decay", nonzero=True)
    restore_scale = kernel_scalar(restore_scale, "restore_scale", nonzero=True)
    distribution = _distribution(distribution)
    if not isinstance(stochastic_rounding, bool):
        raise TypeError("stochastic_rounding must be True or False")
    if not isinstance(check_finite, bool):
        raise TypeError("check_finite must be True or False")
    offs = _offsets(tensors, offsets)
    device = _check_tensors(tensors)
    masks = _masks(mask, tensors, device)
    grads = _projected_grads(projected_grads, device, check_finite)
    q = grads.numel()
    if q >= contract.DIRECTION_LIMIT:
        raise ValueError("too many directions")
    restore_direction = q - 1 if restore_direction is None else _direction(
        restore_direction, "restore_direction")
    pairs = _factors(factors, tensors, device, masks,
                     base.call_directions(range(q), restore_scale, restore_direction))
    _run(tensors, offs, device, backend, lambda impl, ts, os_, ms, fs: impl.update(
        ts, os_, seed, distribution, lr=lr, projected_grads=grads, restore_scale=restore_scale,
        restore_direction=restore_direction, weight_decay=weight_decay,
        stochastic_rounding=stochastic_rounding, masks=ms, factors=fs), masks, pairs)


def magnitude_mask(tensors: TensorList, thresholds, backend: Optional[str] = None
                   ) -> List[torch.Tensor]:
    """The sparse-perturbation bitmaps of ``tensors`` by magnitude: for tensor i, bit j (bit
    j mod 32 of int32 word j div 32, element j in row-major order) is set iff
    float32(|t_j|) <= float32(thresholds[i]) (a NaN element: never). Returns one int32
    tensor of ``ceil(numel / 32)`` words per tensor, on the tensors' device: 1/32 of a
    float32 tensor's memory. Pass them as ``mask=`` to :func:`perturb_` and
    :func:`zo_update_`; build them before the step's first sweep (the weights move during a
    step, the mask must not). Reads the tensors, writes nothing to them."""
    tensors = _tensor_list(tensors)
    values = _thresholds(thresholds, len(tensors))
    device = _check_tensors(tensors)
    masks = [torch.zeros(contract.mask_words(t.numel()), dtype=torch.int32, device=device)
             for t in tensors]
    todo = [i for i, t in enumerate(tensors) if t.numel() > 0]
    if not todo:
        return masks
    impl = _backend(device, backend)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i in todo:
        by_dtype.setdefault(tensors[i].dtype, []).append(i)
    with torch.no_grad():
        for idx in by_dtype.values():
            impl.magnitude_mask([tensors[i].detach().contiguous() for i in idx],
                                [values[i] for i in idx], [masks[i] for i in idx])
    return masks


def lowrank_factors(tensors: TensorList, seed, rank: int, *, v_seed=None,
                    distribution: str = "gaussian", n_directions: int = 1, offsets=None,
                    backend: Optional[str] = None) -> List[Optional[Tuple[torch.Tensor,
                                                                          torch.Tensor]]]:
    """The low-rank factors of a step with seed ``seed``, one entry per tensor, to pass as
    ``factors=`` to every :func:`perturb_` and :func:`zo_update_` of that step (with the same
    seed, distribution and offsets).

    A tensor of dim >= 2 viewed as the matrix (m, n) = (shape[0], numel / shape[0]) with
    ``rank`` <= min(m, n) gets U of shape (n_directions, m, rank) and V of shape
    (n_directions, n, rank), float32 on its device; any other tensor gets None (its z stays
    dense). Direction k's z is U[k] V[k]^T / sqrt(rank), in the contract's fixed-order float32
    formula (``contract.lowrank_z``); U[k][i, l] = noise(u_seed, o + i*rank + l, k) and
    V[k][j, l] = noise(v_seed, o + j*rank + l, k) with o the tensor's global offset and
    (u_seed, v_seed) = ``contract.lowrank_seeds(seed, v_key)``, v_key = ``v_seed`` when given
    (hold V for several steps by passing the seed of the first step of its period), else
    ``seed``. Memory: (m + n) * rank * n_directions floats per matrix, nothing the size of
    the tensor."""
    tensors = _tensor_list(tensors)
    seed = _seed(seed)
    v_key = seed if v_seed is None else _index(v_seed, "v_seed", 0, contract.SEED_LIMIT)
    rank = _index(rank, "rank", 1, 1 << 31)
    distribution = _distribution(distribution)
    q = _index(n_directions, "n_directions", 1, contract.DIRECTION_LIMIT)
    offs = _offsets(tensors, offsets)
    device = _check_tensors(tensors)
    u_seed, v_seed_ = contract.lowrank_seeds(seed, v_key)
    out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = []
    impl = None
    for t, off in zip(tensors, offs):
        mn = contract.lowrank_shape(t.shape, rank)
        if mn is None:
            out.append(None)
            continue
        impl = impl or _backend(device, backend)
        m, n = mn
        pair = tuple(torch.stack([impl.noise(s, off, rows * rank, distribution, k, device)
                                  .view(rows, rank) for k in range(q)])
                     for s, rows in ((u_seed, m), (v_seed_, n)))
        out.append(pair)
    return out
