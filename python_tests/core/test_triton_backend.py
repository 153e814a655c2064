"""Triton-specific checks of the triton backend, against zofo_kernels.core.contract / the reference.

The generic contract checks (known answers, statistics, round trip, bad input through the
public API) live in test_kernels.py and run on every backend; this file covers what only the
Triton backend has: multi-tensor pointer tables over many tensors of odd sizes and offsets,
global indices beyond 2**32, one launch per (device, dtype) group, the launch-table cache,
invariance to the block size, how the backend reports itself, and the sparse-mask variants
(masked launches over full and partial windows, the aligned path with a mask, the table cache
keyed on the bitmaps, the magnitude_mask kernel's packing) and the low-rank variant's table
(factor columns, cached on the factors).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported,
as CI does); on a CUDA machine the same tests run compiled (marker ``gpu``).

Tolerances (weights after a call, compared with the reference backend):
* Rademacher: bit for bit everywhere (z = +-1, every product exact, one rounding rule).
* Gaussian, interpreter: bit for bit (the interpreter's log/sin/cos are numpy's, as the
  reference's).
* Gaussian, compiled: libdevice log/sin/cos differ from numpy by a few ulp, which moves
  scale * z by a few float32 ulp and can move a rounding boundary: at most one ulp of the
  storage dtype, plus the z difference itself for float32 storage (table below).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import zofo_kernels as zk
from tolerances import GAUSS_STORAGE_ULPS, GAUSS_Z_BOUND, ulp
from zofo_kernels.core import contract
from zofo_kernels.core.backends import base

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTRIBUTIONS = ["gaussian", "rademacher"]

# Compiled-mode Gaussian tolerance (python_tests/tolerances.py): GAUSS_STORAGE_ULPS per rounding
# step, in ulps of the storage dtype at the result (a z a few float32 ulp away can move the
# value across one rounding boundary, nearest or stochastic, whatever the dtype), plus the z
# difference itself: <= 4 float32 ulp of the pair radius r (test_kernels.py derives it),
# r <= sqrt(-2 ln 1e-7) < 8, so <= GAUSS_Z_BOUND = 4 * 2**-21 per unit of |scale| applied to z.

_RNG_SEED = int.from_bytes(os.urandom(4), "little")
RNG = np.random.default_rng(_RNG_SEED)

BACKEND = base.get("triton")
STATUS = BACKEND.status()


def _devices():
    out = [pytest.param("cpu", id="interpreter-cpu")]  # skipped with the reason when absent
    out.append(pytest.param("cuda", id="compiled-cuda", marks=pytest.mark.gpu))
    return out


DEVICES = _devices()


def _need(device: str):
    if not STATUS.available:
        pytest.skip(f"triton backend unavailable: {STATUS.reason}")
    if not BACKEND.supports_device(torch.device(device)):
        pytest.skip(f"triton backend ({STATUS.reason}) does not run on {device}")


def _exact(distribution: str) -> bool:
    return distribution == "rademacher" or BACKEND.interpreted


def _note(**kw) -> str:
    return f"(test rng seed {_RNG_SEED}; " + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"


def _assert_same(got: torch.Tensor, want: torch.Tensor, distribution: str, what: str,
                 coef: float = 1.0, steps: int = 1):
    """Equal, or (compiled Gaussian) within ``steps`` storage roundings plus ``coef`` (the sum
    of |scale| multiplying z in the calls so far) times 4 float32 ulp of the largest radius."""
    got = got.detach().cpu().reshape(-1)
    want = want.detach().cpu().reshape(-1)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan_g, nan_w = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(nan_g, nan_w), f"NaN positions differ {what}"
    g, w = got.float()[~nan_g], want.float()[~nan_w]
    if _exact(distribution):
        bad = (g != w).nonzero().reshape(-1)
        assert bad.numel() == 0, (
            f"{bad.numel()} elements differ, first at {bad[0].item()}: "
            f"{g[bad[0]].item()!r} vs {w[bad[0]].item()!r} {what}")
    else:
        big = torch.maximum(g.double().abs(), w.double().abs())
        tol = (steps * GAUSS_STORAGE_ULPS[got.dtype] * ulp(big, got.dtype)
               + coef * GAUSS_Z_BOUND)
        same_inf = torch.isinf(g) & (g == w)
        err = torch.where(same_inf, torch.zeros_like(big), (g.double() - w.double()).abs())
        assert torch.all(err <= tol), f"max error {err.max().item()} over tolerance {what}"


def _weights(shape, dtype, specials=False) -> torch.Tensor:
    """Weights spanning many binades (exercises rounding, float16 subnormals, tiny values)."""
    n = int(np.prod(shape)) if shape else 1
    mag = 10.0 ** RNG.uniform(-9, 1, size=n)
    w = RNG.standard_normal(n) * mag
    if specials and n >= 6:
        big = {torch.float32: 3.0e38, torch.bfloat16: 3.38e38, torch.float16: 65500.0}[dtype]
        w[:6] = [np.inf, -np.inf, np.nan, big, -big, 0.0]
    return torch.from_numpy(w).to(torch.float32).to(dtype).reshape(shape)


def _layout(count: int):
    """Odd shapes and offsets: unaligned, 128-aligned, beyond 2**32 and 2**40, with gaps."""
    shapes, offsets, pos = [], [], int(RNG.integers(0, 300))
    for k in range(count):
        kind = k % 5
        if kind == 0:
            shape = (int(RNG.integers(1, 60)),)
        elif kind == 1:
            shape = (int(RNG.integers(1, 9)), int(RNG.integers(1, 40)))
        elif kind == 2:
            shape = (int(RNG.integers(1, 4)), 3, int(RNG.integers(1, 30)))
        elif kind == 3:
            shape = (128 * int(RNG.integers(1, 3)),)
        else:
            shape = (0,) if k % 10 == 4 else (int(RNG.integers(100, 400)),)
        if k == count // 2:
            pos = 2 ** 32 - 70  # a tensor straddling the c0 -> c1 carry of the block counter
        if k == 3 * count // 4:
            pos = 2 ** 40 + 128 * 3
        if k % 3 == 0:
            pos += int(RNG.integers(0, 200))  # a gap
        if k % 4 == 3:
            pos += (-pos) % 128  # some tensors start on a Rademacher block boundary
        shapes.append(shape)
        offsets.append(pos)
        pos += int(np.prod(shape))
    return shapes, offsets


def _pair(shapes, dtype, device, specials=False):
    ref = [_weights(s, dtype, specials=specials and i == 1) for i, s in enumerate(shapes)]
    return [t.clone().to(device) for t in ref], ref


# --------------------------------------------------------------------------- status

def test_status_reports_mode():
    if STATUS.available:
        if BACKEND.interpreted:
            assert STATUS.reason == "interpreter on CPU tensors"
            assert BACKEND.supports_device(torch.device("cpu"))
            assert not BACKEND.supports_device(torch.device("cuda"))
        else:
            assert STATUS.reason.startswith("GPU")
            assert not BACKEND.supports_device(torch.device("cpu"))
    else:
        assert STATUS.reason, "an unavailable backend must say why"
        assert not BACKEND.supports_device(torch.device("cpu"))


def _run_python(code: str, env_update: dict) -> str:
    env = dict(os.environ)
    env.update(env_update)
    env = {k: v for k, v in env.items() if v is not None}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_status_without_interpreter_and_gpu():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import zofo_kernels as zk, torch\n"
            "st = zk.available_backends()['triton']\n"
            "print(st.available, torch.cuda.is_available(), '|', st.reason)")
    out = _run_python(code, {"CUDA_VISIBLE_DEVICES": ""})
    flag, cuda, reason = out.split(" ", 2)
    assert cuda == "False"
    assert flag == "False" and "TRITON_INTERPRET" in reason, out


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import zofo_kernels as zk\n"
            "st = zk.available_backends()['triton']\n"
            "print(st.available, '|', st.reason)\n"
            "x = zk.noise(3, 0, 5, backend='reference')\n"
            "print(x.numel())")
    out = _run_python(code, {"TRITON_INTERPRET": "1"})
    first, second = out.splitlines()
    assert first.startswith("False |") and "not importable" in first, out
    assert second == "5"


def test_block_must_be_power_of_two_multiple_of_128():
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    for bad in (0, 64, 200, 384):
        with pytest.raises(ValueError, match="block"):
            TritonBackend(block=bad)


# --------------------------------------------------------------------------- noise

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_noise_beyond_2_pow_32(device, distribution):
    _need(device)
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    starts = [2 ** 32 - 301, 2 ** 33 + 5, 2 ** 40 - 3, 2 ** 63 - 777,
              int(RNG.integers(2 ** 32, 2 ** 62))]
    for start in starts:
        n = int(RNG.integers(1, 700))
        direction = int(RNG.integers(0, 2 ** 32))
        got = BACKEND.noise(seed, start, n, distribution, direction, torch.device(device))
        want = torch.from_numpy(contract.noise(seed, start, n, distribution, direction))
        assert got.dtype == torch.float32 and got.device.type == device
        if _exact(distribution):
            assert torch.equal(got.cpu(), want), _note(start=start, n=n, seed=seed)
        else:  # a few float32 ulp of the Box-Muller radius (< 8)
            err = (got.cpu().double() - want.double()).abs()
            assert torch.all(err <= GAUSS_Z_BOUND), _note(start=start, n=n, seed=seed)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_empty_and_tiny(device):
    _need(device)
    for distribution in DISTRIBUTIONS:
        out = BACKEND.noise(5, 2 ** 35, 0, distribution, 0, torch.device(device))
        assert out.numel() == 0 and out.dtype == torch.float32
        one = BACKEND.noise(5, 2 ** 35 + 127, 1, distribution, 7, torch.device(device))
        want = contract.noise(5, 2 ** 35 + 127, 1, distribution, 7)
        if _exact(distribution):
            assert one.item() == float(want[0])
        else:
            assert abs(one.item() - float(want[0])) <= GAUSS_Z_BOUND


# --------------------------------------------------------------------------- multi-tensor

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf in the special values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_many_tensors_perturb_and_update(device, dtype, distribution):
    _need(device)
    shapes, offsets = _layout(14)
    got, want = _pair(shapes, dtype, device, specials=True)
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    eps = float(10.0 ** RNG.uniform(-4, -1))
    note = _note(dtype=dtype, distribution=distribution, seed=seed, eps=eps, offsets=offsets)

    for name, tensors in (("triton", got), ("reference", want)):
        zk.perturb_(tensors, seed, eps, distribution, direction=0, offsets=offsets, backend=name)
    for a, b in zip(got, want):
        _assert_same(a, b, distribution, "after perturb " + note, coef=eps, steps=1)

    # switch direction 0 -> 1 in one pass, then the fused restore + update (q = 2)
    for name, tensors in (("triton", got), ("reference", want)):
        zk.perturb_(tensors, seed, eps, distribution, direction=1, offsets=offsets, backend=name,
                    restore_scale=-eps, restore_direction=0)
    grads = [float(RNG.standard_normal()), float(RNG.standard_normal())]
    for sr in (True, False):
        for name, tensors in (("triton", got), ("reference", want)):
            g = torch.tensor(grads, device=tensors[0].device)
            zk.zo_update_(tensors, seed, lr=1e-3, projected_grads=g,
                          restore_scale=-eps if sr else 0.0, weight_decay=0.05,
                          distribution=distribution, offsets=offsets, backend=name,
                          stochastic_rounding=sr)
        for a, b in zip(got, want):
            coef = 4 * eps + 1e-3 * sum(abs(x) for x in grads) * (1 if sr else 2)
            _assert_same(a, b, distribution, f"after update (sr={sr}) " + note, coef=coef,
                         steps=5 if sr else 7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_update_many_directions_mixed_dtypes_non_contiguous(device, distribution):
    _need(device)
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    q = 5
    storage = [
        _weights((11, 7), torch.bfloat16),
        _weights((33,), torch.float16),
        _weights((0, 4), torch.float32),  # empty
        _weights((5, 9), torch.float32),
        _weights((130,), torch.bfloat16),
        _weights((3, 3, 3), torch.float16),
    ]

    def views(ts):  # two non-contiguous views: a transpose and a strided slice
        return [t.t() if i == 0 else (t[:, ::2] if i == 3 else t) for i, t in enumerate(ts)]

    got_storage = [t.clone().to(device) for t in storage]
    got = views(got_storage)
    want = views([t.clone() for t in storage])
    assert not got[0].is_contiguous() and not got[3].is_contiguous()
    offsets = [2 ** 32 - 40, 5, 10 ** 6, 2 ** 34 + 1, 999, 2 ** 41 + 17]
    grads = RNG.standard_normal(q).astype(np.float32).tolist()
    for name, tensors in (("triton", got), ("reference", want)):
        zk.zo_update_(tensors, seed, lr=3e-3, projected_grads=torch.tensor(grads).to(
            tensors[1].device), restore_scale=1e-3, restore_direction=q - 1, weight_decay=0.1,
            distribution=distribution, offsets=offsets, backend=name)
    for a, b in zip(got, want):
        coef = 1e-3 + 3e-3 * sum(abs(x) for x in grads)
        _assert_same(a, b, distribution, _note(seed=seed, distribution=distribution), coef=coef,
                     steps=2)
    # the columns the strided view skips are untouched
    assert torch.equal(got_storage[3][:, 1::2].cpu(), storage[3][:, 1::2])


class _CountingLauncher:
    """Stands in for a @triton.jit kernel: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.grids = []

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def launch(*args, **kwargs):
            self.grids.append(grid)
            return launcher(*args, **kwargs)
        return launch


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_dtype_group(device, monkeypatch):
    _need(device)
    from zofo_kernels.core.backends.triton import kernels as tk
    counters = {name: _CountingLauncher(getattr(tk, name))
                for name in ("_perturb_kernel", "_update_kernel", "_noise_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(tk, name, counter)

    dtypes = [DTYPES[k % 3] for k in range(15)]
    tensors = [_weights((int(RNG.integers(1, 50)),), dt).to(device) for dt in dtypes]
    tensors.append(torch.empty(0, dtype=torch.float16, device=device))
    seed = 12345
    zk.perturb_(tensors, seed, 1e-3, "rademacher", backend="triton")
    assert len(counters["_perturb_kernel"].grids) == 3
    zk.perturb_(tensors, seed, -2e-3, "gaussian", backend="triton")
    assert len(counters["_perturb_kernel"].grids) == 6
    zk.zo_update_(tensors, seed, lr=1e-3, projected_grads=[0.5, -0.25, 2.0], backend="triton")
    assert len(counters["_update_kernel"].grids) == 3
    only_fp32 = [t for t in tensors if t.dtype == torch.float32]
    zk.perturb_(only_fp32, seed, 1e-3, backend="triton")
    assert len(counters["_perturb_kernel"].grids) == 7
    zk.noise(seed, 2 ** 33, 3000, backend="triton", device=device)
    assert len(counters["_noise_kernel"].grids) == 1
    # only empty tensors: nothing to launch
    zk.perturb_([torch.empty(0, device=device)], seed, 1e-3, backend="triton")
    assert len(counters["_perturb_kernel"].grids) == 7
    # every program enumerates one window of one tensor: the grid covers all tensors
    grid = counters["_update_kernel"].grids[0]
    assert grid[0] >= sum(1 for t in tensors if t.dtype == dtypes[0] and t.numel())


@pytest.mark.parametrize("device", DEVICES)
def test_launch_tables_are_cached(device):
    _need(device)
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    backend = TritonBackend(block=256)
    tensors = [_weights((int(RNG.integers(1, 300)),), torch.float32).to(device)
               for _ in range(9)]
    offsets = zk.canonical_offsets(tensors)
    want = [t.clone().cpu() for t in tensors]
    ref = base.get("reference")
    g = torch.tensor([0.75], device=device)
    for step in range(3):  # an optimizer step: perturb +eps, -2eps, restore + update
        backend.perturb(tensors, offsets, 100 + step, "rademacher", 1e-3, 0, 0.0, 0)
        backend.perturb(tensors, offsets, 100 + step, "rademacher", -2e-3, 0, 0.0, 0)
        backend.update(tensors, offsets, 100 + step, "rademacher", lr=1e-2, projected_grads=g,
                       restore_scale=1e-3, restore_direction=0, weight_decay=0.0,
                       stochastic_rounding=True)
        ref.perturb(want, offsets, 100 + step, "rademacher", 1e-3, 0, 0.0, 0)
        ref.perturb(want, offsets, 100 + step, "rademacher", -2e-3, 0, 0.0, 0)
        ref.update(want, offsets, 100 + step, "rademacher", lr=1e-2, projected_grads=g.cpu(),
                   restore_scale=1e-3, restore_direction=0, weight_decay=0.0,
                   stochastic_rounding=True)
    assert backend.table_builds == 1, "repeated calls on the same tensors rebuilt the tables"
    for a, b in zip(tensors, want):
        assert torch.equal(a.cpu(), b)
    # the tables do not depend on the distribution; new offsets: one more table
    backend.perturb(tensors, offsets, 1, "gaussian", 1e-3, 0, 0.0, 0)
    assert backend.table_builds == 1
    shifted = [o + 2 ** 33 for o in offsets]
    backend.perturb(tensors, shifted, 1, "rademacher", 1e-3, 0, 0.0, 0)
    backend.perturb(tensors, shifted, 2, "rademacher", 1e-3, 0, 0.0, 0)
    assert backend.table_builds == 2
    # a new tensor in the list changes the key
    extra = tensors + [torch.zeros(5, device=device)]
    backend.perturb(extra, zk.canonical_offsets(extra), 1, "rademacher", 1e-3, 0, 0.0, 0)
    assert backend.table_builds == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_block_size_invariance(device, distribution):
    """Results depend on (seed, index, direction) only, not on the launch shape."""
    _need(device)
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    shapes, offsets = _layout(7)
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    results = []
    for block in (128, 512, 2048):
        backend = TritonBackend(block=block)
        tensors = [_weights(s, torch.bfloat16) for s in shapes]
        if not results:
            start = [t.clone() for t in tensors]
        else:
            tensors = [t.clone() for t in start]
        tensors = [t.to(device) for t in tensors]
        live = [(t, o) for t, o in zip(tensors, offsets) if t.numel()]
        ts, os_ = [t for t, _ in live], [o for _, o in live]
        backend.perturb(ts, os_, seed, distribution, 1e-2, 3, -1e-2, 2)
        backend.update(ts, os_, seed, distribution, lr=1e-3,
                       projected_grads=torch.tensor([1.5, -0.5], device=device),
                       restore_scale=1e-2, restore_direction=1, weight_decay=0.01,
                       stochastic_rounding=True)
        results.append([t.cpu() for t in tensors])
        noise = backend.noise(seed, 2 ** 36 + 77, 1000, distribution, 5, torch.device(device))
        results[-1].append(noise.cpu())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), _note(seed=seed, distribution=distribution)


# --------------------------------------------------------------------------- sparse masks

def _random_masks(shapes, device):
    """One int32 bitmap per shape, cycling through dense-ish, all set, none set and sparse
    (about 1 in 8) patterns; the unused bits past numel are random too (the kernels must
    ignore them)."""
    out = []
    for k, shape in enumerate(shapes):
        words = contract.mask_words(int(np.prod(shape)))

        def rand():
            return RNG.integers(-2 ** 31, 2 ** 31, size=words, dtype=np.int64).astype(np.int32)
        kind = k % 4
        if kind == 0:
            m = rand()
        elif kind == 1:
            m = np.full(words, -1, dtype=np.int32)
        elif kind == 2:
            m = np.zeros(words, dtype=np.int32)
        else:
            m = rand() & rand() & rand()
        out.append(torch.from_numpy(m).to(device))
    return out


def _bit_pattern(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().reshape(-1)
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _assert_masked_out_kept(after, before, masks, what):
    """Elements whose bit is 0 keep their bit pattern exactly (NaN payloads included)."""
    for i, (a, b, m) in enumerate(zip(after, before, masks)):
        keep = torch.from_numpy(contract.mask_bits(m.cpu().numpy(), 0, b.numel()))
        changed = (_bit_pattern(a) != _bit_pattern(b)) & ~keep
        assert not torch.any(changed), f"tensors[{i}]: {int(changed.sum())} masked-out " \
            f"elements were written {what}"


def _masked_steps(backend, ref, got, want, offsets, masks, seed, distribution, grads):
    """perturb, switch direction (fused restore), then restore + update with and without
    stochastic rounding, on the backend and the reference; yields after each call."""
    eps = 1e-2
    calls = [
        lambda b, ts, ms, g: b.perturb(ts, offsets, seed, distribution, eps, 0, 0.0, 0,
                                       masks=ms),
        lambda b, ts, ms, g: b.perturb(ts, offsets, seed, distribution, eps, 1, -eps, 0,
                                       masks=ms),
        lambda b, ts, ms, g: b.update(ts, offsets, seed, distribution, lr=1e-3,
                                      projected_grads=g, restore_scale=-eps,
                                      restore_direction=1, weight_decay=0.05,
                                      stochastic_rounding=True, masks=ms),
        lambda b, ts, ms, g: b.update(ts, offsets, seed, distribution, lr=1e-3,
                                      projected_grads=g, restore_scale=0.0,
                                      restore_direction=0, weight_decay=0.05,
                                      stochastic_rounding=False, masks=ms),
    ]
    for k, call in enumerate(calls):
        call(backend, got, masks, grads.to(got[0].device))
        call(ref, want, [m.cpu() for m in masks], grads.cpu())
        yield k


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf in the special values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_masked_many_tensors(device, dtype, distribution):
    """Masked launches over odd sizes and offsets (beyond 2**32 too), with block 128 so that
    full windows (the unmasked-load path) and partial ones both meet a mask: the reference's
    values where the bit is set, the old bit pattern where it is not."""
    _need(device)
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    backend, ref = TritonBackend(block=128), base.get("reference")
    shapes, offsets = _layout(10)
    got, want = _pair(shapes, dtype, device, specials=True)
    masks = _random_masks(shapes, device)
    start = [t.cpu().clone() for t in got]
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    grads = torch.tensor(RNG.standard_normal(2).astype(np.float32))
    note = _note(dtype=dtype, distribution=distribution, seed=seed, offsets=offsets)
    coef = 0.0
    for k in _masked_steps(backend, ref, got, want, offsets, masks, seed, distribution, grads):
        # sum of |scale| multiplying z so far (as in test_many_tensors_perturb_and_update)
        g1 = 1e-3 * float(grads.abs().sum())
        coef += (1e-2, 2e-2, 1e-2 + g1, g1)[k]
        for a, b in zip(got, want):
            _assert_same(a, b, distribution, f"after call {k} " + note, coef=coef,
                         steps=2 * k + 1)
        _assert_masked_out_kept(got, start, masks, f"after call {k} " + note)
    # the "all set" and "none set" tensors behave as dense / untouched ones
    assert any(_bit_pattern(a).ne(_bit_pattern(b)).any() for a, b in zip(got[1::4], start[1::4]))
    for a, b in zip(got[2::4], start[2::4]):
        assert torch.equal(_bit_pattern(a), _bit_pattern(b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_aligned_vector_path(device, dtype):
    """An aligned layout (the vector-load variant) with a mask stores through the masked
    path: full windows included, only the set bits change."""
    _need(device)
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    backend, ref = TritonBackend(block=256), base.get("reference")
    sizes = [512, 8 * int(RNG.integers(1, 40)) + 256, 8 * int(RNG.integers(1, 40))]
    start = [_weights((n,), dtype) for n in sizes]
    offsets = zk.canonical_offsets(start)
    # random bits for every tensor: full windows with set and unset lanes
    masks = [_random_masks([(n,)], device)[0] for n in sizes]
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    grads = torch.tensor([0.5, 2.0])
    for distribution in DISTRIBUTIONS:  # each from the same start (exact vs toleranced)
        got = [t.clone().to(device) for t in start]
        want = [t.clone() for t in start]
        assert backend._table(got, offsets, 128, masks)[3], "layout not aligned"
        for _ in _masked_steps(backend, ref, got, want, offsets, masks, seed, distribution,
                               grads):
            pass
        for a, b in zip(got, want):  # four calls: |scale| on z sums to 4 eps + 2 lr sum|g|
            _assert_same(a, b, distribution, _note(seed=seed, distribution=distribution),
                         coef=4e-2 + 2e-3 * 2.5, steps=7)
        _assert_masked_out_kept(got, start, masks, _note(seed=seed, distribution=distribution))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_launch_tables_are_cached_on_the_masks(device):
    """The launch table carries the bitmaps' addresses: dense and masked calls on the same
    tensors use different tables, a masked call with the same bitmaps reuses its table, other
    bitmaps (other addresses) get their own, and a dense call after masked ones writes every
    element."""
    _need(device)
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    backend = TritonBackend(block=128)
    sizes = [int(RNG.integers(1, 300)) for _ in range(4)]
    tensors = [torch.zeros(n, device=device) for n in sizes]
    offsets = zk.canonical_offsets(tensors)
    none = [torch.zeros(contract.mask_words(n), dtype=torch.int32, device=device) for n in sizes]
    every = [torch.full_like(m, -1) for m in none]

    def perturb(masks):
        backend.perturb(tensors, offsets, 3, "rademacher", 1.0, 0, 0.0, 0, masks=masks)

    perturb(none)
    assert backend.table_builds == 1
    assert all(torch.count_nonzero(t) == 0 for t in tensors), "an all-zero mask wrote"
    perturb(every)
    assert backend.table_builds == 2
    assert all(torch.all(t.abs() == 1.0) for t in tensors), "an all-set mask skipped elements"
    perturb(none)
    perturb(every)
    backend.update(tensors, offsets, 3, "rademacher", lr=1.0,
                   projected_grads=torch.tensor([0.5], device=device), restore_scale=-1.0,
                   restore_direction=0, weight_decay=0.0, stochastic_rounding=False,
                   masks=none)
    assert backend.table_builds == 2, "the same bitmaps rebuilt their table"
    for t in tensors:
        t.zero_()
    perturb(None)  # dense: must not reuse a masked table (nor a masked one a dense table)
    assert backend.table_builds == 3
    assert all(torch.all(t.abs() == 1.0) for t in tensors)
    table = backend._table(tensors, offsets, 128, every)[0].cpu()
    assert table.shape == (len(tensors), 6)
    assert table[:, 5].tolist() == [m.data_ptr() for m in every]
    assert backend._table(tensors, offsets, 128)[0].cpu()[:, 5].tolist() == [0] * len(sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_launch_tables_and_windows(device):
    """Low-rank calls (HAS_FACTORS): windows spanning several rows and programs (block 128),
    rank 1 (no sum past l = 0) and a dense vector in the same launch, bit for bit with the
    reference (Rademacher: exact); the table has the factor columns (U, V, m, n; 0, 0, 0, 1
    for the dense tensor), is cached on the factors' addresses, and a call whose factors are
    all None is a dense launch (6-column table)."""
    _need(device)
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    backend, ref = TritonBackend(block=128), base.get("reference")
    start = [_weights((20, 13), torch.bfloat16), _weights((37,), torch.bfloat16),
             _weights((6, 7), torch.bfloat16)]
    offsets = [2 ** 32 + 77, 2 ** 32 + 500, 2 ** 32 + 700]
    seed = int(RNG.integers(0, 2 ** 63 - 1))

    def pair(m, n):
        return tuple(torch.from_numpy(contract.noise(seed, o, 2 * rows, "rademacher"))
                     .reshape(2, rows, 1).to(device) for o, rows in ((0, m), (99, n)))
    factors = [pair(20, 13), None, pair(6, 7)]
    got = [t.clone().to(device) for t in start]
    want = [t.clone() for t in start]
    grads = torch.tensor([0.5, -2.0])
    for impl, ts, fs, g in ((backend, got, factors, grads.to(device)),
                            (ref, want, [None if f is None else tuple(x.cpu() for x in f)
                                         for f in factors], grads)):
        impl.perturb(ts, offsets, seed, "rademacher", 1e-2, 1, 0.0, 0, factors=fs)
        impl.perturb(ts, offsets, seed, "rademacher", -2e-2, 1, 0.0, 0, factors=fs)
        impl.update(ts, offsets, seed, "rademacher", lr=1e-2, projected_grads=g,
                    restore_scale=1e-2, restore_direction=1, weight_decay=0.1,
                    stochastic_rounding=True, factors=fs)
    note = _note(seed=seed)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b), note
    assert backend.table_builds == 1, "the same factors rebuilt their table"
    table = backend._table(got, offsets, 128, factors=factors)[0].cpu()
    assert table.shape == (3, 10)
    assert table[:, 6:].tolist() == [[factors[0][0].data_ptr(), factors[0][1].data_ptr(), 20, 13],
                                     [0, 0, 0, 1],
                                     [factors[2][0].data_ptr(), factors[2][1].data_ptr(), 6, 7]]
    other = [pair(20, 13), None, factors[2]]
    backend.perturb(got, offsets, seed, "rademacher", 1e-2, 0, 0.0, 0, factors=other)
    assert backend.table_builds == 2
    backend.perturb(got, offsets, seed, "rademacher", 1e-2, 0, 0.0, 0, factors=[None] * 3)
    backend.perturb(got, offsets, seed, "rademacher", 1e-2, 0, 0.0, 0)
    assert backend.table_builds == 3
    assert backend._table(got, offsets, 128, factors=[None] * 3)[0].shape == (3, 6)


def _magnitude_values(n: int, dtype, threshold: float) -> torch.Tensor:
    """Values around the threshold (equal to it, one step either side, negated), spanning
    many binades, with the special values at the front."""
    w = _weights((n,), dtype).float()
    t32 = np.float32(threshold)
    near = [t32, -t32, np.nextafter(t32, np.float32(0)), np.nextafter(t32, np.float32(np.inf)),
            np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]
    k = min(n, len(near))
    w[:k] = torch.tensor(near[:k], dtype=torch.float32)
    return w[torch.from_numpy(RNG.permutation(n))].to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_mask_packing(device, dtype, monkeypatch):
    """Bit for bit the contract's bitmap for odd sizes (one word, word and program boundaries
    +-1), thresholds that sit on storage values, between them, 0, inf and negative; every
    word is overwritten and the bits past numel are 0; one launch per call."""
    _need(device)
    from zofo_kernels.core.backends.triton import kernels as tk
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    backend = TritonBackend(block=128)  # 4 words per program
    sizes = [1, 5, 31, 32, 33, 127, 128, 129, 500, 32 * 4 * 3 + 1]
    limits = [1e-3, 0.5, 0.0, float("inf"), -1.0, 1e-40, 2.0 ** -20, 3.0, 1e-6, 0.1]
    limits = [float(np.float32(x)) for x in limits]
    values = [_magnitude_values(n, dtype, x).to(device) for n, x in zip(sizes, limits)]
    masks = [torch.full((contract.mask_words(n),), -1, dtype=torch.int32, device=device)
             for n in sizes]  # garbage the kernel must overwrite
    launches = _CountingLauncher(tk._magnitude_mask_kernel)
    monkeypatch.setattr(tk, "_magnitude_mask_kernel", launches)
    backend.magnitude_mask(values, limits, masks)
    assert launches.grids == [(sum(-(-n // 128) for n in sizes),)]
    for i, (v, x, m) in enumerate(zip(values, limits, masks)):
        want = contract.magnitude_mask_words(v.cpu().float().numpy(), x).view(np.int32)
        got = m.cpu().numpy()
        assert np.array_equal(got, want), _note(i=i, n=v.numel(), threshold=x, dtype=dtype)
        tail = sizes[i] % 32
        if tail:  # bits past numel are 0
            assert got[-1:].view(np.uint32)[0] >> tail == 0
    # the public API, through the registered backend: the same words
    api = zk.magnitude_mask(values, limits, backend="triton")
    assert all(torch.equal(a.cpu(), m.cpu()) for a, m in zip(api, masks))
    nonzero = [int(np.unpackbits(m.cpu().numpy().view(np.uint8)).sum()) for m in masks]
    assert nonzero[3] == sizes[3] - 2 and nonzero[4] == 0, (nonzero, "inf / negative threshold")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_calls_reject_bad_bitmaps(device):
    _need(device)
    a = torch.zeros(40, device=device)
    good = torch.full((2,), -1, dtype=torch.int32, device=device)
    for bad in ([good, good], [good[:1]], [good.to(torch.int64)], [good.float()]):
        with pytest.raises(ValueError, match="mask"):
            BACKEND.perturb([a], [0], 1, "rademacher", 1.0, 0, 0.0, 0, masks=bad)
        with pytest.raises(ValueError, match="mask"):
            BACKEND.update([a], [0], 1, "rademacher", lr=1.0,
                           projected_grads=torch.ones(1, device=device), restore_scale=0.0,
                           restore_direction=0, weight_decay=0.0, stochastic_rounding=True,
                           masks=bad)
        with pytest.raises(ValueError, match="mask"):
            BACKEND.magnitude_mask([a], [1.0], bad)
    assert torch.equal(a, torch.zeros(40, device=device))
    assert torch.equal(good, torch.full((2,), -1, dtype=torch.int32, device=device))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("device", DEVICES)
def test_backend_rejects_bad_groups(device):
    _need(device)
    a = torch.zeros(10, device=device)
    b = torch.zeros(10, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="group"):
        BACKEND.perturb([a, b], [0, 10], 1, "gaussian", 1e-3, 0, 0.0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        BACKEND.perturb([torch.zeros(4, 4, device=device).t()], [0], 1, "gaussian", 1e-3, 0,
                        0.0, 0)
    with pytest.raises(ValueError, match="offsets"):
        BACKEND.perturb([a], [0, 1], 1, "gaussian", 1e-3, 0, 0.0, 0)
    with pytest.raises(TypeError, match="dtype"):
        BACKEND.perturb([torch.zeros(3, dtype=torch.float64, device=device)], [0], 1,
                        "gaussian", 1e-3, 0, 0.0, 0)
    with pytest.raises(ValueError, match="projected_grads"):
        BACKEND.update([a], [0], 1, "gaussian", lr=1e-3,
                       projected_grads=torch.zeros(0, device=device), restore_scale=0.0,
                       restore_direction=0, weight_decay=0.0, stochastic_rounding=True)
    assert torch.equal(a, torch.zeros(10, device=device))
    if BACKEND.interpreted and torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot run"):
            BACKEND.perturb([a.cuda()], [0], 1, "gaussian", 1e-3, 0, 0.0, 0)


# --------------------------------------------------------------------------- compiled only

@pytest.mark.gpu
def test_hyperparameters_do_not_recompile():
    _need("cuda")
    from zofo_kernels.core.backends.triton import kernels as tk
    tensors = [_weights((1000,), torch.bfloat16).cuda(), _weights((77,), torch.bfloat16).cuda()]
    device = torch.cuda.current_device()

    def compiled(kernel):
        return len(kernel.device_caches[device][0])

    zk.perturb_(tensors, 1, 1e-3, backend="triton")
    zk.zo_update_(tensors, 1, lr=1e-3, projected_grads=[1.0], backend="triton")
    before = (compiled(tk._perturb_kernel), compiled(tk._update_kernel))
    for k, seed in enumerate([2, 2 ** 40 + 1, 2 ** 63 - 1, 16, 1]):
        zk.perturb_(tensors, seed, 10.0 ** -k, direction=k * 1000 + 1, backend="triton")
        zk.zo_update_(tensors, seed, lr=10.0 ** -k, projected_grads=[0.5] * (k + 1),
                      weight_decay=0.1 * k, backend="triton")
    torch.cuda.synchronize()
    assert (compiled(tk._perturb_kernel), compiled(tk._update_kernel)) == before


@pytest.mark.gpu
def test_masks_do_not_recompile():
    """The bitmaps travel in the launch table: new masks (other contents, other addresses)
    reuse the masked variant compiled once; dense launches keep their own variant."""
    _need("cuda")
    from zofo_kernels.core.backends.triton import kernels as tk
    tensors = [_weights((1000,), torch.float16).cuda(), _weights((77,), torch.float16).cuda()]
    device = torch.cuda.current_device()

    def compiled(kernel):
        return len(kernel.device_caches[device][0])

    def masks():
        return _random_masks([(1000,), (77,)], "cuda")

    zk.perturb_(tensors, 1, 1e-3, backend="triton")
    zk.perturb_(tensors, 1, 1e-3, backend="triton", mask=masks())
    zk.zo_update_(tensors, 1, lr=1e-3, projected_grads=[1.0], backend="triton", mask=masks())
    zk.magnitude_mask(tensors, [0.1, 0.2], backend="triton")
    kernels = (tk._perturb_kernel, tk._update_kernel, tk._magnitude_mask_kernel)
    before = [compiled(k) for k in kernels]
    for seed in (2, 3, 4):
        zk.perturb_(tensors, seed, 1e-3, backend="triton", mask=masks())
        zk.perturb_(tensors, seed, 1e-3, backend="triton")
        zk.zo_update_(tensors, seed, lr=1e-3, projected_grads=[1.0], backend="triton",
                      mask=masks())
        zk.magnitude_mask([t[: 10 * seed] for t in tensors], [0.5, seed], backend="triton")
    torch.cuda.synchronize()
    assert [compiled(k) for k in kernels] == before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_vector_path(device, dtype):
    """Sizes that keep every window 16-byte aligned select the ALIGNED (vector) variant; it
    computes the same values as the masked one, including partial last windows."""
    _need(device)
    from zofo_kernels.core.backends.triton.launcher import TritonBackend
    backend = TritonBackend(block=256)
    sizes = [256, 8 * int(RNG.integers(1, 40)), 8 * int(RNG.integers(1, 40)) + 256]
    tensors = [_weights((n,), dtype).to(device) for n in sizes]
    offsets = zk.canonical_offsets(tensors)
    *_, aligned = backend._table(tensors, offsets, 128)
    assert aligned
    odd = [_weights((n,), dtype).to(device) for n in sizes]
    odd_offsets = [o + 3 for o in offsets]
    assert not backend._table(odd, odd_offsets, 128)[3]
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    for ts, offs in ((tensors, offsets), (odd, odd_offsets)):
        want = [t.cpu().clone() for t in ts]
        for distribution in DISTRIBUTIONS:
            backend.perturb(ts, offs, seed, distribution, 1e-2, 1, 0.0, 0)
            backend.update(ts, offs, seed, distribution, lr=1e-3,
                           projected_grads=torch.tensor([0.5, 2.0], device=device),
                           restore_scale=-1e-2, restore_direction=1, weight_decay=0.0,
                           stochastic_rounding=True)
            ref = base.get("reference")
            ref.perturb(want, offs, seed, distribution, 1e-2, 1, 0.0, 0)
            ref.update(want, offs, seed, distribution, lr=1e-3,
                       projected_grads=torch.tensor([0.5, 2.0]), restore_scale=-1e-2,
                       restore_direction=1, weight_decay=0.0, stochastic_rounding=True)
            for a, b in zip(ts, want):
                _assert_same(a, b, distribution, _note(seed=seed, distribution=distribution),
                             coef=2e-2 + 2.5e-3, steps=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_tiny_updates(device, dtype):
    """Updates far below an ulp (float16 subnormals and below 2**-24, bfloat16 normals): the
    stochastic-rounding decisions match the reference bit for bit (Rademacher: z exact)."""
    _need(device)
    n = 1500
    w = torch.zeros(n)
    w[n // 3: 2 * n // 3] = 2.0 ** -20  # float16 subnormal
    w[2 * n // 3:] = torch.linspace(-1.0, 1.0, n - 2 * n // 3)
    got, want = w.to(dtype).to(device), w.to(dtype)
    seed = int(RNG.integers(0, 2 ** 63 - 1))
    for lr in (3e-9, 1e-7, 1e-4):
        for name, t in (("triton", got), ("reference", want)):
            zk.zo_update_(t, seed + int(lr * 1e9), lr=lr,
                          projected_grads=torch.tensor([0.7, -0.3], device=t.device),
                          distribution="rademacher", offsets=[2 ** 32 + 1], backend=name)
        _assert_same(got, want, "rademacher", _note(seed=seed, lr=lr, dtype=dtype))
    assert torch.count_nonzero(got[: n // 3]) > 0, "tiny updates all rounded away"


def test_every_kernel_variant_compiles_for_sm90_without_fused_multiply_adds():
    """The kernels as a GPU would build them, on this GPU-less machine: Triton lowers each
    variant (every launch-time switch, dtype and distribution at least once) to sm_90 PTX and
    assembles it (its own ptxas, no driver), with the backend's launch options. The noise
    contract rounds every float32 product and sum separately: no fma.rn.f32 may appear in the
    PTX (with fp fusion enabled, Triton contracts the low-rank z and w + scale * z into them)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import json
    code = ("import runpy\n"
            "runpy.run_path('python_tests/core/triton_sm90_compile.py', run_name='__main__')")
    out = json.loads(_run_python(code, {"TRITON_INTERPRET": None}).splitlines()[-1])
    assert out.pop("options")["enable_fp_fusion"] is False
    assert len(out) == 10
    for variant, built in out.items():
        assert built["cubin_bytes"] > 0, variant
        assert built["fma_f32"] == 0, f"{variant}: {built['fma_f32']} fused multiply-adds"
