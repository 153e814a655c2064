"""The native build: modules import, backends report their state, and what is specific to the
C++/CUDA kernels (many tensors in one call, 128-element block boundaries, the balanced thread
split, the shared header's log/sin/cos and 16-bit conversions) matches the reference.

The exhaustive comparison of every backend with the reference is python_tests/test_kernels.py;
this file tests the native machinery behind it, on fresh random inputs of odd sizes. The CPU
kernels are built in several variants (generic x86-64, AVX2, AVX-512; one is chosen at load):
the kernel tests run once per variant this machine can run (fixture ``cpu_mod``), and the
variants must agree with each other bit for bit, Gaussian noise included.

Tolerances (per quantity):
* Rademacher noise, uniforms, 16-bit conversions, stochastic-rounding decisions: bit-exact
  (integer math, or a single correctly rounded float32 operation, on every backend).
* own log/sin/cos (float32 arithmetic) vs float64 math: log 1 ulp (exact f = m - 1 carries the
  result; the small terms' roundings and the final one add < 1 ulp); sin/cos 2 ulp of
  max(|value|, 1/2), i.e. absolute 2**-23: the reduced angle is rounded once (0.5 ulp of r),
  the series and the final sum add about 1 ulp; the contract needs them within 2 ulp of 1.
* Gaussian z vs the reference: GAUSS_ULPS = 4 ulp of the pair's radius r = sqrt(-2 log u):
  the reference's numpy log (up to ~3.6 ulp) and sin/cos (~1.4 ulp) differ from ours; r >= |z|.
* Weights after a Gaussian perturb/update: one storage ulp plus |scale| times that z bound.
"""

from __future__ import annotations


import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import zofo_kernels as zk
from tolerances import GAUSS_ULPS, LOG_ULPS, SINCOS_ULPS, ulp, ulp32
from zofo_kernels.core.backends.native import loader as _native
from zofo_kernels.core import contract
from zofo_kernels.core.backends import base

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["gaussian", "rademacher"]

C, C_ERROR = _native.cpu_module()
needs_cpu = pytest.mark.skipif(C is None, reason=f"native CPU module unavailable: {C_ERROR}")
RUNNABLE = _native.runnable_cpu_variants()


@pytest.fixture(params=RUNNABLE or [None])
def cpu_mod(request, monkeypatch):
    """Each CPU variant this machine can run, as the module and as the "cpu" backend that
    zofo_kernels' ops use during the test."""
    from zofo_kernels.core.backends.native.cpu import CpuBackend

    if request.param is None:
        pytest.skip(f"native CPU module unavailable: {C_ERROR}")
    backend = CpuBackend(variant=request.param)
    assert backend.status().available, backend.status().reason
    assert backend.variant == request.param
    monkeypatch.setitem(base._INSTANCES, "cpu", backend)
    return backend._mod


def radius(seed, start, numel, direction) -> np.ndarray:
    """r = sqrt(-2 log u_a) (float64) of the pair each element belongs to."""
    if numel == 0:
        return np.zeros(0)
    first, last = start // 4, (start + numel - 1) // 4
    blocks = np.arange(first, last + 1, dtype=np.uint64)
    w = contract._block_words(seed, blocks, direction, contract.PURPOSE_NOISE)
    ua = [np.maximum(contract.UNIFORM_MIN, contract.uniform_from_words(w[i])).astype(np.float64)
          for i in (0, 2)]
    r = [np.sqrt(-2.0 * np.log(u)) for u in ua]
    lanes = np.stack([r[0], r[0], r[1], r[1]], axis=1).reshape(-1)
    skip = start - first * 4
    return lanes[skip: skip + numel]


def z_bound(seed, start, numel, direction, distribution) -> np.ndarray:
    if distribution == "rademacher":
        return np.zeros(numel)
    return GAUSS_ULPS * ulp32(radius(seed, start, numel, direction))


def rand_weights(n, dtype, gen, std=0.02):
    return (torch.randn(n, generator=gen) * std).to(dtype)


# ----------------------------------------------------------------------------- build / status

def test_cpu_extension_imports_and_is_available():
    assert C is not None, f"zofo_kernels._C did not import: {C_ERROR}"
    st = zk.available_backends()["cpu"]
    assert st.available, st.reason
    assert "-ffp-contract=off" in C.compile_flags
    assert "fast-math" not in C.compile_flags.replace("-fno-fast-math", "")
    assert isinstance(C.openmp, bool)


EXPECTED_MARCH = {"generic": "-march=x86-64 ", "avx2": "-march=x86-64-v3",
                  "avx512": "-march=x86-64-v4", "native": "-march=native"}


def test_cpu_variants_built_and_chosen_by_cpu_features():
    built = _native.built_cpu_variants()
    feats = _native.cpu_features()
    assert "generic" in built, built
    if feats.get("x86_64"):
        # a wheel for x86-64 carries all three; the best one this CPU runs is chosen
        assert {"generic", "avx2", "avx512"} <= set(built), built
        want = ("avx512" if all(feats[f] for f in _native.REQUIRED_FEATURES["avx512"])
                else "avx2" if all(feats[f] for f in _native.REQUIRED_FEATURES["avx2"])
                else "generic")
    else:
        want = "generic"
    # every built variant the CPU can run imports (none is silently left untested)
    runnable = [v for v in built if _native.cpu_variant_support(v)[0]]
    assert RUNNABLE == runnable and want in RUNNABLE
    for v in RUNNABLE:
        mod, err = _native.cpu_module(v)
        assert mod is not None and mod.variant == v, err
        flags = mod.compile_flags + " "
        assert "-ffp-contract=off" in flags, (v, flags)
        assert "fast-math" not in flags.replace("-fno-fast-math", ""), (v, flags)
        if feats.get("x86_64"):
            assert EXPECTED_MARCH[v] in flags, (v, flags)
    if os.environ.get(_native.VARIANT_ENV, "auto").strip().lower() in ("", "auto"):
        assert _native.cpu_choice()[0] == want
        assert C.variant == want
        reason = zk.available_backends()["cpu"].reason
        assert f"{want} build (chosen at load for this CPU" in reason, reason


def test_cpu_variant_choice_follows_features_and_env(monkeypatch):
    """The choice logic on made-up CPUs: a missing feature rules a variant out (it is never
    imported), the env variable forces one, and a bad value makes the backend unavailable."""
    from zofo_kernels.core.backends.native.cpu import CpuBackend

    full = {f: True for v in _native.REQUIRED_FEATURES.values() for f in v}
    full["x86_64"] = True
    monkeypatch.setattr(_native, "built_cpu_variants", lambda: ["generic", "avx2", "avx512"])
    monkeypatch.delenv(_native.VARIANT_ENV, raising=False)
    cases = [({}, "avx512"), ({"avx512bw": False}, "avx2"), ({"os_avx512": False}, "avx2"),
             ({"avx512f": False, "fma": False}, "generic"), ({"os_avx": False}, "generic")]
    for off, want in cases:
        monkeypatch.setattr(_native, "cpu_features", lambda off=off: dict(full, **off))
        assert _native._choose()[0] == want, off
    monkeypatch.setattr(_native, "cpu_features", lambda: dict(full, avx512vl=False))
    ok, why = _native.cpu_variant_support("avx512")
    assert not ok and "avx512vl" in why
    mod, err = _native.cpu_module("avx512")
    assert mod is None and "avx512vl" in err
    monkeypatch.setenv(_native.VARIANT_ENV, "avx512")
    variant, why = _native._choose()
    assert variant is None and "ZOFO_CPU_VARIANT=avx512" in why and "avx512vl" in why
    monkeypatch.setenv(_native.VARIANT_ENV, "generic")
    assert _native._choose() == ("generic", "forced by ZOFO_CPU_VARIANT=generic")
    monkeypatch.setenv(_native.VARIANT_ENV, "native")
    variant, why = _native._choose()
    assert variant is None and "was not built" in why
    monkeypatch.setenv(_native.VARIANT_ENV, "sse9")
    variant, why = _native._choose()
    assert variant is None and "not a CPU variant" in why
    monkeypatch.setattr(_native, "_choice", (None, why))
    st = CpuBackend().status()
    assert not st.available and "sse9" in st.reason


def test_forced_cpu_variant_in_a_fresh_process():
    code = ("import zofo_kernels as z, torch\n"
            "st = z.available_backends()['cpu']\n"
            "print(st.available, '|', st.reason)\n"
            "try:\n"
            "    z.perturb_(torch.zeros(4), 0, 1e-3, backend='cpu'); print('ran')\n"
            "except z.BackendUnavailableError as e:\n"
            "    print('raised', e)\n")
    for value in RUNNABLE + ["nonsense"]:
        env = dict(os.environ, ZOFO_CPU_VARIANT=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        if value == "nonsense":
            assert out.stdout.startswith("False |") and "nonsense" in out.stdout, out.stdout
            assert "raised" in out.stdout
        else:
            assert out.stdout.startswith("True |"), out.stdout
            assert f"{value} build (forced by ZOFO_CPU_VARIANT={value})" in out.stdout
            assert "ran" in out.stdout


@pytest.mark.skipif(len(RUNNABLE) < 2, reason="only one CPU variant runs on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTS)
def test_cpu_variants_agree_bit_for_bit(dtype, distribution, monkeypatch):
    """Every variant this machine runs computes the same bits as the generic one: noise
    (Gaussian too: same IEEE float32 operations, no FMA contraction, no fast-math), the fused
    perturb and update (stochastic rounding included, sparse and low-rank too) and the
    element-wise header math."""
    from zofo_kernels.core.backends.native.cpu import CpuBackend

    gen = torch.Generator().manual_seed(41 + DTYPES.index(dtype))
    ts0 = _odd_tensors(gen, dtype, 60, max_numel=3000)
    offs = _scattered_offsets(ts0, gen)
    big = rand_weights(70_001, dtype, gen)  # long enough for the threaded, vectorised path
    ts0.append(big)
    offs.append(offs[-1] + ts0[-2].numel() + 3)
    masks = _sparse_masks(ts0, gen)
    results = {}
    for v in RUNNABLE:
        monkeypatch.setitem(base._INSTANCES, "cpu", CpuBackend(variant=v))
        mod = base._INSTANCES["cpu"]._mod
        ts = [t.clone() for t in ts0]
        zk.perturb_(ts, 77, 1e-3, distribution, 1, offsets=offs, backend="cpu",
                    restore_scale=-1e-3, restore_direction=0)
        zk.zo_update_(ts, 77, lr=2e-3, projected_grads=[0.4, -0.9], restore_scale=-1e-3,
                      restore_direction=1, weight_decay=0.1, distribution=distribution,
                      offsets=offs, backend="cpu")
        # sparse perturbation and its bitmaps
        zk.perturb_(ts, 78, 1e-3, distribution, 0, offsets=offs, backend="cpu", mask=masks)
        zk.zo_update_(ts, 78, lr=2e-3, projected_grads=[0.4, -0.9], restore_scale=-1e-3,
                      weight_decay=0.1, distribution=distribution, offsets=offs,
                      backend="cpu", mask=masks)
        ts += zk.magnitude_mask(ts, [0.02] * len(ts), backend="cpu")
        # low-rank directions, rank 1 and 5: a matrix long enough for the threaded path (rows
        # of 251, across the 128-blocks) beside a vector that stays dense
        mat = [rand_weights(301 * 251, dtype, torch.Generator().manual_seed(43)).view(301, 251),
               ts0[0].clone()]
        mat_offs = [2 ** 35 + 5, 2 ** 35 + 5 + 301 * 251 + 7]
        for rank in (1, 5):
            fs = zk.lowrank_factors(mat, 79, rank, distribution=distribution, n_directions=3,
                                    offsets=mat_offs, backend="cpu")
            zk.perturb_(mat, 79, 1e-3, distribution, 2, offsets=mat_offs, backend="cpu",
                        restore_scale=-1e-3, restore_direction=0, factors=fs)
            zk.zo_update_(mat, 79, lr=2e-3, projected_grads=[0.4, -0.9], restore_scale=-1e-3,
                          restore_direction=2, weight_decay=0.1, distribution=distribution,
                          offsets=mat_offs, backend="cpu", factors=fs)
            ts += [m.clone() for m in mat]
        z = zk.noise(5, 2 ** 40 + 3, 100_003, distribution, 9, backend="cpu")
        x = np.linspace(1e-7, 1.0, 50_001, dtype=np.float32)
        t = x * np.float32(6.28)
        lg, sn, cs = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        mod.log_f32(x.ctypes.data, lg.ctypes.data, x.size)
        mod.sincos_f32(t.ctypes.data, sn.ctypes.data, cs.ctypes.data, x.size)
        results[v] = ts + [z, torch.from_numpy(lg), torch.from_numpy(sn), torch.from_numpy(cs)]
    for v in RUNNABLE:
        for j, (a, b) in enumerate(zip(results[v], results["generic"])):
            assert torch.equal(a, b), (v, j)


def test_cpu_status_reports_import_error(monkeypatch):
    from zofo_kernels.core.backends.native import cpu as cpu_mod

    monkeypatch.setattr(_native, "cpu_module", lambda variant=None: (None, "ImportError: boom"))
    st = cpu_mod.CpuBackend().status()
    assert not st.available
    assert "boom" in st.reason and "_C" in st.reason
    assert not cpu_mod.CpuBackend().supports_device(torch.device("cpu"))


def test_cuda_backend_reports_reason_when_unavailable():
    st = zk.available_backends()["cuda"]
    if torch.cuda.is_available() and st.available:
        assert "CUDA kernels" in st.reason
        return
    assert not st.available
    assert st.reason, "an unavailable backend must say why"
    mod, err = _native.cuda_module()
    if mod is None:
        assert "built without CUDA" in st.reason or "CUDA extension" in st.reason
    elif not torch.cuda.is_available():
        assert st.reason == "no CUDA device visible to torch"
    with pytest.raises(zk.BackendUnavailableError, match="cuda"):
        zk.perturb_(torch.zeros(4), 0, 1e-3, backend="cuda")


def test_cuda_module_imports_without_a_device_when_built():
    mod, err = _native.cuda_module()
    if mod is None:
        assert "was not built" in err or "failed" in err
        pytest.skip(f"CUDA module not built here: {err}")
    count, msg = mod.device_count()
    assert isinstance(count, int) and isinstance(msg, str)
    if not torch.cuda.is_available():
        assert count == 0 and msg, "without a device the CUDA runtime must report an error"
    assert mod.cuda_archs and all(a.strip().isdigit() for a in mod.cuda_archs.split(","))


def test_cuda_status_with_missing_module(monkeypatch):
    from zofo_kernels.core.backends.native import cuda as cuda_mod

    monkeypatch.setattr(_native, "cuda_module", lambda: (None, "module zofo_kernels._C_cuda was not built"))
    st = cuda_mod.CudaBackend().status()
    assert not st.available and "built without CUDA" in st.reason
    monkeypatch.setattr(_native, "cuda_module", lambda: (None, "importing failed: OSError: x"))
    st = cuda_mod.CudaBackend().status()
    assert not st.available and "OSError" in st.reason


# ----------------------------------------------------------------------------- shared header math

def test_own_log_sin_cos_against_float64(cpu_mod):
    rng = np.random.default_rng(11)
    words = rng.integers(0, 2 ** 32, size=200_003, dtype=np.uint64).astype(np.uint32)
    u = np.maximum(contract.UNIFORM_MIN, contract.uniform_from_words(words)).astype(np.float32)
    u = np.concatenate([u, np.float32([1e-7, 1.0, 0.5, 0.70710677, 0.70710683, 2.0 ** -23]),
                        np.float32(1.0) - np.arange(1, 300, dtype=np.float32) * np.float32(2 ** -24)])
    u = np.ascontiguousarray(u, dtype=np.float32)
    out = np.empty_like(u)
    cpu_mod.log_f32(u.ctypes.data, out.ctypes.data, u.size)
    exact = np.log(u.astype(np.float64))
    err = np.abs(out - exact) / ulp32(exact)
    assert np.all(out[u == 1.0] == 0.0)
    assert err.max() <= LOG_ULPS, f"log: {err.max():.3f} ulp"

    t = (contract.uniform_from_words(words) * contract.TWO_PI).astype(np.float32)
    near = [np.float32(k * np.pi / 2) for k in range(5)]
    t = np.concatenate([t] + [c + np.arange(-64, 65, dtype=np.float32) * np.spacing(c) for c in near])
    t = np.ascontiguousarray(np.clip(t, 0, contract.TWO_PI), dtype=np.float32)
    s, c = np.empty_like(t), np.empty_like(t)
    cpu_mod.sincos_f32(t.ctypes.data, s.ctypes.data, c.ctypes.data, t.size)
    td = t.astype(np.float64)
    for got, exact, name in ((s, np.sin(td), "sin"), (c, np.cos(td), "cos")):
        err = np.abs(got - exact) / ulp32(np.maximum(np.abs(exact), 0.5))
        assert err.max() <= SINCOS_ULPS, f"{name}: {err.max():.3f} ulp"
        assert np.all(np.abs(got) <= 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_storage_matches_torch(dtype, cpu_mod):
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2 ** 32, size=100_001, dtype=np.uint64).astype(np.uint32)
    # plus every exponent near the 16-bit ranges, ties, overflow edges and infinities
    x = np.concatenate([bits.view(np.float32),
                        np.float32([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 6.1e-5, 5.96e-8,
                                    2.98e-8, 2.9802322e-08, 1e-10, 3.4e38, np.inf, -np.inf]),
                        (rng.standard_normal(50_000) * np.exp2(rng.integers(-30, 17, 50_000)))
                        .astype(np.float32)])
    x = np.ascontiguousarray(x[np.isfinite(x) | np.isinf(x)], dtype=np.float32)
    out = np.empty(x.size, dtype=np.uint16)
    code = base.DTYPE_CODES[dtype]
    cpu_mod.round_to_storage(x.ctypes.data, out.ctypes.data, x.size, code)
    want = torch.from_numpy(x).to(dtype).view(torch.int16).numpy().view(np.uint16)
    bad = np.nonzero(out != want)[0]
    assert bad.size == 0, f"{bad.size} mismatches, first x={x[bad[:5]]} got={out[bad[:5]]} want={want[bad[:5]]}"
    nan = np.float32([np.nan])
    cpu_mod.round_to_storage(nan.ctypes.data, out.ctypes.data, 1, code)
    assert torch.from_numpy(out[:1].view(np.int16)).view(dtype).float().isnan().all()


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_stochastic_round_bit_exact(kind, cpu_mod):
    rng = np.random.default_rng(5)
    n = 60_001
    x = (rng.standard_normal(n) * np.exp2(rng.integers(-40, 20, n))).astype(np.float32)
    x[:7] = np.float32([0.0, -0.0, np.inf, -np.inf, 1e-30, -3e-8, 65504.0])
    r = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32)
    out = np.empty_like(x)
    code = base.DTYPE_CODES[getattr(torch, kind)]
    cpu_mod.stochastic_round(x.ctypes.data, r.ctypes.data, out.ctypes.data, n, code)
    want = contract.stochastic_round_bits(x, r, kind)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError):
        cpu_mod.stochastic_round(x.ctypes.data, r.ctypes.data, out.ctypes.data, 1, 0)


@pytest.mark.parametrize("start", [0, 3, 4 * 2 ** 32 - 6, 2 ** 62 + 1])
def test_rounding_words_bit_exact(start, cpu_mod):
    seed = 2 ** 40 + 9
    out = np.empty(37, dtype=np.uint32)
    cpu_mod.rounding_words(out.ctypes.data, seed, start, out.size)
    assert np.array_equal(out, contract.rounding_words(seed, start, out.size))


# ----------------------------------------------------------------------------- noise

@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("start,numel", [(0, 1), (127, 2), (128, 129), (5, 1000),
                                         (128 * 2 ** 32 - 70, 333),  # block word c1 carries
                                         (4 * 2 ** 32 - 6, 19), (2 ** 63 - 50, 50), (9, 0)])
def test_noise_matches_reference_at_block_and_word_boundaries(distribution, start, numel,
                                                              cpu_mod):
    seed, direction = 987654321012, 2 ** 32 - 1
    got = zk.noise(seed, start, numel, distribution, direction, backend="cpu").numpy()
    want = contract.noise(seed, start, numel, distribution, direction)
    assert got.dtype == np.float32 and got.shape == (numel,)
    if distribution == "rademacher":
        assert np.array_equal(got, want)
    else:
        err = np.abs(got.astype(np.float64) - want)
        assert np.all(err <= z_bound(seed, start, numel, direction, distribution))


def test_noise_thread_count_invariant(cpu_mod):
    n = 300_007
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(zk.noise(77, 13, n, "gaussian", 1, backend="cpu"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ----------------------------------------------------------------------------- work split

@needs_cpu
def test_balanced_split_across_unequal_tensors():
    numels = [1, 10 ** 6, 3, 127, 129, 250_000, 5]
    offsets = [5, 100, 2_000_000, 2_000_010, 3_000_000, 3_000_200, 9_999_999]
    total = sum(numels)
    for nt in (1, 2, 3, 8):
        counts = C.split_elements(numels, offsets, nt)
        assert len(counts) == nt and sum(counts) == total
        # each thread gets the same number of 128-blocks (+-1); partial blocks at tensor ends
        # (two per tensor) are the only other source of imbalance
        slack = 128 * (1 + 2 * len(numels))
        assert max(counts) - min(counts) <= slack, counts
    # a single huge tensor is split evenly too (no per-tensor granularity)
    counts = C.split_elements([10 ** 7], [3], 2)
    assert abs(counts[0] - counts[1]) <= 256


@needs_cpu
def test_threads_for_small_and_large_calls():
    assert C.threads_for(100, 8) == 1
    assert C.threads_for(10 ** 8, 2) == 2
    assert C.threads_for(10 ** 8, 0) == 1


# ----------------------------------------------------------------------------- multi-tensor calls

def _odd_tensors(gen, dtype, count, max_numel=700):
    sizes = torch.randint(0, max_numel, (count,), generator=gen).tolist()
    sizes[:5] = [1, 127, 128, 129, 0]
    return [rand_weights(n, dtype, gen) for n in sizes]


def _sparse_masks(tensors, gen):
    """A bitmap per tensor: random bits at densities from 0 to 1, and runs of kept and
    skipped elements longer than a 128-element block."""
    masks = []
    for i, t in enumerate(tensors):
        n = t.numel()
        if i % 3 == 2:
            keep = (torch.arange(n) // int(torch.randint(100, 400, (1,), generator=gen))) % 2 == 0
        else:
            keep = torch.rand(n, generator=gen) < [0.0, 0.1, 0.5, 0.9, 1.0][i % 5]
        masks.append(_bitmap(keep))
    return masks


def _bitmap(keep: torch.Tensor) -> torch.Tensor:
    """The int32 bitmap (contract.mask_bits layout) of a bool tensor."""
    pad = np.zeros((-keep.numel()) % 32, dtype=np.uint8)
    packed = np.packbits(np.concatenate([keep.numpy().astype(np.uint8), pad]), bitorder="little")
    return torch.from_numpy(packed.view(np.int32).copy())


def _scattered_offsets(tensors, gen):
    """Non-canonical, non-overlapping offsets: random gaps, some beyond 2**32 blocks."""
    offs, pos = [], 2 ** 39 + 61
    for t in tensors:
        pos += int(torch.randint(0, 300, (1,), generator=gen))
        offs.append(pos)
        pos += t.numel()
    return offs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTS)
def test_many_tensors_one_call_perturb(dtype, distribution, cpu_mod):
    gen = torch.Generator().manual_seed(100 + 2 * DTYPES.index(dtype) + DISTS.index(distribution))
    ts = _odd_tensors(gen, dtype, 150)
    offs = _scattered_offsets(ts, gen)
    ref = [t.clone() for t in ts]
    orig = [t.clone() for t in ts]
    seed, scale = 4242, 1e-2
    zk.perturb_(ts, seed, scale, distribution, 3, offsets=offs, backend="cpu",
                restore_scale=-scale, restore_direction=2)
    zk.perturb_(ref, seed, scale, distribution, 3, offsets=offs, backend="reference",
                restore_scale=-scale, restore_direction=2)
    for j, (a, b, off, o) in enumerate(zip(ts, ref, offs, orig)):
        if distribution == "rademacher":
            assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               b.view(torch.int16 if dtype != torch.float32 else torch.int32)), j
        else:
            # two roundings, each may flip where z differs: one ulp of the restored
            # intermediate (|w| <= |p| + scale |z_r|, possibly a coarser binade than the
            # result) plus one ulp of the result, plus scale times the z bounds
            zr = torch.from_numpy(contract.noise(seed, off, a.numel(), distribution, 2)).double()
            zb = torch.from_numpy(z_bound(seed, off, a.numel(), 3, distribution)
                                  + z_bound(seed, off, a.numel(), 2, distribution))
            mid = o.double().abs() + scale * zr.abs()
            tol = ulp(mid, dtype) + ulp(b, dtype) + scale * zb
            assert bool(((a.double() - b.double()).abs() <= tol).all()), j


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tensors_one_call_update_rademacher_bit_exact(dtype, cpu_mod):
    """Rademacher z is exact, so the whole fused update (restore, q=3 directions with the
    restore direction among them, weight decay, stochastic rounding) must be bit-exact."""
    gen = torch.Generator().manual_seed(17 + DTYPES.index(dtype))
    ts = _odd_tensors(gen, dtype, 120)
    offs = _scattered_offsets(ts, gen)
    ref = [t.clone() for t in ts]
    kw = dict(lr=3e-3, projected_grads=[0.7, -1.3, 2.1], restore_scale=-1e-3, restore_direction=1,
              weight_decay=0.01, distribution="rademacher", offsets=offs)
    zk.zo_update_(ts, 99, backend="cpu", **kw)
    zk.zo_update_(ref, 99, backend="reference", **kw)
    for j, (a, b) in enumerate(zip(ts, ref)):
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan())), j


def test_large_call_uses_threads_and_matches_reference_slices(cpu_mod):
    """A call big enough to be split across threads: spot-check slices of it against the
    reference (the whole tensor through the reference would be slow)."""
    n = 3 * 2 ** 16 + 77
    before = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            w = torch.linspace(-1, 1, n, dtype=torch.float32).to(torch.bfloat16)
            zk.zo_update_([w[: n // 3], w[n // 3:]], 5, lr=1e-2, projected_grads=[0.5],
                          distribution="rademacher", offsets=[1000, 1000 + n // 3], backend="cpu")
            outs.append(w)
    finally:
        torch.set_num_threads(before)
    assert cpu_mod.threads_for(n, 2) == 2
    assert torch.equal(outs[0], outs[1])
    for lo in (0, n // 3 - 70, n - 200):
        w = torch.linspace(-1, 1, n, dtype=torch.float32).to(torch.bfloat16)[lo: lo + 140].clone()
        zk.zo_update_(w, 5, lr=1e-2, projected_grads=[0.5], distribution="rademacher",
                      offsets=[1000 + lo], backend="reference")
        assert torch.equal(outs[0][lo: lo + 140], w)


def test_large_masked_call_uses_threads_and_matches_reference_slices(cpu_mod):
    """A masked call big enough to be split across threads, with blocks of 128 elements that
    keep none (skipped), some or all of their elements: the same bits with 1 and 2 threads,
    and slices of it equal the reference's."""
    n = 3 * 2 ** 16 + 77
    gen = torch.Generator().manual_seed(17)
    w0 = torch.linspace(-1, 1, n, dtype=torch.float32).to(torch.bfloat16)
    masks = [_bitmap(torch.rand(n // 3, generator=gen) < 0.3),
             _bitmap((torch.arange(n - n // 3) // 300) % 2 == 0)]  # runs longer than a block
    offsets = [1000, 1000 + n // 3 + 5]
    before = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            w = w0.clone()
            zk.zo_update_([w[: n // 3], w[n // 3:]], 5, lr=1e-2, projected_grads=[0.5, 0.25],
                          distribution="rademacher", offsets=offsets, backend="cpu", mask=masks)
            outs.append(w)
    finally:
        torch.set_num_threads(before)
    assert cpu_mod.threads_for(n, 2) == 2
    assert torch.equal(outs[0], outs[1])
    changed = outs[0] != w0
    assert 0 < int(changed.sum()) < n
    for t, lo in ((0, 0), (0, n // 3 - 140), (1, 1000), (1, n - n // 3 - 140)):
        a = (0 if t == 0 else n // 3) + lo
        w = w0[a: a + 140].clone()
        m = _bitmap(torch.from_numpy(contract.mask_bits(masks[t].numpy(), lo, 140)))
        zk.zo_update_(w, 5, lr=1e-2, projected_grads=[0.5, 0.25], distribution="rademacher",
                      offsets=[offsets[t] + lo], backend="reference", mask=[m])
        assert torch.equal(outs[0][a: a + 140], w), (t, lo)


@needs_cpu
def test_non_contiguous_and_empty_tensors_through_cpu_backend():
    gen = torch.Generator().manual_seed(8)
    base_t = rand_weights(9 * 13, torch.float16, gen).reshape(9, 13)
    view = base_t.t()  # non-contiguous
    empty = torch.empty(0, dtype=torch.float16)
    other = rand_weights(31, torch.float16, gen)
    ref_view, ref_other = view.clone(), other.clone()
    zk.perturb_([view, empty, other], 3, 1e-2, "rademacher", backend="cpu")
    zk.perturb_([ref_view, empty.clone(), ref_other], 3, 1e-2, "rademacher", backend="reference")
    assert torch.equal(view, ref_view) and torch.equal(other, ref_other)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_arithmetic_is_contract_exact_given_own_noise(dtype, cpu_mod):
    """The Gaussian z may differ from the reference by a few ulp (log/sin/cos); everything
    after it must follow the float-math contract exactly. Emulate the contract in torch
    float32 (separately rounded ops) with the cpu backend's own z and require equality."""
    gen = torch.Generator().manual_seed(29 + DTYPES.index(dtype))
    sizes, offs = [1, 130, 517, 1000], [3, 200, 1000, 5000]
    ts = [rand_weights(n, dtype, gen) for n in sizes]
    seed, eps, lr, wd, grads = 2 ** 45 + 3, 1e-3, 3e-3, 0.1, [0.9, -2.3]
    kind = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)

    def z(off, n, k):
        return zk.noise(seed, off, n, "gaussian", k, backend="cpu")

    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    want = []
    for t, off in zip(ts, offs):
        n = t.numel()
        w = (t.float() + z(off, n, 0) * f32(-eps)).to(dtype).float()       # restore k = 0
        w = (w + z(off, n, 1) * f32(eps)).to(dtype).float()                 # perturb k = 1
        w = (w + z(off, n, 1) * f32(-eps)).to(dtype).float()                # update: restore
        d = f32(grads[0]) * z(off, n, 0)
        d = d + f32(grads[1]) * z(off, n, 1)
        d = d + f32(wd) * w
        v = w - f32(lr) * d
        if kind is not None:
            bits = contract.rounding_words(seed, off, n)
            v = torch.from_numpy(contract.stochastic_round_bits(v.numpy(), bits, kind).copy())
        want.append(v.to(dtype))
    zk.perturb_(ts, seed, eps, "gaussian", 1, offsets=offs, backend="cpu", restore_scale=-eps,
                restore_direction=0)
    zk.zo_update_(ts, seed, lr=lr, projected_grads=grads, restore_scale=-eps, restore_direction=1,
                  weight_decay=wd, distribution="gaussian", offsets=offs, backend="cpu")
    for j, (a, b) in enumerate(zip(ts, want)):
        assert torch.equal(a, b), j


# ----------------------------------------------------------------------------- bad input (native layer)

@needs_cpu
def test_native_rejects_bad_arguments():
    t = torch.zeros(8)
    p = t.data_ptr()
    with pytest.raises(ValueError, match="same length"):
        C.perturb([p], [8, 8], [0], 0, 1, 0, 1.0, 0, 0.0, 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        C.perturb([p], [8], [0], 7, 1, 0, 1.0, 0, 0.0, 0, 1)
    with pytest.raises(ValueError, match="distribution"):
        C.perturb([p], [8], [0], 0, 1, 5, 1.0, 0, 0.0, 0, 1)
    with pytest.raises(ValueError, match="seed"):
        C.perturb([p], [8], [0], 0, 2 ** 63, 0, 1.0, 0, 0.0, 0, 1)
    with pytest.raises(ValueError, match="direction"):
        C.perturb([p], [8], [0], 0, 1, 0, 1.0, 2 ** 32, 0.0, 0, 1)
    with pytest.raises(ValueError, match="overflows"):
        C.perturb([p], [8], [2 ** 63 - 4], 0, 1, 0, 1.0, 0, 0.0, 0, 1)
    with pytest.raises(ValueError, match="null"):
        C.perturb([0], [8], [0], 0, 1, 0, 1.0, 0, 0.0, 0, 1)
    g = torch.ones(1)
    with pytest.raises(ValueError, match="q must be"):
        C.update([p], [8], [0], 0, 1, 0, 1.0, g.data_ptr(), 0, 0.0, 0, 0.0, True, 1)
    with pytest.raises(ValueError, match="masks must be"):
        C.perturb([p], [8], [0], 0, 1, 0, 1.0, 0, 0.0, 0, 1, masks=[0, 0])
    with pytest.raises(ValueError, match="same length"):
        C.magnitude_mask([p], [8], [0.5, 0.5], [p], 0, 1)
    with pytest.raises(ValueError, match="null"):
        C.magnitude_mask([p], [8], [0.5], [0], 0, 1)
    with pytest.raises(ValueError, match="dtype"):
        C.magnitude_mask([p], [8], [0.5], [p], 7, 1)
    assert torch.equal(t, torch.zeros(8)), "a rejected call must not touch the weights"
    from zofo_kernels.core.backends.native.cpu import CpuBackend
    with pytest.raises(ValueError, match="contiguous"):
        CpuBackend().perturb([torch.zeros(4, 4).t()], [0], 1, "gaussian", 1.0, 0, 0.0, 0)
    with pytest.raises(TypeError, match="dtype"):
        CpuBackend().perturb([torch.zeros(4), torch.zeros(4, dtype=torch.float16)], [0, 4], 1,
                             "gaussian", 1.0, 0, 0.0, 0)


# ----------------------------------------------------------------------------- GPU

def _cuda_ready():
    return torch.cuda.is_available() and zk.available_backends()["cuda"].available


@pytest.mark.gpu
def test_cuda_backend_available_on_gpu_machine():
    st = zk.available_backends()["cuda"]
    assert st.available, st.reason


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTS)
def test_cuda_multi_tensor_matches_cpu_and_reference(dtype, distribution):
    """Perturb (with fused restore) and the fused update on many tensors in one launch: the
    CUDA kernels run the same header math as the CPU kernels, so both must agree bit for bit
    (Gaussian included); Rademacher must also equal the reference bit for bit."""
    if not _cuda_ready():
        pytest.skip(zk.available_backends()["cuda"].reason)
    gen = torch.Generator().manual_seed(23 + DTYPES.index(dtype))
    ts = _odd_tensors(gen, dtype, 90)
    offs = _scattered_offsets(ts, gen)
    # a view at an odd element offset exercises the unaligned (element-wise) path
    big = rand_weights(4099, dtype, gen)
    ts.append(big[1:])
    offs.append(offs[-1] + ts[-2].numel() + 5)
    seed = 31337
    kw = dict(lr=2e-3, projected_grads=[0.4, -0.9], restore_scale=-1e-3, restore_direction=1,
              weight_decay=0.1, distribution=distribution, offsets=offs)
    results = {}
    for backend in ("cuda", "cpu", "reference"):
        if backend == "reference" and distribution == "gaussian":
            continue
        xs = [t.clone().cuda() if backend == "cuda" else t.clone() for t in ts]
        zk.perturb_(xs, seed, 1e-3, distribution, 1, offsets=offs, backend=backend,
                    restore_scale=-1e-3, restore_direction=0)
        zk.zo_update_(xs, seed, backend=backend, **kw)
        if backend == "cuda":
            torch.cuda.synchronize()
        results[backend] = [x.cpu() for x in xs]
    for other in results:
        for j, (a, b) in enumerate(zip(results["cuda"], results[other])):
            assert torch.equal(a, b), (other, j)


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", DISTS)
def test_cuda_noise_matches_cpu(distribution):
    if not _cuda_ready():
        pytest.skip(zk.available_backends()["cuda"].reason)
    for start, numel in [(0, 1000), (3, 517), (4 * 2 ** 32 - 6, 64), (2 ** 62, 9)]:
        a = zk.noise(5, start, numel, distribution, 7, backend="cuda", device="cuda").cpu()
        b = zk.noise(5, start, numel, distribution, 7, backend="cpu")
        # the same header functions on both sides: IEEE float32 operations only (no FMA, no
        # libm, correctly rounded division and sqrt), so even Gaussian values agree bit for bit
        assert torch.equal(a, b), (start, (a - b).abs().max().item())
