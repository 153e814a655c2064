"""The CUDA kernels' own source, run on the CPU under AddressSanitizer and UBSan, checked bit
for bit against the noise contract.

No GPU is needed: ``csrc/cuda_kernels.cu`` -- the file nvcc compiles -- is compiled a second
time as plain C++ with ``csrc/host/cuda_host_shim.h`` standing in for the CUDA runtime, and
linked with the test-only driver ``csrc/host/cuda_host_main.cpp`` into an executable
instrumented with ``-fsanitize=address,undefined -fno-sanitize-recover=all`` (an instrumented
shared library cannot be loaded into an uninstrumented Python, hence a program that reads its
cases from a file and writes the results to another). The shim's launcher runs every
(block, thread) of the grid that the real launch code computes (``csrc/cuda_launch.h``), in a
shuffled order. So the kernels' grid-stride loop, the binary search of a group's row, the
16-byte/8-byte vector loads and stores, the element-by-element tails, the 64-bit indices, the
projected gradients read from "device" memory, the restore-direction switch, stochastic
rounding on store, the sparse-perturbation bitmaps (masked stores, skipped groups), the
low-rank directions (the kernels' low-rank instantiation: z from the factor rows of each
element, rows with and without factors in one call) and the magnitude_mask kernel all run
here, and every buffer the kernels touch is an allocation of exactly the size the GPU code may
touch (the tensors, bitmaps and factors end where their allocation ends -- factors hold exactly
the directions a call uses; a canary sits before tensors placed off alignment; the bitmaps
magnitude_mask writes start as 0xA5 bytes, so a word it does not write shows).

What is compared, bit for bit, with no tolerance:
* Rademacher signs, stochastic-rounding words and decisions: ``contract`` itself.
* Gaussian noise: ``contract``'s Philox words and uniforms, then the float32 log/sin/cos that
  the kernels use (``zofo_noise.h``), transcribed below in numpy float32 arithmetic (every
  numpy float32 operation is correctly rounded, and the header is compiled without FMA
  contraction on both sides, so the transcription gives the kernels' bits). ``contract``'s own
  Gaussian values use numpy's log/sin/cos and may differ by a few ulp; that allowance is what
  ``test_kernels.py`` checks, not this file.
* Weights: the float-math contract of ``backends/base.py`` applied in numpy float32 to those z;
  16-bit rounding to nearest by numpy (float16) and torch (bfloat16) conversions, stochastic
  rounding by ``contract.stochastic_round_bits``.
* Sparse perturbation: an element whose bit is 0 keeps its bits, the others get the dense
  result above (bitmaps of density 0 to 1, runs, random bits past numel).
* Low-rank directions: a tensor given factors (U, V) (``contract.lowrank_factor``) takes, in
  every direction the call uses (restore included), z = ``contract.lowrank_z`` of U[k], V[k]
  (separately rounded float32 products and sums in a fixed order, times float32(1/sqrt(r))) in
  the formulas above; a tensor without factors in the same call its noise. Given the factors
  this is exact for both distributions; float32 zeros perturbed with scale 1 store z itself.
* magnitude_mask: ``contract.magnitude_mask_words`` (NaN, +-inf, +-0 among the values;
  thresholds equal to an element, 0, -0, negative, infinite, NaN).
* Also the existing CPU backend (same header, different kernels), where it is built.

``test_mutant_is_caught`` breaks ``cuda_kernels.cu`` on purpose in a scratch copy (string
patches, each asserted to apply; each break switched on alone at run time) and asserts that
each break is detected, by a sanitizer or by the comparison: the check can fail.

Only a missing ``g++`` skips this file (``test_matches_cpu_backend`` alone also skips when
the CPU module is not built). Set ZOFO_TEST_SEED to replay a run's random inputs (failures
print the seed). Runtime: about 30 s on 2 cores (three compiles, 28 runs of the executable).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest
import torch


def _import_first(*names):
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ModuleNotFoundError(f"none of {names}")


contract = _import_first("zofo_kernels.contract", "zofo_kernels.core.contract")

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
KERNELS = CSRC / "cuda_kernels.cu"
DRIVER = CSRC / "host" / "cuda_host_main.cpp"
GXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found: the host build of the "
                                                    "CUDA kernels needs it")

_RNG_SEED = int(os.environ.get("ZOFO_TEST_SEED", int.from_bytes(os.urandom(4), "little")))

# -O1 keeps the instrumented build quick to compile and run; -fno-strict-aliasing because the
# kernels read a float4/uint2 vector through element pointers, as CUDA code does (the GPU
# compiler allows it; ISO C++ does not); -ffp-contract=off as in every build of the header.
CXXFLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer",
            "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-strict-aliasing", "-ffp-contract=off", "-fno-fast-math",
            "-DZOFO_CUDA_HOST_EXEC", f"-I{CSRC}", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
# Leak checking needs ptrace, which some containers forbid; the kernels allocate nothing.
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1"}

THREADS = 256        # cuda_launch.h: kThreads
BLOCKS_PER_SM = 16   # cuda_launch.h: kBlocksPerSM
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
DIST_CODES = {"gaussian": 0, "rademacher": 1}
F32 = np.float32


# ============================================================================ build

def _nice():
    return ["nice", "-n", "10"] if shutil.which("nice") else []


def _compile(src: Path, obj: Path) -> str:
    """Compiles one translation unit; returns the compiler's warnings."""
    cmd = _nice() + [GXX, *CXXFLAGS, "-x", "c++", "-c", str(src), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"compile failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r.stderr


def _link(objs: List[Path], exe: Path) -> None:
    cmd = [GXX, "-fsanitize=address,undefined", *map(str, objs), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"link failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_host")


@pytest.fixture(scope="session")
def base_build(build_dir):
    """(the sanitized executable built from the real csrc/cuda_kernels.cu, the driver's object
    file, the compilers' warnings); the two translation units compile in parallel, once per
    session. Warnings fail test_host_build_is_warning_free, not the build, so that a new
    compiler's warning shows as one failure with its text."""
    driver, kernels, exe = (build_dir / "cuda_host_main.o", build_dir / "cuda_kernels.o",
                            build_dir / "cuda_host")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(_compile, DRIVER, driver), pool.submit(_compile, KERNELS, kernels)]
        warnings = "".join(j.result() for j in jobs)
    _link([kernels, driver], exe)
    return exe, driver, warnings


@pytest.fixture(scope="session")
def host_exe(base_build):
    return base_build[0]


@pytest.fixture(scope="session")
def driver_obj(base_build):
    return base_build[1]


# ======================================================================= the kernels' Gaussian math

def header_log(x):
    """zofo_noise.h log_f32, in numpy float32 operations (same order, same constants)."""
    b = x.view(np.uint32)
    e = (b >> np.uint32(23)).astype(np.int32) - np.int32(127)
    mant = b & np.uint32(0x007FFFFF)
    big = mant > np.uint32(0x003504F3)
    mb = mant | np.where(big, np.uint32(0x3F000000), np.uint32(0x3F800000))
    e = e + big.astype(np.int32)
    f = mb.view(np.float32) - F32(1)
    s = f / (F32(2) + f)
    z = s * s
    R = F32(2) / F32(9)
    R = R * z + F32(2) / F32(7)
    R = R * z + F32(2) / F32(5)
    R = R * z + F32(2) / F32(3)
    R = R * z
    hf = F32(0.5) * f * f
    ef = e.astype(np.float32)
    lnm_lo = ef * F32(3.194618329871446e-05) - (hf - s * (hf + R))
    return ef * F32(0.693115234375) + (f + lnm_lo)


def header_sincos(t):
    """zofo_noise.h sincos_f32, in numpy float32 operations."""
    k_round = F32(12582912.0)
    jf = (t * F32(0.636619772) + k_round) - k_round
    q = (jf + k_round).view(np.uint32) & np.uint32(3)
    r = t - jf * F32(1.5703125)
    r = r - jf * F32(4.837512969970703125e-04)
    r = r - jf * F32(7.549790126404332e-08)
    z = r * r
    sp = F32(1) / F32(362880)
    sp = sp * z - F32(1) / F32(5040)
    sp = sp * z + F32(1) / F32(120)
    sp = sp * z - F32(1) / F32(6)
    sr = r + r * z * sp
    cp = F32(-1) / F32(3628800)
    cp = cp * z + F32(1) / F32(40320)
    cp = cp * z - F32(1) / F32(720)
    cp = cp * z + F32(1) / F32(24)
    cr = (F32(1) - F32(0.5) * z) + z * z * cp
    odd = (q & np.uint32(1)) != 0
    s_ = np.where(odd, cr, sr)
    c_ = np.where(odd, sr, cr)
    sin = np.where((q & np.uint32(2)) != 0, -s_, s_)
    cos = np.where(((q + np.uint32(1)) & np.uint32(2)) != 0, -c_, c_)
    return sin, cos


def _box_muller(ua, ub):
    ua = np.where(ua > contract.UNIFORM_MIN, ua, contract.UNIFORM_MIN)
    t = contract.TWO_PI * ub
    r = np.sqrt(contract.MINUS_TWO * header_log(ua))
    s, c = header_sincos(t)
    return r * c, r * s


def gaussian_kernel_math(seed: int, start: int, numel: int, direction: int) -> np.ndarray:
    """Gaussian z for [start, start + numel): contract's words and uniforms, the header's
    float32 log/sin/cos."""
    return gaussian_ranges(seed, [(start, numel)], direction)[0]


def gaussian_ranges(seed: int, ranges, direction: int) -> List[np.ndarray]:
    """gaussian_kernel_math for several (start, numel) ranges at once (one pass of numpy
    over all of their Philox blocks)."""
    firsts = [s // 4 for s, n in ranges]
    counts = [((s + n - 1) // 4 - s // 4 + 1) if n else 0 for s, n in ranges]
    if sum(counts) == 0:
        return [np.zeros(0, np.float32) for _ in ranges]
    blocks = np.concatenate([np.arange(f, f + c, dtype=np.uint64)
                             for f, c in zip(firsts, counts)])
    lo = (blocks & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (blocks >> np.uint64(32)).astype(np.uint32)
    w = contract.philox4x32(lo, hi, np.uint32(direction), np.uint32(contract.PURPOSE_NOISE),
                            seed)
    u = [contract.uniform_from_words(x) for x in w]
    n0, n1 = _box_muller(u[0], u[1])
    n2, n3 = _box_muller(u[2], u[3])
    lanes = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)
    out, pos = [], 0
    for (s, n), f, c in zip(ranges, firsts, counts):
        skip = s - f * 4
        out.append(np.ascontiguousarray(lanes[4 * pos + skip: 4 * pos + skip + n]))
        pos += c
    return out


def ref_noise(seed, start, numel, dist, direction):
    return ref_noise_ranges(seed, [(start, numel)], dist, direction)


def ref_noise_ranges(seed, ranges, dist, direction) -> np.ndarray:
    """z of several index ranges, concatenated."""
    if dist == "rademacher":
        parts = [contract.rademacher(seed, s, n, direction) for s, n in ranges]
    else:
        parts = gaussian_ranges(seed, ranges, direction)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# ============================================================================ storage dtypes

def widen(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return bits.view(np.float32).copy()
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def narrow(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage bits, rounding to nearest even (numpy's float16, torch's bfloat16:
    conversions independent of the header's)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.view(np.uint32).copy()
    if dtype == "bfloat16":
        return torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(
            np.uint16).copy()
    with np.errstate(over="ignore"):
        return x.astype(np.float16).view(np.uint16).copy()


def rn(x, dtype):
    return widen(narrow(x, dtype), dtype)


# ============================================================================ cases

@dataclasses.dataclass
class Tensor:
    numel: int
    offset: int
    align: int        # elements after a 64-byte boundary; -1: null pointer (numel 0)
    bits: np.ndarray  # storage bit patterns (uint32 or uint16)


@dataclasses.dataclass
class Case:
    name: str
    op: str                      # noise, perturb, update, magnitude
    sms: int
    order_seed: int
    seed: int
    dist: str
    device: int = 0
    # noise
    start: int = 0
    numel: int = 0
    direction: int = 0
    # perturb / update
    dtype: str = "float32"
    tensors: List[Tensor] = dataclasses.field(default_factory=list)
    scale: float = 0.0
    restore_scale: float = 0.0
    restore_direction: int = 0
    lr: float = 0.0
    weight_decay: float = 0.0
    stochastic: bool = False
    grads: List[float] = dataclasses.field(default_factory=list)
    # sparse perturbation (perturb / update): one bitmap (uint32 words) per tensor, or None
    masks: Optional[List[np.ndarray]] = None
    # low-rank directions (perturb / update): the call's rank and, per tensor, None (dense
    # noise) or its factors (U, V), float32 arrays of shapes (D, m, r) and (D, n, r); or None
    rank: int = 0
    factors: Optional[List[Optional[Tuple[np.ndarray, np.ndarray]]]] = None
    shapes: Optional[List[tuple]] = None  # the tensors' shapes (low-rank cases)
    # magnitude_mask: one float32 threshold per tensor
    thresholds: List[float] = dataclasses.field(default_factory=list)
    # what the call must do
    expect_rc: int = 0
    expect_error: str = ""


def groups_of(offset: int, numel: int) -> int:
    """Work groups (4 global indices each) a tensor spans, as CudaBackend builds its table."""
    return (offset + numel - 1) // 4 - offset // 4 + 1


def table_of(tensors: List[Tensor]):
    first, rows = 0, []
    for t in tensors:
        rows.append((t.numel, t.offset, first, t.align))
        first += groups_of(t.offset, t.numel)
    return rows, first


def mask_table_of(tensors: List[Tensor]):
    """(rows (numel, first word, align), total words) of a magnitude_mask table."""
    first, rows = 0, []
    for t in tensors:
        rows.append((t.numel, first, t.align))
        first += contract.mask_words(t.numel)
    return rows, first


def expected_launches(case: Case):
    if case.expect_rc:
        return []
    if case.op == "noise":
        total = groups_of(case.start, case.numel) if case.numel > 0 else 0
    elif case.op == "magnitude":
        total = mask_table_of(case.tensors)[1]
    else:
        total = table_of(case.tensors)[1] if case.tensors else 0
    if total <= 0:
        return []
    blocks = min(-(-total // THREADS), case.sms * BLOCKS_PER_SM)
    return [(blocks, THREADS)]


def random_weights(rng, n: int, dtype: str) -> np.ndarray:
    """~N(0, 0.02) with a sprinkling of zeros of both signs, tiny and large values."""
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    if n >= 3:
        special = {"float32": [0.0, -0.0, 1e-40, -3e-39, 1e30, -2.5e-3],
                   "bfloat16": [0.0, -0.0, 1e-38, 3e30, -1e-20, 1.0],
                   "float16": [0.0, -0.0, 6e-8, -3e-5, 6e4, -0.99]}[dtype]
        idx = rng.choice(n, size=min(n // 3, len(special)), replace=False)
        x[idx] = np.array(special[: len(idx)], dtype=np.float32)
    return narrow(x, dtype)


def tensor_list(rng, dtype: str, sizes, base: int, modes, gap: bool = False,
                shuffle_offsets: bool = False) -> List[Tensor]:
    """Tensors of the given sizes, laid end to end from global index `base` (with random gaps
    when `gap`; in a shuffled order of offsets when `shuffle_offsets`). modes per tensor:
    'a' aligned (vector path for complete groups), 'm' one element off alignment, 'n' null
    pointer (empty tensors only)."""
    spans = []
    o = base
    for n in sizes:
        if gap:
            o += int(rng.integers(0, 9))
        spans.append(o)
        o += n
    if shuffle_offsets:
        # the tensors tile [base, ...) in a random order, not in table order
        order = rng.permutation(len(sizes))
        o, spans = base, [0] * len(sizes)
        for i in order:
            spans[i] = o
            o += sizes[i] + (int(rng.integers(0, 5)) if gap else 0)
    out = []
    for n, off, mode in zip(sizes, spans, modes):
        if mode == "n":
            assert n == 0
            align = -1
        elif mode == "a":
            align = off % 4
        else:
            align = (off + 1) % 4
        out.append(Tensor(n, off, align, random_weights(rng, n, dtype)))
    return out


SMS = [1, 2, 108, 132]           # 1 and 2: every thread strides over many groups
SMALL = [0, 1, 3, 4, 5, 7, 8, 9, 13, 2, 6]
LARGE_ODD = [4099, 16387, 40001]  # 16387 + others exceed one pass of a 1-SM grid (16384)
BEYOND_32 = 2 ** 32 + 3           # element index past 2**32, not a multiple of 4
CROSS_34 = 2 ** 34 - 4098         # Gaussian block index i/4 crosses 2**32 (counter word c1)
CROSS_39 = 2 ** 39 - 300          # Rademacher block index i/128 crosses 2**32
HUGE = 2 ** 62 + 2 ** 40 + 1


def table_layouts(rng, dtype):
    """(name, tensors) for one dtype: many tensors in one table, empty ones included, aligned
    and one-off-alignment pointers, offsets from 0 to beyond 2**62, sizes 0..13 and odd large."""
    many = SMALL + LARGE_ODD[:2]
    modes_many = ["n" if n == 0 else ("a" if i % 2 else "m") for i, n in enumerate(many)]
    layouts = [
        ("many_from_0", tensor_list(rng, dtype, many, 0, modes_many)),
        ("many_beyond_2^32_gaps", tensor_list(rng, dtype, many, BEYOND_32,
                                              ["a" if m == "m" else m for m in modes_many],
                                              gap=True)),
        ("many_cross_2^34_shuffled", tensor_list(rng, dtype, many, CROSS_34,
                                                 ["m" if m == "a" else m for m in modes_many],
                                                 gap=True, shuffle_offsets=True)),
        ("many_cross_2^39", tensor_list(rng, dtype, [5, 0, 3000, 1, 1001], CROSS_39,
                                        ["m", "a", "a", "m", "a"])),
        ("huge_offsets", tensor_list(rng, dtype, [0, 3, 4, 1023], HUGE, ["a", "m", "a", "m"])),
        ("one_large_odd_misaligned", tensor_list(rng, dtype, [LARGE_ODD[2]], 6, ["m"])),
        ("one_large_odd_aligned", tensor_list(rng, dtype, [LARGE_ODD[1]], BEYOND_32, ["a"])),
        ("single_0_null", tensor_list(rng, dtype, [0], 5, ["n"])),
        ("single_0_alloc", tensor_list(rng, dtype, [0], 8, ["a"])),
    ]
    for n in (1, 3, 4, 5):
        layouts.append((f"single_{n}", tensor_list(rng, dtype, [n], int(rng.integers(0, 9)),
                                                   ["m" if n % 2 else "a"])))
    return layouts


def _rand_seed(rng):
    return int(rng.integers(0, 2 ** 63 - 1))


# ---------------------------------------------------------------------------- sparse masks

DENSITIES = [0.5, 0.9, 0.0, 1.0, 0.1, "runs"]


def pack_bits(bits: np.ndarray, pad_bits: np.ndarray) -> np.ndarray:
    """uint32 bitmap words of ``bits`` (contract.mask_bits layout), the bits past numel
    taken from ``pad_bits``."""
    full = np.concatenate([bits.astype(np.uint8), pad_bits.astype(np.uint8)])
    return np.packbits(full, bitorder="little").view(np.uint32).copy()


def random_bitmap(rng, n: int, density) -> np.ndarray:
    """A bitmap with the given fraction of bits set ("runs": alternating runs of 3 to 40
    elements). Half of the bitmaps have random bits past numel: the kernels must ignore them
    (a bitmap from magnitude_mask has zeros there; one built by hand may not)."""
    if density == "runs":
        bits = (np.arange(n) // int(rng.integers(3, 41))) % 2 == 1
    else:
        bits = rng.random(n) < density
    pad = (-n) % 32
    pad_bits = rng.random(pad) < 0.5 if rng.random() < 0.5 else np.zeros(pad, bool)
    return pack_bits(bits, pad_bits)


def bitmaps_for(rng, tensors: List[Tensor], start: int) -> List[np.ndarray]:
    return [random_bitmap(rng, t.numel, DENSITIES[(start + i) % len(DENSITIES)])
            for i, t in enumerate(tensors)]


def word_multiple_layout(rng, dtype):
    """Tensors of whole bitmap words whose last work group runs past their end (offset +
    numel not a multiple of 4): a bitmap read for the element after the last is one word past
    the bitmap."""
    return ("word_multiples", tensor_list(rng, dtype, [32, 64, 96, 4096], 1,
                                          ["a", "m", "a", "m"]))


def masked_cases(rng, sms, order_seed) -> List[Case]:
    """perturb and update with bitmaps on every layout and dtype: densities 0 to 1, runs,
    bits past numel set, both distributions, restore, q = 1..3, stochastic rounding."""
    cases = []
    for dtype in DTYPE_CODES:
        layouts = table_layouts(rng, dtype) + [word_multiple_layout(rng, dtype)]
        for li, (lname, tensors) in enumerate(layouts):
            dist = ("gaussian", "rademacher")[li % 2]
            masks = bitmaps_for(rng, tensors, li)
            restore = li % 3 != 0
            cases.append(Case(f"masked_perturb_{dtype}_{dist}_{lname}", "perturb", sms(),
                              order_seed(), _rand_seed(rng), dist, dtype=dtype,
                              tensors=tensors, masks=masks, scale=[1e-3, -2e-2][li % 2],
                              restore_scale=-1e-3 if restore else 0.0,
                              restore_direction=li % 3, direction=(li + 1) % 4))
            q = 1 + li % 3
            grads = [float(F32(g)) for g in rng.standard_normal(q) * 3]
            masks = bitmaps_for(rng, tensors, li + 3)
            sr = li % 4 < 2
            cases.append(Case(f"masked_update_{dtype}_{dist}_{lname}_q{q}_sr{int(sr)}",
                              "update", sms(), order_seed(), _rand_seed(rng), dist,
                              dtype=dtype, tensors=tensors, masks=masks,
                              lr=[1e-3, 3e-4, 2e-2][li % 3], weight_decay=[0.1, 0.0][li % 2],
                              stochastic=sr, grads=grads,
                              restore_scale=1e-3 if restore else 0.0, restore_direction=q - 1))
    return cases


# ---------------------------------------------------------------------------- low-rank directions

# (shape, alignment mode) of the tensors of the low-rank layouts. The call's rank decides
# (contract.lowrank_shape) which tensors take factors: "matrices" at rank 3 gives factors to
# (7, 5), (3, 131), (11, 6) and (129, 67) (m > n and m < n) while (31,) and (2, 50) stay
# dense beside them, at rank 2 (2, 50) takes factors too (no low-rank grid strides: the loop
# is the dense kernels', whose cases stride);
# "thin" at rank 1 gives factors to (5, 1) (one column: every element wraps to the next row),
# (1, 9) (one row) and (4, 4), and (6,) stays dense. Offsets are odd, with gaps, so groups
# straddle tensors; "a" tensors take the vector path, "m" ones do not.
LOWRANK_LAYOUTS = [
    ("matrices", [((7, 5), "a"), ((31,), "m"), ((3, 131), "m"), ((11, 6), "a"),
                  ((2, 50), "a"), ((129, 67), "m")]),
    ("thin", [((5, 1), "m"), ((6,), "a"), ((1, 9), "a"), ((4, 4), "m")]),
]


def lowrank_factors_of(tensors: List[Tensor], shapes, rank: int, seed: int, v_key: int,
                       dist: str, directions: int):
    """Per tensor None or (U, V) of ``directions`` directions, drawn as the contract draws
    them (contract.lowrank_factor at the tensor's offset, seeds contract.lowrank_seeds): the
    harness allocates exactly these, so a factor read of a direction or row past them is
    outside its allocation."""
    u_seed, v_seed = contract.lowrank_seeds(seed, v_key)
    out = []
    for t, shape in zip(tensors, shapes):
        mn = contract.lowrank_shape(shape, rank)
        if mn is None:
            out.append(None)
            continue
        out.append(tuple(np.stack([contract.lowrank_factor(s, t.offset, rows, rank, dist, k)
                                   for k in range(directions)])
                         for s, rows in ((u_seed, mn[0]), (v_seed, mn[1]))))
    return out


def lowrank_cases(rng, sms, order_seed) -> List[Case]:
    """perturb and update with low-rank factors on both layouts, every dtype and both
    distributions: perturb with the fused restore of another direction or plain, update with
    q = 2 or 3, the restore of direction q - 1, weight decay, stochastic rounding on and off.
    Every call holds exactly the directions it uses (D = the highest direction + 1)."""
    cases = []
    for ti, dtype in enumerate(DTYPE_CODES):
        for li, (lname, spec) in enumerate(LOWRANK_LAYOUTS):
            shapes = [shape for shape, _ in spec]
            rank = 1 if lname == "thin" else (2 if dtype == "bfloat16" else 3)
            base = 4 * int(rng.integers(0, 2 ** 40)) + 1 + 2 * li
            tensors = tensor_list(rng, dtype, [int(np.prod(x)) for x in shapes], base,
                                  [mode for _, mode in spec], gap=True)
            for di, dist in enumerate(("gaussian", "rademacher")):
                v = ti + li + di
                restore = v % 2 == 0
                rdir, direction = (1, 2) if restore else (0, v % 3)
                seed = _rand_seed(rng)
                v_key = seed if di == 0 else _rand_seed(rng)  # a lazy V: keyed on another seed
                factors = lowrank_factors_of(tensors, shapes, rank, seed, v_key, dist,
                                             max(direction, rdir if restore else 0) + 1)
                cases.append(Case(f"lowrank_perturb_{dtype}_{dist}_{lname}_r{rank}"
                                  f"_restore{int(restore)}", "perturb", sms(), order_seed(),
                                  seed, dist, dtype=dtype, tensors=tensors,
                                  scale=[1e-2, -2e-3][di],
                                  restore_scale=-1e-2 if restore else 0.0,
                                  restore_direction=rdir, direction=direction, rank=rank,
                                  factors=factors, shapes=shapes))
                q = 2 + v % 2
                grads = [float(F32(g)) for g in rng.standard_normal(q) * 3]
                sr = (ti + di) % 2 == 0
                seed = _rand_seed(rng)
                factors = lowrank_factors_of(tensors, shapes, rank, seed, seed, dist, q)
                cases.append(Case(f"lowrank_update_{dtype}_{dist}_{lname}_r{rank}_q{q}"
                                  f"_sr{int(sr)}", "update", sms(), order_seed(), seed, dist,
                                  dtype=dtype, tensors=tensors, lr=[3e-3, 2e-2][li],
                                  weight_decay=[0.1, 0.0][di], stochastic=sr, grads=grads,
                                  restore_scale=1e-3, restore_direction=q - 1, rank=rank,
                                  factors=factors, shapes=shapes))
    # z itself: float32 zeros perturbed with scale 1 store z exactly, so a z that differs in
    # any bit (a fused multiply-add, another order of the sum) shows in every such element
    shapes = [shape for shape, _ in LOWRANK_LAYOUTS[0][1]]
    for dist in ("gaussian", "rademacher"):
        tensors = tensor_list(rng, "float32", [int(np.prod(x)) for x in shapes],
                              4 * int(rng.integers(0, 2 ** 40)) + 3,
                              [mode for _, mode in LOWRANK_LAYOUTS[0][1]], gap=True)
        tensors = [dataclasses.replace(t, bits=np.zeros(t.numel, np.uint32)) for t in tensors]
        seed = _rand_seed(rng)
        cases.append(Case(f"lowrank_z_float32_{dist}", "perturb", sms(), order_seed(), seed,
                          dist, dtype="float32", tensors=tensors, scale=1.0, direction=1,
                          rank=3, factors=lowrank_factors_of(tensors, shapes, 3, seed, seed,
                                                             dist, 2), shapes=shapes))
    return cases


MAGNITUDE_SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0]


def with_specials(rng, t: Tensor, dtype: str) -> Tensor:
    """A copy of ``t`` with NaN, +-inf and +-0 at random places (when it is big enough)."""
    x = widen(t.bits, dtype)
    if t.numel >= 8:
        idx = rng.choice(t.numel, size=len(MAGNITUDE_SPECIALS), replace=False)
        x[idx] = np.array(MAGNITUDE_SPECIALS, dtype=np.float32)
    return dataclasses.replace(t, bits=narrow(x, dtype))


def pick_threshold(rng, t: Tensor, dtype: str, k: int) -> float:
    """Thresholds that an off-by-one comparison gets wrong: an element's own magnitude
    (equality), 0, -0, a negative value, infinity, NaN, or a value between the elements."""
    x = np.abs(widen(t.bits, dtype))
    finite = x[np.isfinite(x)]
    kind = k % 8
    if kind in (0, 1, 2) and finite.size:
        return float(finite[int(rng.integers(0, finite.size))])
    return [0.02, 0.02, 0.02, 0.0, -0.0, -1e-3, float("inf"), float("nan")][kind]


def magnitude_cases(rng, sms, order_seed) -> List[Case]:
    """magnitude_mask on every layout and dtype, with NaN, +-inf and +-0 among the values,
    and a call whose words exceed one pass of a 1-SM grid."""
    cases = []
    k = 0
    for dtype in DTYPE_CODES:
        layouts = table_layouts(rng, dtype) + [word_multiple_layout(rng, dtype)]
        for lname, tensors in layouts:
            tensors = [with_specials(rng, t, dtype) for t in tensors]
            thresholds = []
            for t in tensors:
                thresholds.append(pick_threshold(rng, t, dtype, k))
                k += 1
            cases.append(Case(f"magnitude_{dtype}_{lname}", "magnitude", sms(), order_seed(),
                              0, "gaussian", dtype=dtype, tensors=tensors,
                              thresholds=thresholds))
        big = tensor_list(rng, dtype, [70001, 0, 70003], 0, ["m", "n", "a"])
        cases.append(Case(f"magnitude_{dtype}_strided", "magnitude", 1, order_seed(), 0,
                          "gaussian", dtype=dtype, tensors=big,
                          thresholds=[pick_threshold(rng, t, dtype, i) for i, t in
                                      enumerate(big)]))
    return cases


def build_cases() -> List[Case]:
    rng = np.random.default_rng(_RNG_SEED)
    cases: List[Case] = []
    counter = [0]

    def sms():
        counter[0] += 1
        return SMS[counter[0] % len(SMS)]

    def order_seed():
        return int(rng.integers(1, 2 ** 62))

    # ---- noise: sizes 0, 1, 3, 4, 5, odd large; starts around every counter-word boundary
    starts = [0, 1, 2, 3, 5, 127, 2 ** 32 - 2, BEYOND_32, CROSS_34, CROSS_39, HUGE,
              2 ** 63 - 40001]
    sizes = [0, 1, 3, 4, 5, 13, 129, 4099, 40001]
    for dist in ("gaussian", "rademacher"):
        for i, start in enumerate(starts):
            for n in (sizes if i % 3 == 0 else sizes[1:6] + [LARGE_ODD[0]]):
                if start + n > 2 ** 63:
                    continue
                cases.append(Case(f"noise_{dist}_start{start}_n{n}", "noise", sms(),
                                  order_seed(), seed=[0, 2 ** 63 - 1, _rand_seed(rng)][i % 3],
                                  dist=dist, start=start, numel=n,
                                  direction=[0, 1, 7, 2 ** 32 - 1][i % 4]))

    # ---- perturb and update on every layout, dtype and distribution
    for dtype in DTYPE_CODES:
        for li, (lname, tensors) in enumerate(table_layouts(rng, dtype)):
            for di, dist in enumerate(("gaussian", "rademacher")):
                v = 2 * li + di
                # perturb: plain; restore + perturb of the next direction (the q-direction
                # switch); restore of the same direction
                mode = v % 3
                scale = [1e-3, -2e-3, 1e-2][mode]
                rs = [0.0, -1e-3, -1e-2][mode]
                rdir = [0, v % 5, (v + 1) % 7][mode]
                direction = [v % 4, rdir + 1, rdir][mode]
                cases.append(Case(f"perturb_{dtype}_{dist}_{lname}_mode{mode}", "perturb",
                                  sms(), order_seed(), _rand_seed(rng), dist, dtype=dtype,
                                  tensors=tensors, scale=scale, restore_scale=rs,
                                  restore_direction=rdir, direction=direction))
                # update: q = 1..3 gradients from "device" memory, with and without the
                # fused restore, weight decay, stochastic rounding on and off
                q = 1 + v % 3
                grads = [float(F32(g)) for g in rng.standard_normal(q) * 3]
                if v % 5 == 0:
                    grads[0] = 0.0
                for sr in (True, False):
                    restore = (v + sr) % 2 == 0
                    cases.append(Case(
                        f"update_{dtype}_{dist}_{lname}_q{q}_sr{int(sr)}_r{int(restore)}",
                        "update", sms(), order_seed(), _rand_seed(rng), dist, dtype=dtype,
                        tensors=tensors, lr=[1e-3, 3e-4, 2e-2][v % 3],
                        weight_decay=[0.0, 0.1][(v // 2) % 2], stochastic=sr, grads=grads,
                        restore_scale=1e-3 if restore else 0.0,
                        restore_direction=q - 1))

    # ---- sparse perturbation and magnitude_mask
    cases += masked_cases(rng, sms, order_seed)
    cases += magnitude_cases(rng, sms, order_seed)
    cases += lowrank_cases(rng, sms, order_seed)

    # ---- launch errors and edge calls
    t = tensor_list(rng, "float32", [5], 0, ["a"])
    cases.append(Case("error_invalid_device", "perturb", 2, 1, 1, "gaussian", device=3,
                      dtype="float32", tensors=t, scale=1e-3, expect_rc=1,
                      expect_error="cudaSetDevice"))
    cases.append(Case("error_invalid_device_noise", "noise", 2, 1, 1, "gaussian", device=-1,
                      start=0, numel=8, expect_rc=1, expect_error="cudaSetDevice"))
    cases.append(Case("no_rows", "update", 2, 1, 1, "gaussian", dtype="bfloat16", tensors=[],
                      lr=1e-3, grads=[1.0]))
    cases.append(Case("error_invalid_device_magnitude", "magnitude", 2, 1, 0, "gaussian",
                      device=1, dtype="float16", tensors=tensor_list(rng, "float16", [40], 0,
                                                                     ["a"]),
                      thresholds=[0.01], expect_rc=1, expect_error="cudaSetDevice"))
    cases.append(Case("no_rows_magnitude", "magnitude", 2, 1, 0, "gaussian", dtype="float32",
                      tensors=[], thresholds=[]))
    return cases


def _check_case_design(cases: List[Case]) -> None:
    """The cases exercise what they are meant to: per dtype, complete groups on the vector
    path and complete groups that miss it for alignment, element-by-element tails, rows with
    no element; grids that stride (more groups than threads)."""
    for dtype in DTYPE_CODES:
        vec = off = tail = empty_rows = 0
        for c in cases:
            if c.op == "noise" or c.dtype != dtype:
                continue
            for t in c.tensors:
                for g in range(t.offset // 4, (t.offset + t.numel + 3) // 4):
                    local0 = 4 * g - t.offset
                    if local0 >= 0 and local0 + 4 <= t.numel:
                        if (t.align + local0) % 4 == 0:
                            vec += 1
                        else:
                            off += 1
                    else:
                        tail += 1
                empty_rows += t.numel == 0 and groups_of(t.offset, 0) > 0
        assert vec and off and tail and empty_rows, (dtype, vec, off, tail, empty_rows)
    strided = [c for c in cases if (c.op == "noise" and groups_of(c.start, max(c.numel, 1))
                                    > c.sms * BLOCKS_PER_SM * THREADS)
               or (c.op != "noise" and c.tensors
                   and table_of(c.tensors)[1] > c.sms * BLOCKS_PER_SM * THREADS)]
    assert len(strided) >= 10


def _group_keeps(t: Tensor, words: np.ndarray):
    """(vector path?, bits present in the row, bits kept) of every work group of a row."""
    bits = contract.mask_bits(words, 0, t.numel)
    for g in range(t.offset // 4, (t.offset + t.numel + 3) // 4):
        local0 = 4 * g - t.offset
        present = [0 <= local0 + m < t.numel for m in range(4)]
        kept = [p and bool(bits[local0 + m]) for m, p in enumerate(present)]
        vec = all(present) and (t.align + local0) % 4 == 0
        yield vec, sum(present), sum(kept)


def _check_mask_design(cases: List[Case]) -> None:
    """The masked cases reach every path, per dtype: whole groups kept on the vector path,
    vector-aligned groups kept in part (element stores), groups with no kept element (skipped),
    bits set past numel, a bitmap that ends exactly where a row's last group continues; the
    magnitude cases: thresholds equal to an element, NaN and infinite values, a strided grid."""
    for dtype in DTYPE_CODES:
        whole = part = skipped = garbage = word_end = 0
        for c in cases:
            if c.masks is None or c.dtype != dtype:
                continue
            for t, words in zip(c.tensors, c.masks):
                for vec, present, kept in _group_keeps(t, words):
                    whole += vec and kept == 4
                    part += vec and 0 < kept < 4
                    skipped += present > 0 and kept == 0
                pad = contract.mask_words(t.numel) * 32 - t.numel
                garbage += pad > 0 and bool(contract.mask_bits(words, 0, t.numel + pad)[
                    t.numel:].any())
                word_end += t.numel > 0 and t.numel % 32 == 0 and (t.offset + t.numel) % 4 != 0
        assert whole and part and skipped and garbage and word_end, (
            dtype, whole, part, skipped, garbage, word_end)
        equal = specials = 0
        for c in cases:
            if c.op != "magnitude" or c.dtype != dtype or c.expect_rc:
                continue
            for t, th in zip(c.tensors, c.thresholds):
                x = np.abs(widen(t.bits, dtype))
                equal += bool((x == F32(th)).any())
                specials += bool(np.isnan(x).any() and np.isinf(x).any())
        assert equal >= 5 and specials >= 5, (dtype, equal, specials)
    strided = [c for c in cases if c.op == "magnitude" and not c.expect_rc
               and mask_table_of(c.tensors)[1] > c.sms * BLOCKS_PER_SM * THREADS]
    assert len(strided) >= 3


def _check_lowrank_design(cases: List[Case]) -> None:
    """The low-rank cases reach every path, per dtype: rows with factors on the vector path,
    off it for alignment, and in element-by-element tails; rows without factors beside them
    in the same call; m > n and m < n (a row or column index used for the other reads past a
    factor), one column (the column wraps at every element), rank 1 and rank >= 2; perturb
    with the restore, update with q >= 2; both distributions."""
    for dtype in DTYPE_CODES:
        vec = off = tail = mixed = taller = wider = one_col = 0
        ranks, kinds, dists = set(), set(), set()
        for c in cases:
            if c.factors is None or c.dtype != dtype:
                continue
            ranks.add(min(c.rank, 2))
            dists.add(c.dist)
            kinds.add((c.op, c.restore_scale != 0.0, len(c.grads) >= 2))
            mixed += any(f is None for f in c.factors) and any(f is not None for f in c.factors)
            for t, f in zip(c.tensors, c.factors):
                if f is None:
                    continue
                m, n = f[0].shape[1], f[1].shape[1]
                taller += m > n
                wider += m < n
                one_col += n == 1
                for g in range(t.offset // 4, (t.offset + t.numel + 3) // 4):
                    local0 = 4 * g - t.offset
                    if local0 >= 0 and local0 + 4 <= t.numel:
                        vec += (t.align + local0) % 4 == 0
                        off += (t.align + local0) % 4 != 0
                    else:
                        tail += 1
        assert vec and off and tail and mixed and taller and wider and one_col, (
            dtype, vec, off, tail, mixed, taller, wider, one_col)
        assert ranks == {1, 2} and dists == {"gaussian", "rademacher"}, (dtype, ranks, dists)
        assert ("perturb", True, False) in kinds and ("update", True, True) in kinds, kinds


# ============================================================================ references

def case_z(case: Case, ranges, direction: int) -> np.ndarray:
    """z of the case's tensors in ``direction``, concatenated: the noise, or, for a tensor
    with factors, contract.lowrank_z of its U[direction] and V[direction]."""
    if case.factors is None:
        return ref_noise_ranges(case.seed, ranges, case.dist, direction)
    parts = [ref_noise_ranges(case.seed, [(o, n)], case.dist, direction) if f is None
             else contract.lowrank_z(f[0][direction], f[1][direction], 0, n)
             for (o, n), f in zip(ranges, case.factors)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def expected_output(case: Case):
    """The contract's result: noise values, or each tensor's storage bits after the call.
    All tensors of a call are computed together, on their concatenated elements."""
    if case.expect_rc:
        return None
    if case.op == "noise":
        return [ref_noise(case.seed, case.start, case.numel, case.dist, case.direction)
                .view(np.uint32)]
    if case.op == "magnitude":
        return [contract.magnitude_mask_words(widen(t.bits, case.dtype), th)
                for t, th in zip(case.tensors, case.thresholds)]
    if not case.tensors:
        return []
    ranges = [(t.offset, t.numel) for t in case.tensors]
    p = widen(np.concatenate([t.bits for t in case.tensors]), case.dtype)
    if case.restore_scale != 0.0:
        zr = case_z(case, ranges, case.restore_direction)
        w = rn(p + F32(case.restore_scale) * zr, case.dtype)
    else:
        w = p
    if case.op == "perturb":
        z = case_z(case, ranges, case.direction)
        bits = narrow(w + F32(case.scale) * z, case.dtype)
    else:
        d = None
        for k, g in enumerate(case.grads):
            zk = case_z(case, ranges, k)
            d = F32(g) * zk if d is None else d + F32(g) * zk
        v = w - F32(case.lr) * (d + F32(case.weight_decay) * w)
        if case.stochastic and case.dtype != "float32":
            r = np.concatenate([contract.rounding_words(case.seed, o, n) for o, n in ranges])
            v = contract.stochastic_round_bits(v, r, case.dtype)
        bits = narrow(v, case.dtype)
    ends = np.cumsum([t.numel for t in case.tensors])[:-1]
    out = np.split(bits, ends)
    if case.masks is not None:  # an element whose bit is 0 keeps its bits
        out = [np.where(contract.mask_bits(m, 0, t.numel), b, t.bits)
               for t, m, b in zip(case.tensors, case.masks, out)]
    return out


# ======================================================================= the executable's files

MAGIC = 0x333058484F464F5A  # "ZOFOHX03"


def _f32bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


class _Writer:
    def __init__(self):
        self.parts = []

    def w(self, v: int):
        self.parts.append(struct.pack("<q", v if v < 2 ** 63 else v - 2 ** 64))

    def f(self, x: float):
        self.w(_f32bits(x))

    def blob(self, b: bytes):
        self.w(len(b))
        self.parts.append(b + b"\0" * ((-len(b)) % 8))

    def bytes(self):
        return b"".join(self.parts)


def encode(cases: List[Case]) -> bytes:
    wr = _Writer()
    wr.w(MAGIC)
    wr.w(len(cases))
    for c in cases:
        op = {"noise": 0, "perturb": 1, "update": 2, "magnitude": 3}[c.op]
        for v in (op, c.sms, c.order_seed, c.device, c.seed, DIST_CODES[c.dist]):
            wr.w(v)
        if c.op == "noise":
            wr.w(c.start)
            wr.w(c.numel)
            wr.w(c.direction)
            continue
        if c.op == "magnitude":
            _encode_magnitude(wr, c)
            continue
        wr.w(DTYPE_CODES[c.dtype])
        wr.f(c.restore_scale)
        wr.w(c.restore_direction)
        if c.op == "perturb":
            wr.f(c.scale)
            wr.w(c.direction)
        else:
            wr.f(c.lr)
            wr.f(c.weight_decay)
            wr.w(int(c.stochastic))
            wr.w(len(c.grads))
            for g in c.grads:
                wr.f(g)
        rows, total = table_of(c.tensors)
        wr.w(len(rows))
        wr.w(total)
        wr.w(int(c.masks is not None))
        wr.w(c.rank if c.factors is not None else 0)
        for row in rows:
            for v in row:
                wr.w(v)
        for t in c.tensors:
            wr.blob(t.bits.tobytes())
        for m in c.masks or []:
            wr.blob(m.astype(np.uint32).tobytes())
        for f in c.factors or []:
            if f is None:
                for v in (0, 0, 0):
                    wr.w(v)
                wr.blob(b"")
                wr.blob(b"")
                continue
            u, v = (np.ascontiguousarray(x, dtype=np.float32) for x in f)
            for x in (u.shape[0], u.shape[1], v.shape[1]):
                wr.w(x)
            wr.blob(u.tobytes())
            wr.blob(v.tobytes())
    return wr.bytes()


def _encode_magnitude(wr: _Writer, c: Case) -> None:
    wr.w(DTYPE_CODES[c.dtype])
    rows, total = mask_table_of(c.tensors)
    wr.w(len(rows))
    wr.w(total)
    for (numel, first, align), th in zip(rows, c.thresholds):
        for v in (numel, first, align):
            wr.w(v)
        wr.f(th)
    for t in c.tensors:
        wr.blob(t.bits.tobytes())


@dataclasses.dataclass
class Result:
    rc: int
    error: str
    launches: list
    canaries: bool
    arrays: list


def decode(data: bytes, cases: List[Case]) -> List[Result]:
    """Results of the cases the executable finished (all of them unless it was aborted)."""
    pos = 0

    def w():
        nonlocal pos
        (v,) = struct.unpack_from("<q", data, pos)
        pos += 8
        return v

    def blob():
        nonlocal pos
        n = w()
        b = data[pos: pos + n]
        pos += n + (-n) % 8
        return b

    out = []
    try:
        for c in cases:
            rc = w()
            err = blob().decode(errors="replace")
            launches = [(w(), w()) for _ in range(w())]
            canaries = w() == 1
            if c.op == "noise":
                arrays = [np.frombuffer(blob(), dtype=np.uint32)]
            elif c.op == "magnitude":
                arrays = [np.frombuffer(blob(), dtype=np.uint32) for _ in c.tensors]
            else:
                dt = np.uint32 if c.dtype == "float32" else np.uint16
                arrays = [np.frombuffer(blob(), dtype=dt) for _ in c.tensors]
            out.append(Result(rc, err, launches, canaries, arrays))
    except struct.error:
        pass
    return out


def run_exe(exe: Path, cases: List[Case], workdir: Path, tag: str, env=None):
    """(results, completed process); the executable's stderr holds any sanitizer report."""
    inp, outp = workdir / f"{tag}.in", workdir / f"{tag}.out"
    inp.write_bytes(encode(cases))
    env = dict(os.environ, **SAN_ENV, **(env or {}))
    proc = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True,
                          env=env, timeout=300)
    data = outp.read_bytes() if outp.exists() else b""
    return decode(data, cases), proc


def case_failures(case: Case, res: Result, expected) -> List[str]:
    """What differs from the contract (empty: the case passed)."""
    f = []
    if res.rc != case.expect_rc and not (case.expect_rc and res.rc):
        f.append(f"rc {res.rc} ({res.error})")
    if case.expect_error and case.expect_error not in res.error:
        f.append(f"error message {res.error!r} lacks {case.expect_error!r}")
    if res.launches != expected_launches(case):
        f.append(f"launches {res.launches} != {expected_launches(case)}")
    if not res.canaries:
        f.append("wrote before a tensor's first element (canary changed)")
    if expected is None:
        return f
    for j, (got, want) in enumerate(zip(res.arrays, expected)):
        if got.shape != want.shape:
            f.append(f"tensor {j}: {got.size} elements, expected {want.size}")
            continue
        bad = np.flatnonzero(got != want)
        if bad.size:
            i = int(bad[0])
            f.append(f"tensor {j} (numel {want.size}): {bad.size} elements differ, first at "
                     f"{i}: got {int(got[i]):#x}, contract {int(want[i]):#x}")
    return f


# ============================================================================ session fixtures

@pytest.fixture(scope="session")
def suite():
    cases = build_cases()
    _check_case_design(cases)
    _check_mask_design(cases)
    _check_lowrank_design(cases)
    return cases, [expected_output(c) for c in cases]


@pytest.fixture(scope="session")
def host_results(host_exe, build_dir, suite):
    cases, _ = suite
    results, proc = run_exe(host_exe, cases, build_dir, "real")
    assert proc.returncode == 0 and len(results) == len(cases), (
        f"the host build of cuda_kernels.cu failed (exit {proc.returncode}, "
        f"{len(results)}/{len(cases)} cases done; test rng seed {_RNG_SEED}):\n"
        f"{proc.stderr[-6000:]}")
    return results


def _assert_ops(suite, host_results, pick):
    cases, expected = suite
    failures, n = [], 0
    for c, r, e in zip(cases, host_results, expected):
        if pick(c):
            n += 1
            failures += [f"{c.name}: {m}" for m in case_failures(c, r, e)]
    assert n > 0
    assert not failures, (f"{len(failures)} mismatches (test rng seed {_RNG_SEED}):\n"
                          + "\n".join(failures[:20]))


# ============================================================================ tests

def test_sanitizers_are_active(host_exe):
    """The executable really is instrumented: a heap overflow and a misaligned float4 load
    in its self-tests abort it with the sanitizers' reports."""
    env = dict(os.environ, **SAN_ENV)
    r = subprocess.run([str(host_exe), "--selftest-asan"], capture_output=True, text=True,
                       env=env)
    assert r.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in r.stderr
    r = subprocess.run([str(host_exe), "--selftest-ubsan"], capture_output=True, text=True,
                       env=env)
    assert r.returncode != 0 and "misaligned address" in r.stderr


def test_host_build_is_warning_free(base_build):
    """-Wall -Wextra on the host build of cuda_kernels.cu and the driver: no warning."""
    assert base_build[2] == "", base_build[2]


def test_oracle_known_answers():
    """The numpy transcription of the kernels' Gaussian math gives DESIGN.md's known answers
    (printed to 8 digits)."""
    got = gaussian_kernel_math(1234, 0, 8, 0)
    want = [-0.44222745, 1.59436655, -0.94150925, 0.61516333, 0.11843181, 0.73432505,
            1.32964003, 2.09871960]
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-7)
    got = gaussian_kernel_math(7, 5_000_000_000, 4, 3)
    np.testing.assert_allclose(got, [0.53333682, -0.23873316, 1.37519264, 0.64634657],
                               rtol=2e-7, atol=1e-7)


def test_noise(suite, host_results):
    """noise_kernel: both distributions, sizes 0..40001, starts up to 2**63 - 40001, across the
    counter-word boundaries at 2**34 (Gaussian) and 2**39 (Rademacher)."""
    _assert_ops(suite, host_results, lambda c: c.op == "noise" and not c.expect_rc)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_perturb(suite, host_results, dtype):
    """perturb: plain, with the restore-direction switch, and restoring the same direction."""
    _assert_ops(suite, host_results, lambda c: c.op == "perturb" and c.dtype == dtype
                and c.masks is None and c.factors is None and not c.expect_rc)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_update(suite, host_results, dtype):
    """update: q = 1..3 projected gradients read from a device-style buffer of exactly q
    floats, with and without the fused restore, weight decay, stochastic rounding on/off."""
    _assert_ops(suite, host_results, lambda c: c.op == "update" and c.dtype == dtype
                and c.masks is None and c.factors is None)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_masked_perturb_and_update(suite, host_results, dtype):
    """Sparse perturbation: with a bitmap per row (exactly its words in size), elements whose
    bit is 0 keep their bits and the others get the dense result: bitmaps of density 0 to 1
    and runs, random bits past numel, whole and partial groups on and off the vector path."""
    _assert_ops(suite, host_results, lambda c: c.masks is not None and c.dtype == dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_lowrank_perturb_and_update(suite, host_results, dtype):
    """Low-rank directions: a row with factors takes, in every direction the call uses
    (restore included), z = contract.lowrank_z of its U[k], V[k] (contract.lowrank_factor);
    a row without factors in the same call its noise: both distributions, ranks 1 to 3, odd
    shapes (one row, one column, m > n, m < n), vector path and tails, perturb with and
    without the restore, update with q = 2 or 3, weight decay, stochastic rounding on and off.
    The factors are allocations of exactly the directions the call uses."""
    _assert_ops(suite, host_results, lambda c: c.factors is not None and c.dtype == dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_magnitude_mask(suite, host_results, dtype):
    """magnitude_mask: every word of every bitmap (each an allocation of exactly its words,
    starting as 0xA5 bytes) written, bit for bit contract.magnitude_mask_words: thresholds
    equal to an element, +-0, negative, infinite, NaN; NaN, +-inf and +-0 among the values;
    bits past numel 0; grids that stride."""
    _assert_ops(suite, host_results, lambda c: c.op == "magnitude" and c.dtype == dtype
                and not c.expect_rc)


def test_launch_errors(suite, host_results):
    """An invalid device is reported with the failing CUDA call, nothing is launched."""
    _assert_ops(suite, host_results, lambda c: c.expect_rc != 0)


def test_table_matches_cuda_backend():
    """The tables these tests build (numel, offset, first group, total; numel, first word,
    total words) are the ones the CUDA backend builds for the same tensors and offsets (its
    table builders run on CPU tensors), with each tensor's pointer, bitmap pointer (0 when
    dense), factor pointers and matrix view (U, V, m, n; 0 without factors) and the
    threshold's float32 bits."""
    mod = _import_first("zofo_kernels.backends.cuda", "zofo_kernels.core.backends.native.cuda",
                        "zofo_kernels.core.backends.cuda")
    rng = np.random.default_rng(_RNG_SEED)
    backend = mod.CudaBackend()
    for _, tensors in table_layouts(rng, "float32") + [word_multiple_layout(rng, "float32")]:
        ts = [torch.zeros(t.numel) for t in tensors]
        offsets = [t.offset for t in tensors]
        masks = [torch.zeros(contract.mask_words(t.numel), dtype=torch.int32) for t in tensors]
        rows, want_total = table_of(tensors)
        for ms in (None, masks):
            table, total = backend._table(ts, offsets, ms)
            assert total == want_total
            got = table.cpu().numpy().tolist()
            assert [tuple(r[1:4]) for r in got] == [r[:3] for r in rows]
            assert [r[0] for r in got] == [t.data_ptr() for t in ts]
            assert [r[4] for r in got] == [0 if ms is None else m.data_ptr() for m in masks]
            assert [tuple(r[5:]) for r in got] == [(0, 0, 0, 0)] * len(ts)
        # factors on every other non-empty tensor, viewed as (m, numel / m), one direction
        fs = []
        for i, t in enumerate(ts):
            m = next((d for d in (3, 2) if t.numel() % d == 0), 1)
            fs.append((torch.zeros(1, m, 1), torch.zeros(1, t.numel() // m, 1))
                      if t.numel() and i % 2 else None)
        table, total = backend._table(ts, offsets, None, fs)
        assert total == want_total
        got = table.cpu().numpy().tolist()
        assert [tuple(r[:5]) for r in got] == [(t.data_ptr(),) + r[:3] + (0,)
                                               for t, r in zip(ts, rows)]
        assert [tuple(r[5:]) for r in got] == [
            (0, 0, 0, 0) if f is None else (f[0].data_ptr(), f[1].data_ptr(), f[0].shape[1],
                                            f[1].shape[1]) for f in fs]
        thresholds = [float(F32(x)) for x in rng.standard_normal(len(ts))]
        table, total = backend._mask_table(ts, thresholds, masks)
        mrows, want_words = mask_table_of(tensors)
        assert total == want_words
        got = table.cpu().numpy().tolist()
        assert [(r[1], r[3]) for r in got] == [r[:2] for r in mrows]
        assert [(r[0], r[2]) for r in got] == [(t.data_ptr(), m.data_ptr())
                                               for t, m in zip(ts, masks)]
        assert [r[4] for r in got] == [_f32bits(x) for x in thresholds]


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _torch_tensor(t: Tensor, dtype: str) -> torch.Tensor:
    raw = t.bits.view(np.int32 if dtype == "float32" else np.int16).copy()
    return torch.from_numpy(raw).view(TORCH_DTYPES[dtype])


def _cpu_backend_result(zk, c: Case):
    """What the CPU backend makes of case ``c`` (storage bits or bitmap words per tensor that
    has elements), or None when the case has nothing to compare."""
    nonempty = [i for i, t in enumerate(c.tensors) if t.numel]
    if not nonempty:
        return None
    ts = [_torch_tensor(c.tensors[i], c.dtype) for i in nonempty]
    factors = None
    if c.factors is not None:  # the tensors in their shapes (the factors' matrix views)
        ts = [t.view(c.shapes[i]) for t, i in zip(ts, nonempty)]
        factors = [None if c.factors[i] is None else
                   tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in c.factors[i])
                   for i in nonempty]
    if c.op == "magnitude":  # the backend itself: the public API refuses NaN thresholds
        masks = [torch.zeros(contract.mask_words(t.numel()), dtype=torch.int32) for t in ts]
        from zofo_kernels.core.backends import base
        base.get("cpu").magnitude_mask(ts, [c.thresholds[i] for i in nonempty], masks)
        return [m.numpy().view(np.uint32) for m in masks]
    offs = [c.tensors[i].offset for i in nonempty]
    mask = None if c.masks is None else [torch.from_numpy(c.masks[i].view(np.int32).copy())
                                         for i in nonempty]
    if c.op == "perturb":
        zk.perturb_(ts, c.seed, c.scale, c.dist, c.direction, offsets=offs, backend="cpu",
                    restore_scale=c.restore_scale, restore_direction=c.restore_direction,
                    mask=mask, factors=factors)
    else:
        zk.zo_update_(ts, c.seed, lr=c.lr, projected_grads=c.grads,
                      restore_scale=c.restore_scale, restore_direction=c.restore_direction,
                      weight_decay=c.weight_decay, distribution=c.dist, offsets=offs,
                      backend="cpu", stochastic_rounding=c.stochastic, mask=mask,
                      factors=factors)
    return [t.reshape(-1).view(torch.int32 if c.dtype == "float32" else torch.int16).numpy()
            for t in ts]


def test_matches_cpu_backend(suite, host_results):
    """The CPU backend (the same header in other kernels) gives the same bits, sparse
    perturbation, low-rank directions and magnitude_mask included."""
    import zofo_kernels as zk

    if not zk.available_backends()["cpu"].available:
        pytest.skip(f"CPU backend not built: {zk.available_backends()['cpu'].reason}")
    cases, _ = suite
    checked, failures = 0, []
    for c, r in zip(cases, host_results):
        if c.expect_rc:
            continue
        if c.op == "noise":
            if c.numel == 0:
                continue
            z = zk.noise(c.seed, c.start, c.numel, c.dist, c.direction, backend="cpu")
            got = [z.numpy().view(np.uint32)]
        else:
            got = _cpu_backend_result(zk, c)
            if got is None:
                continue
            r = dataclasses.replace(r, arrays=[a for a, t in zip(r.arrays, c.tensors)
                                               if t.numel])
        checked += 1
        for j, (a, b) in enumerate(zip(got, r.arrays)):
            if not np.array_equal(a.view(b.dtype), b):
                failures.append(f"{c.name} tensor {j}")
    assert checked > 50
    assert not failures, f"CPU backend differs (test rng seed {_RNG_SEED}): {failures[:20]}"


# ============================================================================ the check can fail

# Each mutant: (name, a snippet of cuda_kernels.cu that occurs exactly once, the expression in
# it to break, the broken expression, how it must be caught: "mismatch" = the run completes and
# the comparison with the contract fails; any other string = the executable aborts with that
# sanitizer message, or with one of several separated by "|").
MUTANTS = [
    ("tail_reads_one_past_the_end",
     "    if (i >= 0 && i < numel) {\n      w[m] = Storage<T>::load(p[i]);",
     "i < numel", "i <= numel", "heap-buffer-overflow"),
    ("vector_load_on_an_incomplete_group",
     "local0 >= 0 && local0 + 4 <= numel;", "local0 + 4 <= numel", "local0 + 3 <= numel",
     "heap-buffer-overflow"),
    ("vector_load_without_the_alignment_check",
     "% sizeof(V) == 0", "sizeof(V)", "sizeof(R)", "misaligned address"),
    # (the search serves both kernels: the groups kernel then computes wrong elements, and the
    # magnitude kernel writes a row's first word into the row before it, one word past that
    # row's bitmap or, for an empty row, through its null bitmap pointer, whichever thread
    # the shuffled launch runs first: either report aborts the run)
    ("binary_search_takes_the_previous_row",
     "if (first_item(rows[mid]) <= g) {", "first_item(rows[mid]) <= g",
     "first_item(rows[mid]) < g", "heap-buffer-overflow|store to null pointer"),
    ("binary_search_reads_past_the_table",
     "int64_t lo = 0, hi = n - 1;", "n - 1", "n", "heap-buffer-overflow"),
    ("32_bit_local_index",
     "const int64_t local0 = (int64_t)(group * 4) - row.offset;", "(int64_t)(group * 4)",
     "(int64_t)(uint32_t)(group * 4)", "mismatch"),
    ("32_bit_group_number",
     "(uint64_t)(row.offset >> 2) + (uint64_t)(g - row.first_group)",
     "(uint64_t)(row.offset >> 2)", "(uint64_t)(uint32_t)(row.offset >> 2)", "mismatch"),
    ("grid_stride_skips_groups",
     "g < total; g += stride) {\n    const ZofoSegmentRow", "stride", "stride + 1",
     "mismatch"),
    ("restore_uses_direction_0",
     "zs(restore_direction, zr);", "restore_direction", "0u", "mismatch"),
    ("gradient_read_past_q",
     "for (int64_t k = 0; k < q; ++k) {", "k < q", "k <= q", "heap-buffer-overflow"),
    ("rounding_bits_from_the_noise_stream",
     "block_words(at.seed, at.group, 0u, kPurposeRounding, r);", "kPurposeRounding",
     "kPurposeNoise", "mismatch"),
    ("stochastic_rounding_of_float32",
     "stochastic_rounding != 0 && dtype != kFloat32;", "dtype != kFloat32", "true", "mismatch"),
    ("noise_tail_writes_one_past_the_end",
     "if (i >= 0 && i < numel) out[i] = z[m];", "i < numel", "i <= numel",
     "heap-buffer-overflow"),
    # sparse perturbation
    ("masked_store_ignores_the_bitmap",
     "present & keep, w);", "present & keep", "present", "mismatch"),
    ("masked_vector_store_of_a_partial_group",
     "local0, vec && keep == 0xF,", "vec && keep == 0xF", "vec", "mismatch"),
    ("masked_group_skipped_unless_whole",
     "if (keep == 0) continue;", "keep == 0", "keep != 0xF", "mismatch"),
    ("bitmap_read_past_its_end",
     "if (j >= 0 && j < numel) bits", "j < numel", "j <= numel", "heap-buffer-overflow"),
    ("bitmap_of_the_previous_element",
     "bits |= (int)mask_bit(bitmap, j) << m;", "mask_bit(bitmap, j)",
     "mask_bit(bitmap, j > 0 ? j - 1 : 0)", "mismatch"),
    # magnitude_mask
    ("magnitude_reads_a_whole_last_word",
     "const int count = rest < 32 ? (int)rest : 32;", "rest < 32 ? (int)rest : 32", "32",
     "heap-buffer-overflow"),
    ("magnitude_writes_one_word_past_the_end",
     "u < total; u +=", "u < total", "u <= total", "heap-buffer-overflow"),
    ("magnitude_grid_stride_skips_words",
     "u += stride) {\n    const ZofoMaskRow", "u += stride", "u += stride + 1", "mismatch"),
    ("magnitude_threshold_one_ulp_lower",
     "magnitude_limit(u2f((uint32_t)row.threshold_bits))", "(uint32_t)row.threshold_bits",
     "((uint32_t)row.threshold_bits - 1u)", "mismatch"),
    # low-rank directions (the outcome of an index break depends on the shapes: a row index
    # used as a column, or a direction stride too large, reads past the last direction's
    # factors of a wider (taller) matrix, which every call's exactly-sized factors expose;
    # _check_lowrank_design keeps such matrices in the cases)
    ("lowrank_fused_multiply_add",
     "z[m] = lowrank_value(ui, vc,", "lowrank_value", "zofo_mutant_lowrank_fma", "mismatch"),
    ("lowrank_scale_missing",
     "rank > 0 ? lowrank_scale(rank) : 0.0f", "lowrank_scale(rank)", "1.0f", "mismatch"),
    ("lowrank_U_row_of_the_column",
     "const float* ui = uk + i * r;", "uk + i * r", "uk + c * r", "heap-buffer-overflow"),
    ("lowrank_V_direction_stride_of_U",
     "const float* vk = v + (int64_t)direction * v_stride;", "v_stride", "u_stride",
     "heap-buffer-overflow"),
]

# The patched copy holds every break, each behind a run-time switch, so that one compile serves
# them all (compiling a copy per mutant would take most of this file's time budget): the
# environment variable ZOFO_MUTANT=k turns break k on, alone; 0 runs the original expressions.
MUTANT_PRELUDE = """// scratch copy of cuda_kernels.cu with deliberate breaks (python_tests/core/test_cuda_host.py)
#include <stdlib.h>
static int zofo_mutant_from_env() {
  const char* s = getenv("ZOFO_MUTANT");
  return s ? atoi(s) : 0;
}
static const int zofo_mutant = zofo_mutant_from_env();
#define ZOFO_MUTANT_ON(k) (zofo_mutant == (k))
#include <math.h>
// lowrank_value with the sums fused into the products (what --fmad=true would compile)
static inline float zofo_mutant_lowrank_fma(const float* u, const float* v, int rank,
                                            float scale) {
  float acc = u[0] * v[0];
  for (int l = 1; l < rank; ++l) acc = fmaf(u[l], v[l], acc);
  return acc * scale;
}
"""


def mutated_source(src: str) -> str:
    for k, (name, snippet, expr, broken, _) in enumerate(MUTANTS, start=1):
        assert src.count(snippet) == 1, f"mutant {name}: its snippet must occur exactly once"
        assert snippet.count(expr) == 1, f"mutant {name}: its expression must occur once"
        switched = snippet.replace(expr, f"(ZOFO_MUTANT_ON({k}) ? ({broken}) : ({expr}))")
        src = src.replace(snippet, switched)
        assert src.count(switched) == 1, f"mutant {name}: the patch did not apply"
    return MUTANT_PRELUDE + src


@pytest.fixture(scope="session")
def mutant_exe(build_dir, driver_obj):
    """The executable built from the patched scratch copy of cuda_kernels.cu."""
    d = build_dir / "mutants"
    d.mkdir(exist_ok=True)
    (d / "cuda_kernels.cu").write_text(mutated_source(KERNELS.read_text()))
    _compile(d / "cuda_kernels.cu", d / "cuda_kernels.o")
    _link([d / "cuda_kernels.o", driver_obj], d / "cuda_host")
    return d / "cuda_host"


def test_mutant_build_with_no_break_passes(mutant_exe, suite, build_dir):
    """With every switch off the patched copy passes the whole suite: what the mutants below
    fail is their break, not the patching."""
    cases, expected = suite
    results, proc = run_exe(mutant_exe, cases, build_dir, "mutant_0", {"ZOFO_MUTANT": "0"})
    assert proc.returncode == 0 and len(results) == len(cases), proc.stderr[-3000:]
    bad = [c.name for c, r, e in zip(cases, results, expected) if case_failures(c, r, e)]
    assert not bad, f"{bad[:5]} (test rng seed {_RNG_SEED})"


@pytest.mark.parametrize("k", range(1, len(MUTANTS) + 1), ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(k, mutant_exe, suite, build_dir):
    name, _, _, _, how = MUTANTS[k - 1]
    cases, expected = suite
    results, proc = run_exe(mutant_exe, cases, build_dir, f"mutant_{k}",
                            {"ZOFO_MUTANT": str(k)})
    if how == "mismatch":
        assert proc.returncode == 0, f"mutant {name} should run to the end:\n{proc.stderr[-3000:]}"
        assert len(results) == len(cases)
        caught = [c.name for c, r, e in zip(cases, results, expected) if case_failures(c, r, e)]
        assert caught, f"mutant {name} was NOT detected (test rng seed {_RNG_SEED})"
        print(f"{name}: {len(caught)} cases differ from the contract, e.g. {caught[:3]}")
    else:
        assert proc.returncode != 0 and any(h in proc.stderr for h in how.split("|")), (
            f"mutant {name}: expected a sanitizer report {how!r}, got exit "
            f"{proc.returncode}:\n{proc.stderr[-3000:]}")
        where = cases[len(results)].name if len(results) < len(cases) else "?"
        print(f"{name}: sanitizer report '{how}' during case {where}")
