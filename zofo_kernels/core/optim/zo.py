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
buffers); it keeps no momentum.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import signal
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from zofo_kernels.core import contract
from zofo_kernels.core.backends import base as _backends
from zofo_kernels.core.ops import perturb_, zo_update_
from zofo_kernels.core.validation import as_float32, check_float32, finite_real
from zofo_kernels.core.optim.layout import split_by_device, zo_layout, zo_numel

ESTIMATORS = ("central", "forward")
NORMALIZATIONS = ("none", "rms")
NONFINITE_POLICIES = ("raise", "skip")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Philox counter word c3 that tags "derive a step seed" (the noise stream uses 0 and 1).
_SEED_PURPOSE = 0x5EED5EED
_GLOBAL_KEYS = ("eps", "distribution", "estimator", "n_directions", "seed",
                "stochastic_rounding", "nonfinite", "loss_reduce", "backend", "normalize",
                "rms_beta", "include_frozen")


class NonFiniteLossError(FloatingPointError):
    """A loss evaluated during a ZO step was NaN or infinite, or the update it gives overflows
    float32 (the weights were restored and not updated)."""


def step_seed(base_seed: int, step: int) -> int:
    """Seed of step ``step``: Philox4x32-10 keyed by ``base_seed`` on the counter
    (step mod 2**32, step div 2**32, 0, 0x5EED5EED), words 0 and 1 joined and reduced to
    [0, 2**63). A pure function: no generator state, no global RNG."""
    if not 0 <= base_seed < contract.SEED_LIMIT:
        raise ValueError(f"base_seed must be in [0, 2**63), got {base_seed}")
    if not 0 <= step < (1 << 64):
        raise ValueError(f"step must be in [0, 2**64), got {step}")
    w = contract.philox4x32(np.uint32(step & 0xFFFFFFFF), np.uint32(step >> 32), np.uint32(0),
                            np.uint32(_SEED_PURPOSE), base_seed)
    return ((int(w[1]) << 32) | int(w[0])) & (contract.SEED_LIMIT - 1)


def fresh_base_seed() -> int:
    """A base seed from the operating system's entropy (never the torch RNG)."""
    return int.from_bytes(os.urandom(8), "little") & (contract.SEED_LIMIT - 1)


# --------------------------------------------------------------------------- validation

def _real(value, name: str, *, positive=False, nonneg=False) -> float:
    """A real-valued optimizer setting: finite, and > 0 or >= 0 where asked."""
    v = finite_real(value, name)
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _int(value, name: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v >= high):
        hi = "" if high is None else f" and < {high}"
        raise ValueError(f"{name} must be >= {low}{hi}, got {v}")
    return v


def _choice(value, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def check_backend(backend: Optional[str]) -> Optional[str]:
    if backend is None:
        return None
    if not isinstance(backend, str) or backend not in _backends.BACKEND_NAMES:
        raise ValueError(f"backend must be None or one of {_backends.BACKEND_NAMES}, "
                         f"got {backend!r}")
    st = _backends.get(backend).status()
    if not st.available:
        raise _backends.BackendUnavailableError(f"backend {backend!r} is unavailable: {st.reason}")
    return backend


def loss_value(loss) -> float:
    """A closure's loss as a Python float (a real number or a one-element tensor)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"the loss must be a real number or a scalar tensor, got {type(loss).__name__}")
    return float(loss)


# --------------------------------------------------------------------------- param groups

def _is_norm_module(module: torch.nn.Module) -> bool:
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
    rms = getattr(torch.nn, "RMSNorm", None)
    if rms is not None:
        norm_types = norm_types + (rms,)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def zo_param_groups(model_or_named_params, weight_decay: float,
                    no_decay: Union[None, Sequence[str], Callable[[str, torch.Tensor], bool]] = None,
                    trainable_only: bool = True) -> List[dict]:
    """Two parameter groups: ``weight_decay`` for weight matrices, 0 for the rest.

    ``model_or_named_params``: an ``nn.Module`` or an iterable of ``(name, parameter)``.
    ``no_decay`` decides which parameters get no weight decay:

    * ``None`` (default): biases (names ending in "bias"), every parameter of a normalisation
      module (LayerNorm, RMSNorm, GroupNorm, BatchNorm, any module class whose name contains
      "Norm"; only detectable when a module is given) and every parameter with at most one
      dimension;
    * a sequence of strings: a parameter is excluded when its name contains one of them;
    * a callable ``(name, parameter) -> bool``.

    With ``trainable_only`` (default) parameters with ``requires_grad=False`` are left out.
    Parameter order is the model's order within each group; empty groups are dropped.
    """
    wd = _real(weight_decay, "weight_decay", nonneg=True)
    norm_names = set()
    if isinstance(model_or_named_params, torch.nn.Module):
        for mod_name, mod in model_or_named_params.named_modules():
            if _is_norm_module(mod):
                for pn, _ in mod.named_parameters(recurse=False):
                    norm_names.add(f"{mod_name}.{pn}" if mod_name else pn)
        named = list(model_or_named_params.named_parameters())
    else:
        named = list(model_or_named_params)
        for i, item in enumerate(named):
            if (not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str)
                    or not isinstance(item[1], torch.Tensor)):
                raise TypeError(f"item {i} is not a (name, parameter) pair")
    if no_decay is None:
        def excluded(name, p):
            return name.endswith("bias") or name in norm_names or p.dim() <= 1
    elif callable(no_decay):
        excluded = no_decay
    elif isinstance(no_decay, (list, tuple)) and all(isinstance(s, str) for s in no_decay):
        patterns = tuple(no_decay)

        def excluded(name, p):
            return any(s in name for s in patterns)
    else:
        raise TypeError("no_decay must be None, a sequence of strings or a callable")
    decay, keep = [], []
    for name, p in named:
        if trainable_only and not p.requires_grad:
            continue
        (keep if excluded(name, p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": wd})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no parameters selected (all frozen?)")
    return groups


# --------------------------------------------------------------------------- optimizer

# Largest |z| a kernel can produce: Box-Muller radius sqrt(-2 log u) with u >= 1e-7 (5.678),
# rounded up; Rademacher +-1. Bounds the update so that it is known finite in float32.
_Z_MAX = {"gaussian": 5.7, "rademacher": 1.0}
_LEGACY_SETTINGS = {"normalize": "none", "rms_beta": 0.999}  # saved before these existed
_REQUIRED_SETTINGS = ("eps", "distribution", "estimator", "n_directions")


def _scalar32(value, name: str, *, positive=False, nonneg=False) -> float:
    """A real number the kernels will use in float32: finite after rounding to float32, and
    not a non-zero value that rounds to 0 (a silent no-op)."""
    v = _real(value, name, positive=positive, nonneg=nonneg)
    return check_float32(v, name, nonzero=True)


@contextlib.contextmanager
def _sigint_deferred():
    """Inside: a SIGINT (Ctrl-C) is held back and delivered, as KeyboardInterrupt or to the
    handler that was installed, when the block ends, so that a kernel sweep and the record of
    what it applied are never separated by an interrupt. Only in the main thread (where Python
    runs signal handlers) and only when a Python-level handler is installed; elsewhere it
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        old = signal.getsignal(signal.SIGINT)
    except (ValueError, OSError):  # pragma: no cover - no signal support
        old = None
    if not callable(old):  # SIG_IGN, SIG_DFL or a handler installed outside Python
        yield
        return
    pending = []

    def hold(signum, frame):
        pending.append((signum, frame))

    try:
        signal.signal(signal.SIGINT, hold)
    except (ValueError, OSError):  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if pending:
            old(*pending[0])


class _Unit:
    """One kernel call of the update sweep: the parameters of one group on one device."""
    __slots__ = ("group", "device", "tensors", "offsets")

    def __init__(self, group, device, tensors, offsets):
        self.group, self.device, self.tensors, self.offsets = group, device, tensors, offsets


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD with fused perturbation/update kernels (see the module docstring).

    Per-group hyperparameters: ``lr``, ``weight_decay``. Optimizer-wide: ``eps``,
    ``distribution`` ("gaussian" | "rademacher"), ``estimator`` ("central" | "forward"),
    ``n_directions`` (q), ``seed`` (base seed; None draws one from os.urandom),
    ``stochastic_rounding`` (16-bit weights), ``nonfinite`` ("raise" | "skip"),
    ``loss_reduce`` (callable applied to the float64 tensor of the step's losses, e.g. an
    all-reduce mean across data-parallel ranks), ``backend`` (kernel backend name or None),
    ``normalize`` ("none": plain ZO-SGD, MeZO's update; "rms": the projected gradient divided
    by its running RMS, see the module docstring), ``rms_beta`` (that running mean's decay)
    and ``include_frozen``.

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
                 rms_beta: float = 0.999, include_frozen: bool = False):
        lr = _scalar32(lr, "lr", nonneg=True)
        weight_decay = _scalar32(weight_decay, "weight_decay", nonneg=True)
        self.distribution = _choice(distribution, "distribution", contract.DISTRIBUTIONS)
        self.eps = _scalar32(eps, "eps", positive=True)
        if not math.isfinite(as_float32(2.0 * self.eps * _Z_MAX[self.distribution])):
            raise ValueError(f"eps = {eps!r} is too large: 2*eps*|z| overflows float32")
        self.estimator = _choice(estimator, "estimator", ESTIMATORS)
        self.n_directions = _int(n_directions, "n_directions", 1, contract.DIRECTION_LIMIT)
        if not isinstance(stochastic_rounding, bool):
            raise TypeError("stochastic_rounding must be True or False")
        self.stochastic_rounding = stochastic_rounding
        self.nonfinite = _choice(nonfinite, "nonfinite", NONFINITE_POLICIES)
        if loss_reduce is not None and not callable(loss_reduce):
            raise TypeError("loss_reduce must be None or a callable")
        self.loss_reduce = loss_reduce
        self.backend = check_backend(backend)
        self.normalize = _choice(normalize, "normalize", NORMALIZATIONS)
        self.rms_beta = _real(rms_beta, "rms_beta", nonneg=True)
        if not self.rms_beta < 1.0:
            raise ValueError(f"rms_beta must be in [0, 1), got {rms_beta!r}")
        if not isinstance(include_frozen, bool):
            raise TypeError("include_frozen must be True or False")
        self.include_frozen = include_frozen
        base_seed = fresh_base_seed() if seed is None else _int(seed, "seed", 0,
                                                                 contract.SEED_LIMIT)
        # sq_avg / sq_count: the running mean of g^2 and its number of updates (normalize="rms")
        self._zo_state = {"base_seed": base_seed, "step": 0, "sq_avg": 0.0, "sq_count": 0}
        self.last_step: Optional[Dict] = None
        # called as loss_hook(closure) for every loss evaluation of a step, returning the
        # closure's loss (e.g. DataParallelZO reshards FSDP2 modules around it)
        self.loss_hook: Optional[Callable[[Callable], Any]] = None
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    # -- torch.optim conventions ------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Check the whole group, then add it (a refused group leaves the optimizer as it
        was)."""
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
                _scalar32(group[key], f"param group {key}", nonneg=True)
        group["params"] = params
        super().add_param_group(group)

    @property
    def base_seed(self) -> int:
        """The seed every step's seed derives from (with the step counter)."""
        return self._zo_state["base_seed"]

    @base_seed.setter
    def base_seed(self, seed: int) -> None:
        """Set the base seed (e.g. the one all data-parallel ranks agreed on); the steps from
        now on derive their seeds from it."""
        self._zo_state["base_seed"] = _int(seed, "seed", 0, contract.SEED_LIMIT)

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
                    include_frozen=self.include_frozen,
                    param_numels=[[p.numel() for p in g["params"]] for g in self.param_groups])

    def state_dict(self):
        sd = super().state_dict()
        sd["zo"] = dict(self._zo_state, **self._settings())
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Check everything, then apply: the seed counter and RMS state (``"zo"``) and the
        param groups' hyperparameters. The settings that decide the trajectory (eps,
        distribution, estimator, n_directions, normalize, rms_beta, stochastic_rounding,
        include_frozen, the parameters' sizes) must equal this optimizer's: a state dict saved
        by a differently configured optimizer is refused (``ValueError``), never resumed on
        another trajectory. On any error nothing is changed."""
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a dict saved by ZOOptimizer.state_dict()")
        if "zo" not in state_dict:
            raise KeyError("state dict has no 'zo' entry: it was not saved by a ZOOptimizer")
        zo = state_dict["zo"]
        if not isinstance(zo, Mapping):
            raise TypeError("state_dict['zo'] must be a dict")
        for key in ("base_seed", "step") + _REQUIRED_SETTINGS:
            if key not in zo:
                raise KeyError(f"state_dict['zo'] lacks {key!r}")
        base = _int(zo["base_seed"], "saved base_seed", 0, contract.SEED_LIMIT)
        step = _int(zo["step"], "saved step", 0, 1 << 64)
        sq_avg = _real(zo.get("sq_avg", 0.0), "saved sq_avg", nonneg=True)
        sq_count = _int(zo.get("sq_count", 0), "saved sq_count", 0)
        if sq_count == 0 and sq_avg != 0.0:
            raise ValueError(f"saved sq_avg is {sq_avg} but sq_count is 0")
        differ = []
        for key, mine in self._settings().items():
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
        sd = {k: v for k, v in state_dict.items() if k != "zo"}
        if sd.get("state"):
            raise ValueError("the state dict holds per-parameter state; ZOOptimizer keeps none "
                             "(it was saved by another optimizer)")
        groups = sd.get("param_groups")
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups) if isinstance(groups, (list, tuple)) else 'no'} "
                             f"param groups, this optimizer {len(self.param_groups)}")
        for i, g in enumerate(groups):
            if not isinstance(g, Mapping):
                raise TypeError(f"saved param group {i} is not a dict")
            for key in ("lr", "weight_decay"):
                if key not in g:
                    raise KeyError(f"saved param group {i} lacks {key!r}")
                _scalar32(g[key], f"saved param group {i} {key}", nonneg=True)
            for key in _GLOBAL_KEYS:
                if key in g:
                    raise ValueError(f"saved param group {i} sets the optimizer-wide {key!r}")
        super().load_state_dict(sd)  # checks the group sizes before it changes anything
        self._zo_state = {"base_seed": base, "step": step, "sq_avg": sq_avg,
                          "sq_count": sq_count}

    # -- helpers of the step -----------------------------------------------------------------
    def _hyperparameters(self) -> List[Tuple[float, float]]:
        """(lr, weight_decay) of every group, checked as at construction: a value set since
        (by the user or an LR scheduler) that is negative, non-finite, overflows float32 or
        is not a number is refused before anything is touched."""
        out = []
        for i, g in enumerate(self.param_groups):
            lr = g.get("lr")
            if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr < 0:
                raise ValueError(f"param_groups[{i}]['lr'] = {lr!r} is negative (set by an LR "
                                 "scheduler?): it would ascend the loss")
            out.append((_scalar32(lr, f"param_groups[{i}]['lr']", nonneg=True),
                        _scalar32(g.get("weight_decay"), f"param_groups[{i}]['weight_decay']",
                                  nonneg=True)))
        return out

    def _units(self) -> List[_Unit]:
        if not self.include_frozen and not any(
                p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ValueError("every parameter of this ZOOptimizer has requires_grad=False, so "
                             "a step would train nothing (pass include_frozen=True to train "
                             "frozen parameters zeroth-order)")
        layout = zo_layout(self.param_groups, trainable_only=not self.include_frozen)
        units = []
        for gi, entries in enumerate(layout):
            for dev, (ts, offs) in split_by_device(entries).items():
                units.append(_Unit(gi, dev, ts, offs))
        return units

    def _sweep(self, units, applied, seed, scale, direction, restore=None) -> None:
        """Perturbation sweep over every unit (one kernel call per device): p <- p + scale*z_d,
        fused with p <- p + restore[0]*z_restore[1] first when ``restore`` is given. Records in
        ``applied`` the perturbation each unit carries afterwards."""
        by_dev: Dict[torch.device, List[int]] = {}
        for i, u in enumerate(units):
            by_dev.setdefault(u.device, []).append(i)
        rs, rd = restore if restore is not None else (0.0, None)
        for idx in by_dev.values():
            ts = [t for i in idx for t in units[i].tensors]
            offs = [o for i in idx for o in units[i].offsets]
            with _sigint_deferred():
                perturb_(ts, seed, scale, self.distribution, direction, offsets=offs,
                         backend=self.backend, restore_scale=rs, restore_direction=rd)
                for i in idx:
                    applied[i] = (scale if restore is not None or i not in applied
                                  else applied[i][0] + scale, direction)

    def _restore(self, units, applied, seed) -> None:
        """Remove exactly the perturbation each unit still carries."""
        todo: Dict[Tuple, List[int]] = {}
        for i, (scale, direction) in applied.items():
            todo.setdefault((units[i].device, scale, direction), []).append(i)
        for (_, scale, direction), idx in todo.items():
            ts = [t for i in idx for t in units[i].tensors]
            offs = [o for i in idx for o in units[i].offsets]
            with _sigint_deferred():
                perturb_(ts, seed, -scale, self.distribution, direction, offsets=offs,
                         backend=self.backend)
                for i in idx:
                    del applied[i]

    def _reduce(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.loss_reduce is not None:
            out = self.loss_reduce(t)
            t = t if out is None else out
            if not isinstance(t, torch.Tensor) or t.shape != (len(values),):
                raise ValueError("loss_reduce must return a 1-D tensor with one value per loss "
                                 f"({len(values)})")
        return [float(v) for v in t.detach().cpu().to(torch.float64)]

    def _coefficients(self, grads: List[float]):
        """(update coefficients c_k, the RMS that divided them or None, the new
        (sq_avg, sq_count)) for the projected gradients of one step; theta moves by
        -lr * sum_k c_k z_k."""
        q = len(grads)
        if self.normalize == "none":
            return [g / q for g in grads], None, None
        beta = self.rms_beta
        sq_avg = beta * self._zo_state["sq_avg"] + (1.0 - beta) * sum(g * g for g in grads) / q
        count = self._zo_state["sq_count"] + 1
        rms = math.sqrt(sq_avg / (1.0 - beta ** count))
        # all-zero slopes so far: no information about the scale, no step
        coeffs = [g / q / rms if rms > 0.0 else 0.0 for g in grads]
        return coeffs, rms, (sq_avg, count)

    def _unrepresentable(self, coeffs, sq_state, hyper) -> Optional[str]:
        """Why the update lr*(sum_k c_k z_k + wd*p) cannot be computed in float32, or None."""
        if sq_state is not None and not math.isfinite(sq_state[0]):
            return "the running mean of g^2 overflows"
        c32 = [as_float32(c) for c in coeffs]
        if not all(math.isfinite(c) for c in c32):
            return "an update coefficient overflows float32"
        bound = as_float32(sum(abs(c) for c in c32) * _Z_MAX[self.distribution])
        if not math.isfinite(bound) or not all(math.isfinite(as_float32(lr * bound))
                                               for lr, _ in hyper):
            return "lr * sum_k |c_k z_k| overflows float32"
        return None

    def _update_rms(self, coeffs: List[float], units, hyper) -> float:
        """Expected RMS change per weight of the update lr * sum_k c_k z_k (E z^2 = 1 for both
        distributions, directions independent; weight decay not included), averaged over the
        groups by their number of trained elements."""
        sizes = [0] * len(hyper)
        for u in units:
            sizes[u.group] += sum(t.numel() for t in u.tensors)
        total = sum(sizes)
        if total == 0:
            return 0.0
        mean_lr2 = sum(n * lr ** 2 for n, (lr, _) in zip(sizes, hyper)) / total
        return math.sqrt(mean_lr2 * sum(c * c for c in coeffs))

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
        counts as a (skipped) step."""
        if closure is None or not callable(closure):
            raise ValueError("ZOOptimizer.step needs a closure that returns the loss")
        if initial_loss is not None:
            if self.estimator != "forward":
                raise ValueError("initial_loss is only used by the forward estimator")
            initial_loss = loss_value(initial_loss)
        hyper = self._hyperparameters()
        t = self._zo_state["step"]
        seed = step_seed(self._zo_state["base_seed"], t)
        units = self._units()
        applied: Dict[int, Tuple[float, int]] = {}  # unit -> (scale, direction) it carries
        hook = self.loss_hook

        def call() -> float:
            return loss_value(closure() if hook is None else hook(closure))

        try:
            if self.estimator == "central":
                losses, grads, loss = self._central_estimate(call, units, applied, seed)
            else:
                losses, grads, loss = self._forward_estimate(call, units, applied, seed,
                                                             initial_loss)
            coeffs, grad_rms, sq_state, problem = self._plan(losses, grads, hyper)
            if coeffs is None or problem is not None:
                self._restore(units, applied, seed)
            else:
                self._apply(units, applied, seed, coeffs, hyper, t, sq_state)
        finally:
            if applied:  # something raised: remove what is still applied, unit by unit
                self._restore(units, applied, seed)
        skipped = coeffs is None or problem is not None
        if (skipped and self.nonfinite == "skip") or (not units and not skipped):
            self._commit(t, None if skipped else sq_state)  # a step with nothing to update
        self._record(t, seed, units, hyper, losses, grads, loss, coeffs, grad_rms, skipped)
        if skipped and self.nonfinite == "raise":
            what = "non-finite loss" if problem is None else problem
            raise NonFiniteLossError(
                f"{what} in ZO step {t} (losses {losses}); the weights were restored and not "
                "updated, and the step was not counted (pass nonfinite='skip' to skip such "
                "steps)")
        return loss

    # -- the parts of a step -------------------------------------------------------------------
    def _central_estimate(self, call, units, applied, seed):
        """(losses, projected gradients, step loss) of the central estimator: for each
        direction k, L(p + eps z_k) and L(p - eps z_k); the step loss is their mean."""
        eps, raw = self.eps, []
        for k in range(self.n_directions):
            self._sweep(units, applied, seed, eps, k,
                        restore=None if k == 0 else (eps, k - 1))
            raw.append(call())
            self._sweep(units, applied, seed, -2.0 * eps, k)
            raw.append(call())
        losses = self._reduce(raw)
        grads = [(losses[2 * k] - losses[2 * k + 1]) / (2.0 * eps)
                 for k in range(self.n_directions)]
        return losses, grads, sum(losses) / len(losses)

    def _forward_estimate(self, call, units, applied, seed, initial_loss):
        """(losses, projected gradients, step loss) of the forward estimator: L(p) (or
        ``initial_loss``) and L(p + eps z_k) for each direction; the step loss is L(p)."""
        eps = self.eps
        raw = [call() if initial_loss is None else initial_loss]
        for k in range(self.n_directions):
            self._sweep(units, applied, seed, eps, k,
                        restore=None if k == 0 else (-eps, k - 1))
            raw.append(call())
        losses = self._reduce(raw)
        grads = [(losses[k + 1] - losses[0]) / eps for k in range(self.n_directions)]
        return losses, grads, losses[0]

    def _plan(self, losses, grads, hyper):
        """(update coefficients or None when a loss or slope is not finite, the RMS that
        divided them, the new RMS state, why the update cannot be computed or None)."""
        if not all(math.isfinite(v) for v in list(losses) + list(grads)):
            return None, None, None, None
        coeffs, grad_rms, sq_state = self._coefficients(grads)
        return coeffs, grad_rms, sq_state, self._unrepresentable(coeffs, sq_state, hyper)

    def _apply(self, units, applied, seed, coeffs, hyper, t, sq_state) -> None:
        """The update sweep, fused with the removal of each unit's last perturbation, and the
        commit of the step: an interrupt waits for both."""
        with _sigint_deferred():
            done = False
            try:
                for i, u in enumerate(units):
                    scale, last = applied[i]
                    lr, wd = hyper[u.group]
                    zo_update_(u.tensors, seed, lr=lr, projected_grads=coeffs,
                               restore_scale=-scale, restore_direction=last,
                               weight_decay=wd, distribution=self.distribution,
                               offsets=u.offsets, backend=self.backend,
                               stochastic_rounding=self.stochastic_rounding)
                    del applied[i]
                    done = True
            finally:
                # some groups took this step's update (seed and RMS state used): count the
                # step, so that neither is used twice
                if done:
                    self._commit(t, sq_state)

    def _record(self, t, seed, units, hyper, losses, grads, loss, coeffs, grad_rms,
                skipped) -> None:
        """``last_step``: what the step measured and did."""
        self.last_step = dict(
            step=t, seed=seed, projected_grads=grads, losses=losses, loss=loss,
            update_coefficients=None if skipped else coeffs, grad_rms=grad_rms,
            update_rms=0.0 if skipped else self._update_rms(coeffs, units, hyper),
            skipped=skipped, estimator=self.estimator, distribution=self.distribution,
            eps=self.eps, n_directions=self.n_directions, numel=zo_numel(self.param_groups),
            lr=[lr for lr, _ in hyper], weight_decay=[wd for _, wd in hyper])

    def _commit(self, t: int, sq_state) -> None:
        self._zo_state["step"] = t + 1
        if sq_state is not None:
            self._zo_state["sq_avg"], self._zo_state["sq_count"] = sq_state
