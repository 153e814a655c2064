"""zofo_kernels: fused zeroth-order kernels and optimizers for memory-efficient fine-tuning.

The package has three layers, each importing only from those below it:

* ``zofo_kernels.core`` -- the kernel API (``noise``, ``perturb_``, ``zo_update_``), the
  backends (native C++/CUDA, Triton, reference), the optimizers and data parallelism. Needs
  torch and numpy only (Triton where present).
* ``zofo_kernels.integrations`` -- Hugging Face: the ``ZOFOTrainer``, saving and reloading
  trained models, prompt heads, the method registry. Needs the ``[hf]`` extra.
* ``zofo_kernels.apps`` -- the ``zofo-train`` and ``zofo-bench`` commands, data and model
  loading, plots. Needs the ``[apps]`` extra.

Kernel API (README, "The kernel API"): noise, perturb_, zo_update_, available_backends.
Optimizers (README, "Optimizers"): ZOOptimizer (MeZO-class ZO-SGD), ZOFOOptimizer (Bilevel-ZOFO),
MetaZOFOOptimizer (meta-training), zo_param_groups.
Trained models (README, "Saving and reloading"): save_trained, load_trained (integrations,
imported on first use so that ``import zofo_kernels`` needs only the core's dependencies).
"""

import importlib

from zofo_kernels.core.backends import BackendStatus, BackendUnavailableError
from zofo_kernels.core.ops import (available_backends, canonical_offsets, lowrank_factors,
                                   magnitude_mask, noise, perturb_, zo_update_)
from zofo_kernels.core.optim import (MetaZOFOOptimizer, NonFiniteLossError, ZOFOOptimizer,
                                     ZOOptimizer, zo_param_groups)
from zofo_kernels.core.requirements import require_extra

__version__ = "0.1.0"

# public names of the integrations layer: resolved on first access (PEP 562)
_LAZY = {
    "CheckpointError": "zofo_kernels.integrations.checkpoint",
    "load_trained": "zofo_kernels.integrations.checkpoint",
    "save_trained": "zofo_kernels.integrations.checkpoint",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zofo_kernels' has no attribute {name!r}")
    require_extra("hf", f"zofo_kernels.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
    "lowrank_factors",
    "noise",
    "magnitude_mask",
    "perturb_",
    "save_trained",
    "zo_param_groups",
    "zo_update_",
]
