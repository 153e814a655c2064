"""Every available backend against the noise contract (zofo_kernels.core.contract) and the reference.

What "equal" means, per quantity:
* Philox words, uniforms, Rademacher signs, stochastic-rounding decisions: bit for bit.
* Gaussian z: within GAUSS_ULPS ulps of the pair's radius r = sqrt(-2 log u) (float32). The only
  allowed difference between backends is their float32 log/sin/cos: log <= 2 ulp, sqrt 0.5 ulp,
  sin/cos <= 2 ulp of 1 on [0, 2*pi), then one product: |dz| <= (2 + 0.5 + 0.5) ulp(r) + r*2 ulp(1)
  <= 4 ulp(r) (r >= |z|, so the bound scales with r, not with |z|, which can be ~0 where cos ~ 0).
* Weights after perturb/update with Gaussian noise: error propagated through the float32 formula
  (each z difference above times its scale factor) plus one ulp of every value that is rounded on
  the way (a slightly different input can move a rounding by one step): the restored intermediate
  (storage dtype), the float32 accumulation of sum_k g_k z_k + wd*w, and the stored result.
* Weights with Rademacher noise: bit for bit (z = +-1 makes every product exact except the final
  rounding, which every backend does the same way).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import zofo_kernels as zk
from helpers import backend_cases
from tolerances import GAUSS_ULPS, PRINTED_8_DIGITS, ulp
from zofo_kernels.core import contract
from zofo_kernels.core.backends import base

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

_RNG_SEED = int.from_bytes(os.urandom(4), "little")
RNG = np.random.default_rng(_RNG_SEED)


CASES = backend_cases()


def gauss_radius(seed, start, numel, direction):
    """Radius r of the Box-Muller pair each element belongs to (reference values)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float64)
    first = start - start % 4
    z = contract.gaussian(seed, first, start + numel - first, direction).astype(np.float64)
    z = np.concatenate([z, np.zeros((-len(z)) % 2)])
    pairs = z.reshape(-1, 2)
    r = np.repeat(np.sqrt((pairs ** 2).sum(axis=1)), 2)
    return torch.from_numpy(r[start - first: start - first + numel])


def z_tolerance(seed, start, numel, direction, distribution):
    if distribution == "rademacher":
        return torch.zeros(numel, dtype=torch.float64)
    return GAUSS_ULPS * ulp(gauss_radius(seed, start, numel, direction).float(), torch.float32)


def random_seed():
    return int(RNG.integers(0, 2 ** 63 - 1))


def msg(**kw):
    return f"(test rng seed {_RNG_SEED}; " + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"


# ------------------------------------------------------------------------- known answers

def test_philox_known_answers():
    out = contract.philox4x32([0], [0], [0], [0], 0)
    assert [int(w[0]) for w in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    out = contract.philox4x32([ones], [ones], [ones], [ones], (ones << 32) | ones)
    assert [int(w[0]) for w in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


GAUSS_KNOWN = [
    (1234, 0, 0, [-0.44222745, 1.59436655, -0.94150925, 0.61516333, 0.11843181, 0.73432505,
                  1.32964003, 2.09871960]),
    (7, 5_000_000_000, 3, [0.53333682, -0.23873316, 1.37519264, 0.64634657]),
]
RADE_KNOWN = [
    (0, 0, 0, "+-+-+-++---+-+++"),
    (2 ** 40 + 7, 2 ** 33 + 5, 1, "+++-+-++"),
]


@pytest.mark.parametrize("backend,device", CASES)
def test_noise_known_answers(backend, device):
    for seed, start, k, expected in GAUSS_KNOWN:
        z = zk.noise(seed, start, len(expected), "gaussian", k, backend=backend, device=device)
        assert z.dtype == torch.float32 and z.device.type == device
        # known answers are printed to 8 significant digits
        torch.testing.assert_close(z.cpu().double(), torch.tensor(expected, dtype=torch.float64),
                                   **PRINTED_8_DIGITS)
    for seed, start, k, signs in RADE_KNOWN:
        z = zk.noise(seed, start, len(signs), "rademacher", k, backend=backend, device=device)
        assert "".join("+" if v > 0 else "-" for v in z.cpu().tolist()) == signs


# ------------------------------------------------------------------------- noise vs contract

NOISE_SIZES = [1, 3, 4, 127, 128, 129, 1000, 4099]


@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("backend,device", CASES)
def test_noise_matches_contract(backend, device, distribution):
    for numel in NOISE_SIZES:
        seed = random_seed()
        start = int(RNG.choice([0, int(RNG.integers(0, 1000)), 2 ** 32 - 3,
                                int(RNG.integers(2 ** 32, 2 ** 50))]))
        k = int(RNG.integers(0, 5))
        ref = torch.from_numpy(contract.noise(seed, start, numel, distribution, k))
        got = zk.noise(seed, start, numel, distribution, k, backend=backend, device=device).cpu()
        info = msg(seed=seed, start=start, numel=numel, direction=k)
        if distribution == "rademacher":
            assert torch.equal(got, ref), info
        else:
            err = (got.double() - ref.double()).abs()
            tol = z_tolerance(seed, start, numel, k, distribution)
            assert bool((err <= tol).all()), f"max err/tol {(err / tol).max():.2f} {info}"


@pytest.mark.parametrize("backend,device", CASES)
def test_noise_empty_and_range_errors(backend, device):
    assert zk.noise(5, 10, 0, backend=backend, device=device).numel() == 0
    with pytest.raises(ValueError, match="2\\*\\*63"):
        zk.noise(5, 2 ** 63 - 2, 5, backend=backend, device=device)


# ------------------------------------------------------------------------- statistics

def _stats_backend():
    return "cpu" if zk.available_backends()["cpu"].available else "reference"


def test_gaussian_statistics():
    from scipy import stats

    n = 1 << 20
    be = _stats_backend()
    for seed, start in [(1, 0), (2 ** 62 + 11, 2 ** 40 + 3)]:
        z = zk.noise(seed, start, n, "gaussian", backend=be).double()
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
        assert abs(stats.kurtosis(z.numpy())) < 5 * math.sqrt(24 / n)
        assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
        z1 = zk.noise(seed, start, n, "gaussian", direction=1, backend=be).double()
        assert abs(torch.corrcoef(torch.stack([z, z1]))[0, 1].item()) < 5 / math.sqrt(n)
        for lag in (1, 2, 4, 128):  # within a Box-Muller pair, across pairs, across blocks
            c = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
            assert abs(c) < 5 / math.sqrt(n), f"lag {lag}: corr {c}"
        # pairs: cos and sin of one angle are uncorrelated, and their squares too
        c2 = torch.corrcoef(torch.stack([z[0::2] ** 2, z[1::2] ** 2]))[0, 1].item()
        assert abs(c2) < 0.05 + 5 / math.sqrt(n / 2)


def test_rademacher_statistics():
    n = 1 << 20
    be = _stats_backend()
    for seed, start in [(3, 0), (2 ** 45 + 1, 2 ** 33 + 77)]:
        z = zk.noise(seed, start, n, "rademacher", backend=be).double()
        assert set(torch.unique(z).tolist()) == {-1.0, 1.0}
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        z1 = zk.noise(seed, start, n, "rademacher", direction=1, backend=be).double()
        assert abs((z * z1).mean().item()) < 5 / math.sqrt(n)
        for lag in (1, 31, 32, 128, 129):  # within a word, across words, across blocks
            c = (z[:-lag] * z[lag:]).mean().item()
            assert abs(c) < 5 / math.sqrt(n), f"lag {lag}: {c}"
        zs = zk.noise(seed + 1, start, n, "rademacher", backend=be).double()
        assert abs((z * zs).mean().item()) < 5 / math.sqrt(n)


# ------------------------------------------------------------------------- weights vs reference

def make_weights(dtype, device, sizes=(0, 1, 7, 128, 129, 1031)):
    ts = [(torch.randn(n, generator=torch.Generator().manual_seed(int(RNG.integers(1 << 30))))
           * 0.05).to(dtype) for n in sizes]
    mat = (torch.randn(9, 13) * 0.05).to(dtype).t()  # non-contiguous (a transposed view)
    ts.append(mat)
    return [t.to(device) for t in ts]


def clone_all(ts):
    return [t.clone() for t in ts]


def assert_weights_close(got, ref, dtype, distribution, tol_list, info):
    """Rademacher: bit for bit. Gaussian: |got - ref| <= ulp(ref) + tol_list[j] elementwise."""
    for j, (g, r) in enumerate(zip(got, ref)):
        g, r = g.cpu(), r.cpu()
        assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride()
        if distribution == "rademacher":
            assert torch.equal(g, r), f"tensor {j} differs {info}"
        else:
            err = (g.double() - r.double()).abs().reshape(-1)
            tol = ulp(r, dtype).reshape(-1) + tol_list[j]
            assert bool((err <= tol).all()), f"tensor {j}: max err/tol {(err / tol).max():.2f} {info}"


def z_tol(seed, offset, t, direction, distribution):
    return z_tolerance(seed, offset, t.numel(), direction, distribution)


def restored_reference(ts, seed, offsets, distribution, restore_scale, restore_direction):
    """The intermediate w = rn(p + rs * z_r) each fused kernel rounds to (reference backend)."""
    mid = [t.cpu().clone() for t in ts]
    zk.perturb_(mid, seed, 0.0, distribution, offsets=offsets, backend="reference",
                restore_scale=restore_scale, restore_direction=restore_direction)
    return mid


@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_perturb_matches_reference(backend, device, dtype, distribution):
    ts = make_weights(dtype, device)
    ref = [t.cpu().clone() for t in ts]
    seed = random_seed()
    offsets = [int(RNG.integers(0, 2 ** 34)) * 2000 for _ in ts]  # sparse, beyond 2**32
    offsets = sorted(set(offsets))
    while len(offsets) < len(ts):
        offsets.append(offsets[-1] + 5000)
    scale, k, rs, rk = 1e-2, int(RNG.integers(0, 4)), -1e-2, int(RNG.integers(0, 4))
    info = msg(seed=seed, offsets=offsets, k=k)
    zk.perturb_(ts, seed, scale, distribution, k, offsets=offsets, backend=backend)
    zk.perturb_(ref, seed, scale, distribution, k, offsets=offsets, backend="reference")
    tol = [scale * z_tol(seed, o, t, k, distribution) for o, t in zip(offsets, ts)]
    assert_weights_close(ts, ref, dtype, distribution, tol, info)
    # fused direction switch: restore direction k, perturb direction rk
    ref = [t.cpu().clone() for t in ts]
    mid = restored_reference(ref, seed, offsets, distribution, rs, k)
    zk.perturb_(ts, seed, scale, distribution, rk, offsets=offsets, backend=backend,
                restore_scale=rs, restore_direction=k)
    zk.perturb_(ref, seed, scale, distribution, rk, offsets=offsets, backend="reference",
                restore_scale=rs, restore_direction=k)
    tol = [ulp(m, dtype).reshape(-1) + abs(rs) * z_tol(seed, o, t, k, distribution)
           + scale * z_tol(seed, o, t, rk, distribution) for o, t, m in zip(offsets, ts, mid)]
    assert_weights_close(ts, ref, dtype, distribution, tol, info)


@pytest.mark.parametrize("stochastic_rounding", [True, False])
@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_update_matches_reference(backend, device, dtype, distribution, stochastic_rounding):
    ts = make_weights(dtype, device)
    seed = random_seed()
    q = int(RNG.integers(1, 4))
    grads = [float(g) for g in RNG.normal(size=q) * 3]
    eps, lr, wd = 1e-3, 3e-3, 0.1
    zk.perturb_(ts, seed, eps, distribution, q - 1, backend="reference")  # still applied
    ref = [t.cpu().clone() for t in ts]
    offsets = zk.canonical_offsets(ts)
    mid = restored_reference(ref, seed, offsets, distribution, -eps, q - 1)
    kw = dict(lr=lr, restore_scale=-eps, weight_decay=wd, distribution=distribution,
              stochastic_rounding=stochastic_rounding)
    dev_grads = [torch.tensor(g, device=device) for g in grads]  # device scalars accepted
    zk.zo_update_(ts, seed, projected_grads=dev_grads, backend=backend, **kw)
    zk.zo_update_(ref, seed, projected_grads=grads, backend="reference", **kw)
    tol = []
    for o, t, m in zip(offsets, ts, mid):
        n = t.numel()
        w = m.reshape(-1).double()
        # bound on |d| = |sum_k g_k z_k + wd w| and on each partial sum: every float32 rounding of
        # the accumulation may move by one ulp of that bound when the z's differ slightly
        dmax = wd * w.abs()
        dz = torch.zeros(n, dtype=torch.float64)
        for k, g in enumerate(grads):
            dmax = dmax + abs(g) * torch.from_numpy(
                np.abs(contract.noise(seed, o, n, distribution, k)).astype(np.float64))
            dz = dz + abs(g) * z_tol(seed, o, t, k, distribution)
        accumulation = (q + 2) * ulp(dmax.float(), torch.float32)
        t_restore = ulp(m, dtype).reshape(-1) + eps * z_tol(seed, o, t, q - 1, distribution)
        tol.append(t_restore * (1 + lr * wd) + lr * (dz + accumulation)
                   + ulp((w + lr * dmax).float(), torch.float32))
    assert_weights_close(ts, ref, dtype, distribution, tol, msg(seed=seed, q=q))


@pytest.mark.parametrize("backend,device", CASES)
def test_update_without_restore_and_zero_lr(backend, device):
    w = (torch.randn(777) * 0.02).to(device)
    w0 = w.clone()
    zk.zo_update_(w, 9, lr=0.0, projected_grads=[1.0], backend=backend)
    assert torch.equal(w, w0)  # p - 0 * d == p exactly
    zk.zo_update_(w, 9, lr=1e-3, projected_grads=[0.0], weight_decay=0.0, backend=backend)
    assert torch.equal(w, w0)  # d == 0


# ------------------------------------------------------------------------- layout invariance

@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("backend,device", CASES)
def test_chunk_invariance(backend, device, distribution):
    n = 1537
    seed = random_seed()
    base_off = int(RNG.integers(0, 2 ** 40))
    whole = (torch.randn(n) * 0.02).to(device)
    pieces_src = whole.clone()
    zk.perturb_(whole, seed, 0.5, distribution, offsets=[base_off], backend=backend)
    cuts = sorted(set(int(c) for c in RNG.integers(1, n, size=5)))
    bounds = [0] + cuts + [n]
    pieces = [pieces_src[a:b].clone() for a, b in zip(bounds, bounds[1:])]
    rng_order = RNG.permutation(len(pieces))  # order of the list must not matter
    zk.perturb_([pieces[i] for i in rng_order], seed, 0.5, distribution,
                offsets=[base_off + bounds[i] for i in rng_order], backend=backend)
    assert torch.equal(torch.cat(pieces), whole)
    # a list of tensors in the canonical layout equals the same elements as one flat tensor
    shapes = [(3, 5), (7,), (2, 2, 2), (100,)]
    ts = [(torch.randn(s) * 0.02).to(device) for s in shapes]
    flat = torch.cat([t.reshape(-1) for t in ts])
    zk.zo_update_(ts, seed, lr=0.1, projected_grads=[0.7], weight_decay=0.01,
                  distribution=distribution, backend=backend)
    zk.zo_update_(flat, seed, lr=0.1, projected_grads=[0.7], weight_decay=0.01,
                  distribution=distribution, backend=backend)
    assert torch.equal(torch.cat([t.reshape(-1) for t in ts]), flat)


@pytest.mark.parametrize("backend,device", CASES)
def test_non_contiguous_equals_contiguous(backend, device):
    base_t = (torch.randn(33, 17) * 0.02).to(device)
    view = base_t.t()  # non-contiguous; element j is row-major position j of the view
    dense = view.contiguous()
    zk.perturb_(view, 77, 1e-2, "rademacher", backend=backend)
    zk.perturb_(dense, 77, 1e-2, "rademacher", backend=backend)
    assert torch.equal(view, dense)
    sliced = (torch.randn(40) * 0.02).to(device)[::3]
    dense = sliced.contiguous()
    zk.perturb_(sliced, 78, 1e-2, "rademacher", backend=backend)
    zk.perturb_(dense, 78, 1e-2, "rademacher", backend=backend)
    assert torch.equal(sliced, dense)


# ------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_round_trip(backend, device, dtype, capsys):
    """perturb(+eps) then perturb(-eps): equal to the reference, and how close to the original.

    Measured bound: the error is at most 1 ulp of w + eps*z, and it exceeds half an ulp only where
    the second rounding is an exact tie (w1 - s lies exactly halfway between two storage values,
    and round-half-to-even picks the neighbour of w). The test checks both statements."""
    n = 20011
    w0 = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype).to(device)
    seed = random_seed()
    for eps in (1e-3, 1e-2):
        w = w0.clone()
        zk.perturb_(w, seed, eps, "rademacher", backend=backend)
        w1 = w.clone()
        zk.perturb_(w, seed, -eps, "rademacher", backend=backend)
        ref = w0.cpu().clone()
        zk.perturb_(ref, seed, eps, "rademacher", backend="reference")
        zk.perturb_(ref, seed, -eps, "rademacher", backend="reference")
        assert torch.equal(w.cpu(), ref)
        err_ulps = ((w.cpu().double() - w0.cpu().double()).abs() / ulp(w1, dtype))
        exact = (w.cpu() == w0.cpu()).double().mean().item()
        assert err_ulps.max().item() <= 1.0
        over_half = err_ulps > 0.5
        if over_half.any():
            s = np.float32(eps) * contract.rademacher(seed, 0, n)
            middle = w1.cpu().double() - torch.from_numpy(s.astype(np.float64))
            lo = w.cpu().double()
            half = ulp(torch.minimum(middle.abs(), lo.abs()), dtype) / 2
            dist = (middle - lo).abs()
            # within the rounding half-ulp of the result (ties are exactly at it)
            assert bool((dist[over_half] <= half[over_half] * 1.0000001).all())
        with capsys.disabled():
            print(f"\n  round trip {backend} {dtype} eps={eps}: exact {exact:.1%}, "
                  f"worst {err_ulps.max().item():.2f} ulp of w+eps*z, "
                  f"{over_half.double().mean().item():.2%} above half an ulp (ties)")


# ------------------------------------------------------------------------- stochastic rounding

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_stochastic_rounding_is_unbiased(backend, device, dtype):
    """w just below 1 decays by a factor (1 - lr*wd), a change below half an ulp of w.

    Round to nearest keeps w unchanged; stochastic rounding moves the mean by the right amount.
    Statistical bound: each element rounds to one of two neighbours a <= v < a + u with
    P(up) = (v - a)/u, so the mean over N independent draws has standard deviation
    u*sqrt(p(1-p)/N); we allow 5 of them (plus the float32 error of v itself)."""
    n, seeds = 4099, 12
    # (start, lr): start exactly representable; lr*start < half an ulp (2**-9 bf16, 2**-12 fp16)
    start, lr = {torch.bfloat16: (1 - 2.0 ** -8, 1e-3), torch.float16: (1 - 2.0 ** -11, 1e-4)}[dtype]
    means = []
    for s in range(seeds):
        w = torch.full((n,), start, dtype=dtype, device=device)
        zk.zo_update_(w, 1000 + s, lr=lr, projected_grads=[0.0], weight_decay=1.0,
                      backend=backend, stochastic_rounding=True)
        means.append(w.double().mean().item())
        rn = torch.full((n,), start, dtype=dtype, device=device)
        zk.zo_update_(rn, 1000 + s, lr=lr, projected_grads=[0.0], weight_decay=1.0,
                      backend=backend, stochastic_rounding=False)
        assert torch.equal(rn, torch.full_like(rn, start)), "round to nearest should stall"
    target = float(np.float32(start) - np.float32(lr) * np.float32(start))
    u = ulp(torch.tensor(target), dtype).item()
    lower = math.floor(target / u) * u  # the representable neighbour below (target > 0)
    p = (target - lower) / u
    assert 0.05 < p < 0.95, "the test needs a value well inside a rounding interval"
    sd = u * math.sqrt(p * (1 - p) / (n * seeds))
    mean = float(np.mean(means))
    assert abs(mean - target) < 5 * sd + 1e-7, f"mean {mean} target {target} sd {sd}"


@pytest.mark.parametrize("backend,device", CASES)
def test_stochastic_rounding_subnormal_float16(backend, device):
    """float16 subnormals and values below the smallest subnormal round unbiasedly too."""
    n = 8191
    for start in (3 * 2.0 ** -24, 2.0 ** -24):
        w = torch.full((n,), start, dtype=torch.float16, device=device)
        ref = w.cpu().clone()
        # v = start * (1 - lr*wd) with lr*wd = 0.3: below one subnormal step
        zk.zo_update_(w, 4242, lr=0.3, projected_grads=[0.0], weight_decay=1.0, backend=backend)
        zk.zo_update_(ref, 4242, lr=0.3, projected_grads=[0.0], weight_decay=1.0,
                      backend="reference")
        assert torch.equal(w.cpu(), ref)
        target = start * (1 - 0.3)
        sd = 2.0 ** -24 * 0.5 / math.sqrt(n)
        assert abs(w.double().mean().item() - target) < 5 * sd


# ------------------------------------------------------------------------- bad input

def _unchanged_after(fn, ts):
    before = [t.clone() for t in ts]
    fn()
    return all(torch.equal(a, b) for a, b in zip(before, ts))


def _inference_tensor():
    with torch.inference_mode():
        return torch.zeros(4)


BAD_CALLS = [
    ("int tensor", lambda w: zk.perturb_([w, torch.zeros(3, dtype=torch.int32)], 1, 0.1),
     TypeError, "dtype"),
    ("float64 tensor", lambda w: zk.perturb_([w, torch.zeros(3, dtype=torch.float64)], 1, 0.1),
     TypeError, "float64"),
    ("not a tensor", lambda w: zk.perturb_([w, [1.0, 2.0]], 1, 0.1), TypeError, "torch.Tensor"),
    ("two devices", lambda w: zk.perturb_([w, torch.zeros(3, device="meta")], 1, 0.1),
     ValueError, "device"),
    ("expanded view", lambda w: zk.perturb_([w, torch.zeros(1).expand(4)], 1, 0.1),
     ValueError, "overlapping"),
    ("aliasing tensors", lambda w: zk.perturb_([w, w[2:5]], 1, 0.1), ValueError, "share memory"),
    ("negative seed", lambda w: zk.perturb_(w, -1, 0.1), ValueError, "seed"),
    ("seed too large", lambda w: zk.perturb_(w, 2 ** 63, 0.1), ValueError, "seed"),
    ("float seed", lambda w: zk.perturb_(w, 1.5, 0.1), TypeError, "seed"),
    ("bool seed", lambda w: zk.perturb_(w, True, 0.1), TypeError, "seed"),
    ("nan scale", lambda w: zk.perturb_(w, 1, float("nan")), ValueError, "scale"),
    ("bad distribution", lambda w: zk.perturb_(w, 1, 0.1, "uniform"), ValueError, "distribution"),
    ("negative direction", lambda w: zk.perturb_(w, 1, 0.1, direction=-1), ValueError, "direction"),
    ("offsets length", lambda w: zk.perturb_(w, 1, 0.1, offsets=[0, 5]), ValueError, "offsets"),
    ("negative offset", lambda w: zk.perturb_(w, 1, 0.1, offsets=[-3]), ValueError, "offsets"),
    ("overlapping offsets", lambda w: zk.perturb_([w, torch.zeros(4)], 1, 0.1, offsets=[0, 3]),
     ValueError, "overlap"),
    ("offsets past 2**63", lambda w: zk.perturb_(w, 1, 0.1, offsets=[2 ** 63 - 2]), ValueError,
     "2\\*\\*63"),
    ("restore without direction", lambda w: zk.perturb_(w, 1, 0.1, restore_scale=0.1),
     ValueError, "restore_direction"),
    ("no projected grads", lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=[]),
     ValueError, "projected_grads"),
    ("projected grads not a sequence", lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=3.0),
     TypeError, "projected_grads"),
    ("2-D projected grads",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=torch.zeros(2, 2)), ValueError,
     "projected_grads"),
    ("vector inside projected grads",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=[torch.zeros(3)]), ValueError,
     "projected_grads"),
    ("nan projected grad", lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=[float("inf")]),
     ValueError, "projected_grads"),
    ("nan lr", lambda w: zk.zo_update_(w, 1, lr=float("nan"), projected_grads=[1.0]), ValueError,
     "lr"),
    ("string weight decay",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=[1.0], weight_decay="0.1"), TypeError,
     "weight_decay"),
    ("unknown backend", lambda w: zk.perturb_(w, 1, 0.1, backend="tpu"), ValueError, "backend"),
    # issue 12, item 2: finite as a Python float, not after the rounding to float32
    ("scale overflows float32", lambda w: zk.perturb_(w, 1, 1e39), ValueError, "float32"),
    ("restore scale overflows float32",
     lambda w: zk.perturb_(w, 1, 0.1, restore_scale=1e39, restore_direction=0), ValueError,
     "float32"),
    ("scale rounds to 0", lambda w: zk.perturb_(w, 1, 1e-46), ValueError, "rounds to 0"),
    ("lr overflows float32", lambda w: zk.zo_update_(w, 1, lr=1e39, projected_grads=[1.0]),
     ValueError, "lr"),
    ("lr rounds to 0", lambda w: zk.zo_update_(w, 1, lr=1e-46, projected_grads=[1.0]),
     ValueError, "rounds to 0"),
    ("weight decay overflows float32",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=[1.0], weight_decay=1e39),
     ValueError, "weight_decay"),
    ("projected grad overflows float32",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=[1.0, 1e39]), ValueError,
     "projected_grads"),
    # item 3: non-finite projected gradients given as tensors
    ("nan tensor projected grads",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=torch.tensor([float("nan")])),
     ValueError, "projected_grads"),
    ("nan 0-d tensor projected grad",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=torch.tensor(float("nan"))),
     ValueError, "projected_grads"),
    ("inf tensor inside projected grads",
     lambda w: zk.zo_update_(w, 1, lr=0.1, projected_grads=[1.0, torch.tensor([float("inf")])]),
     ValueError, "projected_grads"),
    ("float64 tensor projected grad overflowing float32",
     lambda w: zk.zo_update_(w, 1, lr=0.1,
                             projected_grads=torch.tensor([1e39], dtype=torch.float64)),
     ValueError, "projected_grads"),
    # item 4: overlap that torch's own test calls "too hard"
    ("overlapping unfold", lambda w: zk.perturb_(w.unfold(0, 4, 2), 1, 0.1), ValueError,
     "overlapping"),
    ("overlapping as_strided", lambda w: zk.perturb_(w.as_strided((3, 3), (2, 1)), 1, 0.1),
     ValueError, "overlapping"),
    ("as_strided views sharing elements",
     lambda w: zk.perturb_([w.as_strided((3,), (3,)), w.as_strided((2,), (3,), 3)], 1, 0.1),
     ValueError, "share memory"),
    # item 6: an inference tensor after a normal one (the first must not be perturbed)
    ("inference tensor", lambda w: zk.perturb_([w, _inference_tensor()], 1, 0.1), ValueError,
     "inference"),
    ("inference tensor, update",
     lambda w: zk.zo_update_([w, _inference_tensor()], 1, lr=0.1, projected_grads=[1.0],
                             restore_scale=0.1), ValueError, "inference"),
    # item 14
    ("bool tensor seed", lambda w: zk.perturb_(w, torch.tensor(True), 0.1), TypeError, "seed"),
    ("numpy bool seed", lambda w: zk.perturb_(w, np.True_, 0.1), TypeError, "seed"),
    ("multi-element tensor seed", lambda w: zk.perturb_(w, torch.tensor([1, 2]), 0.1),
     ValueError, "seed"),
    ("multi-element tensor offset",
     lambda w: zk.perturb_(w, 1, 0.1, offsets=[torch.tensor([0, 1])]), ValueError, "offsets"),
    ("multi-element tensor direction",
     lambda w: zk.perturb_(w, 1, 0.1, direction=torch.tensor([0, 1])), ValueError,
     "direction"),
    ("empty backend name", lambda w: zk.perturb_(w, 1, 0.1, backend=""), ValueError, "backend"),
    ("sparse tensor", lambda w: zk.perturb_([w, torch.ones(4).to_sparse()], 1, 0.1), TypeError,
     "sparse"),
]


@pytest.mark.parametrize("name,call,exc,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_before_any_write(name, call, exc, pattern):
    w = torch.randn(10)
    with pytest.raises(exc, match=pattern):
        call(w)
    assert _unchanged_after(lambda: None, [w])
    w_before = w.clone()
    with pytest.raises(exc):
        call(w)
    assert torch.equal(w, w_before), "a rejected call must not touch the weights"


def test_unavailable_backend_raises_with_reason(monkeypatch):
    statuses = zk.available_backends()
    missing = [n for n, s in statuses.items() if not s.available]
    if not missing:
        pytest.skip("every backend is available on this machine")
    name = missing[0]
    with pytest.raises(zk.BackendUnavailableError, match=name) as info:
        zk.perturb_(torch.zeros(3), 1, 0.1, backend=name)
    assert statuses[name].reason and statuses[name].reason in str(info.value)


def test_environment_variable_selects_backend(monkeypatch):
    calls = []
    ref = base.get("reference")
    original = type(ref).perturb

    def spy(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(ref), "perturb", spy)
    monkeypatch.setenv("ZOFO_BACKEND", "reference")
    zk.perturb_(torch.zeros(5), 1, 0.1)
    assert calls == ["reference"]
    monkeypatch.setenv("ZOFO_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        zk.perturb_(torch.zeros(5), 1, 0.1)


def test_one_backend_call_per_dtype_group(monkeypatch):
    calls = []
    ref = base.get("reference")
    original = type(ref).update

    def spy(self, tensors, *args, **kwargs):
        calls.append((tensors[0].dtype, len(tensors)))
        return original(self, tensors, *args, **kwargs)

    monkeypatch.setattr(type(ref), "update", spy)
    ts = [torch.zeros(3), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(5),
          torch.zeros(0), torch.zeros(6, dtype=torch.bfloat16)]
    zk.zo_update_(ts, 1, lr=0.1, projected_grads=[1.0], backend="reference")
    assert sorted(calls, key=str) == sorted([(torch.float32, 2), (torch.bfloat16, 2)], key=str)


def _code_tables(layer):
    """(dtype codes, distribution codes) a kernel layer uses, keyed as base's tables are."""
    if layer == "native":  # zofo_noise.h's DType and Distribution, as the module exports them
        from zofo_kernels.core.backends.native import loader as _native
        mod, err = _native.cpu_module()
        if mod is None:
            pytest.skip(f"native CPU module unavailable: {err}")
        return ({dtype: getattr(mod, f"dtype_{str(dtype).split('.')[-1]}")
                 for dtype in base.DTYPE_CODES},
                {dist: getattr(mod, dist) for dist in base.DISTRIBUTION_CODES})
    tk = base.get("triton")._load()  # the Triton kernels' STORAGE_* and DIST_* constants
    if tk is None:
        pytest.skip(f"Triton kernels unavailable: {base.get('triton').status().reason}")
    return ({dtype: getattr(tk, f"STORAGE_{str(dtype).split('.')[-1].upper()}").value
             for dtype in base.DTYPE_CODES},
            {dist: getattr(tk, f"DIST_{dist.upper()}").value for dist in base.DISTRIBUTION_CODES})


@pytest.mark.parametrize("layer", ["native", "triton"])
def test_dtype_and_distribution_codes_agree_across_kernel_layers(layer):
    """The three tables of codes (base.DTYPE_CODES / DISTRIBUTION_CODES, which the backends
    send; zofo_noise.h's enums; the Triton kernels' constants) give every storage dtype and
    every distribution the same, distinct number."""
    dtypes, dists = _code_tables(layer)
    assert dtypes == base.DTYPE_CODES
    assert dists == base.DISTRIBUTION_CODES
    assert len(set(dtypes.values())) == len(dtypes) and len(set(dists.values())) == len(dists)
    assert set(base.DISTRIBUTION_CODES) == set(contract.DISTRIBUTIONS)


def test_available_backends_reports_reasons():
    st = zk.available_backends()
    assert set(st) == {"reference", "cpu", "cuda", "triton"}
    assert st["reference"].available
    for s in st.values():
        assert isinstance(s.reason, str) and s.reason
    if not torch.cuda.is_available():
        assert not st["cuda"].available


def test_autograd_leaf_parameters_are_updated_in_place():
    p = torch.nn.Parameter(torch.randn(50) * 0.02)
    before = p.detach().clone()
    zk.perturb_([p], 3, 0.1, "rademacher")
    z = zk.noise(3, 0, 50, "rademacher")
    assert torch.equal(p.detach(), before + torch.tensor(np.float32(0.1)) * z)
    assert p.grad is None


# ------------------------------------------------------------------------- issue 12

@pytest.mark.parametrize("op", ["perturb", "update"])
@pytest.mark.parametrize("backend,device", CASES)
def test_kernel_calls_bump_the_autograd_version_counter(backend, device, op):
    """Item 5: like an in-place torch op, so a backward through a graph that saved the weight
    before the call raises torch's usual error instead of using the new values."""
    p = torch.nn.Parameter(torch.randn(300, device=device) * 0.02)
    v0 = p._version
    y = (p * p).sum()  # saves p
    if op == "perturb":
        zk.perturb_([p], 3, 0.1, "rademacher", backend=backend)
    else:
        zk.zo_update_([p], 3, lr=0.1, projected_grads=[1.0], backend=backend)
    assert p._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # a non-contiguous tensor (written through a staging copy) and a view of a leaf
    base_t = torch.randn(20, 30, device=device).t()
    v1 = base_t._version
    zk.perturb_([base_t], 3, 0.1, backend=backend)
    assert base_t._version > v1


@pytest.mark.parametrize("backend,device", CASES)
def test_inference_tensor_in_the_list_is_refused_before_any_write(backend, device):
    """Item 6: all checks run before the first tensor is written."""
    a = torch.randn(300, device=device)
    with torch.inference_mode():
        b = torch.randn(300, device=device)
    before = [a.clone(), b.clone()]
    with pytest.raises(ValueError, match="inference"):
        zk.perturb_([a, b], 1, 0.1, backend=backend)
    with pytest.raises(ValueError, match="inference"):
        zk.zo_update_([a, b], 1, lr=0.1, projected_grads=[1.0], backend=backend)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    with torch.inference_mode():  # inside inference mode the inference tensor is writable
        zk.perturb_([b], 1, 0.1, backend=backend)
    assert not torch.equal(b, before[1])


@pytest.mark.parametrize("backend,device", CASES)
def test_disjoint_interleaved_views_are_accepted_and_match_separate_tensors(backend, device):
    """Item 4: views that share a storage but no element, e.g. the two columns of
    x.view(n, 2), the even and odd elements, disjoint as_strided windows."""
    x = torch.randn(2 * 257, device=device)
    cases = [
        lambda t: [t.view(257, 2)[:, 0], t.view(257, 2)[:, 1]],
        lambda t: [t[::2], t[1::2]],
        lambda t: [t[:508].unfold(0, 4, 4)],                   # windows that do not overlap
        lambda t: [t.as_strided((3, 2), (2, 3))],               # not nested, still disjoint
        lambda t: [t.view(2, 257)[:, :100], t.view(2, 257)[:, 100:]],
    ]
    for make in cases:
        t = x.clone()
        views = make(t)
        copies = [v.clone() for v in views]
        zk.zo_update_(views, 5, lr=0.1, projected_grads=[0.7], restore_scale=0.01,
                      backend=backend)
        zk.zo_update_(copies, 5, lr=0.1, projected_grads=[0.7], restore_scale=0.01,
                      backend=backend)
        for v, c in zip(views, copies):
            assert torch.equal(v, c)
        assert not torch.equal(t, x)


def _brute_force_overlap(views, itemsize):
    """Whether two elements (over all views) share a byte, by listing every byte."""
    seen = set()
    for v in views:
        base_ptr = v.data_ptr()
        for idx in np.ndindex(*v.shape) if v.dim() else [()]:
            start = base_ptr + sum(i * s for i, s in zip(idx, v.stride())) * itemsize
            for byte in range(start, start + itemsize):
                if byte in seen:
                    return True
                seen.add(byte)
    return False


def test_overlap_decision_is_exact_on_random_strided_views():
    """Item 4: the overlap test agrees with a brute-force listing of bytes, for single views
    and for pairs, over random sizes, strides and storage offsets (below the enumeration
    limit, where it is documented exact)."""
    from zofo_kernels.core import ops

    rng = np.random.default_rng(_RNG_SEED)
    buf = torch.zeros(4096)
    agree = {True: 0, False: 0}
    for _ in range(600):
        views = []
        for _ in range(rng.integers(1, 3)):
            dim = int(rng.integers(1, 4))
            shape = tuple(int(n) for n in rng.integers(1, 5, dim))
            stride = tuple(int(s) for s in rng.integers(0, 7, dim))
            views.append(buf.as_strided(shape, stride, int(rng.integers(0, 20))))
        expect = _brute_force_overlap(views, 4)
        try:
            ops._check_tensors(views)
            got = False
        except ValueError as exc:
            assert "overlap" in str(exc) or "share memory" in str(exc)
            got = True
        assert got == expect, [(v.shape, v.stride(), v.storage_offset()) for v in views]
        agree[expect] += 1
    assert agree[True] > 50 and agree[False] > 50  # both answers were exercised


def test_noise_on_a_missing_cuda_device_is_a_clear_error():
    """Item 14: not an AssertionError from deep inside torch."""
    if torch.cuda.is_available():
        assert zk.noise(1, 0, 8, device="cuda").device.type == "cuda"
        return
    with pytest.raises(zk.BackendUnavailableError, match="CUDA"):
        zk.noise(1, 0, 8, device="cuda")
    with pytest.raises(ValueError, match="device"):
        zk.noise(1, 0, 8, device="no-such-device")


def test_device_projected_grads_are_checked_and_check_finite_false_skips_only_that():
    """Item 3: host tensors are always checked; check_finite=False only matters for device
    tensors, so on the host it changes nothing."""
    w = torch.randn(10)
    before = w.clone()
    with pytest.raises(ValueError, match="projected_grads"):
        zk.zo_update_(w, 1, lr=0.1, projected_grads=torch.tensor([float("nan")]),
                      check_finite=False)
    assert torch.equal(w, before)
    with pytest.raises(TypeError, match="check_finite"):
        zk.zo_update_(w, 1, lr=0.1, projected_grads=[1.0], check_finite=1)
    if torch.cuda.is_available():
        wd = torch.randn(10, device="cuda")
        bd = wd.clone()
        with pytest.raises(ValueError, match="projected_grads"):
            zk.zo_update_(wd, 1, lr=0.1,
                          projected_grads=torch.tensor([float("nan")], device="cuda"))
        assert torch.equal(wd, bd)
