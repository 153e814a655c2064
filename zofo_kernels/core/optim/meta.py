"""MetaZOFOOptimizer: Bilevel-ZOFO meta-training with a shared backbone.

One backbone theta is shared by all tasks; every task t has its own PEFT pair (P_t, S_t) with
their own first-order optimizers. One outer step over a set T of sampled tasks:

    for t in T:  inner_steps lower steps of S_t on g_t (its lower batches)
    for t in T:  P_t.grad = grad [f_t + lam * g_t]
    theta <- one ZO step on  sum_{t in T} L_t,
             L_t = f_t(theta, P_t; B_f^t) + lam * [g_t(theta, P_t; B_g^t) - g_t(theta, S_t; B_g^t)]
    for t in T:  P_t steps

in the order of :mod:`zofo_kernels.core.optim.bilevel` (its docstring gives the forward counts
and the theta updates), so every sampled task contributes to the single ZO update of theta
(the published code kept only the last task's ZO gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Union

from zofo_kernels.core.optim.bilevel import (DEFAULT_LR, BilevelOptimizer, ZOFOStepResult,
                                             check_lower_batches)
from zofo_kernels.core.optim.peft_adapters import (adapter_names, check_new_adapter_name,
                                                   copy_adapter, pair_from_adapters,
                                                   remove_adapters, select_backbone)
from zofo_kernels.core.optim.peft_pair import LEVELS


@dataclasses.dataclass
class MetaStepResult:
    """Per-task results (lower/upper losses) and the shared ZO step's outcome."""
    tasks: Dict[Hashable, ZOFOStepResult]
    objective: Optional[float] = None
    projected_grads: List[float] = dataclasses.field(default_factory=list)
    skipped: bool = False
    theta_step_rms: Optional[float] = None

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


class MetaZOFOOptimizer(BilevelOptimizer):
    """Shared theta (ZO), one (P_t, S_t) pair per task (FO).

    ``tasks``: mapping task name -> dict(upper_params, lower_params, select_adapter, loss_fn)
    with the same meaning as in :class:`ZOFOOptimizer` (``select_adapter(level)`` selects that
    task's copy). Every other setting is keyword-only, shared by the tasks, and means what it
    means for :class:`ZOFOOptimizer` (``theta_update``, ``order``, ``lam``, ``inner_steps``,
    the PEFT optimizer settings and the ZO settings, ``sparse_fraction`` included), with the
    same defaults (``lr`` 1e-4,
    ``lam`` 10, ``inner_steps`` 3). Under the default ``theta_update="rms"``
    theta's step does not grow with the number of sampled tasks (their objectives add up, the
    running RMS follows).
    """

    def __init__(self, backbone_params, tasks: Mapping[Hashable, Any], lr: float = DEFAULT_LR,
                 **settings):
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError("tasks must be a non-empty mapping task name -> task spec")
        specs = {name: _task_spec(name, spec) for name, spec in tasks.items()}
        self._setup(backbone_params, specs, lr, **settings)
        self.peft_model = None

    @classmethod
    def from_peft(cls, peft_model, tasks: Sequence[str],
                  loss_fn: Union[Callable, Mapping[str, Callable]], lr: float = DEFAULT_LR, *,
                  backbone_params=None, backbone_regex: Optional[str] = None, **settings):
        """Meta-training on a ``peft.PeftModel``: for every task name in ``tasks`` (a list of
        strings), adapters f"{task}_upper" and f"{task}_lower" are added as copies (config and
        current weights) of the model's active adapter, which stays as the template and is
        not trained. ``loss_fn`` is one callable ``loss_fn(batch)`` for all tasks or a mapping
        task -> callable. theta: as :meth:`ZOFOOptimizer.from_peft` (``backbone_params`` or
        ``backbone_regex``). Other settings: as :class:`MetaZOFOOptimizer`. On any failure the
        model is left as given."""
        adapter_names(peft_model)
        template = peft_model.active_adapter
        if not isinstance(template, str):
            raise ValueError("the PEFT model must have exactly one active adapter (the template)")
        if isinstance(tasks, (str, bytes)) or not isinstance(tasks, (list, tuple)):
            raise TypeError("tasks must be a list of task names (strings), got "
                            f"{type(tasks).__name__} {tasks!r}")
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
                check_new_adapter_name(peft_model, f"{t}_{lv}")
        added = []
        try:
            specs = {}
            for t in names:
                for lv in LEVELS:
                    added.append(f"{t}_{lv}")
                    copy_adapter(peft_model, template, f"{t}_{lv}")
                up, low, select = pair_from_adapters(peft_model, f"{t}_upper", f"{t}_lower")
                specs[t] = dict(upper_params=up, lower_params=low, select_adapter=select,
                                loss_fn=fns[t])
            backbone = select_backbone(peft_model, backbone_params, backbone_regex)
            opt = cls(backbone, specs, lr, **settings)
        except BaseException:
            remove_adapters(peft_model, added, template)
            raise
        opt.peft_model = peft_model
        opt.template_adapter = template
        return opt

    def _pair(self, task):
        if task not in self.pairs:
            raise KeyError(f"unknown task {task!r}; tasks are {list(self.pairs)}")
        return self.pairs[task]

    def eval_mode(self, task=None):
        """Select task ``task``'s upper copy P_t (what evaluation on that task uses; every
        task's without ``task``) and, for ``from_peft``, ``model.eval()``; returns self."""
        if task is None:
            return super().eval_mode()
        self._pair(task).select_adapter("upper")
        if self.peft_model is not None:
            self.peft_model.eval()
        return self

    def lower_step(self, task, lower_batch) -> ZOFOStepResult:
        """One FO step of S_task on g_task."""
        pair = self._pair(task)
        with self._atomic():
            return ZOFOStepResult(lower_losses=[self._lower(pair, lower_batch)])

    def step(self, task_batches: Mapping[Hashable, Any]) -> MetaStepResult:
        """One outer step over the sampled tasks.

        ``task_batches``: mapping task -> (upper_batch, lower_batches) or (upper_batch,
        lower_batches, penalty_batch), with the meaning of :meth:`ZOFOOptimizer.step`
        (``lower_batches`` a list of ``inner_steps`` batches; without ``penalty_batch`` the
        last lower batch is B_g^t). Tasks not in the mapping are not touched except through
        the shared theta. Atomic like :meth:`ZOFOOptimizer.step`.
        """
        if not isinstance(task_batches, Mapping) or not task_batches:
            raise ValueError("task_batches must be a non-empty mapping task -> "
                             "(upper_batch, lower_batches[, penalty_batch])")
        plan = {}
        for task, item in task_batches.items():
            pair = self._pair(task)
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise ValueError(f"task {task!r}: expected (upper_batch, lower_batches"
                                 "[, penalty_batch])")
            penalty = item[2] if len(item) == 3 else None
            lowers = check_lower_batches(item[1], self.inner_steps, penalty is None)
            plan[task] = (pair, item[0], lowers, lowers[-1] if penalty is None else penalty)
        with self._atomic():
            lower_losses = {task: [self._lower(pair, b) for b in lowers[:self.inner_steps]]
                            for task, (pair, _, lowers, _) in plan.items()}
            results, zo = self._outer([(pair, bf, bg) for pair, bf, _, bg in plan.values()])
            self.outer_steps += 1
        by_task = {}
        for task, res in zip(plan, results):
            res.lower_losses = lower_losses[task]
            by_task[task] = res
        return MetaStepResult(tasks=by_task, objective=zo["objective"],
                              projected_grads=zo["projected_grads"], skipped=zo["skipped"],
                              theta_step_rms=zo["theta_step_rms"])
