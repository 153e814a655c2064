"""Sparse perturbation (Sparse-MeZO style) of :class:`~zofo_kernels.core.optim.ZOOptimizer`:
``sparse_fraction=f`` perturbs and updates, in each step, only about the fraction f of each
parameter tensor holding its elements of smallest magnitude at the step's start.

The rule, per step and per tensor of n elements:

* the sample: all n elements when n <= SAMPLE; otherwise the SAMPLE elements at flat indices
  (j * P) mod n, j = 0 .. SAMPLE-1, with P the smallest integer >= floor(n * G / 2**64)
  coprime to n (G = GOLDEN, 2**64 divided by the golden ratio: P is near 0.618 n). A Weyl
  sequence: the indices are distinct and spread over rows and columns, without aliasing
  with the row length;
* the threshold tau: the k-th smallest float32 |w| of the sample (NaN counts as larger than
  every number), k = ceil(f * m) for a sample of m elements, computed exactly on the value of
  the float f and kept in [1, m]; f = 1 gives tau = +inf (every element, sample or not), and
  a tau that is NaN (k falls among NaN weights) becomes +inf;
* the mask: bit j set iff float32(|w_j|) <= tau (:func:`zofo_kernels.core.ops.magnitude_mask`;
  a NaN weight: never). Ties at tau are all in, so a tensor with many equal magnitudes
  (e.g. zeros) can have more than the fraction f set.

The masks are built once per step from the step-start weights, before the first sweep, and
every sweep of the step (perturbation, restore, update) passes them: the weights move during
a step (w + eps*z is not w), and no threshold rule on the perturbed values would give back
the step-start decision near tau, so the decision is stored, one bit per element (1/32 of
the float32 weights' memory), and freed when the step ends. The thresholds depend only on
the step-start weights: an exact resume needs no new state.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

import torch

from zofo_kernels.core.ops import magnitude_mask
from zofo_kernels.core.optim.layout import sharded_parameter
from zofo_kernels.core.validation import real

SAMPLE = 16384
SELECT_ROWS = 8  # samples selected together (bounds the temporaries)
GOLDEN = 0x9E3779B97F4A7C15  # floor(2**64 / golden ratio): the Weyl step's fraction of n
_POPCOUNT = [bin(i).count("1") for i in range(256)]


def check_fraction(value) -> Optional[float]:
    """None (dense: every element, the default) or a fraction in (0, 1], as a float."""
    if value is None:
        return None
    v = real(value, "sparse_fraction", positive=True)
    if v > 1.0:
        raise ValueError(f"sparse_fraction must be in (0, 1] (the share of each tensor "
                         f"perturbed per step) or None for dense, got {value!r}")
    return v


def refuse_sharded(param_groups) -> None:
    """Sparse perturbation needs each rank to see whole tensors: a sharded parameter (FSDP2
    ``fully_shard``, a DTensor with a Shard placement) would get a threshold per shard, and
    the sharded run would no longer be the unsharded one."""
    p = sharded_parameter(param_groups)
    if p is not None:
        raise ValueError(
            f"sparse_fraction is not supported with sharded parameters (a DTensor of "
            f"global shape {tuple(p.shape)} with placements {p.placements}, e.g. "
            "FSDP2 fully_shard): the magnitude threshold would be computed per "
            "shard, so the run would depend on the sharding; use data parallelism "
            "without sharding, or sparse_fraction=None")


def weyl_step(numel: int) -> int:
    """P of the sample of a tensor of ``numel`` elements: the smallest integer >=
    max(1, floor(numel * GOLDEN / 2**64)) coprime to ``numel``."""
    p = max(1, (numel * GOLDEN) >> 64)
    while math.gcd(p, numel) != 1:
        p += 1
    return p


def rank(fraction: float, m: int) -> int:
    """k = ceil(fraction * m), exact on the float's value (0.7 * 10 is 7, not 8), in [1, m]."""
    return min(max(math.ceil(Fraction(fraction) * m), 1), m)


def sample_indices(numel: int, device: torch.device, cache: Dict) -> Optional[torch.Tensor]:
    """The flat indices of the sample of a tensor of ``numel`` elements (None: all of them),
    cached in ``cache`` per (numel, device)."""
    if numel <= SAMPLE:
        return None
    key = (numel, device)
    if key not in cache:
        p = weyl_step(numel)
        if p * SAMPLE < 1 << 63:  # j * p fits in int64: no Python integers (their memory
            j = torch.arange(SAMPLE, dtype=torch.int64)  # stays with the interpreter)
            idx = (j * p) % numel
        else:
            idx = torch.tensor([(j * p) % numel for j in range(SAMPLE)], dtype=torch.int64)
        cache[key] = idx.to(device)
    return cache[key]


def thresholds(tensors: Sequence[torch.Tensor], fraction: float, cache: Dict) -> torch.Tensor:
    """tau of every tensor (float32, on their device, which they share): see the module
    docstring. Samples of one size are selected SELECT_ROWS at a time (one kthvalue for
    several tensors; kthvalue counts NaN as larger than every number, as sort does, at a
    quarter of a full sort's time on 16384-element rows), so the temporaries stay below
    2 * SELECT_ROWS samples (1 MiB) whatever the number of tensors."""
    device = tensors[0].device
    if fraction == 1.0:
        return torch.full((len(tensors),), math.inf, dtype=torch.float32, device=device)
    by_size: Dict[int, List[int]] = {}
    for i, t in enumerate(tensors):
        by_size.setdefault(min(t.numel(), SAMPLE), []).append(i)
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for m, idx in by_size.items():
        k = rank(fraction, m)
        for a in range(0, len(idx), SELECT_ROWS):
            rows = idx[a:a + SELECT_ROWS]
            samples = torch.stack([_sample(tensors[i], cache) for i in rows])
            out[rows] = samples.abs_().kthvalue(k, dim=1).values
    return torch.where(out.isnan(), torch.full_like(out, math.inf), out)


def _sample(t: torch.Tensor, cache: Dict) -> torch.Tensor:
    """The float32 sample of one tensor (all its elements when it has at most SAMPLE)."""
    flat = t.detach().reshape(-1)
    idx = sample_indices(flat.numel(), flat.device, cache)
    return (flat if idx is None else flat[idx]).float()


def attach_masks(units, fraction: float, cache: Dict, backend: Optional[str]) -> None:
    """Give every unit (:class:`~zofo_kernels.core.optim.zo_functional.Unit`) the bitmaps of
    its tensors for this step, from their current (step-start) values."""
    for u in units:
        u.masks = magnitude_mask(u.tensors, thresholds(u.tensors, fraction, cache),
                                 backend=backend)


def set_bits(mask: torch.Tensor) -> torch.Tensor:
    """The number of set bits of a bitmap (an int64 0-d tensor on its device): a histogram of
    its bytes (one pass, no temporary the size of the bitmap) dotted with each byte value's
    bit count. Measured on an 8.4 M-word bitmap: 4x faster than a lookup per byte."""
    counts = torch.bincount(mask.view(torch.uint8), minlength=256)
    lut = torch.tensor(_POPCOUNT, dtype=torch.int64, device=mask.device)
    return (counts * lut).sum()


def moved_elements(units) -> List[int]:
    """Per unit, the number of elements its sweeps change: the set bits of its masks, or
    every element of a unit without masks (dense)."""
    out = []
    for u in units:
        if u.masks is None:
            out.append(sum(t.numel() for t in u.tensors))
        else:
            out.append(int(torch.stack([set_bits(m) for m in u.masks]).sum()))  # one sync
    return out
