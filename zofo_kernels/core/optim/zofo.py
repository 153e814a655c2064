"""ZOFOOptimizer: Bilevel-ZOFO (arXiv 2502.03604; docs/optimizers/zofo.md) with one
PEFT pair, P and S.

The algorithm, the forward counts per outer step and theta's updates: the docstring of
:mod:`zofo_kernels.core.optim.bilevel`, whose :class:`BilevelOptimizer` this class drives with
one (P, S) pair.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from zofo_kernels.core.optim.bilevel import (DEFAULT_LR, BilevelOptimizer, ZOFOStepResult,
                                             check_lower_batches)
from zofo_kernels.core.optim.peft_adapters import (adapter_names, copy_adapter,
                                                   pair_from_adapters, remove_adapters,
                                                   select_backbone)


class ZOFOOptimizer(BilevelOptimizer):
    """Bilevel-ZOFO: ZO for the backbone theta, FO for the two PEFT copies P (upper) and S
    (lower). See :mod:`zofo_kernels.core.optim.bilevel` for the algorithm, the forward counts
    and the theta updates, and ``docs/optimizers/zofo.md`` for the data protocol.

    Parameters: ``backbone_params`` (parameters or parameter groups of theta; groups may set
    their own lr / weight_decay), ``upper_params`` / ``lower_params`` (P and S, two copies of
    the same PEFT block, float32), ``select_adapter(level)`` (makes the model's forward use P
    for "upper", S for "lower"), ``loss_fn(batch)`` (scalar loss of the model on a batch),
    ``lr`` (theta's learning rate, default 1e-4). Keyword-only: ``eps``, ``lam`` (penalty
    weight lambda, default 10), ``inner_steps`` (lower steps of S per outer step, default 3),
    ``theta_update`` ("rms" | "sgd" | "scaled-sgd" | "std" | "adam"), ``order`` ("official" | "p-first"),
    ``peft_optimizer`` (torch.optim class for P and S), ``peft_lr`` (lr of P, and of S unless
    ``lower_lr`` is given), ``peft_optimizer_kwargs``, ``estimator`` (default "forward", as the
    authors), ``weight_decay``, and every other setting of :class:`ZOOptimizer`
    (n_directions, distribution, seed, stochastic_rounding, nonfinite, loss_reduce, backend,
    rms_beta, sparse_fraction), handed to it unchanged. The defaults are the method registry's
    (``zofo-train --method bilevel-zofo``): the SST-2 study's choice.
    """

    def __init__(self, backbone_params, upper_params, lower_params,
                 select_adapter: Callable[[str], None], loss_fn: Callable[[Any], torch.Tensor],
                 lr: float = DEFAULT_LR, **settings):
        self._setup(backbone_params, {"default": (upper_params, lower_params, select_adapter,
                                                  loss_fn)}, lr, **settings)
        self.pair = self.pairs["default"]
        self.peft_model = None
        self.eval_mode()

    @classmethod
    def from_peft(cls, peft_model, loss_fn: Callable[[Any], torch.Tensor],
                  lr: float = DEFAULT_LR, *,
                  lower_adapter: Optional[str] = None, backbone_params=None,
                  backbone_regex: Optional[str] = None, **settings):
        """Bilevel-ZOFO on a ``peft.PeftModel`` (LoRA, prefix tuning, prompt tuning, ...).

        The model's active adapter is P; a second adapter ``lower_adapter`` (default
        f"{active}_lower") is added with the same config and a copy of P's current weights,
        and is S. Modules in the config's ``modules_to_save`` (e.g. the classification head
        of a SEQ_CLS model) are per adapter in peft, so they belong to P and S and are
        trained first-order; their shared ``original_module`` is unused and left alone. The
        backbone theta is every other parameter (or ``backbone_params`` if given, e.g.
        :func:`zo_param_groups` of a subset, or those whose name matches the regular
        expression ``backbone_regex``, e.g. ``"LayerNorm|bias"``; the rest of the backbone
        stays as it is). ``loss_fn(batch)`` runs ``peft_model``. Other
        settings: as :class:`ZOFOOptimizer`. On any failure the model is left as given.
        Put the model in eval mode first (``peft_model.eval()``): the first step warns if
        the loss runs dropout; :meth:`eval_mode` also calls ``peft_model.eval()``.
        """
        adapter_names(peft_model)
        upper = peft_model.active_adapter
        if not isinstance(upper, str):
            raise ValueError("the PEFT model must have exactly one active adapter")
        lower = f"{upper}_lower" if lower_adapter is None else lower_adapter
        if not isinstance(lower, str) or not lower or lower == upper:
            raise ValueError("lower_adapter must be a new adapter name")
        copy_adapter(peft_model, upper, lower)
        try:
            up, low, select = pair_from_adapters(peft_model, upper, lower)
            backbone = select_backbone(peft_model, backbone_params, backbone_regex)
            opt = cls(backbone, up, low, select, loss_fn, lr, **settings)
        except BaseException:
            remove_adapters(peft_model, [lower], upper)  # leave the model as it was given
            raise
        opt.peft_model = peft_model
        opt.adapter_names = {"upper": upper, "lower": lower}
        return opt

    @property
    def upper_params(self):
        return self.pair.upper

    @property
    def lower_params(self):
        return self.pair.lower

    @property
    def upper_optimizer(self):
        """P's optimizer (under theta_update='adam': the AdamW shared with theta)."""
        return self.pair.opt_upper or self.theta_optimizer

    @property
    def lower_optimizer(self):
        return self.pair.opt_lower

    def lower_step(self, lower_batch) -> ZOFOStepResult:
        """One first-order step of S on g(theta, S; lower_batch)."""
        with self._atomic():
            return ZOFOStepResult(lower_losses=[self._lower(self.pair, lower_batch)])

    def upper_step(self, upper_batch, penalty_batch) -> ZOFOStepResult:
        """P's first-order step on f + lam*g and the fused ZO step of theta on L, with
        B_f = ``upper_batch`` and B_g = ``penalty_batch``."""
        with self._atomic():
            (res,), _ = self._outer([(self.pair, upper_batch, penalty_batch)])
            self.outer_steps += 1
        return res

    def step(self, upper_batch, lower_batches: list, penalty_batch=None) -> ZOFOStepResult:
        """One outer iteration: ``inner_steps`` lower steps on ``lower_batches`` (a list, in
        order), then the upper step with B_f = ``upper_batch`` and B_g = ``penalty_batch``: a
        fresh batch of D_g, as the authors' code draws it from a second D_g iterator. Without
        ``penalty_batch`` B_g is the last lower batch (which S has just trained on, so
        g(theta, S; B_g) is biased low); with ``inner_steps == 0`` ``lower_batches`` then holds
        that one batch."""
        batches = check_lower_batches(lower_batches, self.inner_steps, penalty_batch is None)
        bg = batches[-1] if penalty_batch is None else penalty_batch
        with self._atomic():
            lower_losses = [self._lower(self.pair, b) for b in batches[:self.inner_steps]]
            (res,), _ = self._outer([(self.pair, upper_batch, bg)])
            res.lower_losses = lower_losses
            self.outer_steps += 1
        return res
