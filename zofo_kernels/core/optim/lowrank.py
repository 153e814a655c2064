"""Low-rank directions (LOZO / SubZero style) of :class:`~zofo_kernels.core.optim.ZOOptimizer`:
``lowrank=r`` gives every parameter matrix a rank-r direction z = U V^T / sqrt(r) in place of
its dense noise, ``lowrank_period=p`` keeps V for p steps (LOZO's lazy V).

The rule, per step t with seed s_t = step_seed(base_seed, t):

* a parameter of dim >= 2 and shape (m, ...) is the matrix (m, n), n = numel / m; it takes a
  low-rank z when r <= min(m, n). Vectors (biases, norms) and matrices too narrow for r keep
  their dense z, so every weight still moves;
* U (q, m, r) is drawn from the step seed, V (q, n, r) from the seed of the first step of the
  period, s_{p * (t div p)} (``contract.lowrank_seeds``), with the optimizer's distribution;
  q = n_directions, one (U, V) per direction;
* the kernels compute z_ij = sum_l U_il V_jl / sqrt(r) per element (``contract.lowrank_z``)
  in every sweep of the step (perturbation, restore, update), so z is never materialised:
  the step holds (m + n) * r * q floats per matrix, freed when it ends.

E[z z^T] = I as for dense z, so the update lr * g * z keeps the dense update's scale
(``last_step["update_rms"]`` is unchanged). The factors depend only on the seeds: an exact
resume needs no new state. Low-rank directions cannot be combined with ``sparse_fraction``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

from zofo_kernels.core.ops import lowrank_factors
from zofo_kernels.core.optim import zo_functional as F
from zofo_kernels.core.optim.layout import sharded_parameter
from zofo_kernels.core.validation import integer


def check_rank(value) -> Optional[int]:
    """None (dense directions, the default) or the rank r >= 1."""
    if value is None:
        return None
    return integer(value, "lowrank", 1, 1 << 31)


def check_period(value) -> int:
    """p >= 1: V is redrawn every p steps (1: every step)."""
    return integer(value, "lowrank_period", 1, 1 << 63)


def v_key(base_seed: int, step: int, period: int) -> int:
    """The seed V of step ``step`` is keyed on: that of the first step of its period."""
    return F.step_seed(base_seed, period * (step // period))


def z_bound(distribution: str, rank: Optional[int]) -> float:
    """An upper bound of |z| (bounds the update, so that it is known finite in float32):
    the dense bound, or for rank r, r products of two factor values times 1/sqrt(r),
    i.e. sqrt(r) * Z_MAX**2, with a margin for float32 rounding."""
    if rank is None:
        return F.Z_MAX[distribution]
    return math.sqrt(rank) * F.Z_MAX[distribution] ** 2 * (1.0 + 1e-6)


def refuse_sharded(param_groups) -> None:
    """Each rank must see whole matrices: a sharded parameter (FSDP2 ``fully_shard``, a
    DTensor with a Shard placement) would be viewed as the matrix of its shard."""
    p = sharded_parameter(param_groups)
    if p is not None:
        raise ValueError(
            f"lowrank is not supported with sharded parameters (a DTensor of global "
            f"shape {tuple(p.shape)} with placements {p.placements}, e.g. FSDP2 "
            "fully_shard): U and V would be drawn per shard, so the run would depend "
            "on the sharding; use data parallelism without sharding, or lowrank=None")


def attach_factors(units: Sequence[F.Unit], seed: int, key: int, rank: int, *,
                   distribution: str, n_directions: int, backend: Optional[str]) -> None:
    """Give every unit the factors of its tensors for this step (None for a unit whose
    tensors all keep dense z)."""
    for u in units:
        pairs: List = lowrank_factors(u.tensors, seed, rank, v_seed=key,
                                      distribution=distribution, n_directions=n_directions,
                                      offsets=u.offsets, backend=backend)
        u.factors = pairs if any(p is not None for p in pairs) else None


def factor_floats(units: Sequence[F.Unit]) -> int:
    """Floats the step's factors hold (what low-rank directions cost in memory)."""
    return sum(x.numel() for u in units if u.factors for p in u.factors if p for x in p)
