"""ZOFOOptimizer: Bilevel-ZOFO (DESIGN.md section 1.2).

Backbone theta is trained zeroth-order with the fused kernels (an internal
:class:`~zofo_kernels.optim.ZOOptimizer`), a PEFT block is kept in two copies, P (upper
level, used for prediction) and S (lower level), both trained first-order::

    lower_step(B_g):          S <- FOStep(grad_S g(theta, S; B_g))
    upper_step(B_f, B_g):     P <- FOStep(grad_P [f(theta, P; B_f) + lam * g(theta, P; B_g)])
                              theta <- ZOStep on L = f(theta, P; B_f)
                                                  + lam * [g(theta, P; B_g) - g(theta, S; B_g)]
    step(B_f, [B_g1..B_gK]):  lower_step(B_gk) for k = 1..K, then upper_step(B_f, B_gK)

f and g are the same ``loss_fn`` on upper (B_f) and lower (B_g) batches. During the
first-order steps only the copy being trained has ``requires_grad=True`` (the backbone and the
other copy are switched off and switched back afterwards), so autograd stores nothing for
the backbone; the theta step runs under ``torch.no_grad()`` and keeps no state besides a
seed counter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .zo import (NONFINITE_POLICIES, NonFiniteLossError, ZOOptimizer, _choice, _int, _real,
                 loss_value)

LEVELS = ("upper", "lower")


@dataclasses.dataclass
class ZOFOStepResult:
    """Losses of one call (floats; ``None`` where the call did not compute it).

    lower_losses: g(theta, S; B_g) of every lower (inner) step, before its update.
    upper_loss: f(theta, P; B_f) before the P update. penalty_loss: g(theta, P; B_g) before
    the P update. objective: the ZO objective L after the P update (forward estimator: at
    the unperturbed theta; central: mean over the perturbed evaluations).
    projected_grads: the ZO step's projected gradients (one per direction).
    """
    lower_losses: List[float] = dataclasses.field(default_factory=list)
    upper_loss: Optional[float] = None
    penalty_loss: Optional[float] = None
    lower_penalty_loss: Optional[float] = None
    gap: Optional[float] = None
    objective: Optional[float] = None
    projected_grads: List[float] = dataclasses.field(default_factory=list)
    theta_step_rms: Optional[float] = None
    skipped: bool = False

    @property
    def loss(self) -> Optional[float]:
        """The headline training loss: f(theta, P; B_f) for an upper step, else the last
        lower loss."""
        if self.upper_loss is not None:
            return self.upper_loss
        return self.lower_losses[-1] if self.lower_losses else None

    def __float__(self) -> float:
        value = self.loss
        if value is None:
            raise ValueError("this result holds no loss")
        return float(value)

    def as_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), loss=self.loss)


def _param_list(params, name: str) -> List[torch.nn.Parameter]:
    """Flatten parameters or parameter groups into a list of tensors (for checks)."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{name} must be an iterable of parameters or parameter groups, "
                        "not a single tensor")
    out = []
    for item in params:
        if isinstance(item, dict):
            ps = item.get("params")
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            out.extend(ps)
        else:
            out.append(item)
    for p in out:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} contains a {type(p).__name__}, not a tensor")
        if not p.is_leaf:
            raise ValueError(f"{name} contains a non-leaf tensor")
    if not out:
        raise ValueError(f"{name} is empty")
    return out


class _Pair:
    """One (P, S) PEFT pair with its optimizers, adapter switch and loss."""

    def __init__(self, name, upper, lower, select_adapter, loss_fn, opt_cls, upper_lr,
                 lower_lr, opt_kwargs):
        self.name = name
        upper_groups, lower_groups = list(upper), list(lower)
        self.upper = _param_list(upper_groups, f"upper_params ({name})")
        self.lower = _param_list(lower_groups, f"lower_params ({name})")
        if len(self.upper) != len(self.lower) or any(
                a.shape != b.shape for a, b in zip(self.upper, self.lower)):
            raise ValueError(f"upper and lower parameters of {name!r} must be two copies of the "
                             "same PEFT block (same number of tensors, same shapes, same order)")
        if not callable(select_adapter):
            raise TypeError("select_adapter must be callable: select_adapter('upper'|'lower')")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(batch) -> scalar loss tensor")
        self.select_adapter = select_adapter
        self.loss_fn = loss_fn
        for p in self.upper + self.lower:
            if not p.is_floating_point():
                raise TypeError("PEFT parameters must be floating point")
        self.opt_upper = opt_cls(upper_groups, lr=upper_lr, **opt_kwargs)
        self.opt_lower = opt_cls(lower_groups, lr=lower_lr, **opt_kwargs)


class _BilevelBase:
    """Shared machinery of ZOFOOptimizer and MetaZOFOOptimizer."""

    def _setup(self, backbone_params, pairs_spec, lr, eps, lam, inner_steps, peft_optimizer,
               peft_lr, lower_lr, peft_optimizer_kwargs, estimator, n_directions, weight_decay,
               distribution, seed, stochastic_rounding, nonfinite, loss_reduce, backend):
        self.lam = _real(lam, "lam", nonneg=True)
        self.inner_steps = _int(inner_steps, "inner_steps", 0)
        if not (isinstance(peft_optimizer, type) and issubclass(peft_optimizer,
                                                                 torch.optim.Optimizer)):
            raise TypeError("peft_optimizer must be a torch.optim.Optimizer subclass "
                            f"(e.g. torch.optim.Adam), got {peft_optimizer!r}")
        peft_lr = _real(peft_lr, "peft_lr", nonneg=True)
        lower_lr = peft_lr if lower_lr is None else _real(lower_lr, "lower_lr", nonneg=True)
        kwargs = {} if peft_optimizer_kwargs is None else dict(peft_optimizer_kwargs)
        if "lr" in kwargs:
            raise ValueError("give the PEFT learning rate as peft_lr / lower_lr, not in "
                             "peft_optimizer_kwargs")
        self.nonfinite = _choice(nonfinite, "nonfinite", NONFINITE_POLICIES)
        backbone_groups = list(backbone_params)
        backbone = _param_list(backbone_groups, "backbone_params")
        self.zo = ZOOptimizer(backbone_groups, lr=lr, eps=eps, weight_decay=weight_decay,
                              distribution=distribution, estimator=estimator,
                              n_directions=n_directions, seed=seed,
                              stochastic_rounding=stochastic_rounding, nonfinite=nonfinite,
                              loss_reduce=loss_reduce, backend=backend)
        self.pairs: Dict[Any, _Pair] = {}
        for name, (upper, lower, select, loss_fn) in pairs_spec.items():
            self.pairs[name] = _Pair(name, upper, lower, select, loss_fn, peft_optimizer,
                                     peft_lr, lower_lr, kwargs)
        seen = {}
        for owner, ps in [("backbone", backbone)] + [
                (f"{n} {lv}", getattr(p, lv)) for n, p in self.pairs.items() for lv in LEVELS]:
            for p in ps:
                if id(p) in seen:
                    raise ValueError(f"a parameter appears in both {seen[id(p)]} and {owner}; "
                                     "backbone, upper and lower parameters must be disjoint")
                seen[id(p)] = owner
        self._backbone = backbone
        self.forward_count = 0
        self.backward_count = 0
        self.outer_steps = 0

    # -- helpers ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _only_trainable(self, trainable: Sequence[torch.Tensor]):
        """Inside: requires_grad is True exactly for ``trainable`` among the managed tensors."""
        managed = list(self._backbone) + [p for pr in self.pairs.values()
                                          for p in pr.upper + pr.lower]
        saved = [p.requires_grad for p in managed]
        keep = {id(p) for p in trainable}
        try:
            for p in managed:
                p.requires_grad_(id(p) in keep)
            yield
        finally:
            for p, flag in zip(managed, saved):
                p.requires_grad_(flag)

    def _loss(self, pair: _Pair, batch):
        self.forward_count += 1
        loss = pair.loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return a scalar loss tensor")
        return loss.reshape(())

    def _fo_step(self, opt: torch.optim.Optimizer, losses, what: str):
        """First-order step on the sum of ``losses`` (thunks returning scalar losses with their
        weights). Each term is backpropagated as soon as it is computed, so only one forward
        graph is alive at a time (the activation peak of a single FO-PEFT step); gradients
        accumulate. Returns the unweighted loss values, or None when the step was skipped for a
        non-finite loss (no update is made then)."""
        opt.zero_grad(set_to_none=True)
        values = []
        try:
            for weight, thunk in losses:
                loss = thunk()
                value = loss_value(loss)
                values.append(value)
                if not math.isfinite(value):
                    break
                (loss * weight if weight != 1.0 else loss).backward()
                self.backward_count += 1
                del loss
            bad = [v for v in values if not math.isfinite(v)]
            if bad:
                if self.nonfinite == "raise":
                    raise NonFiniteLossError(
                        f"non-finite {what} loss ({bad[0]}); no update made "
                        "(pass nonfinite='skip' to skip such steps)")
                return None
            opt.step()
            return values
        finally:
            opt.zero_grad(set_to_none=True)

    def _lower(self, pair: _Pair, lower_batch) -> float:
        try:
            pair.select_adapter("lower")
            with self._only_trainable(pair.lower), torch.enable_grad():
                values = self._fo_step(pair.opt_lower,
                                       [(1.0, lambda: self._loss(pair, lower_batch))],
                                       "lower-level")
            return values[0] if values else float("nan")
        finally:
            pair.select_adapter("upper")

    def _upper_fo(self, pair: _Pair, upper_batch, lower_batch):
        pair.select_adapter("upper")
        with self._only_trainable(pair.upper), torch.enable_grad():
            values = self._fo_step(pair.opt_upper,
                                   [(1.0, lambda: self._loss(pair, upper_batch)),
                                    (self.lam, lambda: self._loss(pair, lower_batch))],
                                   "upper-level")
        if values is None:
            return float("nan"), float("nan")
        return values[0], values[1]

    def _objective(self, pair: _Pair, upper_batch, lower_batch) -> torch.Tensor:
        """L = f(theta, P; B_f) + lam * [g(theta, P; B_g) - g(theta, S; B_g)] (no grad)."""
        try:
            pair.select_adapter("upper")
            f = self._loss(pair, upper_batch).double()
            gp = self._loss(pair, lower_batch).double()
            pair.select_adapter("lower")
            gs = self._loss(pair, lower_batch).double()
        finally:
            pair.select_adapter("upper")
        return f + self.lam * (gp - gs)

    def _zo_step(self, closure) -> ZOFOStepResult:
        try:
            objective = self.zo.step(closure)
        finally:
            for pair in self.pairs.values():
                pair.select_adapter("upper")
        st = self.zo.last_step
        return ZOFOStepResult(objective=objective, projected_grads=list(st["projected_grads"]),
                              skipped=st["skipped"])

    def eval_mode(self):
        """Select the upper copy P for every pair (what evaluation uses); returns self."""
        for pair in self.pairs.values():
            pair.select_adapter("upper")
        return self

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """theta's seed counter and ZO settings, the P and S optimizer states, the counters.
        The weights themselves (theta, P, S) are the model's: save the model's state_dict."""
        return {
            "zo": self.zo.state_dict(),
            "pairs": {name: {"upper": p.opt_upper.state_dict(), "lower": p.opt_lower.state_dict()}
                      for name, p in self.pairs.items()},
            "forward_count": self.forward_count,
            "backward_count": self.backward_count,
            "outer_steps": self.outer_steps,
            "lam": self.lam,
            "inner_steps": self.inner_steps,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        missing = {"zo", "pairs", "forward_count", "backward_count", "outer_steps"} - set(
            state_dict)
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        if set(state_dict["pairs"]) != set(self.pairs):
            raise ValueError(f"state dict has PEFT pairs {sorted(map(str, state_dict['pairs']))}, "
                             f"this optimizer has {sorted(map(str, self.pairs))}")
        self.zo.load_state_dict(state_dict["zo"])
        for name, pair in self.pairs.items():
            pair.opt_upper.load_state_dict(state_dict["pairs"][name]["upper"])
            pair.opt_lower.load_state_dict(state_dict["pairs"][name]["lower"])
        self.forward_count = int(state_dict["forward_count"])
        self.backward_count = int(state_dict["backward_count"])
        self.outer_steps = int(state_dict["outer_steps"])


def _check_lower_batches(lower_batches, inner_steps: int) -> list:
    if isinstance(lower_batches, (str, bytes)) or not hasattr(lower_batches, "__iter__"):
        raise TypeError("lower_batches must be a sequence of batches")
    batches = list(lower_batches)
    need = max(inner_steps, 1)
    if len(batches) != need:
        raise ValueError(f"lower_batches must hold {need} batch(es) (inner_steps="
                         f"{inner_steps}), got {len(batches)}")
    return batches


# --------------------------------------------------------------------------- PEFT helpers

def _adapter_names(peft_model) -> List[str]:
    cfg = getattr(peft_model, "peft_config", None)
    if not isinstance(cfg, dict) or not hasattr(peft_model, "set_adapter"):
        raise TypeError("from_peft needs a peft.PeftModel (got "
                        f"{type(peft_model).__name__})")
    return list(cfg)


def _adapter_params(peft_model, adapter: str):
    """{name with the adapter component removed: parameter} of one adapter."""
    out = {}
    for name, p in peft_model.named_parameters():
        parts = name.split(".")
        if adapter in parts:
            key = ".".join(x for x in parts if x != adapter)
            out[key] = p
    return out


def _copy_adapter(peft_model, source: str, target: str) -> None:
    """Add adapter ``target`` with ``source``'s config and a copy of its current weights."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if target in peft_model.peft_config:
        raise ValueError(f"the model already has an adapter named {target!r}")
    peft_model.add_adapter(target, copy.deepcopy(peft_model.peft_config[source]))
    sd = get_peft_model_state_dict(peft_model, adapter_name=source)
    set_peft_model_state_dict(peft_model, sd, adapter_name=target)
    src, dst = _adapter_params(peft_model, source), _adapter_params(peft_model, target)
    if set(src) != set(dst):
        raise RuntimeError(f"adapter copy {target!r} does not mirror {source!r}")
    with torch.no_grad():  # exact copy, whatever the loader did (e.g. dtype casts)
        for k, p in src.items():
            dst[k].copy_(p)


def _backbone_params(peft_model) -> List[torch.nn.Parameter]:
    """Every parameter that belongs to no adapter. Excluded too: peft's ``original_module``
    copies of modules_to_save, which no forward uses while an adapter is active."""
    adapters = set(_adapter_names(peft_model))
    out = []
    for name, p in peft_model.named_parameters():
        parts = set(name.split("."))
        if parts & adapters or "original_module" in parts:
            continue
        out.append(p)
    if not out:
        raise ValueError("the PEFT model has no backbone parameters")
    return out


def _pair_from_adapters(peft_model, upper: str, lower: str):
    up, low = _adapter_params(peft_model, upper), _adapter_params(peft_model, lower)
    if not up:
        raise ValueError(f"adapter {upper!r} has no parameters")
    keys = sorted(up)
    if set(keys) != set(low):
        raise ValueError(f"adapters {upper!r} and {lower!r} do not have the same parameters")

    def select(level: str):
        if level not in LEVELS:
            raise ValueError(f"level must be 'upper' or 'lower', got {level!r}")
        peft_model.set_adapter(upper if level == "upper" else lower)

    return [up[k] for k in keys], [low[k] for k in keys], select


# --------------------------------------------------------------------------- ZOFOOptimizer

class ZOFOOptimizer(_BilevelBase):
    """Bilevel-ZOFO: ZO for the backbone theta, FO for the two PEFT copies P (upper) and S
    (lower). See the module docstring for the algorithm and ``docs/optimizers.md`` for the
    data protocol.

    Parameters: ``backbone_params`` (parameters or parameter groups of theta; groups may set
    their own lr / weight_decay), ``upper_params`` / ``lower_params`` (P and S, two copies of
    the same PEFT block), ``select_adapter(level)`` (makes the model's forward use P for
    "upper", S for "lower"), ``loss_fn(batch)`` (scalar loss of the model on a batch),
    ``lr`` (theta's ZO learning rate), ``eps``, ``lam`` (penalty weight lambda),
    ``inner_steps`` (K), ``peft_optimizer`` (torch.optim class for P and S), ``peft_lr`` (lr of
    P, and of S unless ``lower_lr`` is given), ``peft_optimizer_kwargs``, and the ZO settings of
    :class:`ZOOptimizer` (estimator, n_directions, weight_decay, distribution, seed,
    stochastic_rounding, nonfinite, loss_reduce, backend).
    """

    def __init__(self, backbone_params, upper_params, lower_params,
                 select_adapter: Callable[[str], None], loss_fn: Callable[[Any], torch.Tensor],
                 lr: float, eps: float = 1e-3, lam: float = 1.0, inner_steps: int = 10,
                 peft_optimizer=torch.optim.Adam, peft_lr: float = 1e-3,
                 lower_lr: Optional[float] = None, peft_optimizer_kwargs: Optional[dict] = None,
                 estimator: str = "forward", n_directions: int = 1, weight_decay: float = 0.0,
                 distribution: str = "gaussian", seed: Optional[int] = None,
                 stochastic_rounding: bool = True, nonfinite: str = "raise",
                 loss_reduce=None, backend: Optional[str] = None):
        self._setup(backbone_params, {"default": (upper_params, lower_params, select_adapter,
                                                  loss_fn)},
                    lr, eps, lam, inner_steps, peft_optimizer, peft_lr, lower_lr,
                    peft_optimizer_kwargs, estimator, n_directions, weight_decay, distribution,
                    seed, stochastic_rounding, nonfinite, loss_reduce, backend)
        self.pair = self.pairs["default"]
        self.peft_model = None
        self.eval_mode()

    @classmethod
    def from_peft(cls, peft_model, loss_fn: Callable[[Any], torch.Tensor], lr: float,
                  eps: float = 1e-3, lam: float = 1.0, inner_steps: int = 10,
                  peft_optimizer=torch.optim.Adam, peft_lr: float = 1e-3,
                  lower_lr: Optional[float] = None, peft_optimizer_kwargs: Optional[dict] = None,
                  estimator: str = "forward", n_directions: int = 1, weight_decay: float = 0.0,
                  distribution: str = "gaussian", seed: Optional[int] = None,
                  stochastic_rounding: bool = True, nonfinite: str = "raise",
                  loss_reduce=None, backend: Optional[str] = None,
                  lower_adapter: Optional[str] = None, backbone_params=None):
        """Bilevel-ZOFO on a ``peft.PeftModel`` (LoRA, prefix tuning, prompt tuning, ...).

        The model's active adapter is P; a second adapter ``lower_adapter`` (default
        f"{active}_lower") is added with the same config and a copy of P's current weights,
        and is S. Modules in the config's ``modules_to_save`` (e.g. the classification head
        of a SEQ_CLS model) are per adapter in peft, so they belong to P and S and are
        trained first-order; their shared ``original_module`` is unused and left alone. The
        backbone theta is every other parameter (or ``backbone_params`` if given, e.g.
        :func:`zo_param_groups` of a subset). ``loss_fn(batch)`` runs ``peft_model``.
        """
        kwargs = dict(eps=eps, lam=lam, inner_steps=inner_steps, peft_optimizer=peft_optimizer,
                      peft_lr=peft_lr, lower_lr=lower_lr,
                      peft_optimizer_kwargs=peft_optimizer_kwargs, estimator=estimator,
                      n_directions=n_directions, weight_decay=weight_decay,
                      distribution=distribution, seed=seed,
                      stochastic_rounding=stochastic_rounding, nonfinite=nonfinite,
                      loss_reduce=loss_reduce, backend=backend)
        _adapter_names(peft_model)
        upper = peft_model.active_adapter
        if not isinstance(upper, str):
            raise ValueError("the PEFT model must have exactly one active adapter")
        lower = f"{upper}_lower" if lower_adapter is None else lower_adapter
        if not isinstance(lower, str) or not lower or lower == upper:
            raise ValueError("lower_adapter must be a new adapter name")
        _copy_adapter(peft_model, upper, lower)
        try:
            up, low, select = _pair_from_adapters(peft_model, upper, lower)
            backbone = (_backbone_params(peft_model) if backbone_params is None
                        else backbone_params)
            opt = cls(backbone, up, low, select, loss_fn, lr, **kwargs)
        except BaseException:
            peft_model.set_adapter(upper)
            peft_model.delete_adapter(lower)  # leave the model as it was given
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
        return self.pair.opt_upper

    @property
    def lower_optimizer(self):
        return self.pair.opt_lower

    def lower_step(self, lower_batch) -> ZOFOStepResult:
        """One first-order step of S on g(theta, S; lower_batch)."""
        return ZOFOStepResult(lower_losses=[self._lower(self.pair, lower_batch)])

    def upper_step(self, upper_batch, lower_batch) -> ZOFOStepResult:
        """FO step of P on f + lam*g, then the fused ZO step of theta on L (B_g = lower_batch)."""
        f, g = self._upper_fo(self.pair, upper_batch, lower_batch)
        res = self._zo_step(lambda: self._objective(self.pair, upper_batch, lower_batch))
        res.upper_loss, res.penalty_loss = f, g
        self.outer_steps += 1
        return res

    def step(self, upper_batch, lower_batches: Sequence) -> ZOFOStepResult:
        """One outer iteration: ``inner_steps`` lower steps on ``lower_batches`` (in order),
        then the upper step with B_f = ``upper_batch`` and B_g = the last lower batch.
        ``lower_batches`` holds exactly ``inner_steps`` batches (one when inner_steps == 0,
        used only as B_g)."""
        batches = _check_lower_batches(lower_batches, self.inner_steps)
        lower_losses = [self._lower(self.pair, b) for b in batches[:self.inner_steps]]
        res = self.upper_step(upper_batch, batches[-1])
        res.lower_losses = lower_losses
        return res
