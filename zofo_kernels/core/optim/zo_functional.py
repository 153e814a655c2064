"""The ZO-SGD step as plain functions, beside the thin class that holds its state,
:class:`~zofo_kernels.core.optim.zo.ZOOptimizer` (as torch's functional ``sgd()`` sits beside
``torch.optim.SGD``).

A step, in the order the class calls these::

    seed   = step_seed(base_seed, t)
    units  = zo_units(param_groups, include_frozen)           # one kernel call per group/device
    sparse.attach_masks(units, ...)                           # sparse_fraction: the bitmaps
    lowrank.attach_factors(units, ...)                        # lowrank: U and V per matrix
    raw    = central_losses(sweep, evaluate, eps, q)          # or forward_losses
    grads  = projected_gradients(losses, eps, estimator)      # losses: raw after loss_reduce
    coeffs, grad_rms, sq_state, problem = plan_update(...)    # None: a loss was not finite
    update_units(...)  or  restore_units(...)

``sweep`` is :func:`perturb_units` bound to the step's units, record and seed. The record
``applied`` ({unit index: (scale, direction)}) says which perturbation each unit still
carries, so that whatever interrupts a step, :func:`restore_units` removes exactly that.
A unit's ``masks`` (sparse perturbation, :mod:`zofo_kernels.core.optim.sparse`) or
``factors`` (low-rank directions, :mod:`zofo_kernels.core.optim.lowrank`) go with its tensors
into every sweep of the step. Nothing here keeps state between calls.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from zofo_kernels.core import contract
from zofo_kernels.core.ops import perturb_, zo_update_
from zofo_kernels.core.optim.layout import split_by_device, zo_layout
from zofo_kernels.core.validation import as_float32

ESTIMATORS = ("central", "forward")
NORMALIZATIONS = ("none", "rms", "std")

# Philox counter word c3 that tags "derive a step seed" (the noise stream uses 0 and 1).
SEED_PURPOSE = 0x5EED5EED
# Largest |z| a kernel can produce: Box-Muller radius sqrt(-2 log u) with u >= 1e-7 (5.678),
# rounded up; Rademacher +-1. Bounds the update so that it is known finite in float32.
Z_MAX = {"gaussian": 5.7, "rademacher": 1.0}

Applied = Dict[int, Tuple[float, int]]  # unit index -> (scale, direction) it still carries
Hyper = Sequence[Tuple[float, float]]   # (lr, weight_decay) per param group


# --------------------------------------------------------------------------- seeds

def step_seed(base_seed: int, step: int) -> int:
    """Seed of step ``step``: the contract's derived seed of ``base_seed`` at index ``step``,
    purpose 0x5EED5EED (Philox4x32-10 on the counter (step mod 2**32, step div 2**32, 0,
    0x5EED5EED), words 0 and 1 joined and reduced to [0, 2**63)). A pure function: no
    generator state, no global RNG."""
    if not 0 <= base_seed < contract.SEED_LIMIT:
        raise ValueError(f"base_seed must be in [0, 2**63), got {base_seed}")
    if not 0 <= step < (1 << 64):
        raise ValueError(f"step must be in [0, 2**64), got {step}")
    return contract.derived_seed(base_seed, step, SEED_PURPOSE)


def fresh_base_seed() -> int:
    """A base seed from the operating system's entropy (never the torch RNG)."""
    return int.from_bytes(os.urandom(8), "little") & (contract.SEED_LIMIT - 1)


# --------------------------------------------------------------------------- the sweeps

@contextlib.contextmanager
def sigint_deferred():
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


class Unit:
    """One kernel call of the update sweep: the parameters of one group on one device, and
    their step's bitmaps (sparse perturbation) or low-rank factors, one entry per tensor, or
    None (dense)."""
    __slots__ = ("group", "device", "tensors", "offsets", "masks", "factors")

    def __init__(self, group, device, tensors, offsets):
        self.group, self.device, self.tensors, self.offsets = group, device, tensors, offsets
        self.masks: Optional[List[torch.Tensor]] = None
        self.factors: Optional[list] = None


def _joined_masks(units: Sequence[Unit], idx: Sequence[int]) -> Optional[List[torch.Tensor]]:
    """The bitmaps of the tensors of ``units[i]`` for i in ``idx``, in the order of their
    tensors, or None (dense: a step's units all have masks or none has)."""
    if units[idx[0]].masks is None:
        return None
    return [m for i in idx for m in units[i].masks]


def _joined_factors(units: Sequence[Unit], idx: Sequence[int]) -> Optional[list]:
    """The low-rank factors of the tensors of ``units[i]`` for i in ``idx`` (None entries
    for tensors with dense z), or None when none of these units has factors."""
    if all(units[i].factors is None for i in idx):
        return None
    return [f for i in idx for f in (units[i].factors or [None] * len(units[i].tensors))]


def zo_units(param_groups: Sequence[Mapping], include_frozen: bool) -> List[Unit]:
    """The units of a step: per group and device, the tensors to update in place and their
    global offsets (:func:`~zofo_kernels.core.optim.layout.zo_layout`). Without
    ``include_frozen``, parameters with ``requires_grad=False`` are left out (and a step with
    only such parameters is refused)."""
    if not include_frozen and not any(
            p.requires_grad for g in param_groups for p in g["params"]):
        raise ValueError("every parameter of this ZOOptimizer has requires_grad=False, so "
                         "a step would train nothing (pass include_frozen=True to train "
                         "frozen parameters zeroth-order)")
    layout = zo_layout(param_groups, trainable_only=not include_frozen)
    units = []
    for gi, entries in enumerate(layout):
        for dev, (ts, offs) in split_by_device(entries).items():
            units.append(Unit(gi, dev, ts, offs))
    return units


def perturb_units(units: Sequence[Unit], applied: Applied, seed: int, scale: float,
                  direction: int, *, distribution: str, backend: Optional[str],
                  restore: Optional[Tuple[float, int]] = None) -> None:
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
        with sigint_deferred():
            perturb_(ts, seed, scale, distribution, direction, offsets=offs, backend=backend,
                     restore_scale=rs, restore_direction=rd, mask=_joined_masks(units, idx),
                     factors=_joined_factors(units, idx))
            for i in idx:
                applied[i] = (scale if restore is not None or i not in applied
                              else applied[i][0] + scale, direction)


def restore_units(units: Sequence[Unit], applied: Applied, seed: int, *, distribution: str,
                  backend: Optional[str]) -> None:
    """Remove exactly the perturbation each unit still carries (and its record)."""
    todo: Dict[Tuple, List[int]] = {}
    for i, (scale, direction) in applied.items():
        todo.setdefault((units[i].device, scale, direction), []).append(i)
    for (_, scale, direction), idx in todo.items():
        ts = [t for i in idx for t in units[i].tensors]
        offs = [o for i in idx for o in units[i].offsets]
        with sigint_deferred():
            perturb_(ts, seed, -scale, distribution, direction, offsets=offs, backend=backend,
                     mask=_joined_masks(units, idx), factors=_joined_factors(units, idx))
            for i in idx:
                del applied[i]


def update_units(units: Sequence[Unit], applied: Applied, seed: int, coeffs: Sequence[float],
                 hyper: Hyper, *, distribution: str, backend: Optional[str],
                 stochastic_rounding: bool) -> None:
    """The update sweep, unit by unit: p <- p - lr*(sum_k c_k z_k + wd*p), fused with the
    removal of the perturbation the unit still carries; a unit's record is dropped as soon
    as its update is written (so a failure part-way leaves the rest to
    :func:`restore_units`)."""
    for i, u in enumerate(units):
        scale, last = applied[i]
        lr, wd = hyper[u.group]
        zo_update_(u.tensors, seed, lr=lr, projected_grads=coeffs, restore_scale=-scale,
                   restore_direction=last, weight_decay=wd, distribution=distribution,
                   offsets=u.offsets, backend=backend, stochastic_rounding=stochastic_rounding,
                   mask=u.masks, factors=u.factors)
        del applied[i]


# --------------------------------------------------------------------------- the estimators

Sweep = Callable[..., None]  # sweep(scale, direction, restore=None): perturb_units, bound


def central_losses(sweep: Sweep, evaluate: Callable[[], float], eps: float,
                   n_directions: int) -> List[float]:
    """The 2q losses of the central estimator: for each direction k, L(p + eps z_k) and
    L(p - eps z_k) (moving to direction k removes direction k-1 in the same sweep). The
    weights carry +-eps z_{q-1} afterwards."""
    raw = []
    for k in range(n_directions):
        sweep(eps, k, restore=None if k == 0 else (eps, k - 1))
        raw.append(evaluate())
        sweep(-2.0 * eps, k)
        raw.append(evaluate())
    return raw


def forward_losses(sweep: Sweep, evaluate: Callable[[], float], eps: float, n_directions: int,
                   initial_loss: Optional[float] = None) -> List[float]:
    """The q + 1 losses of the forward estimator: L(p) (or ``initial_loss``, not evaluated)
    and L(p + eps z_k) for each direction. The weights carry eps z_{q-1} afterwards."""
    raw = [evaluate() if initial_loss is None else initial_loss]
    for k in range(n_directions):
        sweep(eps, k, restore=None if k == 0 else (-eps, k - 1))
        raw.append(evaluate())
    return raw


def projected_gradients(losses: Sequence[float], eps: float, estimator: str) -> List[float]:
    """g_k = (L+_k - L-_k) / (2 eps) (central) or (L+_k - L0) / eps (forward)."""
    if estimator == "central":
        return [(losses[2 * k] - losses[2 * k + 1]) / (2.0 * eps)
                for k in range(len(losses) // 2)]
    return [(losses[k + 1] - losses[0]) / eps for k in range(len(losses) - 1)]


def step_loss(losses: Sequence[float], estimator: str) -> float:
    """What a step returns: the mean of all losses (central) or L0 (forward)."""
    return sum(losses) / len(losses) if estimator == "central" else losses[0]


# --------------------------------------------------------------------------- the update

def update_coefficients(grads: Sequence[float], *, normalize: str, rms_beta: float,
                        sq_avg: float, sq_count: int):
    """(update coefficients c_k, the scale that divided them or None, the new
    (sq_avg, sq_count) or None) for the projected gradients of one step; theta moves by
    -lr * sum_k c_k z_k. ``normalize="rms"``: c_k = g_k / q / sqrt(v_hat), v_hat the
    bias-corrected running mean of g^2 (v <- beta*v + (1 - beta)*mean_k g_k^2).
    ``normalize="std"`` (FZOO): c_k = g_k / q / s, s the sample standard deviation (q - 1 in
    the denominator) of this step's q slopes, i.e. of its perturbed losses divided by eps;
    no state (q >= 2)."""
    q = len(grads)
    if normalize == "none":
        return [g / q for g in grads], None, None
    if normalize == "std":
        mean = sum(grads) / q
        std = math.sqrt(sum((g - mean) ** 2 for g in grads) / (q - 1))
        # equal slopes: no spread to scale by, no step
        return [g / q / std if std > 0.0 else 0.0 for g in grads], std, None
    beta = rms_beta
    sq_avg = beta * sq_avg + (1.0 - beta) * sum(g * g for g in grads) / q
    count = sq_count + 1
    rms = math.sqrt(sq_avg / (1.0 - beta ** count))
    # all-zero slopes so far: no information about the scale, no step
    coeffs = [g / q / rms if rms > 0.0 else 0.0 for g in grads]
    return coeffs, rms, (sq_avg, count)


def unrepresentable(coeffs: Sequence[float], sq_state, hyper: Hyper,
                    z_max: float) -> Optional[str]:
    """Why the update lr*(sum_k c_k z_k + wd*p) cannot be computed in float32, or None
    (``z_max``: a bound of |z|, Z_MAX or the low-rank one)."""
    if sq_state is not None and not math.isfinite(sq_state[0]):
        return "the running mean of g^2 overflows"
    c32 = [as_float32(c) for c in coeffs]
    if not all(math.isfinite(c) for c in c32):
        return "an update coefficient overflows float32"
    bound = as_float32(sum(abs(c) for c in c32) * z_max)
    if not math.isfinite(bound) or not all(math.isfinite(as_float32(lr * bound))
                                           for lr, _ in hyper):
        return "lr * sum_k |c_k z_k| overflows float32"
    return None


def plan_update(losses: Sequence[float], grads: Sequence[float], hyper: Hyper, *,
                z_max: float, normalize: str, rms_beta: float, sq_avg: float,
                sq_count: int):
    """(update coefficients or None when a loss or slope is not finite, the RMS that divided
    them, the new RMS state, why the update cannot be computed in float32 or None)."""
    if not all(math.isfinite(v) for v in list(losses) + list(grads)):
        return None, None, None, None
    coeffs, grad_rms, sq_state = update_coefficients(
        grads, normalize=normalize, rms_beta=rms_beta, sq_avg=sq_avg, sq_count=sq_count)
    return coeffs, grad_rms, sq_state, unrepresentable(coeffs, sq_state, hyper, z_max)


def update_rms(coeffs: Sequence[float], units: Sequence[Unit], hyper: Hyper,
               moved: Sequence[int]) -> float:
    """Expected RMS change per trained weight of the update lr * sum_k c_k z_k (E z^2 = 1 for
    both distributions, dense or low-rank, directions independent; weight decay not
    included), averaged over
    all trained elements, of which ``moved[i]`` of unit i move (all of them, dense; the set
    bits of its masks, sparse: the others change by 0, so a sparse step's RMS is the dense
    value times sqrt(moved fraction))."""
    moving = [0] * len(hyper)
    total = 0
    for u, n in zip(units, moved):
        moving[u.group] += n
        total += sum(t.numel() for t in u.tensors)
    if total == 0:
        return 0.0
    mean_lr2 = sum(n * lr ** 2 for n, (lr, _) in zip(moving, hyper)) / total
    return math.sqrt(mean_lr2 * sum(c * c for c in coeffs))
