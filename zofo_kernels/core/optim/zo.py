"""ZOOptimizer: zeroth-order SGD (MeZO-class) on the fused kernels of :mod:`zofo_kernels.core.ops`.

One two-point step with q directions (central difference)::

    for k in 0 .. q-1:
        theta <- theta + eps*z_k   (k > 0: fused with the restore of direction k-1)
        L+_k = closure()
        theta <- theta - 2*eps*z_k
        L-_k = closure()
    g_k = (L+_k - L-_k) / (2*eps)
    theta <- theta + eps*z_{q-1} - lr*(1/q * sum_k g_k*z_k + wd*theta)      (one fused pass)

Forward difference: L0 = closure() on the unperturbed weights, then L+_k as above, with
g_k = (L+_k - L0) / eps. z_k is the contract noise of (seed, global index, direction k); the
global index of a parameter element is given by :func:`zofo_kernels.core.optim.layout.zo_layout`.

Step normalisation (``normalize="rms"``): the update uses g_k / r instead of g_k, where
r = sqrt(v_hat) and v_hat is a bias-corrected running mean of g^2 (one scalar of state,
v <- beta*v + (1 - beta)*mean_k g_k^2, updated before use, as Adam's second moment). Each
weight then moves by about lr*|z| per step whatever the scale of the loss: multiplying the
objective by c (e.g. a penalty weight lambda) leaves the trajectory unchanged. This is Adam's
scale invariance at O(1) memory (Adam on theta.grad = g*z would need three backbone-sized
buffers); it keeps no momentum. ``normalize="std"`` (FZOO, with q >= 2 directions, usually
the forward estimator): g_k / s with s the standard deviation of this step's q slopes, the
spread of its perturbed losses over eps; no state.

Sparse perturbation (``sparse_fraction=f``, Sparse-MeZO style): each step perturbs and
updates only about the fraction f of each tensor holding its elements of smallest magnitude
at the step's start (z_i becomes m_i * z_i); the rule and why its 1-bit-per-weight mask is
stored for the step: :mod:`zofo_kernels.core.optim.sparse`.

Low-rank directions (``lowrank=r``, ``lowrank_period=p``, LOZO style): each matrix takes
z = U V^T / sqrt(r), U and V drawn from the seeds and computed into z inside the kernels
(V kept for p steps); vectors keep dense z: :mod:`zofo_kernels.core.optim.lowrank`.

The arithmetic of the step is in :mod:`zofo_kernels.core.optim.zo_functional`; this class
holds what persists between steps (param groups, the seed counter, the RMS state) and
checks every setting.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from zofo_kernels.core import contract
from zofo_kernels.core.optim import lowrank as low_rank
from zofo_kernels.core.optim import sparse
from zofo_kernels.core.optim import zo_functional as F
from zofo_kernels.core.optim.dropout_check import watched_once
from zofo_kernels.core.optim.layout import zo_numel
from zofo_kernels.core.optim.zo_functional import ESTIMATORS, NORMALIZATIONS, step_seed
from zofo_kernels.core.validation import (as_float32, check_backend, choice, float32_real,
                                          integer, loss_value, real)

NONFINITE_POLICIES = ("raise", "skip")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_GLOBAL_KEYS = ("eps", "distribution", "estimator", "n_directions", "seed",
                "stochastic_rounding", "nonfinite", "loss_reduce", "backend", "normalize",
                "rms_beta", "include_frozen", "sparse_fraction", "lowrank", "lowrank_period")
# saved before these existed: the behaviour of that time
_LEGACY_SETTINGS = {"normalize": "none", "rms_beta": 0.999, "sparse_fraction": None,
                    "lowrank": None, "lowrank_period": 1}
_REQUIRED_SETTINGS = ("eps", "distribution", "estimator", "n_directions")


class NonFiniteLossError(FloatingPointError):
    """A loss evaluated during a ZO step was NaN or infinite, or the update it gives overflows
    float32 (the weights were restored and not updated)."""


def _checked_group(param_group) -> dict:
    """A param group for ``add_param_group``, checked whole (params as a list)."""
    if not isinstance(param_group, dict):
        raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
    group = dict(param_group)
    for key in _GLOBAL_KEYS:
        if key in group:
            raise ValueError(f"{key!r} is an optimizer-wide setting of ZOOptimizer, "
                             "not a per-group one")
    if "params" not in group:
        raise ValueError("a param group needs a 'params' entry")
    params = group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, "
                        "but the ordering of tensors in sets will change between runs")
    else:
        params = list(params)
    for i, p in enumerate(params):
        t = p[1] if isinstance(p, tuple) and len(p) == 2 else p
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"param group entry {i} is a {type(t).__name__}, not a tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"ZOOptimizer supports float32, bfloat16 and float16 "
                            f"parameters, got {t.dtype}")
    for key in ("lr", "weight_decay"):
        if key in group:
            float32_real(group[key], f"param group {key}", nonneg=True)
    group["params"] = params
    return group


def _saved_counters(zo, settings: Dict) -> Dict:
    """The "zo" entry of a state dict, checked against this optimizer's ``settings``: its
    counters (base_seed, step, sq_avg, sq_count)."""
    if not isinstance(zo, Mapping):
        raise TypeError("state_dict['zo'] must be a dict")
    for key in ("base_seed", "step") + _REQUIRED_SETTINGS:
        if key not in zo:
            raise KeyError(f"state_dict['zo'] lacks {key!r}")
    counters = {"base_seed": integer(zo["base_seed"], "saved base_seed", 0, contract.SEED_LIMIT),
                "step": integer(zo["step"], "saved step", 0, 1 << 64),
                "sq_avg": real(zo.get("sq_avg", 0.0), "saved sq_avg", nonneg=True),
                "sq_count": integer(zo.get("sq_count", 0), "saved sq_count", 0)}
    if counters["sq_count"] == 0 and counters["sq_avg"] != 0.0:
        raise ValueError(f"saved sq_avg is {counters['sq_avg']} but sq_count is 0")
    differ = []
    for key, mine in settings.items():
        if key in zo:
            saved = zo[key]
        elif key in _LEGACY_SETTINGS:
            saved = _LEGACY_SETTINGS[key]
        else:  # not saved by older versions: nothing to compare
            continue
        if type(saved) is not type(mine) or saved != mine:
            differ.append(f"{key}: saved {saved!r}, this optimizer {mine!r}")
    if differ:
        raise ValueError("the state dict was saved by a differently configured ZOOptimizer ("
                         + "; ".join(differ) + "); resuming would follow another "
                         "trajectory: construct the optimizer with the saved settings")
    return counters


def _check_saved_groups(sd: Mapping, n_groups: int) -> None:
    """The torch part of a state dict: no per-parameter state, ``n_groups`` groups with valid
    lr and weight_decay and no optimizer-wide setting."""
    if sd.get("state"):
        raise ValueError("the state dict holds per-parameter state; ZOOptimizer keeps none "
                         "(it was saved by another optimizer)")
    groups = sd.get("param_groups")
    if not isinstance(groups, (list, tuple)) or len(groups) != n_groups:
        have = len(groups) if isinstance(groups, (list, tuple)) else "no"
        raise ValueError(f"the state dict has {have} param groups, this optimizer {n_groups}")
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping):
            raise TypeError(f"saved param group {i} is not a dict")
        for key in ("lr", "weight_decay"):
            if key not in g:
                raise KeyError(f"saved param group {i} lacks {key!r}")
            float32_real(g[key], f"saved param group {i} {key}", nonneg=True)
        for key in _GLOBAL_KEYS:
            if key in g:
                raise ValueError(f"saved param group {i} sets the optimizer-wide {key!r}")


def _hyperparameters(param_groups) -> List[Tuple[float, float]]:
    """(lr, weight_decay) of every group, checked as at construction: a value set since
    (by the user or an LR scheduler) that is negative, non-finite, overflows float32 or is
    not a number is refused before anything is touched."""
    out = []
    for i, g in enumerate(param_groups):
        lr = g.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr < 0:
            raise ValueError(f"param_groups[{i}]['lr'] = {lr!r} is negative (set by an LR "
                             "scheduler?): it would ascend the loss")
        out.append((float32_real(lr, f"param_groups[{i}]['lr']", nonneg=True),
                    float32_real(g.get("weight_decay"),
                                 f"param_groups[{i}]['weight_decay']", nonneg=True)))
    return out


def _record(opt, t, seed, losses, grads, coeffs, grad_rms, units, hyper, moved) -> Dict:
    """``last_step``: what step ``t`` computed (``coeffs`` None: it updated nothing)."""
    trained = sum(x.numel() for u in units for x in u.tensors)
    return dict(
        step=t, seed=seed, projected_grads=grads, losses=losses,
        loss=F.step_loss(losses, opt.estimator), update_coefficients=coeffs,
        grad_rms=grad_rms, skipped=coeffs is None,
        update_rms=0.0 if coeffs is None else F.update_rms(coeffs, units, hyper, moved),
        estimator=opt.estimator, distribution=opt.distribution, eps=opt.eps,
        n_directions=opt.n_directions, numel=zo_numel(opt.param_groups),
        lr=[lr for lr, _ in hyper], weight_decay=[wd for _, wd in hyper],
        sparse_fraction=opt.sparse_fraction,
        perturbed_fraction=sum(moved) / trained if trained else 0.0,
        lowrank=opt.lowrank, lowrank_period=opt.lowrank_period,
        factor_floats=low_rank.factor_floats(units))


def _attach_directions(opt, units, seed: int, t: int) -> List[int]:
    """What step ``t`` of ``opt`` perturbs along, attached to its units: the bitmaps
    (sparse_fraction, from the step-start weights) or U and V (lowrank, V keyed on its
    period's first step). Returns the number of elements each unit's sweeps change."""
    if opt.sparse_fraction is not None:
        sparse.refuse_sharded(opt.param_groups)
        sparse.attach_masks(units, opt.sparse_fraction, opt._sparse_samples, opt.backend)
    if opt.lowrank is not None:
        low_rank.refuse_sharded(opt.param_groups)
        low_rank.attach_factors(
            units, seed, low_rank.v_key(opt.base_seed, t, opt.lowrank_period), opt.lowrank,
            distribution=opt.distribution, n_directions=opt.n_directions, backend=opt.backend)
    return sparse.moved_elements(units)


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD with fused perturbation/update kernels (see the module docstring).

    Per-group hyperparameters: ``lr``, ``weight_decay``. Optimizer-wide: ``eps``,
    ``distribution`` ("gaussian" | "rademacher"), ``estimator`` ("central" | "forward"),
    ``n_directions`` (q), ``seed`` (base seed; None draws one from os.urandom),
    ``stochastic_rounding`` (16-bit weights), ``nonfinite`` ("raise" | "skip"),
    ``loss_reduce`` (callable applied to the float64 tensor of the step's losses, e.g. an
    all-reduce mean across data-parallel ranks), ``backend`` (kernel backend name or None),
    ``normalize`` ("none": plain ZO-SGD, MeZO's update; "rms": the projected gradient divided
    by its running RMS; "std": by the spread of the step's slopes, FZOO's step; see the module
    docstring), ``rms_beta`` (that running mean's decay),
    ``include_frozen`` and ``sparse_fraction`` (None: dense; f in (0, 1]: each step perturbs
    and updates only the fraction f of each tensor with the smallest magnitudes,
    :mod:`zofo_kernels.core.optim.sparse`), ``lowrank`` (None: dense; r: rank-r directions
    for every matrix, :mod:`zofo_kernels.core.optim.lowrank`) and ``lowrank_period`` (V is
    redrawn every that many steps).

    Parameters with ``requires_grad=False`` at the start of a step are left alone in that step,
    as torch optimizers leave parameters without a gradient (they keep their place in the
    global noise index, so freezing one does not change the noise of the others);
    ``include_frozen=True`` perturbs and updates them too (Bilevel-ZOFO's backbone is frozen
    for autograd but trained zeroth-order).
    """

    def __init__(self, params, lr: float, *, eps: float = 1e-3, weight_decay: float = 0.0,
                 distribution: str = "gaussian", estimator: str = "central",
                 n_directions: int = 1, seed: Optional[int] = None,
                 stochastic_rounding: bool = True, nonfinite: str = "raise",
                 loss_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 backend: Optional[str] = None, normalize: str = "none",
                 rms_beta: float = 0.999, include_frozen: bool = False,
                 sparse_fraction: Optional[float] = None, lowrank: Optional[int] = None,
                 lowrank_period: int = 1):
        lr = float32_real(lr, "lr", nonneg=True)
        weight_decay = float32_real(weight_decay, "weight_decay", nonneg=True)
        self.distribution = choice(distribution, "distribution", contract.DISTRIBUTIONS)
        self.eps = float32_real(eps, "eps", positive=True)
        self.lowrank = low_rank.check_rank(lowrank)
        self.lowrank_period = low_rank.check_period(lowrank_period)
        self._z_max = low_rank.z_bound(self.distribution, self.lowrank)
        if not math.isfinite(as_float32(2.0 * self.eps * self._z_max)):
            raise ValueError(f"eps = {eps!r} is too large: 2*eps*|z| overflows float32")
        self.estimator = choice(estimator, "estimator", ESTIMATORS)
        self.n_directions = integer(n_directions, "n_directions", 1, contract.DIRECTION_LIMIT)
        if not isinstance(stochastic_rounding, bool):
            raise TypeError("stochastic_rounding must be True or False")
        self.stochastic_rounding = stochastic_rounding
        self.nonfinite = choice(nonfinite, "nonfinite", NONFINITE_POLICIES)
        if loss_reduce is not None and not callable(loss_reduce):
            raise TypeError("loss_reduce must be None or a callable")
        self.loss_reduce = loss_reduce
        self.backend = check_backend(backend)
        self.normalize = choice(normalize, "normalize", NORMALIZATIONS)
        if self.normalize == "std" and self.n_directions < 2:
            raise ValueError("normalize='std' (FZOO) divides by the spread of a step's "
                             "directional slopes: it needs n_directions >= 2, got "
                             f"{self.n_directions}")
        self.rms_beta = real(rms_beta, "rms_beta", nonneg=True)
        if not self.rms_beta < 1.0:
            raise ValueError(f"rms_beta must be in [0, 1), got {rms_beta!r}")
        if not isinstance(include_frozen, bool):
            raise TypeError("include_frozen must be True or False")
        self.include_frozen = include_frozen
        self.sparse_fraction = sparse.check_fraction(sparse_fraction)
        if self.sparse_fraction is not None and self.lowrank is not None:
            raise ValueError("sparse_fraction and lowrank cannot be combined: a step's "
                             "directions are either sparse or low-rank")
        self._sparse_samples: Dict = {}  # the sparse rule's sample indices per (numel, device)
        base_seed = (F.fresh_base_seed() if seed is None
                     else integer(seed, "seed", 0, contract.SEED_LIMIT))
        # sq_avg / sq_count: the running mean of g^2 and its number of updates (normalize="rms")
        self._zo_state = {"base_seed": base_seed, "step": 0, "sq_avg": 0.0, "sq_count": 0}
        self.last_step: Optional[Dict] = None
        # called as loss_hook(closure) for every loss evaluation of a step, returning the
        # closure's loss (e.g. DataParallelZO reshards FSDP2 modules around it)
        self.loss_hook: Optional[Callable[[Callable], Any]] = None
        self.dropout_checked = False  # the first loss is watched for dropout (dropout_check)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    # -- torch.optim conventions ------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Check the whole group, then add it (a refused group leaves the optimizer as it
        was)."""
        super().add_param_group(_checked_group(param_group))

    @property
    def base_seed(self) -> int:
        """The seed every step's seed derives from (with the step counter)."""
        return self._zo_state["base_seed"]

    @base_seed.setter
    def base_seed(self, seed: int) -> None:
        """Set the base seed (e.g. the one all data-parallel ranks agreed on); the steps from
        now on derive their seeds from it."""
        self._zo_state["base_seed"] = integer(seed, "seed", 0, contract.SEED_LIMIT)

    @property
    def step_count(self) -> int:
        """Number of completed steps (the counter that derives the next seed)."""
        return self._zo_state["step"]

    def next_seed(self) -> int:
        return step_seed(self._zo_state["base_seed"], self._zo_state["step"])

    def _settings(self) -> Dict:
        """What decides the trajectory besides the weights, the seed and the counters."""
        return dict(eps=self.eps, distribution=self.distribution, estimator=self.estimator,
                    n_directions=self.n_directions, normalize=self.normalize,
                    rms_beta=self.rms_beta, stochastic_rounding=self.stochastic_rounding,
                    include_frozen=self.include_frozen, sparse_fraction=self.sparse_fraction,
                    lowrank=self.lowrank, lowrank_period=self.lowrank_period,
                    param_numels=[[p.numel() for p in g["params"]] for g in self.param_groups])

    def state_dict(self):
        sd = super().state_dict()
        sd["zo"] = dict(self._zo_state, **self._settings())
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Check everything, then apply: the seed counter and RMS state (``"zo"``) and the
        param groups' hyperparameters. The settings that decide the trajectory (eps,
        distribution, estimator, n_directions, normalize, rms_beta, stochastic_rounding,
        include_frozen, sparse_fraction, lowrank, lowrank_period, the parameters' sizes) must
        equal this optimizer's: a
        state dict saved by a differently configured optimizer is refused (``ValueError``),
        never resumed on another trajectory. On any error nothing is changed."""
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a dict saved by ZOOptimizer.state_dict()")
        if "zo" not in state_dict:
            raise KeyError("state dict has no 'zo' entry: it was not saved by a ZOOptimizer")
        counters = _saved_counters(state_dict["zo"], self._settings())
        sd = {k: v for k, v in state_dict.items() if k != "zo"}
        _check_saved_groups(sd, len(self.param_groups))
        super().load_state_dict(sd)  # checks the group sizes before it changes anything
        self._zo_state = counters

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Union[torch.Tensor, float]] = None, *,  # type: ignore[override]
             initial_loss: Optional[float] = None) -> float:
        """One ZO step. ``closure()`` returns the loss of the current batch; it is called under
        ``torch.no_grad()``, 2q times (central) or q + 1 times (forward). Returns the mean of
        all losses (central) or the unperturbed loss (forward).

        ``initial_loss`` (forward estimator only): the loss at the unperturbed weights, when
        the caller has it already (e.g. from a first-order pass on the same batch); the
        closure is then called q times, at the perturbed points only. It goes through
        ``loss_reduce`` like every other loss.

        Atomic: if anything raises (the closure, ``loss_reduce``, a kernel call, an
        interrupt), the perturbation each parameter still carries is removed and the
        optimizer's state and counters are as before the step. A non-finite loss (or a step
        that overflows float32) updates nothing: with ``nonfinite="raise"`` the step raises
        ``NonFiniteLossError`` and leaves the state and counters as before; with "skip" it
        counts as a (skipped) step. The first step warns if its loss ran dropout (dropout_check)."""
        if closure is None or not callable(closure):
            raise ValueError("ZOOptimizer.step needs a closure that returns the loss")
        if initial_loss is not None:
            if self.estimator != "forward":
                raise ValueError("initial_loss is only used by the forward estimator")
            initial_loss = loss_value(initial_loss)
        hyper = _hyperparameters(self.param_groups)
        t = self._zo_state["step"]
        seed = step_seed(self._zo_state["base_seed"], t)
        units = F.zo_units(self.param_groups, self.include_frozen)
        moved = _attach_directions(self, units, seed, t)
        applied: F.Applied = {}
        where = dict(distribution=self.distribution, backend=self.backend)
        try:
            losses = self._reduce(self._evaluate(closure, units, applied, seed, initial_loss))
            grads = F.projected_gradients(losses, self.eps, self.estimator)
            coeffs, grad_rms, sq_state, problem = F.plan_update(
                losses, grads, hyper, z_max=self._z_max, normalize=self.normalize,
                rms_beta=self.rms_beta, sq_avg=self._zo_state["sq_avg"],
                sq_count=self._zo_state["sq_count"])
            skipped = coeffs is None or problem is not None
            if skipped:
                F.restore_units(units, applied, seed, **where)
            else:
                self._apply(units, applied, seed, coeffs, hyper, t, sq_state)
        finally:
            if applied:  # something raised: remove what is still applied, unit by unit
                F.restore_units(units, applied, seed, **where)
        if (skipped and self.nonfinite == "skip") or (not units and not skipped):
            self._commit(t, None if skipped else sq_state)  # a step with nothing to update
        self.last_step = _record(self, t, seed, losses, grads, None if skipped else coeffs,
                                 grad_rms, units, hyper, moved)
        if skipped and self.nonfinite == "raise":
            raise NonFiniteLossError(
                f"{problem or 'non-finite loss'} in ZO step {t} (losses {losses}); the weights "
                "were restored and not updated, and the step was not counted (pass "
                "nonfinite='skip' to skip such steps)")
        return self.last_step["loss"]

    # -- the parts of a step -------------------------------------------------------------------
    def _evaluate(self, closure, units, applied, seed, initial_loss) -> List[float]:
        """The raw losses of the step's estimator, every evaluation through ``loss_hook``."""
        hook = self.loss_hook
        sweep = functools.partial(F.perturb_units, units, applied, seed,
                                  distribution=self.distribution, backend=self.backend)

        def evaluate() -> float:
            return loss_value(closure() if hook is None else hook(closure))

        if not self.dropout_checked:
            evaluate = watched_once(evaluate, lambda: setattr(self, "dropout_checked", True))
        if self.estimator == "central":
            return F.central_losses(sweep, evaluate, self.eps, self.n_directions)
        return F.forward_losses(sweep, evaluate, self.eps, self.n_directions, initial_loss)

    def _reduce(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.loss_reduce is not None:
            out = self.loss_reduce(t)
            t = t if out is None else out
            if not isinstance(t, torch.Tensor) or t.shape != (len(values),):
                raise ValueError("loss_reduce must return a 1-D tensor with one value per loss "
                                 f"({len(values)})")
        return [float(v) for v in t.detach().cpu().to(torch.float64)]

    def _apply(self, units, applied, seed, coeffs, hyper, t, sq_state) -> None:
        """The update sweep, fused with the removal of each unit's last perturbation, and the
        commit of the step: an interrupt waits for both."""
        with F.sigint_deferred():
            pending = len(applied)
            try:
                F.update_units(units, applied, seed, coeffs, hyper,
                               distribution=self.distribution, backend=self.backend,
                               stochastic_rounding=self.stochastic_rounding)
            finally:
                # some groups took this step's update (seed and RMS state used): count the
                # step, so that neither is used twice
                if len(applied) < pending:
                    self._commit(t, sq_state)

    def _commit(self, t: int, sq_state) -> None:
        self._zo_state["step"] = t + 1
        if sq_state is not None:
            self._zo_state["sq_avg"], self._zo_state["sq_count"] = sq_state
