"""Triton kernels of the noise contract (see :mod:`zofo_kernels.core.contract`).

Importing this module imports Triton; :mod:`zofo_kernels.core.backends.triton.launcher` imports it
lazily, so ``import zofo_kernels`` works without Triton.

Work layout (multi-tensor launches). One launch serves every tensor of a (device, dtype)
group. Each program handles one *window* of ``BLOCK`` consecutive global indices
[g0, g0 + BLOCK) of one tensor; windows of a tensor start at ``first = o - o % 128`` (o is
the tensor's global offset), so every window begins on a Philox block boundary and one Philox
call serves 128 (Rademacher) or 4 (Gaussian) elements. Element i of the window lives at local
index j = i - o of the tensor; lanes with j outside [0, numel) are masked. Two tables describe
a launch:

* ``tensor_table``: int64 [T, 6] = (data_ptr, offset o, numel, first window start,
  first program id, mask bitmap data_ptr or 0) per tensor;
* ``program_table``: int32 [P] = tensor index of each program.

The program's window start is ``first + (pid - first_program) * BLOCK``. A program whose
window lies entirely inside its tensor takes an unmasked load/store path; when every tensor
of the launch satisfies (data_ptr - o * itemsize) % 16 == 0 (the host checks; true for
16-byte aligned storage and offsets that are multiples of 8), the kernel is told so
(ALIGNED) and that path uses 16-byte vector loads and stores.

Sparse launches (HAS_MASK; every tensor then has a bitmap, see
:func:`zofo_kernels.core.contract.mask_bits`): each lane reads word j >> 5 of its tensor's
bitmap and tests bit j & 31; the window is computed as usual but stored only on the lanes
inside the tensor whose bit is set (always the masked store, full window or not). Dense
launches (HAS_MASK false) never read the mask column and compile as they would without it.

Low-rank launches (HAS_FACTORS; see "Low-rank directions" in
:mod:`zofo_kernels.core.backends.base`) take a wider ``tensor_table``, int64 [T, 10]: the six
columns above, then (U data_ptr, V data_ptr, m, n) of the tensor's factors, U (D, m, r) and
V (D, n, r) float32 contiguous; U data_ptr 0 marks a tensor without factors (then m = 0,
n = 1), which keeps its dense noise: the choice is a branch per program (uniform, no
divergence), so dense and low-rank tensors of a call share one launch. The rank r and
float32(1/sqrt(r)) are launch arguments (one rank per call). A low-rank lane computes its row
i = j div n and column c = j mod n once, then per direction k the contract's fixed-order sum
acc = U[k,i,0] V[k,c,0]; acc = acc + U[k,i,l] V[k,c,l] (l = 1 .. r-1); z = acc * s_r, in
place of the noise everywhere (restore, perturbation, every update direction); the
stochastic-rounding words still come from the seed. Launches without factors (HAS_FACTORS
false) keep the 6-column table, never read the factor arguments and compile as before.

``_magnitude_mask_kernel`` writes bitmaps: each program packs ``WORDS`` consecutive words
(32 * WORDS elements, a [WORDS, 32] tile of bits OR-reduced along its rows) of one tensor, described
by its own ``mask_table`` (int64 [T, 4] = (data_ptr, numel, bitmap data_ptr, first program
id)) and the same kind of ``program_table``.

Float math follows the contract in :mod:`zofo_kernels.core.backends.base` (separately rounded
float32 operations in a fixed order); the launcher disables FMA contraction. On a GPU, log,
sin and cos come from libdevice (accurate to a few ulp; the approximate hardware instructions
are not), and the square root is the correctly rounded one.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # libdevice is used only in compiled (GPU) mode; the interpreter cannot call it
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - Triton without an interpreter
        return False
    return isinstance(fn, InterpretedFunction)


WINDOW_ALIGN = 128  # window starts are multiples of this (a Rademacher block)
TABLE_COLUMNS = tl.constexpr(6)  # the tensor_table's row length
FACTOR_TABLE_COLUMNS = tl.constexpr(10)  # ... of a low-rank launch (HAS_FACTORS)
MASK_TABLE_COLUMNS = tl.constexpr(4)  # the mask_table's row length

# The STORAGE and DIST codes the kernels take: zofo_noise.h's DType and Distribution, and
# zofo_kernels.core.backends.base.DTYPE_CODES and DISTRIBUTION_CODES (a test checks that they agree).
STORAGE_FLOAT32 = tl.constexpr(0)
STORAGE_BFLOAT16 = tl.constexpr(1)
STORAGE_FLOAT16 = tl.constexpr(2)
DIST_GAUSSIAN = tl.constexpr(0)
DIST_RADEMACHER = tl.constexpr(1)

_UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
_TWO_PI = tl.constexpr(6.283185307179586)
_UNIFORM_MIN = tl.constexpr(1.0e-7)
_TWO_POW_24 = tl.constexpr(16777216.0)
_TWO_POW_MINUS_24 = tl.constexpr(5.9604644775390625e-08)
_TWO_POW_MINUS_24_BITS = tl.constexpr(0x33800000)


# --------------------------------------------------------------------------- noise functions

@triton.jit
def _philox_words(seed, blocks, direction, PURPOSE: tl.constexpr):
    """Philox4x32-10 of counters (blocks mod 2**32, blocks div 2**32, direction, PURPOSE)."""
    c0 = blocks.to(tl.uint32)  # truncation: blocks mod 2**32
    c1 = (blocks >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tl.cast(direction, tl.uint32)
    c3 = tl.zeros_like(c0) + PURPOSE
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _uniform(w):
    """Triton's uint_to_uniform_float, spelled out: int32 view, ~x if negative, x * scale."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * _UNIFORM_SCALE


@triton.jit
def _box_muller(u_a, u_b, PRECISE: tl.constexpr):
    u_a = tl.maximum(u_a, _UNIFORM_MIN)
    theta = _TWO_PI * u_b
    if PRECISE:
        lg = libdevice.log(u_a)
    else:
        lg = tl.log(u_a)
    r = tl.sqrt_rn(-2.0 * lg)
    if PRECISE:
        c = libdevice.cos(theta)
        s = libdevice.sin(theta)
    else:
        c = tl.cos(theta)
        s = tl.sin(theta)
    return r * c, r * s


@triton.jit
def _interleave4(a, b, c, d):
    """[N] x 4 -> [N, 4] with columns (a, b, c, d)."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [a.shape[0], 4])


@triton.jit
def _gaussian_window(seed, g0, direction, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    """z for global indices [g0, g0 + BLOCK), g0 a multiple of 4."""
    NB: tl.constexpr = BLOCK // 4
    blocks = g0 // 4 + tl.arange(0, NB).to(tl.int64)
    w0, w1, w2, w3 = _philox_words(seed, blocks, direction, 0)
    n0, n1 = _box_muller(_uniform(w0), _uniform(w1), PRECISE)
    n2, n3 = _box_muller(_uniform(w2), _uniform(w3), PRECISE)
    return tl.reshape(_interleave4(n0, n1, n2, n3), [BLOCK])


@triton.jit
def _rademacher_window(seed, g0, direction, BLOCK: tl.constexpr):
    """z in {-1, +1} for global indices [g0, g0 + BLOCK), g0 a multiple of 128."""
    NB: tl.constexpr = BLOCK // 128
    blocks = g0 // 128 + tl.arange(0, NB).to(tl.int64)
    w0, w1, w2, w3 = _philox_words(seed, blocks, direction, 0)
    words = _interleave4(w0, w1, w2, w3)  # [NB, 4]: word (i div 32) mod 4 of block i div 128
    bit = tl.arange(0, 32).to(tl.uint32)
    bits = (words[:, :, None] >> bit[None, None, :]) & 1  # [NB, 4, 32]: bit i mod 32
    z = tl.where(bits != 0, 1.0, -1.0)
    return tl.reshape(z, [BLOCK])


@triton.jit
def _noise_window(seed, g0, direction, BLOCK: tl.constexpr, DIST: tl.constexpr,
                  PRECISE: tl.constexpr):
    if DIST == DIST_GAUSSIAN:
        z = _gaussian_window(seed, g0, direction, BLOCK, PRECISE)
    else:
        z = _rademacher_window(seed, g0, direction, BLOCK)
    return z


@triton.jit
def _rounding_window(seed, g0, BLOCK: tl.constexpr):
    """Stochastic-rounding words (purpose 1, direction 0) for [g0, g0 + BLOCK), g0 % 4 == 0."""
    NB: tl.constexpr = BLOCK // 4
    blocks = g0 // 4 + tl.arange(0, NB).to(tl.int64)
    w0, w1, w2, w3 = _philox_words(seed, blocks, 0, 1)
    return tl.reshape(_interleave4(w0, w1, w2, w3), [BLOCK])


@triton.jit
def _stochastic_round(v, r, IS_BF16: tl.constexpr):
    """contract.stochastic_round_bits on the float32 bit pattern; returns float32."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    if IS_BF16:
        mask = tl.full(v.shape, 0xFFFF, tl.uint32)
        rounded = (mag + (r & mask)) & ~mask
    else:
        expo = (mag >> 23).to(tl.int32)
        shift = 13 + tl.maximum(113 - expo, 0)  # one more dropped bit per binade below 2**-14
        tiny = shift > 23  # |v| < 2**-24
        shift = tl.minimum(shift, 23).to(tl.uint32)
        mask = (tl.full(v.shape, 1, tl.uint32) << shift) - 1
        rounded = (mag + (r & mask)) & ~mask
        scaled = tl.abs(v) * _TWO_POW_24
        uniform24 = (r >> 8).to(tl.float32) * _TWO_POW_MINUS_24
        tiny_bits = tl.where(uniform24 < scaled, _TWO_POW_MINUS_24_BITS, 0).to(tl.uint32)
        rounded = tl.where(tiny, tiny_bits, rounded)
    finite = mag < 0x7F800000
    out = tl.where(finite, rounded | sign, bits)
    return out.to(tl.float32, bitcast=True)



# --------------------------------------------------------------------------- storage conversion
# STORAGE is one of the STORAGE_* codes. bfloat16 is handled on its bit pattern (loaded and
# stored as uint16): the widening is exact and the round-to-nearest-even narrowing is explicit,
# so compiled and interpreted kernels round identically (the interpreter's own float32 ->
# bfloat16 cast truncates).

@triton.jit
def _rne_bf16_bits(v):
    """float32 bit pattern of v rounded to the nearest bfloat16 (ties to even); NaN stays NaN."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, bits | 0x00400000, rounded)


@triton.jit
def _widen(x, STORAGE: tl.constexpr):
    """Loaded storage values -> float32 (exact)."""
    if STORAGE == STORAGE_BFLOAT16:
        y = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _narrow(v, STORAGE: tl.constexpr):
    """float32 -> storage values, rounded to nearest even."""
    if STORAGE == STORAGE_BFLOAT16:
        y = (_rne_bf16_bits(v) >> 16).to(tl.uint16)
    elif STORAGE == STORAGE_FLOAT16:
        y = v.to(tl.float16)
    else:
        y = v
    return y


@triton.jit
def _round_rn(v, STORAGE: tl.constexpr):
    """v rounded to nearest in the storage type, kept as float32."""
    if STORAGE == STORAGE_BFLOAT16:
        y = _rne_bf16_bits(v).to(tl.float32, bitcast=True)
    elif STORAGE == STORAGE_FLOAT16:
        y = v.to(tl.float16).to(tl.float32)
    else:
        y = v
    return y


# --------------------------------------------------------------------------- window setup

@triton.jit
def _typed_ptr(addr, STORAGE: tl.constexpr):
    """An int64 address as a pointer to the storage type (bfloat16 as its uint16 bits)."""
    if STORAGE == STORAGE_FLOAT32:
        ptr = addr.to(tl.pointer_type(tl.float32))
    elif STORAGE == STORAGE_BFLOAT16:
        ptr = addr.to(tl.pointer_type(tl.uint16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float16))
    return ptr


@triton.jit
def _window(tensor_table, program_table, STORAGE: tl.constexpr, BLOCK: tl.constexpr,
            ALIGNED: tl.constexpr, COLUMNS: tl.constexpr):
    """This program's (pointers, local indices j, numel, window start g0, full?, table row);
    the tensor_table has rows of COLUMNS values."""
    pid = tl.program_id(0)
    t = tl.load(program_table + pid).to(tl.int64)
    row = tensor_table + COLUMNS * t
    addr = tl.load(row)
    offset = tl.load(row + 1)
    numel = tl.load(row + 2)
    first = tl.load(row + 3)
    first_program = tl.load(row + 4)
    g0 = first + (pid - first_program) * BLOCK
    j0 = g0 - offset
    base = _typed_ptr(addr, STORAGE) + j0  # element j0 of the tensor, the window's first
    if ALIGNED:
        # the host checked (data_ptr - offset * itemsize) % 16 == 0 for every tensor; with
        # g0 a multiple of 128 this makes every window start 16-byte aligned (vector access)
        base = tl.multiple_of(base, 16)
    lanes = tl.arange(0, BLOCK)
    j = j0 + lanes.to(tl.int64)
    full = (j0 >= 0) & (j0 + BLOCK <= numel)
    return base + lanes, j, numel, g0, full, row


@triton.jit
def _mask_lanes(row, j, inside):
    """The lanes of ``inside`` whose bit is set in the tensor's bitmap (column 5 of its row):
    bit j & 31 of word j >> 5."""
    words = tl.load(row + 5).to(tl.pointer_type(tl.int32))
    word = tl.load(words + (j >> 5), mask=inside, other=0)
    bit = (word >> (j & 31).to(tl.int32)) & 1
    return inside & (bit != 0)


@triton.jit
def _load_window(tensor_table, program_table, STORAGE: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED: tl.constexpr, HAS_FACTORS: tl.constexpr):
    """This program's window (pointers, local indices j, lanes inside the tensor, full?,
    start g0, table row) and its weights as float32."""
    if HAS_FACTORS:
        ptrs, j, numel, g0, full, row = _window(tensor_table, program_table, STORAGE, BLOCK,
                                                ALIGNED, FACTOR_TABLE_COLUMNS)
    else:
        ptrs, j, numel, g0, full, row = _window(tensor_table, program_table, STORAGE, BLOCK,
                                                ALIGNED, TABLE_COLUMNS)
    inside = (j >= 0) & (j < numel)
    if full:
        w = _widen(tl.load(ptrs), STORAGE)
    else:
        w = _widen(tl.load(ptrs, mask=inside, other=0), STORAGE)
    return ptrs, j, inside, full, g0, row, w


@triton.jit
def _lowrank_lanes(row, j, inside, rank):
    """The low-rank setup of a window of a launch with factors: (has factors?, pointers to
    U[0, i, 0] and V[0, c, 0] of each lane's row i = j div n and column c = j mod n, m * r,
    n * r) from columns 6..9 of the tensor's row (U data_ptr 0: no factors, dense noise)."""
    u_addr = tl.load(row + 6)
    v_addr = tl.load(row + 7)
    m = tl.load(row + 8)
    n = tl.load(row + 9)  # 1 for a tensor without factors: no division by zero
    jj = tl.where(inside, j, 0)  # lanes outside the tensor: a valid element, never loaded
    i = jj // n
    c = jj - i * n
    r = rank.to(tl.int64)
    u = u_addr.to(tl.pointer_type(tl.float32)) + i * r
    v = v_addr.to(tl.pointer_type(tl.float32)) + c * r
    return u_addr != 0, u, v, m * r, n * r


@triton.jit
def _lowrank_z(u, v, inside, direction, mr, nr, rank, lowrank_scale):
    """The contract's low-rank z of direction k: acc = U[k,i,0] V[k,c,0];
    acc = acc + U[k,i,l] V[k,c,l] (l = 1 .. r-1); z = acc * s_r, each operation rounded
    separately (no FMA: the launcher disables contraction)."""
    k = tl.cast(direction, tl.int64)
    u = u + k * mr
    v = v + k * nr
    acc = tl.load(u, mask=inside, other=0.0) * tl.load(v, mask=inside, other=0.0)
    for l in range(1, rank):
        acc = acc + tl.load(u + l, mask=inside, other=0.0) * tl.load(v + l, mask=inside,
                                                                     other=0.0)
    return acc * lowrank_scale


@triton.jit
def _z(seed, g0, direction, lowrank, u, v, inside, mr, nr, rank, lowrank_scale,
       BLOCK: tl.constexpr, DIST: tl.constexpr, PRECISE: tl.constexpr,
       HAS_FACTORS: tl.constexpr):
    """z of the window in ``direction``: the contract noise, or (HAS_FACTORS and the tensor
    has factors: ``lowrank``, uniform over the program) its low-rank z. Without HAS_FACTORS
    the low-rank arguments are unused placeholders."""
    if HAS_FACTORS:
        if lowrank:
            z = _lowrank_z(u, v, inside, direction, mr, nr, rank, lowrank_scale)
        else:
            z = _noise_window(seed, g0, direction, BLOCK, DIST, PRECISE)
    else:
        z = _noise_window(seed, g0, direction, BLOCK, DIST, PRECISE)
    return z


@triton.jit
def _sweep_start(tensor_table, program_table, seed, restore_scale, restore_direction, rank,
                 lowrank_scale, STORAGE: tl.constexpr, BLOCK: tl.constexpr,
                 DIST: tl.constexpr, HAS_RESTORE: tl.constexpr, PRECISE: tl.constexpr,
                 ALIGNED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_FACTORS: tl.constexpr):
    """What a perturb and an update sweep do first: the window and its float32 weights, the
    low-rank lanes (placeholders without HAS_FACTORS), the restore w = rn(w + restore_scale *
    z_r) if HAS_RESTORE, and the lanes to store (the mask's bits if HAS_MASK). Returns
    (ptrs, lanes to store, full?, g0, w, lowrank?, U lanes, V lanes, m * r, n * r)."""
    ptrs, j, inside, full, g0, row, w = _load_window(tensor_table, program_table, STORAGE,
                                                     BLOCK, ALIGNED, HAS_FACTORS)
    if HAS_FACTORS:
        lowrank, u_lanes, v_lanes, mr, nr = _lowrank_lanes(row, j, inside, rank)
    else:
        lowrank, u_lanes, v_lanes, mr, nr = 0, 0, 0, 0, 0  # unused
    if HAS_RESTORE:
        z_r = _z(seed, g0, restore_direction, lowrank, u_lanes, v_lanes, inside, mr, nr, rank,
                 lowrank_scale, BLOCK, DIST, PRECISE, HAS_FACTORS)
        w = _round_rn(w + restore_scale * z_r, STORAGE)
    if HAS_MASK:
        inside = _mask_lanes(row, j, inside)
    return ptrs, inside, full, g0, w, lowrank, u_lanes, v_lanes, mr, nr


@triton.jit
def _store(ptrs, inside, full, p, HAS_MASK: tl.constexpr):
    """Stores a window's storage values: all lanes when full (and no mask), else the lanes
    ``inside`` (with a mask: inside the tensor and bit set, full window or not)."""
    if HAS_MASK:
        tl.store(ptrs, p, mask=inside)
    elif full:
        tl.store(ptrs, p)
    else:
        tl.store(ptrs, p, mask=inside)


# --------------------------------------------------------------------------- kernels
#
# Private: their parameter lists are the launch ABI (4 to 20 values, in this order), and
# only :class:`zofo_kernels.core.backends.triton.launcher.TritonBackend` launches them.

@triton.jit(do_not_specialize=["seed", "start", "numel", "direction"])
def _noise_kernel(out_ptr, seed: tl.int64, start: tl.int64, numel: tl.int64,
                 direction: tl.uint32,
                 BLOCK: tl.constexpr, ALIGN: tl.constexpr, DIST: tl.constexpr,
                 PRECISE: tl.constexpr):
    """out[j] = z(start + j) for j in [0, numel); windows start at start - start % ALIGN."""
    pid = tl.program_id(0).to(tl.int64)
    start = start.to(tl.int64)
    numel = numel.to(tl.int64)
    g0 = start - start % ALIGN + pid * BLOCK
    z = _noise_window(seed, g0, direction, BLOCK, DIST, PRECISE)
    j = g0 - start + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + j, z, mask=(j >= 0) & (j < numel))


@triton.jit(do_not_specialize=["seed", "direction", "restore_direction", "rank"])
def _perturb_kernel(tensor_table, program_table, seed: tl.int64, scale: tl.float32,
                   direction: tl.uint32, restore_scale: tl.float32, restore_direction: tl.uint32,
                   rank: tl.int32, lowrank_scale: tl.float32,
                   STORAGE: tl.constexpr, BLOCK: tl.constexpr, DIST: tl.constexpr,
                   HAS_RESTORE: tl.constexpr, PRECISE: tl.constexpr, ALIGNED: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_FACTORS: tl.constexpr):
    """w = rn(p + restore_scale * z_r) [if HAS_RESTORE]; p = rn(w + scale * z) (only the
    elements whose bit is set if HAS_MASK; z low-rank for the tensors with factors if
    HAS_FACTORS, of rank ``rank`` and scale ``lowrank_scale``)."""
    ptrs, inside, full, g0, w, lowrank, u_lanes, v_lanes, mr, nr = _sweep_start(
        tensor_table, program_table, seed, restore_scale, restore_direction, rank,
        lowrank_scale, STORAGE, BLOCK, DIST, HAS_RESTORE, PRECISE, ALIGNED, HAS_MASK,
        HAS_FACTORS)
    z = _z(seed, g0, direction, lowrank, u_lanes, v_lanes, inside, mr, nr, rank, lowrank_scale,
           BLOCK, DIST, PRECISE, HAS_FACTORS)
    _store(ptrs, inside, full, _narrow(w + scale * z, STORAGE), HAS_MASK)


@triton.jit(do_not_specialize=["seed", "q", "restore_direction", "rank"])
def _update_kernel(tensor_table, program_table, seed: tl.int64, lr: tl.float32, grads_ptr,
                  q: tl.int32, restore_scale: tl.float32, restore_direction: tl.uint32,
                  weight_decay: tl.float32, rank: tl.int32, lowrank_scale: tl.float32,
                  STORAGE: tl.constexpr, BLOCK: tl.constexpr, DIST: tl.constexpr,
                  HAS_RESTORE: tl.constexpr, STOCHASTIC: tl.constexpr,
                  PRECISE: tl.constexpr, ALIGNED: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_FACTORS: tl.constexpr):
    """w = rn(p + restore_scale * z_r) [if HAS_RESTORE]; d = sum_k g_k z_k; d += wd * w;
    v = w - lr * d; p = sr(v) if STOCHASTIC else rn(v) (only the elements whose bit is set
    if HAS_MASK; every z low-rank for the tensors with factors if HAS_FACTORS)."""
    ptrs, inside, full, g0, w, lowrank, u_lanes, v_lanes, mr, nr = _sweep_start(
        tensor_table, program_table, seed, restore_scale, restore_direction, rank,
        lowrank_scale, STORAGE, BLOCK, DIST, HAS_RESTORE, PRECISE, ALIGNED, HAS_MASK,
        HAS_FACTORS)
    g = tl.load(grads_ptr)
    d = g * _z(seed, g0, 0, lowrank, u_lanes, v_lanes, inside, mr, nr, rank, lowrank_scale,
               BLOCK, DIST, PRECISE, HAS_FACTORS)
    for k in range(1, q):
        g_k = tl.load(grads_ptr + k)
        d = d + g_k * _z(seed, g0, k, lowrank, u_lanes, v_lanes, inside, mr, nr, rank,
                         lowrank_scale, BLOCK, DIST, PRECISE, HAS_FACTORS)
    d = d + weight_decay * w
    v = w - lr * d
    if STOCHASTIC:
        r = _rounding_window(seed, g0, BLOCK)
        v = _stochastic_round(v, r, STORAGE == STORAGE_BFLOAT16)
    _store(ptrs, inside, full, _narrow(v, STORAGE), HAS_MASK)


@triton.jit
def _magnitude_mask_kernel(mask_table, program_table, thresholds_ptr,
                           STORAGE: tl.constexpr, WORDS: tl.constexpr):
    """Words [w0, w0 + WORDS) of one tensor's bitmap: bit b of word k is set iff
    float32(|x|) <= threshold for element 32 k + b (NaN compares false; past numel: 0)."""
    pid = tl.program_id(0)
    t = tl.load(program_table + pid).to(tl.int64)
    row = mask_table + MASK_TABLE_COLUMNS * t
    values = _typed_ptr(tl.load(row), STORAGE)
    numel = tl.load(row + 1)
    bitmap = tl.load(row + 2).to(tl.pointer_type(tl.int32))
    threshold = tl.load(thresholds_ptr + t)
    k = (pid - tl.load(row + 3)) * WORDS + tl.arange(0, WORDS).to(tl.int64)  # word indices
    bit = tl.arange(0, 32)
    j = k[:, None] * 32 + bit[None, :].to(tl.int64)  # [WORDS, 32] element indices
    inside = j < numel
    x = _widen(tl.load(values + j, mask=inside, other=0), STORAGE)
    on = inside & (tl.abs(x) <= threshold)
    # one distinct bit per lane: the uint32 row sum is their OR (no carries; bit 31 included;
    # a sum, not a generic OR-reduce, runs vectorised in the interpreter), stored as int32
    bits = tl.where(on, tl.full(on.shape, 1, tl.uint32) << bit[None, :].to(tl.uint32), 0)
    word = tl.sum(bits.to(tl.uint32), axis=1)
    tl.store(bitmap + k, word.to(tl.int32, bitcast=True), mask=k * 32 < numel)


# True when TRITON_INTERPRET was set as the kernels were defined: they then run on CPU tensors.
INTERPRETED = _is_interpreted(_uniform)
