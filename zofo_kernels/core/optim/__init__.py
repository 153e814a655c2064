"""Optimizers on the fused ZO kernels: ZO-SGD (MeZO-class), Bilevel-ZOFO and its meta-training
variant.

One idea per module: ``zo`` (the ZOOptimizer class) beside ``zo_functional`` (its step as
plain functions); ``bilevel`` (the Bilevel-ZOFO machinery and its result type), ``zofo``
(ZOFOOptimizer), ``meta`` (MetaZOFOOptimizer), with ``peft_pair`` (one P/S pair),
``first_order`` (the guarded first-order steps of P and S), ``adam_theta`` (the authors'
materialised theta update) and ``peft_adapters`` (from_peft's adapters); ``layout`` (the
global noise index of every parameter) and ``param_groups`` (zo_param_groups).
"""

from zofo_kernels.core.optim.layout import zo_layout, zo_numel
from zofo_kernels.core.optim.param_groups import zo_param_groups
from zofo_kernels.core.optim.zo import NonFiniteLossError, ZOOptimizer
from zofo_kernels.core.optim.zo_functional import step_seed
from zofo_kernels.core.optim.bilevel import BilevelOptimizer, ZOFOStepResult
from zofo_kernels.core.optim.zofo import ZOFOOptimizer
from zofo_kernels.core.optim.meta import MetaStepResult, MetaZOFOOptimizer

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
