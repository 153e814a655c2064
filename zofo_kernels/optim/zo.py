"""ZOOptimizer: zeroth-order SGD (MeZO-class) on the fused kernels of :mod:`zofo_kernels.ops`.

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
global index of a parameter element is given by :func:`zofo_kernels.optim.layout.zo_layout`.

Step normalisation (``normalize="rms"``): the update uses g_k / r instead of g_k, where
r = sqrt(v_hat) and v_hat is a bias-corrected running mean of g^2 (one scalar of state,
v <- beta*v + (1 - beta)*mean_k g_k^2, updated before use, as Adam's second moment). Each
weight then moves by about lr*|z| per step whatever the scale of the loss: multiplying the
objective by c (e.g. a penalty weight lambda) leaves the trajectory unchanged. This is Adam's
scale invariance at O(1) memory (Adam on theta.grad = g*z would need three backbone-sized
buffers); it keeps no momentum.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import contract
from ..backends import base as _backends
from ..ops import perturb_, zo_update_
from .layout import split_by_device, zo_layout, zo_numel

ESTIMATORS = ("central", "forward")
NORMALIZATIONS = ("none", "rms")
NONFINITE_POLICIES = ("raise", "skip")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Philox counter word c3 that tags "derive a step seed" (the noise stream uses 0 and 1).
_SEED_PURPOSE = 0x5EED5EED
_GLOBAL_KEYS = ("eps", "distribution", "estimator", "n_directions", "seed",
                "stochastic_rounding", "nonfinite", "loss_reduce", "backend", "normalize",
                "rms_beta")


class NonFiniteLossError(FloatingPointError):
    """A loss evaluated during a ZO step was NaN or infinite (the weights were restored)."""


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
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
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

class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD with fused perturbation/update kernels (see the module docstring).

    Per-group hyperparameters: ``lr``, ``weight_decay``. Optimizer-wide: ``eps``,
    ``distribution`` ("gaussian" | "rademacher"), ``estimator`` ("central" | "forward"),
    ``n_directions`` (q), ``seed`` (base seed; None draws one from os.urandom),
    ``stochastic_rounding`` (16-bit weights), ``nonfinite`` ("raise" | "skip"),
    ``loss_reduce`` (callable applied to the float64 tensor of the step's losses, e.g. an
    all-reduce mean across data-parallel ranks), ``backend`` (kernel backend name or None),
    ``normalize`` ("none": plain ZO-SGD, MeZO's update; "rms": the projected gradient divided
    by its running RMS, see the module docstring) and ``rms_beta`` (that running mean's decay).
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0,
                 distribution: str = "gaussian", estimator: str = "central",
                 n_directions: int = 1, seed: Optional[int] = None,
                 stochastic_rounding: bool = True, nonfinite: str = "raise",
                 loss_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 backend: Optional[str] = None, normalize: str = "none",
                 rms_beta: float = 0.999):
        lr = _real(lr, "lr", nonneg=True)
        weight_decay = _real(weight_decay, "weight_decay", nonneg=True)
        self.eps = _real(eps, "eps", positive=True)
        self.distribution = _choice(distribution, "distribution", contract.DISTRIBUTIONS)
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
        base_seed = fresh_base_seed() if seed is None else _int(seed, "seed", 0,
                                                                 contract.SEED_LIMIT)
        # sq_avg / sq_count: the running mean of g^2 and its number of updates (normalize="rms")
        self._zo_state = {"base_seed": base_seed, "step": 0, "sq_avg": 0.0, "sq_count": 0}
        self.last_step: Optional[Dict] = None
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    # -- torch.optim conventions ------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            for key in _GLOBAL_KEYS:
                if key in param_group:
                    raise ValueError(f"{key!r} is an optimizer-wide setting of ZOOptimizer, "
                                     "not a per-group one")
            for key in ("lr", "weight_decay"):
                if key in param_group:
                    _real(param_group[key], f"param group {key}", nonneg=True)
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"ZOOptimizer supports float32, bfloat16 and float16 "
                                f"parameters, got {p.dtype}")

    @property
    def base_seed(self) -> int:
        return self._zo_state["base_seed"]

    @property
    def step_count(self) -> int:
        """Number of completed steps (the counter that derives the next seed)."""
        return self._zo_state["step"]

    def next_seed(self) -> int:
        return step_seed(self._zo_state["base_seed"], self._zo_state["step"])

    def state_dict(self):
        sd = super().state_dict()
        sd["zo"] = dict(self._zo_state, eps=self.eps, distribution=self.distribution,
                        estimator=self.estimator, n_directions=self.n_directions,
                        normalize=self.normalize, rms_beta=self.rms_beta)
        return sd

    def load_state_dict(self, state_dict) -> None:
        if "zo" not in state_dict:
            raise KeyError("state dict has no 'zo' entry: it was not saved by a ZOOptimizer")
        sd = dict(state_dict)
        zo = sd.pop("zo")
        base = _int(zo["base_seed"], "base_seed", 0, contract.SEED_LIMIT)
        step = _int(zo["step"], "step", 0)
        sq_avg = _real(zo.get("sq_avg", 0.0), "sq_avg", nonneg=True)
        sq_count = _int(zo.get("sq_count", 0), "sq_count", 0)
        super().load_state_dict(sd)
        self._zo_state = {"base_seed": base, "step": step, "sq_avg": sq_avg,
                          "sq_count": sq_count}

    # -- kernel sweeps -------------------------------------------------------------------
    def _perturb(self, layout, seed, scale, direction, restore_scale=0.0, restore_direction=None):
        entries = [e for group in layout for e in group]
        for ts, offs in split_by_device(entries).values():
            perturb_(ts, seed, scale, self.distribution, direction, offsets=offs,
                     backend=self.backend, restore_scale=restore_scale,
                     restore_direction=restore_direction)

    def _update(self, layout, seed, coeffs, restore_scale):
        for group, entries in zip(self.param_groups, layout):
            for ts, offs in split_by_device(entries).values():
                zo_update_(ts, seed, lr=group["lr"], projected_grads=coeffs,
                           restore_scale=restore_scale, restore_direction=len(coeffs) - 1,
                           weight_decay=group["weight_decay"], distribution=self.distribution,
                           offsets=offs, backend=self.backend,
                           stochastic_rounding=self.stochastic_rounding)

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

    def _update_rms(self, coeffs: List[float]) -> float:
        """Expected RMS change per weight of the update lr * sum_k c_k z_k (E z^2 = 1 for both
        distributions, directions independent; weight decay not included), averaged over the
        groups by their number of elements."""
        sizes = [sum(p.numel() for p in g["params"]) for g in self.param_groups]
        total = sum(sizes)
        if total == 0:
            return 0.0
        mean_lr2 = sum(n * g["lr"] ** 2 for n, g in zip(sizes, self.param_groups)) / total
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
        ``loss_reduce`` like every other loss."""
        if closure is None or not callable(closure):
            raise ValueError("ZOOptimizer.step needs a closure that returns the loss")
        if initial_loss is not None:
            if self.estimator != "forward":
                raise ValueError("initial_loss is only used by the forward estimator")
            initial_loss = loss_value(initial_loss)
        t = self._zo_state["step"]
        seed = step_seed(self._zo_state["base_seed"], t)
        layout = zo_layout(self.param_groups)
        eps, q = self.eps, self.n_directions
        applied: Optional[Tuple[float, int]] = None  # (scale, direction) currently on the weights

        def call() -> float:
            return loss_value(closure())

        try:
            raw: List[float] = []
            if self.estimator == "central":
                for k in range(q):
                    if applied is None:
                        self._perturb(layout, seed, eps, k)
                    else:
                        self._perturb(layout, seed, eps, k, restore_scale=eps,
                                      restore_direction=k - 1)
                    applied = (eps, k)
                    raw.append(call())
                    self._perturb(layout, seed, -2.0 * eps, k)
                    applied = (-eps, k)
                    raw.append(call())
            else:
                raw.append(call() if initial_loss is None else initial_loss)
                for k in range(q):
                    if applied is None:
                        self._perturb(layout, seed, eps, k)
                    else:
                        self._perturb(layout, seed, eps, k, restore_scale=-eps,
                                      restore_direction=k - 1)
                    applied = (eps, k)
                    raw.append(call())
            losses = self._reduce(raw)
            finite = all(math.isfinite(v) for v in losses)
            if self.estimator == "central":
                grads = [(losses[2 * k] - losses[2 * k + 1]) / (2.0 * eps) for k in range(q)]
                loss = sum(losses) / len(losses)
            else:
                grads = [(losses[k + 1] - losses[0]) / eps for k in range(q)]
                loss = losses[0]
            finite = finite and all(math.isfinite(g) for g in grads)
            scale, last = applied
            coeffs, grad_rms, sq_state = None, None, None
            if finite:
                coeffs, grad_rms, sq_state = self._coefficients(grads)
                self._update(layout, seed, coeffs, -scale)
                applied = None
            else:
                self._perturb(layout, seed, -scale, last)
                applied = None
        finally:
            if applied is not None:  # the closure or a kernel call raised: undo the perturbation
                self._perturb(layout, seed, -applied[0], applied[1])
        self._zo_state["step"] = t + 1
        if sq_state is not None:
            self._zo_state["sq_avg"], self._zo_state["sq_count"] = sq_state
        self.last_step = dict(
            step=t, seed=seed, projected_grads=grads, losses=losses, loss=loss,
            update_coefficients=coeffs, grad_rms=grad_rms,
            update_rms=self._update_rms(coeffs) if coeffs is not None else 0.0,
            skipped=not finite, estimator=self.estimator, distribution=self.distribution,
            eps=eps, n_directions=q, numel=zo_numel(self.param_groups),
            lr=[g["lr"] for g in self.param_groups],
            weight_decay=[g["weight_decay"] for g in self.param_groups])
        if not finite and self.nonfinite == "raise":
            raise NonFiniteLossError(
                f"non-finite loss in ZO step {t} (losses {losses}); the weights were restored "
                "and not updated (pass nonfinite='skip' to skip such steps)")
        return loss
