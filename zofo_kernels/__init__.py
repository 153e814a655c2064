"""zofo_kernels: fused zeroth-order kernels and optimizers for memory-efficient fine-tuning.

Kernel API (README, "The kernel API"): noise, perturb_, zo_update_, available_backends.
Optimizers (README, "Optimizers"): ZOOptimizer (MeZO-class ZO-SGD), ZOFOOptimizer (Bilevel-ZOFO),
MetaZOFOOptimizer (meta-training), zo_param_groups.
"""

from .backends import BackendStatus, BackendUnavailableError
from .ops import available_backends, canonical_offsets, noise, perturb_, zo_update_
from .optim import (MetaZOFOOptimizer, NonFiniteLossError, ZOFOOptimizer, ZOOptimizer,
                    zo_param_groups)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "MetaZOFOOptimizer",
    "NonFiniteLossError",
    "ZOFOOptimizer",
    "ZOOptimizer",
    "available_backends",
    "canonical_offsets",
    "noise",
    "perturb_",
    "zo_param_groups",
    "zo_update_",
]
