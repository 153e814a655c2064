"""zofo_kernels: fused zeroth-order kernels and optimizers for memory-efficient fine-tuning.

Kernel API (README, "The kernel API"): noise, perturb_, zo_update_, available_backends.
Optimizers (README, "Optimizers"): ZOOptimizer (MeZO-class ZO-SGD), ZOFOOptimizer (Bilevel-ZOFO),
MetaZOFOOptimizer (meta-training), zo_param_groups.
Trained models (README, "Saving and reloading"): save_trained, load_trained.
"""

from .backends import BackendStatus, BackendUnavailableError
from .checkpoint import CheckpointError, load_trained, save_trained
from .ops import available_backends, canonical_offsets, noise, perturb_, zo_update_
from .optim import (MetaZOFOOptimizer, NonFiniteLossError, ZOFOOptimizer, ZOOptimizer,
                    zo_param_groups)

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "CheckpointError",
    "MetaZOFOOptimizer",
    "NonFiniteLossError",
    "ZOFOOptimizer",
    "ZOOptimizer",
    "available_backends",
    "canonical_offsets",
    "load_trained",
    "noise",
    "perturb_",
    "save_trained",
    "zo_param_groups",
    "zo_update_",
]
