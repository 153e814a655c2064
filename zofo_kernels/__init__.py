"""zofo_kernels: fused zeroth-order kernels and optimizers for memory-efficient fine-tuning.

Kernel API (see README, "The noise contract"):
    noise, perturb_, zo_update_, available_backends
"""

from .backends import BackendStatus, BackendUnavailableError
from .ops import available_backends, canonical_offsets, noise, perturb_, zo_update_

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "canonical_offsets",
    "noise",
    "perturb_",
    "zo_update_",
]
