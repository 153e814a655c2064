"""Optimizers on the fused ZO kernels: ZO-SGD (MeZO-class), Bilevel-ZOFO and its meta-training
variant."""

from .layout import zo_layout, zo_numel
from .zo import NonFiniteLossError, ZOOptimizer, step_seed, zo_param_groups
from .meta import MetaStepResult, MetaZOFOOptimizer
from .zofo import BilevelOptimizer, ZOFOOptimizer, ZOFOStepResult

__all__ = [
    "BilevelOptimizer",
    "MetaStepResult",
    "MetaZOFOOptimizer",
    "NonFiniteLossError",
    "ZOFOOptimizer",
    "ZOFOStepResult",
    "ZOOptimizer",
    "step_seed",
    "zo_layout",
    "zo_numel",
    "zo_param_groups",
]
