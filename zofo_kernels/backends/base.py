"""What a backend implements, and the registry that finds one for a device.

The public functions in :mod:`zofo_kernels.ops` validate every argument, split the tensors
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
:func:`zofo_kernels.contract.stochastic_round_bits` with the rounding-stream word of the element.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DISTRIBUTION_CODES = {"gaussian": 0, "rademacher": 1}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


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
                restore_scale: float, restore_direction: int) -> None:
        ...

    @abc.abstractmethod
    def update(self, tensors: List[torch.Tensor], offsets: List[int], seed: int,
               distribution: str, lr: float, projected_grads: torch.Tensor,
               restore_scale: float, restore_direction: int, weight_decay: float,
               stochastic_rounding: bool) -> None:
        ...


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
