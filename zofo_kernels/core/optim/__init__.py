"""Optimizers on the fused ZO kernels: ZO-SGD (MeZO-class), Bilevel-ZOFO and its meta-training
variant."""

from zofo_kernels.core.optim.layout import zo_layout, zo_numel
from zofo_kernels.core.optim.zo import NonFiniteLossError, ZOOptimizer, step_seed, zo_param_groups
from zofo_kernels.core.optim.meta import MetaStepResult, MetaZOFOOptimizer
from zofo_kernels.core.optim.zofo import BilevelOptimizer, ZOFOOptimizer, ZOFOStepResult

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
