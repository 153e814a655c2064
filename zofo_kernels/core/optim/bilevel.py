"""BilevelOptimizer: the machinery of Bilevel-ZOFO (arXiv 2502.03604;
docs/optimizers/zofo.md), shared by :class:`~zofo_kernels.core.optim.ZOFOOptimizer` (one PEFT pair) and
:class:`~zofo_kernels.core.optim.MetaZOFOOptimizer` (one pair per task), and its result type
:class:`ZOFOStepResult`.

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

Per outer step, with the forward estimator and q directions:
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
* ``"std"``: FZOO's normalised step (``ZOOptimizer(normalize="std")``, needs
  ``n_directions >= 2``): the slopes divided by their spread within the step, so a weight
  moves by about lr per step, with no state that remembers earlier, larger slopes.
* ``"adam"``: the authors' update, for exact reproduction: theta.grad = g * z is materialised
  and one ``torch.optim.AdamW`` steps theta and P together with ``lr`` (P's ``peft_lr`` is
  not used; S keeps its own optimizer with ``lower_lr``, default ``peft_lr``). It costs three
  backbone-sized buffers (grad, exp_avg, exp_avg_sq): not memory-efficient. It refuses
  ``sparse_fraction`` (Adam's moments and weight decay would move the unmasked weights too).

theta's ZO step can be sparse (``sparse_fraction``, a :class:`ZOOptimizer` setting handed
through: each step perturbs and updates only the smallest-magnitude fraction of each backbone
tensor; :mod:`zofo_kernels.core.optim.sparse`).

An outer step is atomic: if anything raises during it (a loss function, a non-finite loss
under ``nonfinite="raise"``, an interrupt), P, S, their optimizer states, theta's ZO state and
every counter are put back as they were before the call (theta itself is restored by the ZO
step's own guarantee, see docs/optimizers/zo-sgd.md, "Safety guarantees") and the error propagates.
The first-order steps of P and S must leave finite weights: a step that would write NaN/inf is
undone and reported as a non-finite loss.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from zofo_kernels.core.optim import first_order
from zofo_kernels.core.optim.adam_theta import adam_theta_step, theta_adamw
from zofo_kernels.core.optim.peft_pair import LEVELS, PeftPair, param_list
from zofo_kernels.core.optim.zo import NONFINITE_POLICIES, NonFiniteLossError, ZOOptimizer
from zofo_kernels.core.validation import choice, integer, real

# The defaults of every Bilevel-ZOFO optimizer, equal to the method registry's
# (zofo_kernels/integrations/methods.py): the SST-2 study's choice (benchmarks/results/study_v2/)
DEFAULT_LR = 1e-4
DEFAULT_LAM = 10.0
DEFAULT_INNER_STEPS = 3
THETA_UPDATES = ("rms", "sgd", "scaled-sgd", "std", "adam")
# the ZOOptimizer normalisation each theta_update uses ("adam": the ZO step only perturbs)
_THETA_NORMALIZE = {"rms": "rms", "std": "std"}
ORDERS = ("official", "p-first")
_COUNTERS = ("forward_count", "backward_count", "outer_steps")


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

def check_lower_batches(lower_batches, inner_steps: int, need_penalty: bool) -> list:
    """``lower_batches`` of one outer step: a list of ``inner_steps`` batches (one more when
    ``need_penalty`` and ``inner_steps == 0``: the last lower batch is then B_g)."""
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


def _check_adam(theta_update: str, order: str, sparse_fraction, lowrank) -> None:
    """What theta_update='adam' cannot be combined with."""
    if theta_update != "adam":
        return
    if order != "official":
        raise ValueError("theta_update='adam' steps theta and P with one Adam after the ZO "
                         "estimate: it needs order='official'")
    if sparse_fraction is not None:
        raise ValueError("sparse_fraction cannot be used with theta_update='adam': AdamW "
                         "moves every weight of theta by its moments and weight decay, so "
                         "the step would not stay on the masked elements; use "
                         "theta_update='rms', 'sgd' or 'scaled-sgd'")
    if lowrank is not None:
        raise ValueError("lowrank cannot be used with theta_update='adam': its theta.grad is "
                         "materialised from the dense noise; use theta_update='rms', 'sgd' "
                         "or 'scaled-sgd'")


def _check_peft_optimizer(peft_optimizer) -> None:
    if not (isinstance(peft_optimizer, type)
            and issubclass(peft_optimizer, torch.optim.Optimizer)):
        raise TypeError("peft_optimizer must be a torch.optim.Optimizer subclass "
                        f"(e.g. torch.optim.Adam), got {peft_optimizer!r}")
    if issubclass(peft_optimizer, ZOOptimizer):
        raise TypeError("peft_optimizer must be a first-order optimizer (e.g. "
                        "torch.optim.Adam); ZOOptimizer trains the backbone here")


def _checked_counters(opt: "BilevelOptimizer", state_dict) -> Dict[str, int]:
    """The counters of a state dict saved by ``opt``'s kind of optimizer, after checking that
    it matches ``opt`` (settings, PEFT pairs, theta_update)."""
    if not isinstance(state_dict, dict):
        raise TypeError("state_dict must be a dict saved by state_dict()")
    missing = {"zo", "pairs", *_COUNTERS} - set(state_dict)
    if missing:
        raise KeyError(f"state dict lacks {sorted(missing)}")
    differ = [f"{k}: saved {state_dict[k]!r}, this optimizer {getattr(opt, k)!r}"
              for k in opt._SETTINGS if k in state_dict and state_dict[k] != getattr(opt, k)]
    if differ:
        raise ValueError("the state dict was saved by a differently configured optimizer ("
                         + "; ".join(differ) + "); resuming would follow another trajectory")
    if not isinstance(state_dict["pairs"], dict) or set(state_dict["pairs"]) != set(opt.pairs):
        raise ValueError(f"state dict has PEFT pairs "
                         f"{sorted(map(str, state_dict['pairs']))}, this optimizer has "
                         f"{sorted(map(str, opt.pairs))}")
    counters = {k: state_dict[k] for k in _COUNTERS}
    for k, v in counters.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"state dict {k} must be a non-negative integer, got {v!r}")
    if (opt.theta_optimizer is not None) != ("theta_optimizer" in state_dict):
        raise ValueError("theta_update='adam' state and this optimizer's theta_update "
                         "do not match")
    return counters


def _load_all_or_nothing(loads) -> None:
    """``o.load_state_dict(s)`` for every (o, s) of ``loads``; if one fails, every one is put
    back as it was and the error propagates."""
    saved = [copy.deepcopy(o.state_dict()) for o, _ in loads]
    try:
        for o, s in loads:
            o.load_state_dict(s)
    except BaseException:
        for (o, _), s in zip(loads, saved):
            o.load_state_dict(s)
        raise


def _fill_result(res: ZOFOStepResult, terms: List[Dict[str, float]], *, reuse: bool,
                 estimator: str, lam: float, eps: float) -> None:
    """Complete one pair's ``res`` from ``terms``, its {"f", "gp", "gs"} at each evaluation of
    the ZO step: the objective where P's pass could not give it (``reuse`` False), and the
    slopes of the three terms (forward estimator)."""
    if not reuse and terms:
        if estimator == "central":  # no unperturbed evaluation at all
            res.objective = sum(t["f"] + lam * (t["gp"] - t["gs"]) for t in terms) / len(terms)
        else:  # p-first: the first evaluation is at the unperturbed theta, new P
            first = terms[0]
            res.lower_penalty_loss = first["gs"]
            res.gap = res.penalty_loss - first["gs"]
            res.objective = first["f"] + lam * (first["gp"] - first["gs"])
    if estimator == "forward" and len(terms) > (0 if reuse else 1):
        base = ({"f": res.upper_loss, "gp": res.penalty_loss, "gs": res.lower_penalty_loss}
                if reuse else terms[0])
        res.slopes = [{"f": (t["f"] - base["f"]) / eps,
                       "g_upper": (t["gp"] - base["gp"]) / eps,
                       "g_lower": (t["gs"] - base["gs"]) / eps}
                      for t in (terms if reuse else terms[1:])]


# --------------------------------------------------------------------------- the machinery

class BilevelOptimizer:
    """What ZOFOOptimizer and MetaZOFOOptimizer share: a backbone stepped zeroth-order by
    ``zo`` (a :class:`ZOOptimizer`) and PEFT copies (P, S) stepped first-order by
    :meth:`first_order_optimizers`; ``theta_update`` says how the backbone moves. Code that
    drives either (e.g. ``DataParallelZO``) talks to this interface."""

    _SETTINGS = ("lam", "inner_steps", "theta_update", "order")

    def _setup(self, backbone_params, pairs_spec, lr, *, lam=DEFAULT_LAM,
               inner_steps=DEFAULT_INNER_STEPS,
               theta_update="rms", order="official", peft_optimizer=torch.optim.Adam,
               peft_lr=1e-3, lower_lr=None, peft_optimizer_kwargs=None, estimator="forward",
               weight_decay=0.0, **zo_kwargs):
        self.lam = real(lam, "lam", nonneg=True)
        self.inner_steps = integer(inner_steps, "inner_steps", 0)
        self.theta_update = choice(theta_update, "theta_update", THETA_UPDATES)
        self.order = choice(order, "order", ORDERS)
        _check_adam(self.theta_update, self.order, zo_kwargs.get("sparse_fraction"),
                    zo_kwargs.get("lowrank"))
        _check_peft_optimizer(peft_optimizer)
        peft_lr = real(peft_lr, "peft_lr", nonneg=True)
        lower_lr = peft_lr if lower_lr is None else real(lower_lr, "lower_lr", nonneg=True)
        kwargs = {} if peft_optimizer_kwargs is None else dict(peft_optimizer_kwargs)
        if "lr" in kwargs:
            raise ValueError("give the PEFT learning rate as peft_lr / lower_lr, not in "
                             "peft_optimizer_kwargs")
        self.nonfinite = choice(zo_kwargs.get("nonfinite", "raise"), "nonfinite",
                                NONFINITE_POLICIES)
        backbone_groups = list(backbone_params)
        backbone = param_list(backbone_groups, "backbone_params")
        adam = self.theta_update == "adam"
        weight_decay = real(weight_decay, "weight_decay", nonneg=True)
        if "include_frozen" in zo_kwargs:
            raise ValueError("include_frozen is not a Bilevel-ZOFO setting: the backbone given "
                             "is trained whatever its requires_grad (peft freezes it)")
        # theta_update="adam": the ZO optimizer only perturbs and restores (lr 0); AdamW steps
        # the ZO settings (eps, distribution, n_directions, seed, backend, ...) go straight
        # to ZOOptimizer, which checks them
        self.zo = ZOOptimizer(backbone_groups, lr=0.0 if adam else lr, include_frozen=True,
                              estimator=estimator, weight_decay=0.0 if adam else weight_decay,
                              normalize=_THETA_NORMALIZE.get(self.theta_update, "none"),
                              **zo_kwargs)
        self.pairs: Dict[Any, PeftPair] = {
            name: PeftPair(name, upper, lower, select, loss_fn, opt_cls=peft_optimizer,
                           upper_lr=peft_lr, lower_lr=lower_lr, opt_kwargs=kwargs,
                           upper_optimizer=not adam)
            for name, (upper, lower, select, loss_fn) in pairs_spec.items()}
        _check_disjoint([("backbone", backbone)] + [
            (f"{n!r} {lv}", getattr(p, lv)) for n, p in self.pairs.items() for lv in LEVELS])
        self._backbone = backbone
        self.theta_optimizer = (theta_adamw(backbone, [p.upper for p in self.pairs.values()],
                                            real(lr, "lr", nonneg=True), weight_decay)
                                if adam else None)
        self.forward_count = self.backward_count = self.outer_steps = 0

    # -- the first-order steps ---------------------------------------------------------------
    def _loss(self, pair: PeftPair, batch) -> torch.Tensor:
        self.forward_count += 1
        loss = pair.loss_fn(batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return a scalar loss tensor")
        return loss.reshape(())

    def _nonfinite(self, message: str) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteLossError(message + " (pass nonfinite='skip' to skip such steps)")

    def _backprop(self, params, losses, what: str) -> Optional[List[float]]:
        """:func:`~zofo_kernels.core.optim.first_order.backprop` with every tensor this
        optimizer manages frozen but ``params``; counts the backward passes."""
        managed = list(self._backbone) + [p for pr in self.pairs.values()
                                          for p in pr.upper + pr.lower]
        values, backwards = first_order.backprop(params, losses, managed=managed,
                                                 on_nonfinite=self._nonfinite, what=what)
        self.backward_count += backwards
        return values

    def _lower(self, pair: PeftPair, lower_batch) -> float:
        try:
            pair.select_adapter("lower")
            values = self._backprop(pair.lower, [(1.0, lambda: self._loss(pair, lower_batch))],
                                    "lower-level")
            if values is None:
                return float("nan")
            first_order.guarded_step(pair.opt_lower, pair.lower, on_nonfinite=self._nonfinite,
                                     what="lower-level")
            return values[0]
        finally:
            pair.select_adapter("upper")

    def _upper_pass(self, pair: PeftPair, upper_batch, penalty_batch) -> ZOFOStepResult:
        """P.grad = grad_P [f + lam * g_P]; the result holds f and g_P (NaN: skipped)."""
        pair.select_adapter("upper")
        values = self._backprop(pair.upper, [(1.0, lambda: self._loss(pair, upper_batch)),
                                             (self.lam, lambda: self._loss(pair, penalty_batch))],
                                "upper-level")
        res = ZOFOStepResult()
        res.upper_loss, res.penalty_loss = values if values is not None else (float("nan"),) * 2
        return res

    def _step_p(self, plan, results) -> List[Tuple[PeftPair, List[torch.Tensor]]]:
        """P's first-order step, made before theta's update (the step's commit point) so that
        anything that can fail happens first; under order="official" the new P is set aside
        (returned) and the ZO step sees the old one, as in the authors' code."""
        stepped_p = []
        if self.theta_optimizer is None:
            for (pair, _, _), res in zip(plan, results):
                if res.upper_loss != res.upper_loss:  # skipped: no gradient
                    continue
                old = first_order.guarded_step(pair.opt_upper, pair.upper,
                                               on_nonfinite=self._nonfinite, what="upper-level")
                if old is not None and self.order == "official":
                    stepped_p.append((pair, [p.detach().clone() for p in pair.upper]))
                    with torch.no_grad():
                        for p, o in zip(pair.upper, old):
                            p.copy_(o)
        return stepped_p

    # -- the zeroth-order step ---------------------------------------------------------------
    def _terms(self, pair: PeftPair, upper_batch, penalty_batch, which=("f", "gp", "gs")):
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

    def _zo_step(self, plan, results, evaluations: List, reuse: bool) -> float:
        """One ZO step of theta on the sum of the pairs' objectives; every evaluation's terms
        are appended to ``evaluations``. ``reuse``: L0 from the values of P's pass plus one
        forward of g(theta, S; B_g) per pair."""
        scale = 1.0 / (1.0 + self.lam) if self.theta_update == "scaled-sgd" else 1.0
        total0 = 0.0
        for (pair, bf, bg), res in zip(plan, results) if reuse else ():
            res.lower_penalty_loss = float(self._terms(pair, bf, bg, ("gs",))["gs"])
            res.gap = res.penalty_loss - res.lower_penalty_loss
            res.objective = res.upper_loss + self.lam * res.gap
            total0 += res.objective

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
            return self.zo.step(closure, initial_loss=total0 * scale if reuse else None)
        finally:
            for pair, _, _ in plan:
                pair.select_adapter("upper")

    def _outer(self, plan: List[Tuple[PeftPair, Any, Any]]) -> Tuple[List[ZOFOStepResult], dict]:
        """The upper step for every (pair, B_f, B_g) of ``plan`` and one ZO step of theta on the
        sum of their objectives. Returns per-pair results and the ZO step's summary."""
        results = [self._upper_pass(pair, bf, bg) for pair, bf, bg in plan]
        stepped_p = self._step_p(plan, results)
        reuse = self.order == "official" and self.zo.estimator == "forward"
        evaluations: List[List[Dict[str, float]]] = []
        objective = self._zo_step(plan, results, evaluations, reuse)
        with torch.no_grad():  # theta has its update: P takes its own
            for pair, new in stepped_p:
                for p, n in zip(pair.upper, new):
                    p.copy_(n)
        st = self.zo.last_step
        for i, res in enumerate(results):
            _fill_result(res, [e[i] for e in evaluations], reuse=reuse,
                         estimator=self.zo.estimator, lam=self.lam, eps=self.zo.eps)
        summary = dict(objective=objective, projected_grads=list(st["projected_grads"]),
                       skipped=st["skipped"], theta_step_rms=st["update_rms"])
        if self.theta_optimizer is not None:
            summary["theta_step_rms"] = adam_theta_step(self.theta_optimizer, self.zo, st)
        for res in results:
            res.projected_grads, res.theta_step_rms, res.skipped = (
                summary["projected_grads"], summary["theta_step_rms"], summary["skipped"])
        return results, summary

    # -- the interface -----------------------------------------------------------------------
    def first_order_optimizers(self) -> List[torch.optim.Optimizer]:
        """Every first-order optimizer this optimizer steps (S's and P's; under
        theta_update='adam' the AdamW of theta and P)."""
        out = [o for pair in self.pairs.values() for o in pair.optimizers()]
        return out + ([self.theta_optimizer] if self.theta_optimizer is not None else [])

    @contextlib.contextmanager
    def _atomic(self):
        """Everything an outer step changes besides theta, put back if the step raises."""
        pairs = [(p, p.snapshot()) for p in self.pairs.values()]
        zo_state = dict(self.zo._zo_state)
        counters = {k: getattr(self, k) for k in _COUNTERS}
        try:
            yield
        except BaseException:
            for pair, snapshot in pairs:
                pair.restore(snapshot)
            self.zo._zo_state = zo_state
            for k, v in counters.items():
                setattr(self, k, v)
            raise

    def eval_mode(self):
        """Ready the model for evaluation: the upper copy P selected for every pair and, when
        the model is known (``from_peft``), ``model.eval()`` (no dropout); returns self."""
        for pair in self.pairs.values():
            pair.select_adapter("upper")
        if getattr(self, "peft_model", None) is not None:
            self.peft_model.eval()
        return self

    def state_dict(self) -> Dict[str, Any]:
        """theta's ZO state (seed counter, RMS state) and settings, the P and S optimizer
        states (and theta's AdamW state under theta_update='adam'), the counters. The weights
        themselves (theta, P, S) are the model's: save the model's state_dict."""
        sd = {"zo": self.zo.state_dict(),
              "pairs": {name: {"upper": p.opt_upper.state_dict() if p.opt_upper else None,
                               "lower": p.opt_lower.state_dict()}
                        for name, p in self.pairs.items()},
              **{k: getattr(self, k) for k in _COUNTERS + self._SETTINGS}}
        if self.theta_optimizer is not None:
            sd["theta_optimizer"] = self.theta_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Validate everything, then apply; on any failure nothing is changed."""
        counters = _checked_counters(self, state_dict)
        optimizers = [(p.opt_upper, state_dict["pairs"][n]["upper"]) for n, p in
                      self.pairs.items() if p.opt_upper is not None]
        optimizers += [(p.opt_lower, state_dict["pairs"][n]["lower"])
                       for n, p in self.pairs.items()]
        if self.theta_optimizer is not None:
            optimizers.append((self.theta_optimizer, state_dict["theta_optimizer"]))
        _load_all_or_nothing(optimizers + [(self.zo, state_dict["zo"])])
        for k, v in counters.items():
            setattr(self, k, v)
