"""Low-rank directions on every available backend, against the contract and the reference.

A tensor given factors (U, V) (``factors=`` of ``perturb_``/``zo_update_``) takes, in direction
k, z = ``contract.lowrank_z(U[k], V[k])``: products and sums rounded separately in float32, in
a fixed order, then times float32(1/sqrt(r)). Given the same factor tensors, that is the same
sequence of float32 operations on every backend (the float contract forbids FMA), so every
backend's result must equal the reference's **bit for bit, for both distributions**; the
reference itself is checked against the formula written out from the contract. A tensor whose
entry is None must get exactly what the same backend's dense call gives it.

``lowrank_factors`` draws U and V through the backend's own ``noise``: Rademacher factors bit
for bit with ``contract.lowrank_factor``, Gaussian ones within GAUSS_Z_BOUND per value (the
allowed Gaussian z difference, python_tests/tolerances.py).

Inputs are fresh random values on every run (the seed is printed on failure): matrices with
odd sides, a 3-D tensor (viewed as (shape[0], rest)), a transposed (non-contiguous) one, one
too small for the rank, a vector and an empty tensor, at global offsets that are not
multiples of 32 or 128. GPU cases are marked ``gpu``; Triton runs through its interpreter
when TRITON_INTERPRET=1, so the tensors stay small.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import zofo_kernels as zk
from helpers import backend_cases
from tolerances import GAUSS_Z_BOUND
from zofo_kernels.core import contract
from zofo_kernels.core.backends import base

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = backend_cases()
RANK = 3

_RNG_SEED = int.from_bytes(os.urandom(4), "little")
RNG = np.random.default_rng(_RNG_SEED)


def msg(**kw):
    return f"(test rng seed {_RNG_SEED}; " + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"


def random_seed():
    return int(RNG.integers(0, 2 ** 63 - 1))


def make_weights(dtype, device):
    """~N(0, 0.05) tensors: four that take factors at rank 3 ((7, 5), (33, 4), (3, 131),
    (11, 2, 3)), a transposed (9, 13) view, and three that stay dense: (2, 50) (rank 3 >
    2), a vector of 31 and an empty (0, 5)."""
    shapes = [(7, 5), (33, 4), (3, 131), (11, 2, 3), None, (2, 50), (31,), (0, 5)]
    g = torch.Generator().manual_seed(int(RNG.integers(1 << 30)))
    ts = []
    for s in shapes:
        t = torch.randn(13, 9, generator=g).t() if s is None else torch.randn(s, generator=g)
        ts.append((t * 0.05).to(dtype).to(device))
    return ts


def odd_offsets(ts):
    """Disjoint global offsets, none a multiple of 32 or 128 (random gaps, start past 2**32)."""
    out, o = [], 2 ** 32 + 32 * int(RNG.integers(0, 1000)) + int(RNG.integers(1, 32))
    for t in ts:
        out.append(o)
        o += t.numel() + int(RNG.integers(1, 300))
        o += 1 if o % 32 == 0 else 0
    return out


def contract_factors(ts, offsets, seed, distribution, q, device, rank=RANK):
    """The factors of ``contract.lowrank_factor`` (numpy), as the kernels take them."""
    u_seed, v_seed = contract.lowrank_seeds(seed, seed)
    out = []
    for t, o in zip(ts, offsets):
        mn = contract.lowrank_shape(t.shape, rank)
        if mn is None:
            out.append(None)
            continue
        pair = tuple(torch.from_numpy(np.stack([
            contract.lowrank_factor(s, o, rows, rank, distribution, k) for k in range(q)]))
            .to(device) for s, rows in ((u_seed, mn[0]), (v_seed, mn[1])))
        out.append(pair)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().cpu().reshape(-1).clone()
    return flat.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def clones(ts):
    return [t.clone() for t in ts]  # clone keeps a transposed view's strides


def assert_bits_equal(got, want, info, which=None):
    for j, (g, w) in enumerate(zip(got, want)):
        if which is not None and not which[j]:
            continue
        assert g.shape == w.shape
        assert torch.equal(bits(g), bits(w)), f"tensor {j} {tuple(g.shape)} differs {info}"


def on_cpu(factors):
    return [None if f is None else tuple(x.cpu() for x in f) for f in factors]


# ------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
def test_reference_follows_the_formula(distribution):
    """perturb_ on the reference = p + s * lowrank_z, rounded to the storage dtype, written out
    here from the contract; z has the rank of U V^T, at most r (numerically: float32 rounding
    only adds singular values ~1e-7 of the largest; random +-1 factors can be singular)."""
    ts = make_weights(torch.float32, "cpu")
    offsets = odd_offsets(ts)
    seed, k, s = random_seed(), 1, 0.25
    factors = contract_factors(ts, offsets, seed, distribution, 2, "cpu")
    out = clones(ts)
    zk.perturb_(out, seed, s, distribution, k, offsets=offsets, backend="reference",
                factors=factors)
    for j, (t, f) in enumerate(zip(ts, factors)):
        if f is None:
            continue
        u, v = f[0][k].numpy(), f[1][k].numpy()
        z = contract.lowrank_z(u, v, 0, t.numel()).reshape(t.shape)
        want = t.contiguous().numpy() + np.float32(s) * z
        assert np.array_equal(out[j].numpy(), want), msg(seed=seed, tensor=j)
        zm = torch.from_numpy(z).double().reshape(u.shape[0], -1)
        uv = torch.from_numpy(u).double() @ torch.from_numpy(v).double().T
        assert torch.linalg.matrix_rank(zm, rtol=1e-5).item() == \
            torch.linalg.matrix_rank(uv).item() <= RANK
    # the explicit rank-r product, in float64 (the float32 order only rounds it)
    u, v = (x[k].double() for x in factors[0])
    z = contract.lowrank_z(factors[0][0][k].numpy(), factors[0][1][k].numpy(), 0, 35)
    assert np.allclose(z.reshape(7, 5), (u @ v.T / np.sqrt(RANK)).numpy(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- every backend

@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_lowrank_perturb(backend, device, dtype, distribution):
    """Plain, then with the fused restore of another direction (the q-direction switch)."""
    ts = make_weights(dtype, device)
    offsets = odd_offsets(ts)
    seed, scale, rs = random_seed(), 1e-2, -1e-2
    k, rk = int(RNG.integers(0, 3)), int(RNG.integers(0, 3))
    factors = contract_factors(ts, offsets, seed, distribution, 3, device)
    has = [f is not None for f in factors]
    info = msg(seed=seed, offsets=offsets, k=k, rk=rk)
    for restore in (False, True):
        kw = dict(offsets=offsets, restore_scale=rs if restore else 0.0,
                  restore_direction=k if restore else None)
        direction = rk if restore else k
        got, dense, ref = clones(ts), clones(ts), [t.cpu().clone() for t in ts]
        zk.perturb_(got, seed, scale, distribution, direction, backend=backend,
                    factors=factors, **kw)
        zk.perturb_(dense, seed, scale, distribution, direction, backend=backend, **kw)
        zk.perturb_(ref, seed, scale, distribution, direction, backend="reference",
                    factors=on_cpu(factors), **kw)
        assert_bits_equal(got, ref, info, which=has)
        assert_bits_equal(got, dense, info, which=[not h for h in has])
        assert not torch.equal(bits(got[0]), bits(dense[0])), "factors were ignored " + info


@pytest.mark.parametrize("stochastic_rounding", [True, False])
@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_lowrank_update(backend, device, dtype, distribution, stochastic_rounding):
    """q = 2..3 directions, the fused restore of the last one, weight decay, stochastic
    rounding on and off."""
    ts = make_weights(dtype, device)
    offsets = odd_offsets(ts)
    seed, q = random_seed(), int(RNG.integers(2, 4))
    grads = [float(g) for g in RNG.normal(size=q) * 3]
    eps, lr, wd = 1e-3, 3e-3, 0.1
    factors = contract_factors(ts, offsets, seed, distribution, q, device)
    has = [f is not None for f in factors]
    zk.perturb_(ts, seed, eps, distribution, q - 1, offsets=offsets, backend="reference",
                factors=factors if device == "cpu" else None)
    kw = dict(lr=lr, restore_scale=-eps, weight_decay=wd, distribution=distribution,
              offsets=offsets, stochastic_rounding=stochastic_rounding)
    got, dense, ref = clones(ts), clones(ts), [t.cpu().clone() for t in ts]
    dev_grads = torch.tensor(grads, device=device)
    zk.zo_update_(got, seed, projected_grads=dev_grads, backend=backend, factors=factors, **kw)
    zk.zo_update_(dense, seed, projected_grads=dev_grads, backend=backend, **kw)
    zk.zo_update_(ref, seed, projected_grads=grads, backend="reference",
                  factors=on_cpu(factors), **kw)
    info = msg(seed=seed, q=q, offsets=offsets)
    assert_bits_equal(got, ref, info, which=has)
    assert_bits_equal(got, dense, info, which=[not h for h in has])


@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("backend,device", CASES)
def test_lowrank_factors_follow_the_contract(backend, device, distribution):
    """lowrank_factors through the backend's noise: U and V of every tensor that takes
    factors, q directions, a V keyed on another seed (LOZO's lazy V); None for the others."""
    ts = make_weights(torch.bfloat16, device)
    offsets = odd_offsets(ts)
    seed, v_key, q = random_seed(), random_seed(), 2
    got = zk.lowrank_factors(ts, seed, RANK, v_seed=v_key, distribution=distribution,
                             n_directions=q, offsets=offsets, backend=backend)
    u_seed, v_seed = contract.lowrank_seeds(seed, v_key)
    tol = 0.0 if distribution == "rademacher" else GAUSS_Z_BOUND
    for j, (t, o, f) in enumerate(zip(ts, offsets, got)):
        mn = contract.lowrank_shape(t.shape, RANK)
        assert (f is None) == (mn is None), f"tensor {j} {tuple(t.shape)}"
        if f is None:
            continue
        for x, s, rows in zip(f, (u_seed, v_seed), mn):
            assert x.dtype == torch.float32 and x.shape == (q, rows, RANK)
            assert x.device.type == device
            want = np.stack([contract.lowrank_factor(s, o, rows, RANK, distribution, k)
                             for k in range(q)])
            err = np.abs(x.cpu().numpy().astype(np.float64) - want).max()
            assert err <= tol, msg(seed=seed, tensor=j, err=err)


# ------------------------------------------------------------------------- bad input

def _pair(d=2, m=4, n=5, r=2, dtype=torch.float32):
    return (torch.zeros(d, m, r, dtype=dtype), torch.zeros(d, n, r, dtype=dtype))


BAD_FACTORS = [
    ("two entries for one matrix and a vector", lambda ts: [_pair()], ValueError, "2 tensors"),
    ("not a pair", lambda ts: [torch.zeros(2, 4, 2), None], TypeError, "pair"),
    ("U of the wrong rows", lambda ts: [(torch.zeros(2, 3, 2), torch.zeros(2, 5, 2)), None],
     ValueError, "shape"),
    ("V of another rank", lambda ts: [(torch.zeros(2, 4, 2), torch.zeros(2, 5, 3)), None],
     ValueError, "shape"),
    ("rank above min(m, n)", lambda ts: [_pair(r=5), None], ValueError, "min"),
    ("float64 factors", lambda ts: [_pair(dtype=torch.float64), None], ValueError, "float32"),
    ("non-contiguous U", lambda ts: [(torch.zeros(2, 2, 4).transpose(1, 2),
                                      torch.zeros(2, 5, 2)), None], ValueError, "contiguous"),
    ("too few directions", lambda ts: [_pair(d=1), None], ValueError, "direction 1"),
    ("factors on another device", lambda ts: [tuple(x.to("meta") for x in _pair()), None],
     ValueError, "meta"),
    ("with a mask", "mask", ValueError, "combined"),
]


@pytest.mark.parametrize("op", ["perturb", "update"])
@pytest.mark.parametrize("name,make,exc,pattern", BAD_FACTORS, ids=[b[0] for b in BAD_FACTORS])
def test_bad_factors_are_rejected_before_any_write(name, make, exc, pattern, op):
    ts = [torch.randn(4, 5), torch.randn(40)]
    before = [t.clone() for t in ts]
    extra = {}
    if make == "mask":
        factors = [_pair(), None]
        extra["mask"] = [torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)]
    else:
        factors = make(ts)
    with pytest.raises(exc, match=pattern):
        if op == "perturb":
            zk.perturb_(ts, 1, 0.1, direction=1, factors=factors, **extra)
        else:
            zk.zo_update_(ts, 1, lr=0.1, projected_grads=[1.0, 2.0], restore_scale=0.1,
                          factors=factors, **extra)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ts, before))


def test_shared_memory_factors_are_refused():
    w = torch.zeros(4, 5)
    flat = w.view(-1)
    u = flat[:8].view(1, 4, 2)  # U is the weight's own first 8 elements
    with pytest.raises(ValueError, match="shares memory"):
        zk.perturb_([w], 1, 0.1, factors=[(u, torch.zeros(1, 5, 2))])
    assert torch.equal(w, torch.zeros(4, 5))


def test_lowrank_factors_bad_arguments():
    ts = [torch.randn(4, 5)]
    with pytest.raises(ValueError, match="rank"):
        zk.lowrank_factors(ts, 1, 0)
    with pytest.raises(ValueError, match="n_directions"):
        zk.lowrank_factors(ts, 1, 2, n_directions=0)
    with pytest.raises(ValueError, match="v_seed"):
        zk.lowrank_factors(ts, 1, 2, v_seed=-1)
    assert zk.lowrank_factors(ts, 1, 5) == [None]  # rank 5 > min(4, 5): dense


@pytest.mark.parametrize("backend,device", CASES)
def test_backends_check_factors_on_direct_calls(backend, device):
    """A backend called directly (not through the public API) refuses wrong factors with a
    clear error before writing anything."""
    impl = base.get(backend)
    t = (torch.randn(4, 5) * 0.05).to(device).view(-1)
    before = bits(t)
    good = tuple(x.to(device) for x in _pair(d=1))
    bad = [[good, good],                                               # two for one tensor
           [tuple(x.double() for x in good)],                          # float64
           [(good[0], torch.zeros(1, 4, 2, device=device))],           # m * n != numel
           [good]]                                                     # direction 1 of 1
    for factors in bad:
        with pytest.raises(ValueError, match="factor"):
            impl.perturb([t], [0], 1, "gaussian", 0.1, 1, 0.0, 0, factors=factors)
        with pytest.raises(ValueError, match="factor"):
            impl.update([t], [0], 1, "gaussian", lr=0.1,
                        projected_grads=torch.ones(2, device=device), restore_scale=0.0,
                        restore_direction=0, weight_decay=0.0, stochastic_rounding=False,
                        factors=factors)
    assert torch.equal(bits(t), before)
