"""ZOFOOptimizer: Bilevel-ZOFO (arXiv 2502.03604; docs/optimizers.md, "Bilevel-ZOFO").

Backbone theta is trained zeroth-order with the fused kernels (an internal
:class:`~zofo_kernels.core.optim.ZOOptimizer`); a PEFT block is kept in two copies, P (upper level,
used for prediction) and S (lower level), both trained first-order. The objective is the
value-function relaxation

    L(theta, P, S) = f(theta, P; B_f) + lam * [g(theta, P; B_g) - g(theta, S; B_g)]

with f and g the same ``loss_fn`` on upper (D_f) and lower (D_g) batches. One outer step, in
the order of the authors' code (``order="official"``, the default)::

    inner_steps times:  S <- FOStep(grad_S g(theta, S; B_g^k))       # B_g^k: next D_g batch
    P.grad = grad_P [f(theta, P; B_f) + lam * g(theta, P; B_g)]      # B_g: a fresh D_g batch
    L0 = f + lam * (g_P - g(theta, S; B_g))      # f, g_P reused from P's pass: one forward
    ZO step of theta on L at P (not yet stepped): q directions, 3 forwards each
    P <- FOStep(P.grad)

The paper's K (global steps per outer iteration, the upper step included) is
``inner_steps + 1``. Per outer step, with the forward estimator and q directions:
``inner_steps + 3 + 3q`` forwards and ``inner_steps + 2`` backwards (central estimator:
``inner_steps + 2 + 6q`` forwards). ``order="p-first"`` steps P before the ZO step (the
earlier behaviour of this package), which cannot reuse f and g_P: ``inner_steps + 5 + 3q``
forwards with the forward estimator.

theta's update (``theta_update``):

* ``"rms"`` (default): ZO-SGD on the projected gradient divided by its running RMS
  (``ZOOptimizer(normalize="rms")``, one scalar of state). A weight moves by about lr per step
  whatever lam and the scale of the loss, as under the authors' Adam, with no backbone-sized
  buffer.
* ``"sgd"``: plain ZO-SGD, theta moves by lr * g * z (the step grows with lam).
* ``"scaled-sgd"``: plain ZO-SGD on L / (1 + lam).
* ``"adam"``: the authors' update, for exact reproduction: theta.grad = g * z is materialised
  and one ``torch.optim.AdamW`` steps theta and P together with ``lr`` (P's ``peft_lr`` is
  not used; S keeps its own optimizer with ``lower_lr``, default ``peft_lr``). It costs three
  backbone-sized buffers (grad, exp_avg, exp_avg_sq): not memory-efficient.

An outer step is atomic: if anything raises during it (a loss function, a non-finite loss
under ``nonfinite="raise"``, an interrupt), P, S, their optimizer states, theta's ZO state and
every counter are put back as they were before the call (theta itself is restored by the ZO
step's own guarantee, see docs/optimizers.md, "Safety guarantees") and the error propagates.
The first-order steps of P and S must leave finite weights: a step that would write NaN/inf is
undone and reported as a non-finite loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from zofo_kernels.core.optim.zo import (NONFINITE_POLICIES, NonFiniteLossError, ZOOptimizer, _choice, _int, _real,
                 loss_value)

LEVELS = ("upper", "lower")
THETA_UPDATES = ("rms", "sgd", "scaled-sgd", "adam")
ORDERS = ("official", "p-first")
PEFT_DTYPES = (torch.float32, torch.float64)


@dataclasses.dataclass
class ZOFOStepResult:
    """What one call computed (floats; ``None`` where the call did not compute it).

    lower_losses: g(theta, S; B_g^k) of every lower step, before its update.
    upper_loss: f(theta, P; B_f), penalty_loss: g(theta, P; B_g), lower_penalty_loss:
    g(theta, S; B_g), all at the unperturbed theta and before P's update (under
    ``order="p-first"`` the last one is measured after it). gap: penalty_loss -
    lower_penalty_loss (>= 0 when S solves the lower problem better than P). objective: L at
    the unperturbed point (central estimator: the mean over the perturbed evaluations).
    projected_grads: the ZO slopes of L, one per direction. slopes: per direction, the slopes
    of the three terms, {"f", "g_upper", "g_lower"} (forward estimator only), so that
    projected_grad = f + lam * (g_upper - g_lower). theta_step_rms: the RMS change per
    backbone weight of theta's update (expected over z; weight decay excluded).
    """
    lower_losses: List[float] = dataclasses.field(default_factory=list)
    upper_loss: Optional[float] = None
    penalty_loss: Optional[float] = None
    lower_penalty_loss: Optional[float] = None
    gap: Optional[float] = None
    objective: Optional[float] = None
    projected_grads: List[float] = dataclasses.field(default_factory=list)
    slopes: List[Dict[str, float]] = dataclasses.field(default_factory=list)
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


# --------------------------------------------------------------------------- checks

def _param_list(params, name: str) -> List[torch.Tensor]:
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


def _byte_span(t: torch.Tensor) -> Tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) that ``t`` can touch."""
    local = t.to_local() if hasattr(t, "to_local") else t
    if local.numel() == 0:
        return (0, 0, 0)
    size = local.element_size()
    lo = local.storage_offset()
    hi = lo + sum((n - 1) * abs(s) for n, s in zip(local.shape, local.stride())) + 1
    return (local.untyped_storage().data_ptr(), lo * size, hi * size)


def _check_disjoint(owners: Sequence[Tuple[str, Sequence[torch.Tensor]]]) -> None:
    """No two tensors of different roles (or twice in one role) may share memory: checked on
    the storage, not object identity (``p.data`` is another object on the same memory)."""
    spans = []
    for owner, ps in owners:
        for p in ps:
            ptr, lo, hi = _byte_span(p)
            if hi > lo:
                spans.append((ptr, lo, hi, owner))
    spans.sort()
    for (pa, la, ha, oa), (pb, lb, hb, ob) in zip(spans, spans[1:]):
        if pa == pb and lb < ha:
            where = f"both {oa} and {ob}" if oa != ob else f"{oa} twice"
            raise ValueError(f"a parameter's memory appears in {where}; backbone, upper and "
                             "lower parameters must be disjoint tensors")


def _check_lower_batches(lower_batches, inner_steps: int, need_penalty: bool) -> list:
    if not isinstance(lower_batches, list):
        raise TypeError("lower_batches must be a list of batches (one per lower step), got a "
                        f"{type(lower_batches).__name__}; wrap a single batch as [batch]")
    need = inner_steps + (1 if need_penalty and inner_steps == 0 else 0)
    if len(lower_batches) != need:
        extra = (" (no penalty_batch given: the last lower batch is B_g)"
                 if need_penalty and inner_steps == 0 else "")
        raise ValueError(f"lower_batches must hold {need} batch(es) (inner_steps="
                         f"{inner_steps}){extra}, got {len(lower_batches)}")
    return lower_batches


# --------------------------------------------------------------------------- one PEFT pair

class _Pair:
    """One (P, S) PEFT pair with its optimizers, adapter switch and loss."""

    def __init__(self, name, upper, lower, select_adapter, loss_fn, opt_cls, upper_lr,
                 lower_lr, opt_kwargs, upper_optimizer=True):
        self.name = name
        upper_groups, lower_groups = list(upper), list(lower)
        self.upper = _param_list(upper_groups, f"upper_params ({name})")
        self.lower = _param_list(lower_groups, f"lower_params ({name})")
        if len(self.upper) != len(self.lower) or any(
                a.shape != b.shape for a, b in zip(self.upper, self.lower)):
            raise ValueError(f"upper and lower parameters of {name!r} must be two copies of the "
                             "same PEFT block (same number of tensors, same shapes, same order)")
        for a, b in zip(self.upper, self.lower):
            if a.dtype != b.dtype or a.device != b.device:
                raise ValueError(f"upper and lower parameters of {name!r} must have the same "
                                 f"dtypes and devices (got {a.dtype} on {a.device} and "
                                 f"{b.dtype} on {b.device})")
        for p in self.upper + self.lower:
            if not p.is_floating_point():
                raise TypeError("PEFT parameters must be floating point")
            if p.dtype not in PEFT_DTYPES:
                raise TypeError(
                    f"PEFT parameters of {name!r} are {p.dtype}: P and S are trained "
                    "first-order with Adam, whose eps and second moments underflow in 16-bit "
                    "types. Keep the adapter in float32 (peft does so by default, "
                    "autocast_adapter_dtype=True) and the backbone in 16 bits if you like")
        if not callable(select_adapter):
            raise TypeError("select_adapter must be callable: select_adapter('upper'|'lower')")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(batch) -> scalar loss tensor")
        self.select_adapter = select_adapter
        self.loss_fn = loss_fn
        self.opt_upper = (opt_cls(upper_groups, lr=upper_lr, **opt_kwargs)
                          if upper_optimizer else None)
        self.opt_lower = opt_cls(lower_groups, lr=lower_lr, **opt_kwargs)

    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.opt_upper, self.opt_lower) if o is not None]


# --------------------------------------------------------------------------- the machinery

class BilevelOptimizer:
    """What ZOFOOptimizer and MetaZOFOOptimizer share: a backbone stepped zeroth-order by
    ``zo`` (a :class:`ZOOptimizer`) and PEFT copies (P, S) stepped first-order by
    :meth:`first_order_optimizers`; ``theta_update`` says how the backbone moves. Code that
    drives either (e.g. ``DataParallelZO``) talks to this interface."""

    def _setup(self, backbone_params, pairs_spec, lr, *, lam=1.0, inner_steps=10,
               theta_update="rms", order="official", peft_optimizer=torch.optim.Adam,
               peft_lr=1e-3, lower_lr=None, peft_optimizer_kwargs=None, estimator="forward",
               weight_decay=0.0, **zo_kwargs):
        self.lam = _real(lam, "lam", nonneg=True)
        self.inner_steps = _int(inner_steps, "inner_steps", 0)
        self.theta_update = _choice(theta_update, "theta_update", THETA_UPDATES)
        self.order = _choice(order, "order", ORDERS)
        if self.theta_update == "adam" and self.order != "official":
            raise ValueError("theta_update='adam' steps theta and P with one Adam after the ZO "
                             "estimate: it needs order='official'")
        if not (isinstance(peft_optimizer, type)
                and issubclass(peft_optimizer, torch.optim.Optimizer)):
            raise TypeError("peft_optimizer must be a torch.optim.Optimizer subclass "
                            f"(e.g. torch.optim.Adam), got {peft_optimizer!r}")
        if issubclass(peft_optimizer, ZOOptimizer):
            raise TypeError("peft_optimizer must be a first-order optimizer (e.g. "
                            "torch.optim.Adam); ZOOptimizer trains the backbone here")
        peft_lr = _real(peft_lr, "peft_lr", nonneg=True)
        lower_lr = peft_lr if lower_lr is None else _real(lower_lr, "lower_lr", nonneg=True)
        kwargs = {} if peft_optimizer_kwargs is None else dict(peft_optimizer_kwargs)
        if "lr" in kwargs:
            raise ValueError("give the PEFT learning rate as peft_lr / lower_lr, not in "
                             "peft_optimizer_kwargs")
        self.nonfinite = _choice(zo_kwargs.get("nonfinite", "raise"), "nonfinite",
                                 NONFINITE_POLICIES)
        backbone_groups = list(backbone_params)
        backbone = _param_list(backbone_groups, "backbone_params")
        adam = self.theta_update == "adam"
        weight_decay = _real(weight_decay, "weight_decay", nonneg=True)
        if "include_frozen" in zo_kwargs:
            raise ValueError("include_frozen is not a Bilevel-ZOFO setting: the backbone given "
                             "is trained whatever its requires_grad (peft freezes it)")
        # theta_update="adam": the ZO optimizer only perturbs and restores (lr 0); AdamW steps
        # the ZO settings (eps, distribution, n_directions, seed, backend, ...) go straight
        # to ZOOptimizer, which checks them
        self.zo = ZOOptimizer(backbone_groups, lr=0.0 if adam else lr,
                              include_frozen=True,
                              estimator=estimator, weight_decay=0.0 if adam else weight_decay,
                              normalize="rms" if self.theta_update == "rms" else "none",
                              **zo_kwargs)
        self.pairs: Dict[Any, _Pair] = {}
        for name, (upper, lower, select, loss_fn) in pairs_spec.items():
            self.pairs[name] = _Pair(name, upper, lower, select, loss_fn, peft_optimizer,
                                     peft_lr, lower_lr, kwargs, upper_optimizer=not adam)
        _check_disjoint([("backbone", backbone)] + [
            (f"{n!r} {lv}", getattr(p, lv)) for n, p in self.pairs.items() for lv in LEVELS])
        self._backbone = backbone
        self.theta_optimizer = None
        if adam:
            lr = _real(lr, "lr", nonneg=True)
            self.theta_optimizer = torch.optim.AdamW(
                [{"params": backbone, "weight_decay": weight_decay}]
                + [{"params": pr.upper, "weight_decay": 0.0} for pr in self.pairs.values()],
                lr=lr)
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

    def _loss(self, pair: _Pair, batch) -> torch.Tensor:
        self.forward_count += 1
        loss = pair.loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return a scalar loss tensor")
        return loss.reshape(())

    def _nonfinite(self, message: str) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteLossError(message + " (pass nonfinite='skip' to skip such steps)")

    def _backprop(self, params, losses, what: str) -> Optional[List[float]]:
        """Backpropagate the weighted ``losses`` (thunks with weights) into ``params``' .grad,
        one at a time so that only one forward graph is alive (FO-PEFT's activation peak).
        Returns the unweighted values, or None (grads cleared) for a non-finite loss under
        nonfinite='skip'."""
        values = []
        for p in params:
            p.grad = None
        with self._only_trainable(params), torch.enable_grad():
            for weight, thunk in losses:
                loss = thunk()
                value = loss_value(loss)
                values.append(value)
                if not math.isfinite(value):
                    for p in params:
                        p.grad = None
                    self._nonfinite(f"non-finite {what} loss ({value}); no update made")
                    return None
                (loss * weight if weight != 1.0 else loss).backward()
                self.backward_count += 1
                del loss
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
            for p in params:
                p.grad = None
            self._nonfinite(f"non-finite {what} gradient (finite loss {values}); no update "
                            "made")
            return None
        return values

    def _fo_update(self, opt: torch.optim.Optimizer, params,
                   what: str) -> Optional[List[torch.Tensor]]:
        """``opt.step()`` on gradients already in ``params``; undone if it wrote a non-finite
        weight. Returns the weights from before the step when it was kept, else None."""
        before = [p.detach().clone() for p in params]
        state = copy.deepcopy(opt.state_dict())
        opt.step()
        for p in params:
            p.grad = None
        if all(bool(torch.isfinite(p).all()) for p in params):
            return before
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        opt.load_state_dict(state)
        self._nonfinite(f"the first-order {what} step produced non-finite weights; undone")
        return None

    def _lower(self, pair: _Pair, lower_batch) -> float:
        try:
            pair.select_adapter("lower")
            values = self._backprop(pair.lower, [(1.0, lambda: self._loss(pair, lower_batch))],
                                    "lower-level")
            if values is None:
                return float("nan")
            self._fo_update(pair.opt_lower, pair.lower, "lower-level")
            return values[0]
        finally:
            pair.select_adapter("upper")

    def _upper_grad(self, pair: _Pair, upper_batch, penalty_batch):
        """P.grad = grad_P [f + lam * g_P]; returns (f, g_P) or None (skipped)."""
        pair.select_adapter("upper")
        return self._backprop(pair.upper, [(1.0, lambda: self._loss(pair, upper_batch)),
                                           (self.lam, lambda: self._loss(pair, penalty_batch))],
                              "upper-level")

    def _terms(self, pair: _Pair, upper_batch, penalty_batch, which=("f", "gp", "gs")):
        """Some of f(theta, P; B_f), g(theta, P; B_g), g(theta, S; B_g), no grad, float64."""
        out = {}
        try:
            with torch.no_grad():
                pair.select_adapter("upper")
                if "f" in which:
                    out["f"] = self._loss(pair, upper_batch).double()
                if "gp" in which:
                    out["gp"] = self._loss(pair, penalty_batch).double()
                if "gs" in which:
                    pair.select_adapter("lower")
                    out["gs"] = self._loss(pair, penalty_batch).double()
        finally:
            pair.select_adapter("upper")
        return out

    def _objective_scale(self) -> float:
        return 1.0 / (1.0 + self.lam) if self.theta_update == "scaled-sgd" else 1.0

    def _outer(self, plan: List[Tuple[_Pair, Any, Any]]) -> Tuple[List[ZOFOStepResult], dict]:
        """The upper step for every (pair, B_f, B_g) of ``plan`` and one ZO step of theta on the
        sum of their objectives. Returns per-pair results and the ZO step's summary."""
        results = []
        for pair, bf, bg in plan:
            values = self._upper_grad(pair, bf, bg)
            res = ZOFOStepResult()
            if values is not None:
                res.upper_loss, res.penalty_loss = values
            else:
                res.upper_loss = res.penalty_loss = float("nan")
            results.append(res)
        # P's first-order step is made now, so that anything that can fail happens before
        # theta's update (the step's commit point); under order="official" the new P is set
        # aside and the ZO step sees the old one, as in the authors' code.
        stepped_p = []
        if self.theta_optimizer is None:
            for (pair, _, _), res in zip(plan, results):
                if res.upper_loss != res.upper_loss:  # skipped: no gradient
                    continue
                old = self._fo_update(pair.opt_upper, pair.upper, "upper-level")
                if old is not None and self.order == "official":
                    stepped_p.append((pair, [p.detach().clone() for p in pair.upper]))
                    with torch.no_grad():
                        for p, o in zip(pair.upper, old):
                            p.copy_(o)
        reuse = self.order == "official" and self.zo.estimator == "forward"
        scale = self._objective_scale()
        if reuse:  # L0 from the values of P's pass plus one forward of g(theta, S; B_g)
            total0 = 0.0
            for (pair, bf, bg), res in zip(plan, results):
                res.lower_penalty_loss = float(self._terms(pair, bf, bg, ("gs",))["gs"])
                res.gap = res.penalty_loss - res.lower_penalty_loss
                res.objective = res.upper_loss + self.lam * res.gap
                total0 += res.objective
        evaluations: List[List[Dict[str, float]]] = []

        def closure():
            terms, total = [], None
            for pair, bf, bg in plan:
                t = self._terms(pair, bf, bg)
                terms.append({k: float(v) for k, v in t.items()})
                value = t["f"] + self.lam * (t["gp"] - t["gs"])
                total = value if total is None else total + value
            evaluations.append(terms)
            return total * scale

        try:
            objective = self.zo.step(closure, initial_loss=total0 * scale if reuse else None)
        finally:
            for pair, _, _ in plan:
                pair.select_adapter("upper")
        with torch.no_grad():  # theta has its update: P takes its own
            for pair, new in stepped_p:
                for p, n in zip(pair.upper, new):
                    p.copy_(n)
        st = self.zo.last_step
        eps = self.zo.eps
        for i, ((pair, _, _), res) in enumerate(zip(plan, results)):
            if not reuse and evaluations:
                if self.zo.estimator == "central":  # no unperturbed evaluation at all
                    res.objective = sum(
                        e[i]["f"] + self.lam * (e[i]["gp"] - e[i]["gs"]) for e in evaluations
                    ) / len(evaluations)
                else:  # p-first: the first evaluation is at the unperturbed theta, new P
                    first = evaluations[0][i]
                    res.lower_penalty_loss = first["gs"]
                    res.gap = res.penalty_loss - first["gs"]
                    res.objective = first["f"] + self.lam * (first["gp"] - first["gs"])
            if self.zo.estimator == "forward" and len(evaluations) > (0 if reuse else 1):
                base = ({"f": res.upper_loss, "gp": res.penalty_loss,
                         "gs": res.lower_penalty_loss} if reuse else evaluations[0][i])
                plus = evaluations[1:] if not reuse else evaluations
                res.slopes = [{"f": (e[i]["f"] - base["f"]) / eps,
                               "g_upper": (e[i]["gp"] - base["gp"]) / eps,
                               "g_lower": (e[i]["gs"] - base["gs"]) / eps} for e in plus]
        summary = dict(objective=objective, projected_grads=list(st["projected_grads"]),
                       skipped=st["skipped"], theta_step_rms=st["update_rms"])
        if self.theta_optimizer is not None:
            summary["theta_step_rms"] = self._adam_step(st)
        for res in results:
            res.projected_grads = summary["projected_grads"]
            res.theta_step_rms = summary["theta_step_rms"]
            res.skipped = summary["skipped"]
        return results, summary

    def _adam_step(self, st: dict) -> float:
        """theta_update='adam': theta.grad = sum_k c_k z_k (materialised from the step's seed,
        parameters laid end to end as the noise contract says), P.grad from its pass; one
        AdamW step of both. Returns the RMS change per backbone weight of that step (from
        AdamW's moments; weight decay excluded)."""
        from zofo_kernels.core.ops import noise
        opt = self.theta_optimizer
        if st["skipped"]:
            opt.zero_grad(set_to_none=True)
            return 0.0
        offset = 0
        for group in self.zo.param_groups:
            for p in group["params"]:
                grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                for k, c in enumerate(st["update_coefficients"]):
                    z = noise(st["seed"], offset, p.numel(), self.zo.distribution, k,
                              device=p.device)
                    grad.add_(z.view(p.shape), alpha=c)
                p.grad = grad.to(p.dtype)
                offset += p.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        beta1, beta2 = opt.param_groups[0]["betas"]
        total, n = 0.0, 0
        with torch.no_grad():
            for group in opt.param_groups[:1]:  # the backbone group
                for p in group["params"]:
                    state = opt.state[p]
                    t = float(state["step"])
                    # |lr * m_hat / (sqrt(v_hat) + eps)|^2 summed, with one float32 temporary
                    tmp = state["exp_avg_sq"].float().sqrt()
                    tmp.div_(math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                    torch.div(state["exp_avg"].float(), tmp, out=tmp)
                    total += float(tmp.pow_(2).sum()) * (group["lr"] / (1 - beta1 ** t)) ** 2
                    n += p.numel()
                    del tmp
        return math.sqrt(total / max(1, n))

    def first_order_optimizers(self) -> List[torch.optim.Optimizer]:
        """Every first-order optimizer this optimizer steps (S's and P's; under
        theta_update='adam' the AdamW of theta and P)."""
        out = [o for pair in self.pairs.values() for o in pair.optimizers()]
        return out + ([self.theta_optimizer] if self.theta_optimizer is not None else [])

    @contextlib.contextmanager
    def _atomic(self):
        """Everything an outer step changes besides theta, put back if the step raises."""
        pairs = [(p, [t.detach().clone() for t in p.upper + p.lower],
                  [copy.deepcopy(o.state_dict()) for o in p.optimizers()])
                 for p in self.pairs.values()]
        zo_state = dict(self.zo._zo_state)
        counters = (self.forward_count, self.backward_count, self.outer_steps)
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for pair, weights, states in pairs:
                    for t, w in zip(pair.upper + pair.lower, weights):
                        t.copy_(w)
                        t.grad = None
                    for o, s in zip(pair.optimizers(), states):
                        o.load_state_dict(s)
                    pair.select_adapter("upper")
            self.zo._zo_state = zo_state
            self.forward_count, self.backward_count, self.outer_steps = counters
            raise

    def eval_mode(self):
        """Select the upper copy P for every pair (what evaluation uses); returns self."""
        for pair in self.pairs.values():
            pair.select_adapter("upper")
        return self

    # -- checkpointing -----------------------------------------------------------------------
    _SETTINGS = ("lam", "inner_steps", "theta_update", "order")

    def state_dict(self) -> Dict[str, Any]:
        """theta's ZO state (seed counter, RMS state) and settings, the P and S optimizer
        states (and theta's AdamW state under theta_update='adam'), the counters. The weights
        themselves (theta, P, S) are the model's: save the model's state_dict."""
        sd = {
            "zo": self.zo.state_dict(),
            "pairs": {name: {"upper": p.opt_upper.state_dict() if p.opt_upper else None,
                             "lower": p.opt_lower.state_dict()}
                      for name, p in self.pairs.items()},
            "forward_count": self.forward_count,
            "backward_count": self.backward_count,
            "outer_steps": self.outer_steps,
        }
        sd.update({k: getattr(self, k) for k in self._SETTINGS})
        if self.theta_optimizer is not None:
            sd["theta_optimizer"] = self.theta_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Validate everything, then apply; on any failure nothing is changed."""
        if not isinstance(state_dict, dict):
            raise TypeError("state_dict must be a dict saved by state_dict()")
        missing = {"zo", "pairs", "forward_count", "backward_count", "outer_steps"} - set(
            state_dict)
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        differ = [f"{k}: saved {state_dict[k]!r}, this optimizer {getattr(self, k)!r}"
                  for k in self._SETTINGS if k in state_dict and state_dict[k] != getattr(self, k)]
        if differ:
            raise ValueError("the state dict was saved by a differently configured optimizer ("
                             + "; ".join(differ) + "); resuming would follow another trajectory")
        if not isinstance(state_dict["pairs"], dict) or set(state_dict["pairs"]) != set(
                self.pairs):
            raise ValueError(f"state dict has PEFT pairs "
                             f"{sorted(map(str, state_dict['pairs']))}, this optimizer has "
                             f"{sorted(map(str, self.pairs))}")
        counters = {k: state_dict[k] for k in ("forward_count", "backward_count", "outer_steps")}
        for k, v in counters.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state dict {k} must be a non-negative integer, got {v!r}")
        if (self.theta_optimizer is not None) != ("theta_optimizer" in state_dict):
            raise ValueError("theta_update='adam' state and this optimizer's theta_update "
                             "do not match")
        optimizers = [(p.opt_upper, state_dict["pairs"][n]["upper"]) for n, p in
                      self.pairs.items() if p.opt_upper is not None]
        optimizers += [(p.opt_lower, state_dict["pairs"][n]["lower"])
                       for n, p in self.pairs.items()]
        if self.theta_optimizer is not None:
            optimizers.append((self.theta_optimizer, state_dict["theta_optimizer"]))
        saved = [copy.deepcopy(o.state_dict()) for o, _ in optimizers]
        saved_zo = copy.deepcopy(self.zo.state_dict())
        try:
            for o, s in optimizers:
                o.load_state_dict(s)
            self.zo.load_state_dict(state_dict["zo"])
        except BaseException:
            for (o, _), s in zip(optimizers, saved):
                o.load_state_dict(s)
            self.zo.load_state_dict(saved_zo)
            raise
        self.forward_count = counters["forward_count"]
        self.backward_count = counters["backward_count"]
        self.outer_steps = counters["outer_steps"]


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


def _check_new_adapter_name(peft_model, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
    if name in peft_model.peft_config:
        raise ValueError(f"the model already has an adapter named {name!r}")
    modules = {part for n, _ in peft_model.named_modules() for part in n.split(".")}
    if name in modules:
        raise ValueError(f"adapter name {name!r} is also the name of a module of the model; "
                         "peft would confuse the two: choose another name")


def _copy_adapter(peft_model, source: str, target: str) -> None:
    """Add adapter ``target`` with ``source``'s config and a copy of its current weights. On
    failure the model is left without ``target``."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    _check_new_adapter_name(peft_model, target)
    try:
        peft_model.add_adapter(target, copy.deepcopy(peft_model.peft_config[source]))
        sd = get_peft_model_state_dict(peft_model, adapter_name=source)
        set_peft_model_state_dict(peft_model, sd, adapter_name=target)
        src, dst = _adapter_params(peft_model, source), _adapter_params(peft_model, target)
        if set(src) != set(dst):
            raise RuntimeError(f"adapter copy {target!r} does not mirror {source!r}")
        with torch.no_grad():  # exact copy, whatever the loader did (e.g. dtype casts)
            for k, p in src.items():
                dst[k].copy_(p)
    except BaseException:
        _remove_adapters(peft_model, [target], source)
        raise


def _remove_adapters(peft_model, names, active: str) -> None:
    peft_model.set_adapter(active)
    for name in names:
        if name in peft_model.peft_config:
            peft_model.delete_adapter(name)


def _backbone_named_params(peft_model) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that belongs to no adapter. Excluded too: peft's
    ``original_module`` copies of modules_to_save, which no forward uses while an adapter is
    active."""
    adapters = set(_adapter_names(peft_model))
    out = []
    for name, p in peft_model.named_parameters():
        parts = set(name.split("."))
        if parts & adapters or "original_module" in parts:
            continue
        out.append((name, p))
    if not out:
        raise ValueError("the PEFT model has no backbone parameters")
    return out


def _backbone_params(peft_model, backbone_params=None,
                     backbone_regex: Optional[str] = None) -> List[torch.nn.Parameter]:
    """theta of ``from_peft``: ``backbone_params`` when given, else every non-adapter
    parameter, or those of them whose name matches ``backbone_regex`` (``re.search``)."""
    if backbone_regex is None:
        return ([p for _, p in _backbone_named_params(peft_model)] if backbone_params is None
                else backbone_params)
    if backbone_params is not None:
        raise ValueError("give backbone_params or backbone_regex, not both")
    if not isinstance(backbone_regex, str) or not backbone_regex:
        raise ValueError(f"backbone_regex must be a non-empty regular expression, got "
                         f"{backbone_regex!r}")
    try:
        pattern = re.compile(backbone_regex)
    except re.error as exc:
        raise ValueError(f"backbone_regex {backbone_regex!r} is not a valid regular "
                         f"expression: {exc}") from None
    named = _backbone_named_params(peft_model)
    chosen = [p for n, p in named if pattern.search(n)]
    if not chosen:
        examples = ", ".join(n for n, _ in named[:4])
        raise ValueError(f"backbone_regex {backbone_regex!r} matches no backbone parameter "
                         f"(names look like: {examples}, ...)")
    return chosen


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

class ZOFOOptimizer(BilevelOptimizer):
    """Bilevel-ZOFO: ZO for the backbone theta, FO for the two PEFT copies P (upper) and S
    (lower). See the module docstring for the algorithm, the forward counts and the theta
    updates, and ``docs/optimizers.md`` for the data protocol.

    Parameters: ``backbone_params`` (parameters or parameter groups of theta; groups may set
    their own lr / weight_decay), ``upper_params`` / ``lower_params`` (P and S, two copies of
    the same PEFT block, float32), ``select_adapter(level)`` (makes the model's forward use P
    for "upper", S for "lower"), ``loss_fn(batch)`` (scalar loss of the model on a batch),
    ``lr`` (theta's learning rate). Keyword-only: ``eps``, ``lam`` (penalty weight lambda),
    ``inner_steps`` (lower steps per outer step; the paper's K - 1), ``theta_update``
    ("rms" | "sgd" | "scaled-sgd" | "adam"), ``order`` ("official" | "p-first"),
    ``peft_optimizer`` (torch.optim class for P and S), ``peft_lr`` (lr of P, and of S unless
    ``lower_lr`` is given), ``peft_optimizer_kwargs``, ``estimator`` (default "forward", as the
    authors), ``weight_decay``, and every other setting of :class:`ZOOptimizer`
    (n_directions, distribution, seed, stochastic_rounding, nonfinite, loss_reduce, backend,
    rms_beta), handed to it unchanged.
    """

    def __init__(self, backbone_params, upper_params, lower_params,
                 select_adapter: Callable[[str], None], loss_fn: Callable[[Any], torch.Tensor],
                 lr: float, **settings):
        self._setup(backbone_params, {"default": (upper_params, lower_params, select_adapter,
                                                  loss_fn)}, lr, **settings)
        self.pair = self.pairs["default"]
        self.peft_model = None
        self.eval_mode()

    @classmethod
    def from_peft(cls, peft_model, loss_fn: Callable[[Any], torch.Tensor], lr: float, *,
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
        """
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
            backbone = _backbone_params(peft_model, backbone_params, backbone_regex)
            opt = cls(backbone, up, low, select, loss_fn, lr, **settings)
        except BaseException:
            _remove_adapters(peft_model, [lower], upper)  # leave the model as it was given
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
        batches = _check_lower_batches(lower_batches, self.inner_steps, penalty_batch is None)
        bg = batches[-1] if penalty_batch is None else penalty_batch
        with self._atomic():
            lower_losses = [self._lower(self.pair, b) for b in batches[:self.inner_steps]]
            (res,), _ = self._outer([(self.pair, upper_batch, bg)])
            res.lower_losses = lower_losses
            self.outer_steps += 1
        return res
