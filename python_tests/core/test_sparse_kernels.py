"""Sparse perturbation masks on every available backend, against the reference and the contract.

A mask is one int32 bitmap per tensor (``contract.mask_bits``: local element j is bit j % 32 of
word j // 32). ``perturb_`` and ``zo_update_`` with ``mask=`` must leave every element whose
bit is 0 exactly as it was (its bit pattern: no restore, no perturbation, no weight decay, no
rounding, NaN payloads included) and give every element whose bit is 1 exactly what the same
backend's dense call gives it. ``magnitude_mask`` must give ``contract.magnitude_mask_words``
bit for bit (NaN never passes; +-0, +-inf, thresholds 0, -0, negative, infinite, equal to an
element), with the bits past numel 0 and every word written.

Against the reference backend (the oracle), what "equal" means is test_kernels.py's argument,
unchanged: Rademacher results bit for bit; Gaussian results within the error that the allowed
difference of z (GAUSS_ULPS ulp of the Box-Muller radius, python_tests/tolerances.py)
propagates through the float32 formula, plus one ulp of each value rounded on the way. An
element whose bit is 0 has no tolerance on any backend: it must keep its bits.

Inputs are fresh random values on every run (the seed is printed on failure): sizes 1, 31, 33,
127, 129, 1031 and an empty and a transposed (non-contiguous) tensor, global offsets that are
not multiples of 32 or 128, densities from 0 to 1. GPU backends are marked ``gpu`` (visible as
skipped without a GPU); Triton runs through its interpreter when TRITON_INTERPRET=1, so the
tensors stay small.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import zofo_kernels as zk
from helpers import backend_cases
from tolerances import GAUSS_ULPS, ulp
from zofo_kernels.core import contract
from zofo_kernels.core.backends import base

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = (1, 31, 33, 127, 129, 1031, 0)

_RNG_SEED = int.from_bytes(os.urandom(4), "little")
RNG = np.random.default_rng(_RNG_SEED)


CASES = backend_cases()


def msg(**kw):
    return f"(test rng seed {_RNG_SEED}; " + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"


def random_seed():
    return int(RNG.integers(0, 2 ** 63 - 1))


# ------------------------------------------------------------------------- inputs

def make_weights(dtype, device, sizes=SIZES):
    """~N(0, 0.05) tensors of the given sizes plus a transposed (non-contiguous) 9x13 one."""
    ts = [(torch.randn(n, generator=torch.Generator().manual_seed(int(RNG.integers(1 << 30))))
           * 0.05).to(dtype) for n in sizes]
    ts.append((torch.randn(9, 13) * 0.05).to(dtype).t())
    return [t.to(device) for t in ts]


def odd_offsets(ts):
    """Disjoint global offsets, none a multiple of 32 or 128 (random gaps, start past 2**32)."""
    out, o = [], 2 ** 32 + 32 * int(RNG.integers(0, 1000)) + int(RNG.integers(1, 32))
    for t in ts:
        out.append(o)
        o += t.numel() + int(RNG.integers(1, 300))
        o += 1 if o % 32 == 0 else 0
    return out


def bitmap(bits: np.ndarray, device) -> torch.Tensor:
    """The int32 bitmap of a bool array (bits past its end 0)."""
    pad = np.zeros((-bits.size) % 32, dtype=np.uint8)
    packed = np.packbits(np.concatenate([bits.astype(np.uint8), pad]), bitorder="little")
    return torch.from_numpy(packed.view(np.int32).copy()).to(device)


def random_masks(ts, device, densities=(0.5, 0.9, 0.1, 1.0, 0.0, 0.3, 0.7, 0.5)):
    """(bitmaps, kept elements as bool tensors in row-major order), one density per tensor."""
    masks, keeps = [], []
    for i, t in enumerate(ts):
        keep = RNG.random(t.numel()) < densities[i % len(densities)]
        masks.append(bitmap(keep, device))
        keeps.append(torch.from_numpy(keep))
    return masks, keeps


def bits(t: torch.Tensor) -> torch.Tensor:
    """A copy of the storage bit patterns of ``t`` in row-major order, on the CPU."""
    flat = t.detach().cpu().reshape(-1).clone()
    return flat.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def clones(ts):
    return [t.clone() for t in ts]  # clone keeps a transposed view's strides


def assert_masked(after, before, dense, keeps, info):
    """Elements whose bit is 0: the bits they had; bit 1: the bits of the dense call."""
    for j, (a, b, d, keep) in enumerate(zip(after, before, dense, keeps)):
        assert a.shape == b.shape and a.stride() == b.stride()
        a, b, d = bits(a), bits(b), bits(d)
        assert torch.equal(a[~keep], b[~keep]), f"tensor {j}: an element with bit 0 changed {info}"
        assert torch.equal(a[keep], d[keep]), f"tensor {j}: kept elements differ from the dense " \
                                              f"call {info}"


# ------------------------------------------------------------------------- Gaussian tolerance
# test_kernels.py's bounds, per element (see its docstring).

def gauss_radius(seed, start, numel, direction):
    """Radius r of the Box-Muller pair each element belongs to (reference values)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.float64)
    first = start - start % 4
    z = contract.gaussian(seed, first, start + numel - first, direction).astype(np.float64)
    z = np.concatenate([z, np.zeros((-len(z)) % 2)])
    r = np.repeat(np.sqrt((z.reshape(-1, 2) ** 2).sum(axis=1)), 2)
    return torch.from_numpy(r[start - first: start - first + numel])


def z_tol(seed, start, numel, direction, distribution):
    if distribution == "rademacher":
        return torch.zeros(numel, dtype=torch.float64)
    return GAUSS_ULPS * ulp(gauss_radius(seed, start, numel, direction).float(), torch.float32)


def assert_close_to_reference(got, ref, keeps, distribution, tols, info):
    """Rademacher: bit for bit. Gaussian: |got - ref| <= ulp(ref) + tol where the bit is 1,
    bit for bit where it is 0."""
    for j, (g, r, keep) in enumerate(zip(got, ref, keeps)):
        if distribution == "rademacher":
            assert torch.equal(bits(g), bits(r)), f"tensor {j} differs {info}"
            continue
        assert torch.equal(bits(g)[~keep], bits(r)[~keep]), f"tensor {j} {info}"
        gv, rv = g.detach().cpu().reshape(-1).double(), r.detach().cpu().reshape(-1).double()
        err = (gv - rv).abs()[keep]
        tol = (ulp(rv, r.dtype) + tols[j])[keep]
        assert bool((err <= tol).all()), f"tensor {j}: max err/tol {(err / tol).max():.2f} {info}"


def restored(ts, seed, offsets, distribution, rs, rk, masks):
    """The intermediate w = rn(p + rs * z_r) the fused kernels round to (reference)."""
    mid = [t.cpu().clone() for t in ts]
    zk.perturb_(mid, seed, 0.0, distribution, offsets=offsets, backend="reference",
                restore_scale=rs, restore_direction=rk, mask=[m.cpu() for m in masks])
    return mid


def update_tolerance(mid, offsets, seed, distribution, grads, eps, lr, wd):
    """test_kernels.test_update_matches_reference's bound, per tensor."""
    q, tols = len(grads), []
    for o, m in zip(offsets, mid):
        n = m.numel()
        w = m.reshape(-1).double()
        dmax, dz = wd * w.abs(), torch.zeros(n, dtype=torch.float64)
        for k, g in enumerate(grads):
            dmax = dmax + abs(g) * torch.from_numpy(
                np.abs(contract.noise(seed, o, n, distribution, k)).astype(np.float64))
            dz = dz + abs(g) * z_tol(seed, o, n, k, distribution)
        accumulation = (q + 2) * ulp(dmax.float(), torch.float32)
        t_restore = ulp(m, m.dtype).reshape(-1) + eps * z_tol(seed, o, n, q - 1, distribution)
        tols.append(t_restore * (1 + lr * wd) + lr * (dz + accumulation)
                    + ulp((w + lr * dmax).float(), torch.float32))
    return tols


# ------------------------------------------------------------------------- perturb / update

@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_masked_perturb(backend, device, dtype, distribution):
    """Plain, then with the fused restore of another direction (the q-direction switch)."""
    ts = make_weights(dtype, device)
    offsets = odd_offsets(ts)
    masks, keeps = random_masks(ts, device)
    seed, scale = random_seed(), 1e-2
    k, rk, rs = int(RNG.integers(0, 4)), int(RNG.integers(0, 4)), -1e-2
    info = msg(seed=seed, offsets=offsets, k=k, rk=rk)
    for restore in (False, True):
        kw = dict(offsets=offsets, restore_scale=rs if restore else 0.0,
                  restore_direction=k if restore else None)
        before, dense, ref = clones(ts), clones(ts), [t.cpu().clone() for t in ts]
        direction = rk if restore else k
        zk.perturb_(dense, seed, scale, distribution, direction, backend=backend, **kw)
        zk.perturb_(ts, seed, scale, distribution, direction, backend=backend, mask=masks, **kw)
        zk.perturb_(ref, seed, scale, distribution, direction, backend="reference",
                    mask=[m.cpu() for m in masks], **kw)
        assert_masked(ts, before, dense, keeps, info)
        if restore:
            mid = restored(before, seed, offsets, distribution, rs, k, masks)
            tols = [ulp(m, dtype).reshape(-1) + abs(rs) * z_tol(seed, o, t.numel(), k,
                                                                 distribution)
                    + scale * z_tol(seed, o, t.numel(), rk, distribution)
                    for o, t, m in zip(offsets, ts, mid)]
        else:
            tols = [scale * z_tol(seed, o, t.numel(), k, distribution)
                    for o, t in zip(offsets, ts)]
        assert_close_to_reference(ts, ref, keeps, distribution, tols, info)


@pytest.mark.parametrize("stochastic_rounding", [True, False])
@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_masked_update(backend, device, dtype, distribution, stochastic_rounding):
    """q = 2..3 directions, the fused restore of the last one, weight decay, stochastic
    rounding on and off."""
    ts = make_weights(dtype, device)
    offsets = odd_offsets(ts)
    masks, keeps = random_masks(ts, device)
    seed, q = random_seed(), int(RNG.integers(2, 4))
    grads = [float(g) for g in RNG.normal(size=q) * 3]
    eps, lr, wd = 1e-3, 3e-3, 0.1
    zk.perturb_(ts, seed, eps, distribution, q - 1, offsets=offsets, backend="reference")
    before, dense, ref = clones(ts), clones(ts), [t.cpu().clone() for t in ts]
    kw = dict(lr=lr, restore_scale=-eps, weight_decay=wd, distribution=distribution,
              offsets=offsets, stochastic_rounding=stochastic_rounding)
    dev_grads = torch.tensor(grads, device=device)
    zk.zo_update_(dense, seed, projected_grads=dev_grads, backend=backend, **kw)
    zk.zo_update_(ts, seed, projected_grads=dev_grads, backend=backend, mask=masks, **kw)
    zk.zo_update_(ref, seed, projected_grads=grads, backend="reference",
                  mask=[m.cpu() for m in masks], **kw)
    info = msg(seed=seed, q=q, offsets=offsets)
    assert_masked(ts, before, dense, keeps, info)
    mid = restored(before, seed, offsets, distribution, -eps, q - 1, masks)
    tols = update_tolerance(mid, offsets, seed, distribution, grads, eps, lr, wd)
    assert_close_to_reference(ts, ref, keeps, distribution, tols, info)


@pytest.mark.parametrize("distribution", contract.DISTRIBUTIONS)
@pytest.mark.parametrize("backend,device", CASES)
def test_mixed_dtypes_one_call(backend, device, distribution):
    """Through the public API: float32, bfloat16 and float16 tensors (empty and transposed
    ones among them) in one call, each with its own bitmap; the masks follow their tensors
    into the per-dtype groups and the staging copies."""
    ts = [(torch.randn(n) * 0.05).to(dt).to(device) for n, dt in
          [(33, torch.float32), (129, torch.bfloat16), (31, torch.float16), (0, torch.float16),
           (1031, torch.bfloat16), (127, torch.float32)]]
    ts += [(torch.randn(7, 11) * 0.05).to(dt).to(device).t() for dt in DTYPES]
    masks, keeps = random_masks(ts, device)
    seed = random_seed()
    info = msg(seed=seed)
    before, dense, ref = clones(ts), clones(ts), [t.cpu().clone() for t in ts]
    zk.perturb_(dense, seed, 2e-2, distribution, 1, backend=backend)
    zk.perturb_(ts, seed, 2e-2, distribution, 1, backend=backend, mask=masks)
    zk.perturb_(ref, seed, 2e-2, distribution, 1, backend="reference",
                mask=[m.cpu() for m in masks])
    assert_masked(ts, before, dense, keeps, info)
    if distribution == "rademacher":  # Gaussian is the dtype tests' job
        assert_close_to_reference(ts, ref, keeps, distribution, None, info)
    before, dense, ref = clones(ts), clones(ts), [t.cpu().clone() for t in ts]
    kw = dict(lr=1e-2, projected_grads=[0.5, -1.5], restore_scale=-2e-2, weight_decay=0.1,
              distribution=distribution)
    zk.zo_update_(dense, seed, backend=backend, **kw)
    zk.zo_update_(ts, seed, backend=backend, mask=masks, **kw)
    zk.zo_update_(ref, seed, backend="reference", mask=[m.cpu() for m in masks], **kw)
    assert_masked(ts, before, dense, keeps, info)
    if distribution == "rademacher":
        assert_close_to_reference(ts, ref, keeps, distribution, None, info)


SPECIAL_BITS = {  # patterns a dense call would change: NaN payloads, -0, subnormals, huge
    torch.float32: [0x7FA00001, 0xFFC00123, 0x80000000, 0x00000001, 0x7F7FFFFF, 0x7F800000],
    torch.bfloat16: [0x7F81, 0xFFC1, 0x8000, 0x0001, 0x7F7F, 0xFF80],
    torch.float16: [0x7C01, 0xFE01, 0x8000, 0x0001, 0x7BFF, 0xFC00],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_unkept_elements_keep_their_exact_bits(backend, device, dtype):
    """An all-zero bitmap writes nothing (NaN payloads, -0 and subnormals keep their bits,
    even through stochastic rounding and weight decay); an all-ones bitmap gives the dense
    call's bits; bits past numel are ignored (they must not reach the next tensor in memory,
    an adjacent slice of the same buffer)."""
    n = 200
    raw = np.array(SPECIAL_BITS[dtype] * (n // len(SPECIAL_BITS[dtype]) + 1))[:n]
    if dtype == torch.float32:
        raw = raw.astype(np.uint32).view(np.int32)
    else:
        raw = raw.astype(np.uint16).view(np.int16)
    w = torch.from_numpy(raw.copy()).view(dtype)
    w[::3] = (torch.randn(len(w[::3])) * 0.05).to(dtype)
    w = w.to(device)
    zeros, ones = bitmap(np.zeros(n, bool), device), bitmap(np.ones(n, bool), device)
    t = w.clone()
    zk.perturb_(t, 5, 1e-2, "gaussian", 0, backend=backend, mask=[zeros],
                restore_scale=1e-2, restore_direction=1)
    zk.zo_update_(t, 5, lr=1e-2, projected_grads=[1.0, 2.0], weight_decay=0.5,
                  backend=backend, mask=[zeros])
    assert torch.equal(bits(t), bits(w))
    dense, t = w.clone(), w.clone()
    zk.zo_update_(dense, 6, lr=1e-2, projected_grads=[1.0], weight_decay=0.5, backend=backend)
    zk.zo_update_(t, 6, lr=1e-2, projected_grads=[1.0], weight_decay=0.5, backend=backend,
                  mask=[ones])
    assert torch.equal(bits(t), bits(dense))
    # two adjacent slices of one buffer; the first one's bitmap has every bit past numel set
    buf = (torch.randn(64 + 37) * 0.05).to(dtype).to(device)
    a, b = buf[:37], buf[37:]
    before_a, before_b = bits(a), bits(b)
    spill = bitmap(np.ones(64, bool), device)  # 2 words for 37 elements: bits 37..63 set
    zk.perturb_([a, b], 7, 1e-2, "rademacher", backend=backend,
                mask=[spill, bitmap(np.zeros(64, bool), device)])
    assert torch.equal(bits(b), before_b)
    assert bool((bits(a) != before_a).all())  # +-1e-2 moves every value of ~0.05


# ------------------------------------------------------------------------- magnitude_mask

def magnitude_inputs(dtype, device):
    """Odd-sized tensors with NaN, +-inf, +-0, subnormals and a value equal to a threshold,
    and one threshold each (0, -0, negative, infinite, an element's exact magnitude, ...)."""
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 6e-8}[dtype]
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, tiny, -tiny]
    ts = []
    for n in (1, 31, 32, 33, 127, 129, 1031):
        x = torch.randn(n) * 0.05
        idx = RNG.choice(n, size=min(n, len(specials)), replace=False)
        x[torch.from_numpy(idx)] = torch.tensor(specials[: len(idx)])
        ts.append(x.to(dtype))
    ts.append((torch.randn(9, 13) * 0.05).to(dtype).t())  # non-contiguous
    ts.append(torch.zeros(0, dtype=dtype))
    x = ts[5].float()
    exact = float(x[torch.isfinite(x) & (x != 0)][0].abs())  # an element's own magnitude
    thresholds = [0.05, 0.0, -0.0, -0.01, float("inf"), exact, tiny, 0.03, 0.02]
    return [t.to(device) for t in ts], thresholds


def expected_words(t, threshold):
    values = t.detach().cpu().float().reshape(-1).numpy()
    return torch.from_numpy(contract.magnitude_mask_words(values, threshold).view(np.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_magnitude_mask_matches_contract(backend, device, dtype):
    ts, thresholds = magnitude_inputs(dtype, device)
    before = [bits(t) for t in ts]
    masks = zk.magnitude_mask(ts, thresholds, backend=backend)
    assert all(torch.equal(a, bits(t)) for a, t in zip(before, ts)), "a tensor was written"
    kept = total = 0
    for j, (t, th, m) in enumerate(zip(ts, thresholds, masks)):
        assert m.dtype == torch.int32 and m.device == t.device and m.is_contiguous()
        assert m.shape == (contract.mask_words(t.numel()),)
        want = expected_words(t, th)
        assert torch.equal(m.cpu(), want), f"tensor {j} (numel {t.numel()}, threshold {th})"
        if t.numel() % 32:  # bits past numel: 0
            assert int(m[-1].item()) & (0xFFFFFFFF << (t.numel() % 32)) & 0xFFFFFFFF == 0
        kept += int(contract.mask_bits(want.numpy(), 0, t.numel()).sum())
        total += t.numel()
    assert 0 < kept < total  # the answers are not all-zero or all-one bitmaps
    # the element whose magnitude is thresholds[5] passes (equality), NaN never does
    x = ts[5].detach().cpu().float().reshape(-1)
    got = torch.from_numpy(contract.mask_bits(masks[5].cpu().numpy(), 0, x.numel()))
    assert bool(got[x.abs() == thresholds[5]].all()) and not bool(got[x.isnan()].any())


@pytest.mark.parametrize("backend,device", CASES)
def test_magnitude_mask_backend_writes_every_word(backend, device):
    """Called directly, a backend overwrites every word of the bitmaps it is given (here
    filled with ones), the bits past numel included."""
    impl = base.get(backend)
    for dtype in DTYPES:
        ts, thresholds = magnitude_inputs(dtype, device)
        ts = [t.contiguous() for t in ts if t.numel()]
        thresholds = thresholds[: len(ts)]
        masks = [torch.full((contract.mask_words(t.numel()),), -1, dtype=torch.int32,
                            device=device) for t in ts]
        impl.magnitude_mask(ts, [float(np.float32(x)) for x in thresholds], masks)
        for t, th, m in zip(ts, thresholds, masks):
            assert torch.equal(m.cpu(), expected_words(t, th)), (dtype, t.numel(), th)


@pytest.mark.parametrize("backend,device", CASES)
def test_mask_from_magnitude_drives_perturb(backend, device):
    """The intended use: a bitmap from magnitude_mask, then perturb +eps and -eps with it:
    the small weights move and come back (Rademacher, dyadic values: exact), the others never
    change."""
    w = (((torch.randn(1000) * 64).round() / 64).clamp(-1, 1) + 0.0).to(device)  # no -0
    w0 = w.clone()
    (mask,) = zk.magnitude_mask([w], [0.25], backend=backend)
    keep = w0.abs().cpu() <= 0.25
    assert 0 < int(keep.sum()) < keep.numel()
    zk.perturb_(w, 11, 2.0 ** -6, "rademacher", backend=backend, mask=[mask])
    assert torch.equal(bits(w) != bits(w0), keep)  # z = +-1: every kept weight moves
    zk.perturb_(w, 11, -2.0 ** -6, "rademacher", backend=backend, mask=[mask])
    assert torch.equal(bits(w), bits(w0))


# ------------------------------------------------------------------------- validation

def _two():
    return [torch.randn(40), torch.randn(3, 5)]


def _masks_for(ts):
    return [torch.zeros(contract.mask_words(t.numel()), dtype=torch.int32) for t in ts]


def _shared(ts):
    """A bitmap that is a view of the first weight's own memory."""
    return [ts[0][:2].view(torch.int32), _masks_for(ts)[1]]


BAD_MASKS = [
    ("one mask for two tensors", lambda ts: _masks_for(ts)[:1], ValueError, "2 tensors"),
    ("not a tensor", lambda ts: [[0, 0], _masks_for(ts)[1]], TypeError, "torch.Tensor"),
    ("int64 bitmap", lambda ts: [m.long() for m in _masks_for(ts)], ValueError, "int32"),
    ("float32 bitmap", lambda ts: [m.float() for m in _masks_for(ts)], ValueError, "int32"),
    ("one word short", lambda ts: [_masks_for(ts)[0][:1], _masks_for(ts)[1]], ValueError,
     "2 words"),
    ("one word too many", lambda ts: [torch.zeros(3, dtype=torch.int32), _masks_for(ts)[1]],
     ValueError, "2 words"),
    ("2-D bitmap", lambda ts: [_masks_for(ts)[0].view(1, 2), _masks_for(ts)[1]], ValueError,
     "1-D"),
    ("non-contiguous bitmap", lambda ts: [torch.zeros(4, dtype=torch.int32)[::2],
                                          _masks_for(ts)[1]], ValueError, "contiguous"),
    ("bitmap on another device", lambda ts: [torch.zeros(2, dtype=torch.int32, device="meta"),
                                             _masks_for(ts)[1]], ValueError, "meta"),
    ("bitmap sharing memory with a weight", _shared, ValueError, "shares memory"),
]


@pytest.mark.parametrize("op", ["perturb", "update"])
@pytest.mark.parametrize("name,make,exc,pattern", BAD_MASKS, ids=[b[0] for b in BAD_MASKS])
def test_bad_masks_are_rejected_before_any_write(name, make, exc, pattern, op):
    ts = _two()
    before = [t.clone() for t in ts]
    mask = make(ts)
    with pytest.raises(exc, match=pattern):
        if op == "perturb":
            zk.perturb_(ts, 1, 0.1, mask=mask)
        else:
            zk.zo_update_(ts, 1, lr=0.1, projected_grads=[1.0], restore_scale=0.1, mask=mask)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ts, before))


@pytest.mark.parametrize("thresholds,exc,pattern", [
    ([0.1, float("nan")], ValueError, "NaN"),
    ([0.1], ValueError, "1 thresholds for 2 tensors"),
    ([0.1, 0.2, 0.3], ValueError, "3 thresholds for 2 tensors"),
    ([0.1, "0.2"], TypeError, "thresholds\\[1\\]"),
    ([0.1, True], TypeError, "thresholds\\[1\\]"),
    (0.1, TypeError, "thresholds"),
], ids=["nan", "too few", "too many", "string", "bool", "not a sequence"])
def test_bad_thresholds_are_rejected(thresholds, exc, pattern):
    ts = _two()
    before = [t.clone() for t in ts]
    with pytest.raises(exc, match=pattern):
        zk.magnitude_mask(ts, thresholds)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ts, before))


@pytest.mark.parametrize("backend,device", CASES)
def test_backends_check_masks_on_direct_calls(backend, device):
    """A backend called directly (not through the public API) refuses a wrong bitmap with a
    clear error before writing anything."""
    impl = base.get(backend)
    t = (torch.randn(40) * 0.05).to(device)
    before = bits(t)
    bad = [[torch.zeros(1, dtype=torch.int32, device=device)],           # one word short
           [torch.zeros(2, dtype=torch.int64, device=device)],           # wrong dtype
           [torch.zeros(2, dtype=torch.int32, device=device)] * 2]       # two for one tensor
    for masks in bad:
        with pytest.raises(ValueError, match="mask"):
            impl.perturb([t], [0], 1, "gaussian", 0.1, 0, 0.0, 0, masks=masks)
        with pytest.raises(ValueError, match="mask"):
            impl.update([t], [0], 1, "gaussian", lr=0.1,
                        projected_grads=torch.ones(1, device=device), restore_scale=0.0,
                        restore_direction=0, weight_decay=0.0, stochastic_rounding=False,
                        masks=masks)
    assert torch.equal(bits(t), before)
