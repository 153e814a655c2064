"""MetaZOFOOptimizer: Bilevel-ZOFO meta-training with a shared backbone.

One backbone theta is shared by all tasks; every task t has its own PEFT pair (P_t, S_t) with
their own first-order optimizers. One outer step over a set T of sampled tasks:

    for t in T:  K lower steps of S_t on g_t (its lower batches), then the FO step of P_t on
                 f_t + lam * g_t
    theta <- one fused ZO step on  sum_{t in T} L_t,
             L_t = f_t(theta, P_t; B_f^t) + lam * [g_t(theta, P_t; B_g^t) - g_t(theta, S_t; B_g^t)]

so every sampled task contributes to the single ZO update of theta (the published code kept
only the last task's ZO gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Union

import torch

from .zofo import (LEVELS, ZOFOStepResult, _BilevelBase, _adapter_names, _backbone_params,
                   _check_lower_batches, _copy_adapter, _pair_from_adapters)


@dataclasses.dataclass
class MetaStepResult:
    """Per-task results (lower/upper losses) and the shared ZO step's outcome."""
    tasks: Dict[Hashable, ZOFOStepResult]
    objective: Optional[float] = None
    projected_grads: List[float] = dataclasses.field(default_factory=list)
    skipped: bool = False

    @property
    def loss(self) -> float:
        """Mean over the sampled tasks of f_t(theta, P_t; B_f^t) before the P_t update."""
        return sum(r.upper_loss for r in self.tasks.values()) / len(self.tasks)

    def __float__(self) -> float:
        return float(self.loss)


def _task_spec(name, spec):
    if isinstance(spec, Mapping):
        missing = {"upper_params", "lower_params", "select_adapter", "loss_fn"} - set(spec)
        if missing:
            raise ValueError(f"task {name!r} lacks {sorted(missing)}")
        return (spec["upper_params"], spec["lower_params"], spec["select_adapter"],
                spec["loss_fn"])
    if isinstance(spec, (tuple, list)) and len(spec) == 4:
        return tuple(spec)
    raise TypeError(f"task {name!r}: give a dict with upper_params, lower_params, "
                    "select_adapter, loss_fn (or a 4-tuple in that order)")


class MetaZOFOOptimizer(_BilevelBase):
    """Shared theta (ZO), one (P_t, S_t) pair per task (FO).

    ``tasks``: mapping task name -> dict(upper_params, lower_params, select_adapter, loss_fn)
    with the same meaning as in :class:`ZOFOOptimizer` (``select_adapter(level)`` selects that
    task's copy). All other hyperparameters are those of :class:`ZOFOOptimizer` and are shared
    by the tasks.
    """

    def __init__(self, backbone_params, tasks: Mapping[Hashable, Any], lr: float,
                 eps: float = 1e-3, lam: float = 1.0, inner_steps: int = 10,
                 peft_optimizer=torch.optim.Adam, peft_lr: float = 1e-3,
                 lower_lr: Optional[float] = None, peft_optimizer_kwargs: Optional[dict] = None,
                 estimator: str = "forward", n_directions: int = 1, weight_decay: float = 0.0,
                 distribution: str = "gaussian", seed: Optional[int] = None,
                 stochastic_rounding: bool = True, nonfinite: str = "raise",
                 loss_reduce=None, backend: Optional[str] = None):
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError("tasks must be a non-empty mapping task name -> task spec")
        specs = {name: _task_spec(name, spec) for name, spec in tasks.items()}
        self._setup(backbone_params, specs, lr, eps, lam, inner_steps, peft_optimizer, peft_lr,
                    lower_lr, peft_optimizer_kwargs, estimator, n_directions, weight_decay,
                    distribution, seed, stochastic_rounding, nonfinite, loss_reduce, backend)
        self.peft_model = None

    @classmethod
    def from_peft(cls, peft_model, tasks, loss_fn: Union[Callable, Mapping[str, Callable]],
                  lr: float, backbone_params=None, **kwargs):
        """Meta-training on a ``peft.PeftModel``: for every task name in ``tasks`` (strings),
        adapters f"{task}_upper" and f"{task}_lower" are added as copies (config and current
        weights) of the model's active adapter, which stays as the template and is not
        trained. ``loss_fn`` is one callable ``loss_fn(batch)`` for all tasks or a mapping
        task -> callable. Other keyword arguments: as :class:`MetaZOFOOptimizer`."""
        _adapter_names(peft_model)
        template = peft_model.active_adapter
        if not isinstance(template, str):
            raise ValueError("the PEFT model must have exactly one active adapter (the template)")
        names = list(tasks)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError("tasks must be a non-empty list of task names (strings)")
        if len(set(names)) != len(names):
            raise ValueError("task names must be distinct")
        if isinstance(loss_fn, Mapping):
            if set(loss_fn) != set(names):
                raise ValueError("loss_fn mapping must have one entry per task")
            fns = dict(loss_fn)
        elif callable(loss_fn):
            fns = {t: loss_fn for t in names}
        else:
            raise TypeError("loss_fn must be callable or a mapping task -> callable")
        for t in names:
            for lv in LEVELS:
                if f"{t}_{lv}" in peft_model.peft_config:
                    raise ValueError(f"the model already has an adapter named {t}_{lv!r}")
        added = []
        try:
            specs = {}
            for t in names:
                for lv in LEVELS:
                    _copy_adapter(peft_model, template, f"{t}_{lv}")
                    added.append(f"{t}_{lv}")
                up, low, select = _pair_from_adapters(peft_model, f"{t}_upper", f"{t}_lower")
                specs[t] = dict(upper_params=up, lower_params=low, select_adapter=select,
                                loss_fn=fns[t])
            backbone = (_backbone_params(peft_model) if backbone_params is None
                        else backbone_params)
            opt = cls(backbone, specs, lr, **kwargs)
        except BaseException:
            peft_model.set_adapter(template)
            for name in added:
                peft_model.delete_adapter(name)
            raise
        opt.peft_model = peft_model
        opt.template_adapter = template
        return opt

    def _pair(self, task):
        if task not in self.pairs:
            raise KeyError(f"unknown task {task!r}; tasks are {list(self.pairs)}")
        return self.pairs[task]

    def eval_mode(self, task=None):
        """Select task ``task``'s upper copy P_t (what evaluation on that task uses)."""
        if task is None:
            return super().eval_mode()
        self._pair(task).select_adapter("upper")
        return self

    def lower_step(self, task, lower_batch) -> ZOFOStepResult:
        """One FO step of S_task on g_task."""
        return ZOFOStepResult(lower_losses=[self._lower(self._pair(task), lower_batch)])

    def step(self, task_batches: Mapping[Hashable, Any]) -> MetaStepResult:
        """One outer step over the sampled tasks.

        ``task_batches``: mapping task -> (upper_batch, lower_batches), with ``lower_batches``
        as in :meth:`ZOFOOptimizer.step` (``inner_steps`` batches; the last one is B_g^t).
        Tasks not in the mapping are not touched except through the shared theta.
        """
        if not isinstance(task_batches, Mapping) or not task_batches:
            raise ValueError("task_batches must be a non-empty mapping task -> "
                             "(upper_batch, lower_batches)")
        plan = {}
        for task, item in task_batches.items():
            pair = self._pair(task)
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"task {task!r}: expected (upper_batch, lower_batches)")
            plan[task] = (pair, item[0], _check_lower_batches(item[1], self.inner_steps))
        results = {}
        for task, (pair, upper_batch, lowers) in plan.items():
            res = ZOFOStepResult(lower_losses=[self._lower(pair, b)
                                               for b in lowers[:self.inner_steps]])
            res.upper_loss, res.penalty_loss = self._upper_fo(pair, upper_batch, lowers[-1])
            results[task] = res

        def objective():
            total = None
            for pair, upper_batch, lowers in plan.values():
                value = self._objective(pair, upper_batch, lowers[-1])
                total = value if total is None else total + value
            return total

        zo = self._zo_step(objective)
        self.outer_steps += 1
        return MetaStepResult(tasks=results, objective=zo.objective,
                              projected_grads=zo.projected_grads, skipped=zo.skipped)
