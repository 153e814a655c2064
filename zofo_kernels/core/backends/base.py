"""What a backend implements, and the registry that finds one for a device.

The public functions in :mod:`zofo_kernels.core.ops` validate every argument, split the tensors
into groups of one dtype (all on one device), and call a backend once per group with:

* ``tensors``: non-empty list of contiguous tensors of one dtype (float32, bfloat16, float16)
  on one device; the backend updates them in place;
* ``offsets``: list of Python ints, the global index of each tensor's first element;
* ``seed``: int in [0, 2**63); ``distribution``: "gaussian" or "rademacher";
* all scalars as Python floats, except ``projected_grads``, a float32 tensor of shape (q,)
  on the tensors' device (so a device-side value never forces a host synchronisation).

Float math contract (all backends): every scalar is rounded to float32 first; products and
sums are separately rounded float32 operations (no fused multiply-add), in this order:

    perturb:  w = rn(p + rs * z_r)   [only if rs != 0]   ;  p = rn(w + s * z_d)
    update:   w = rn(p + rs * z_r)   [only if rs != 0]
              d = g_0 * z_0 ; d = d + g_k * z_k  (k = 1 .. q-1)
              d = d + wd * w ;  v = w - lr * d ;  p = sr(v) for 16-bit storage, else rn(v)

where rn rounds to the storage dtype (nearest even) and sr is
:func:`zofo_kernels.core.contract.stochastic_round_bits` with the rounding-stream word of the element.

Sparse perturbation: ``perturb`` and ``update`` take ``masks``, None or one int32 bitmap per
tensor (the layout of :func:`zofo_kernels.core.contract.mask_bits`: ``mask_words(numel)`` words,
contiguous, on the tensors' device). An element whose bit is 0 keeps its bit pattern (no
restore, no perturbation, no weight decay, no rounding; a backend may store the same bits back,
as the CPU kernels' vectorised blend does); an element whose bit is 1
follows the formulas above exactly. ``magnitude_mask`` writes such bitmaps:
bit j = float32(|t_j|) <= threshold (NaN: 0), the bits past numel 0.

Low-rank directions: ``perturb`` and ``update`` take ``factors``, None or one entry per tensor:
None (that tensor's z is the dense contract noise) or a pair (U, V) of contiguous float32
tensors on the tensors' device, U of shape (D, m, r) and V of shape (D, n, r) with
m * n = numel and the same r for every pair of the call. Direction k (k < D; every direction
the call uses, restore included) takes z_j = lowrank_z(U[k], V[k]) of
:mod:`zofo_kernels.core.contract` (row j div n, column j mod n, products summed in the order
l = 0 .. r-1, then times float32(1/sqrt(r))) in place of the noise, everywhere the formulas
above use z; nothing else changes (the stochastic-rounding bits still come from ``seed``).
``masks`` and ``factors`` are never given together.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# The codes the native and Triton kernels take: zofo_noise.h's DType and Distribution and the
# Triton kernels' STORAGE_* and DIST_* constants spell the same numbers (a test checks).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DISTRIBUTION_CODES = {"gaussian": 0, "rademacher": 1}

Factors = Tuple[torch.Tensor, torch.Tensor]  # (U, V) of one tensor: (D, m, r), (D, n, r)

TABLE_CACHE_SIZE = 64  # launch tables a backend keeps (the least recently used go first)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class MixedDtypeError(TypeError, ValueError):
    """Tensors of different dtypes in one backend call: a wrong dtype (TypeError) and a
    malformed group (ValueError) at once, so that either ``except`` catches it."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or a short description of what it runs on

    def __bool__(self) -> bool:  # `if available_backends()["cuda"]:` reads naturally
        return self.available


class Backend(abc.ABC):
    """Base class; subclasses implement the abstract methods below."""

    name: str = "?"

    @abc.abstractmethod
    def status(self) -> BackendStatus:
        ...

    @abc.abstractmethod
    def supports_device(self, device: torch.device) -> bool:
        ...

    @abc.abstractmethod
    def noise(self, seed: int, start: int, numel: int, distribution: str, direction: int,
              device: torch.device) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def perturb(self, tensors: List[torch.Tensor], offsets: List[int], seed: int,
                distribution: str, scale: float, direction: int,
                restore_scale: float, restore_direction: int, *,
                masks: Optional[List[torch.Tensor]] = None,
                factors: Optional[List[Optional[Factors]]] = None) -> None:
        ...

    @abc.abstractmethod
    def update(self, tensors: List[torch.Tensor], offsets: List[int], seed: int,
               distribution: str, *, lr: float, projected_grads: torch.Tensor,
               restore_scale: float, restore_direction: int, weight_decay: float,
               stochastic_rounding: bool, masks: Optional[List[torch.Tensor]] = None,
               factors: Optional[List[Optional[Factors]]] = None) -> None:
        """The scalars after ``distribution`` are keyword-only (as in
        :func:`zofo_kernels.core.ops.zo_update_`): ten positional values are too easy to
        permute."""

    @abc.abstractmethod
    def magnitude_mask(self, tensors: List[torch.Tensor], thresholds: List[float],
                       masks: List[torch.Tensor]) -> None:
        """Write the magnitude-rule bitmap of ``tensors[i]`` with ``thresholds[i]`` (a Python
        float, already a float32 value) into ``masks[i]`` (int32, ``mask_words(numel)``
        words, contiguous, same device; every word is overwritten)."""


_FACTORIES: Dict[str, Callable[[], Backend]] = {}
_INSTANCES: Dict[str, Backend] = {}
BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")


def register(name: str, factory: Callable[[], Backend]) -> None:
    _FACTORIES[name] = factory


def get(name: str) -> Backend:
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def statuses() -> Dict[str, BackendStatus]:
    return {name: get(name).status() for name in BACKEND_NAMES if name in _FACTORIES}


# Preference order when no backend is named.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def select(device: torch.device, requested: Optional[str], env_value: Optional[str]) -> Backend:
    """The backend for tensors on ``device``: the requested one (argument, then environment
    variable ZOFO_BACKEND; an empty variable counts as unset, an empty argument is refused),
    else the fastest available one."""
    if requested is not None:
        if not isinstance(requested, str) or requested not in BACKEND_NAMES:
            raise ValueError(f"backend must be None (the fastest available) or one of "
                             f"{BACKEND_NAMES}, got {requested!r}")
        name = requested
    else:
        name = env_value or None  # an empty ZOFO_BACKEND counts as unset
    if name:
        backend = get(name)
        st = backend.status()
        if not st.available:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {st.reason}")
        if not backend.supports_device(device):
            raise BackendUnavailableError(
                f"backend {name!r} cannot run on tensors on device {device}")
        return backend
    for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
        if candidate in _FACTORIES:
            backend = get(candidate)
            if backend.status().available and backend.supports_device(device):
                return backend
    raise BackendUnavailableError(f"no backend can run on device {device}")


def flat_views(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [t.view(-1) for t in tensors]


def check_masks(tensors: List[torch.Tensor], masks: Optional[List[torch.Tensor]],
                backend: str) -> None:
    """The checks every backend makes on a call's bitmaps (None, or one per tensor: int32,
    contiguous, ``mask_words(numel)`` words, on the tensors' device)."""
    if masks is None:
        return
    if len(masks) != len(tensors):
        raise ValueError(f"{len(masks)} masks for {len(tensors)} tensors ({backend} backend)")
    for i, (t, m) in enumerate(zip(tensors, masks)):
        words = (t.numel() + 31) // 32
        if m.dtype != torch.int32 or not m.is_contiguous() or m.numel() != words \
                or m.device != t.device:
            raise ValueError(f"masks[{i}] must be a contiguous int32 tensor of {words} words on "
                             f"{t.device}, got {m.dtype} with {m.numel()} elements on {m.device}")


def call_directions(swept: Iterable[int], restore_scale: float,
                    restore_direction: int) -> Tuple[int, ...]:
    """The directions a perturb or update call draws noise for: the ``swept`` ones (a
    perturb's one direction, an update's 0 .. q-1) and the restore direction when the call
    restores (``restore_scale`` != 0). Factors and masks are checked against these."""
    return tuple(swept) + ((restore_direction,) if restore_scale != 0.0 else ())


def check_factors(tensors: List[torch.Tensor], factors: Optional[List[Optional[Factors]]],
                  directions: Sequence[int], backend: str,
                  masks: Optional[List[torch.Tensor]] = None) -> int:
    """The checks every backend makes on a call's low-rank factors (see the module docstring):
    one entry per tensor, each None or (U, V) float32, contiguous, on the tensor's device, of
    shapes (D, m, r) and (D, n, r) with m * n = numel, one r for the call, and D above every
    direction in ``directions``. Returns r (0 when no tensor has factors)."""
    if factors is None:
        return 0
    if masks is not None:
        raise ValueError(f"masks and low-rank factors cannot be combined ({backend} backend)")
    if len(factors) != len(tensors):
        raise ValueError(f"{len(factors)} factor pairs for {len(tensors)} tensors "
                         f"({backend} backend)")
    rank = 0
    for i, (t, f) in enumerate(zip(tensors, factors)):
        if f is None:
            continue
        u, v = f
        ok = all(x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 3
                 and x.device == t.device for x in (u, v))
        if not ok or u.shape[0] != v.shape[0] or u.shape[2] != v.shape[2] \
                or u.shape[1] * v.shape[1] != t.numel() or u.shape[2] < 1:
            raise ValueError(f"factors[{i}] must be contiguous float32 (D, m, r) and (D, n, r) "
                             f"tensors on {t.device} with m * n = {t.numel()}, got "
                             f"{tuple(u.shape)} {u.dtype} and {tuple(v.shape)} {v.dtype}")
        if rank and u.shape[2] != rank:
            raise ValueError(f"factors[{i}] has rank {u.shape[2]}, another tensor of the call "
                             f"rank {rank}: one rank per call")
        rank = int(u.shape[2])
        if max(directions) >= u.shape[0]:
            raise ValueError(f"factors[{i}] hold {u.shape[0]} directions; the call uses "
                             f"direction {max(directions)}")
    return rank


def check_group(tensors: List[torch.Tensor], offsets: List[int], backend: str,
                device_type: Optional[str] = None, nonempty: bool = False) -> int:
    """The checks every kernel backend makes on one call's group: at least one tensor, one
    offset per tensor, one supported dtype and one device (of type ``device_type`` when given)
    for all, contiguous storage and (``nonempty``) no empty tensor. Returns the dtype code.

    :mod:`zofo_kernels.core.ops` only ever passes such groups; this guards direct backend calls."""
    if not tensors:
        raise ValueError(f"the {backend} backend needs at least one tensor")
    if len(offsets) != len(tensors):
        raise ValueError(f"{len(offsets)} offsets for {len(tensors)} tensors")
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype}; expected float32, bfloat16 or float16")
    if device_type is not None and device.type != device_type:
        raise ValueError(f"tensors[0] is on {device}; the {backend} backend takes "
                         f"{device_type.upper()} tensors")
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device} but tensors[0] is on {device}: "
                             "one call per (device, dtype) group")
        if t.dtype != dtype:
            raise MixedDtypeError(f"tensors[{i}] has dtype {t.dtype} but tensors[0] has {dtype}: "
                                  "one call per (device, dtype) group")
        if not t.is_contiguous():
            raise ValueError(f"tensors[{i}] is not contiguous")
        if nonempty and t.numel() == 0:
            raise ValueError(f"tensors[{i}] is empty; leave empty tensors out")
    return DTYPE_CODES[dtype]


class LaunchTables:
    """A backend's cache of launch tables (whatever describes a call's tensors to its kernels),
    keyed on the call's layout: the device, each tensor's data pointer and size, the global
    offsets, and ``extra`` (what else the table depends on). Holds ``size`` tables, dropping
    the least recently used; ``builds`` counts the tables built (not served from the cache)."""

    def __init__(self, size: int = TABLE_CACHE_SIZE):
        self.size = size
        self.builds = 0
        self._tables: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()

    def get(self, tensors: List[torch.Tensor], offsets: List[int], build: Callable[[], Any],
            extra: tuple = ()) -> Any:
        """The table of this layout: cached, or ``build()`` (then cached)."""
        key = (str(tensors[0].device), tuple(t.data_ptr() for t in tensors),
               tuple(t.numel() for t in tensors), tuple(int(o) for o in offsets)) + extra
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            return hit
        table = build()
        self._tables[key] = table
        self.builds += 1
        while len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return table
