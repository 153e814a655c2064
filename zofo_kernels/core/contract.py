"""The noise contract, written once in plain numpy.

z is a pure function of (seed, global element index i, direction k). Every backend (C++ CPU,
CUDA, Triton) must reproduce what this module computes: bit for bit for the integer words,
the uniforms, Rademacher signs and the stochastic-rounding decisions; within a few ulp for the
Gaussian values (CPU and GPU math libraries differ in log/sin/cos).

Philox4x32-10 (Random123), exactly as Triton's ``tl.philox``:
    counter (c0, c1, c2, c3), key (k0, k1) = (seed mod 2**32, seed div 2**32)
    c0 = (block mod 2**32), c1 = (block div 2**32), c2 = direction, c3 = purpose

Purposes (c3): 0 = perturbation noise, 1 = stochastic-rounding bits.

Rademacher: block = i div 128; word (i div 32) mod 4; bit i mod 32; z = +1 if set else -1.
Gaussian:   block = i div 4; four words -> four uniforms (Triton's ``uint_to_uniform_float``),
            Box-Muller on pairs (w0, w1) and (w2, w3) in float32; lane i mod 4 takes
            cos0, sin0, cos1, sin1.
Stochastic-rounding bits: block = i div 4, c2 = 0, c3 = 1; word i mod 4.

The reference is vectorised numpy and processes bounded chunks, so it is usable (slowly) on
tensors of any size; it is the oracle of the test-suite and the backend of last resort.
"""

from __future__ import annotations

import numpy as np

PHILOX_M0 = np.uint64(0xD2511F53)  # multiplies c0
PHILOX_M1 = np.uint64(0xCD9E8D57)  # multiplies c2
PHILOX_W0 = np.uint32(0x9E3779B9)  # key increment of k0
PHILOX_W1 = np.uint32(0xBB67AE85)  # key increment of k1
PHILOX_ROUNDS = 10

PURPOSE_NOISE = 0
PURPOSE_ROUNDING = 1

RADEMACHER_BLOCK = 128  # elements served by one Philox call
GAUSSIAN_BLOCK = 4
ROUNDING_BLOCK = 4

# float32 constants, spelled as Triton spells them, rounded once to float32.
UNIFORM_SCALE = np.float32(4.6566127342e-10)
TWO_PI = np.float32(6.283185307179586)
UNIFORM_MIN = np.float32(1.0e-7)
MINUS_TWO = np.float32(-2.0)

SEED_LIMIT = 1 << 63
INDEX_LIMIT = 1 << 63
DIRECTION_LIMIT = 1 << 32

DISTRIBUTIONS = ("gaussian", "rademacher")

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(c0, c1, c2, c3, seed: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on arrays of 32-bit counters; returns four uint32 arrays."""
    c0 = np.asarray(c0, dtype=np.uint32)
    c1 = np.asarray(c1, dtype=np.uint32)
    c2 = np.asarray(c2, dtype=np.uint32)
    c3 = np.asarray(c3, dtype=np.uint32)
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    k0 = np.uint32(seed & 0xFFFFFFFF)
    k1 = np.uint32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for _ in range(rounds):
            p0 = c0.astype(np.uint64) * PHILOX_M0
            p1 = c2.astype(np.uint64) * PHILOX_M1
            n0 = (p1 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0
            n2 = (p0 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1
            c1 = (p1 & _MASK32).astype(np.uint32)
            c3 = (p0 & _MASK32).astype(np.uint32)
            c0, c2 = n0, n2
            k0 = np.uint32(k0 + PHILOX_W0)
            k1 = np.uint32(k1 + PHILOX_W1)
    return c0, c1, c2, c3


def _block_words(seed: int, blocks: np.ndarray, direction: int, purpose: int):
    blocks = blocks.astype(np.uint64)
    lo = (blocks & _MASK32).astype(np.uint32)
    hi = (blocks >> np.uint64(32)).astype(np.uint32)
    return philox4x32(lo, hi, np.uint32(direction), np.uint32(purpose), seed)


def _covering_words(seed: int, start: int, numel: int, block: int, direction: int,
                    purpose: int):
    """The four word arrays of the blocks of ``block`` elements that cover global indices
    [start, start + numel) (numel >= 1) of stream (direction, purpose), and how many indices
    of the first block lie before ``start``."""
    first = start // block
    last = (start + numel - 1) // block
    blocks = np.arange(first, last + 1, dtype=np.uint64)
    return _block_words(seed, blocks, direction, purpose), start - first * block


def uniform_from_words(words: np.ndarray) -> np.ndarray:
    """Triton's ``uint_to_uniform_float``: int32 view, ~x if negative, float32(x) * scale."""
    x = words.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * UNIFORM_SCALE


def box_muller(u_a: np.ndarray, u_b: np.ndarray):
    u_a = np.maximum(UNIFORM_MIN, u_a)
    theta = TWO_PI * u_b
    r = np.sqrt(MINUS_TWO * np.log(u_a))
    return r * np.cos(theta), r * np.sin(theta)


def gaussian(seed: int, start: int, numel: int, direction: int = 0) -> np.ndarray:
    """z for global indices [start, start + numel), float32."""
    if numel == 0:
        return np.zeros(0, dtype=np.float32)
    w, skip = _covering_words(seed, start, numel, GAUSSIAN_BLOCK, direction, PURPOSE_NOISE)
    u = [uniform_from_words(x) for x in w]
    n0, n1 = box_muller(u[0], u[1])
    n2, n3 = box_muller(u[2], u[3])
    lanes = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)
    return np.ascontiguousarray(lanes[skip: skip + numel], dtype=np.float32)


def rademacher(seed: int, start: int, numel: int, direction: int = 0) -> np.ndarray:
    """z in {-1, +1} for global indices [start, start + numel), float32."""
    if numel == 0:
        return np.zeros(0, dtype=np.float32)
    w, skip = _covering_words(seed, start, numel, RADEMACHER_BLOCK, direction, PURPOSE_NOISE)
    w = np.stack(w, axis=1)  # (nb, 4)
    bits = np.unpackbits(w.reshape(-1).view(np.uint8), bitorder="little")  # 128 bits per block
    bits = bits[skip: skip + numel]
    return np.where(bits == 1, np.float32(1.0), np.float32(-1.0)).astype(np.float32)


def noise(seed: int, start: int, numel: int, distribution: str = "gaussian", direction: int = 0):
    if distribution == "gaussian":
        return gaussian(seed, start, numel, direction)
    if distribution == "rademacher":
        return rademacher(seed, start, numel, direction)
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def rounding_words(seed: int, start: int, numel: int) -> np.ndarray:
    """One uint32 of stochastic-rounding bits per element (purpose 1, direction 0)."""
    if numel == 0:
        return np.zeros(0, dtype=np.uint32)
    w, skip = _covering_words(seed, start, numel, ROUNDING_BLOCK, 0, PURPOSE_ROUNDING)
    w = np.stack(w, axis=1).reshape(-1)
    return np.ascontiguousarray(w[skip: skip + numel])


def stochastic_round_bits(x: np.ndarray, r: np.ndarray, kind: str) -> np.ndarray:
    """Stochastically round float32 values to bfloat16 or float16 precision.

    Returns float32 values that are exactly representable in the target type. The rule works
    on the float32 bit pattern, so every backend can reproduce it bit for bit:
      * the number of dropped low bits is 16 for bfloat16; for float16 it is 13 for normal
        results and grows by one per binade below 2**-14 (float16 subnormals);
      * ``(bits + (r & mask)) & ~mask`` on the magnitude rounds up with probability equal to
        the dropped fraction; for |x| < 2**-24 (below float16's smallest subnormal, whose
        pattern the mask trick cannot express) the result is 2**-24 with probability
        |x| / 2**-24, else 0, decided by the top 24 bits of r;
      * non-finite values are returned unchanged.
    """
    x = np.asarray(x, dtype=np.float32)
    r = np.asarray(r, dtype=np.uint32)
    bits = x.view(np.uint32)
    sign = bits & np.uint32(0x80000000)
    mag = bits & np.uint32(0x7FFFFFFF)
    exp = (mag >> np.uint32(23)).astype(np.int64)
    if kind == "bfloat16":
        shift = np.full(x.shape, 16, dtype=np.int64)
    elif kind == "float16":
        shift = 13 + np.clip(-14 - (exp - 127), 0, None)
    else:
        raise ValueError(kind)
    tiny = shift > 23  # only float16: |x| < 2**-24
    shift = np.minimum(shift, 23)
    mask = ((np.uint64(1) << shift.astype(np.uint64)) - np.uint64(1)).astype(np.uint32)
    with np.errstate(over="ignore"):
        rounded = (mag + (r & mask)) & ~mask
    # |x| < 2**-24: 2**-24 with probability |x| * 2**24 (exact scaling by a power of two)
    scaled = (np.abs(x) * np.float32(2.0 ** 24)).astype(np.float32)
    uniform24 = (r >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    tiny_val = np.where(uniform24 < scaled, np.float32(2.0 ** -24), np.float32(0.0)).view(np.uint32)
    rounded = np.where(tiny, tiny_val, rounded)
    finite = mag < np.uint32(0x7F800000)
    out = np.where(finite, rounded | sign, bits).astype(np.uint32)
    return out.view(np.float32)


# --------------------------------------------------------------------------- sparse masks
#
# A sparse perturbation (``sparse_fraction`` of the optimizers) perturbs and updates only
# the elements whose bit is set in a *mask bitmap*, built once per step from the step-start
# weights: z_i is replaced by m_i * z_i, and an element with m_i = 0 keeps its bit pattern (no
# weight decay, no rounding; a backend may store its own bits back). The mask cannot be recomputed from the
# weights during the step (w + eps*z is not w, and no threshold rule on the perturbed value
# recovers the step-start decision near the threshold), so it is stored: one bit per element.
#
# Layout: one bitmap per tensor, int32 words, ceil(numel / 32) of them; element j of the
# tensor (row-major order, local index, not the global one) is bit j mod 32 (least
# significant first) of word j div 32. Bits past numel in the last word are 0.
# Magnitude rule: m_j = 1 iff float32(|w_j|) <= float32(threshold) (NaN: never).

MASK_WORD_BITS = 32


def mask_words(numel: int) -> int:
    """Number of int32 words of the bitmap of a tensor of ``numel`` elements."""
    return (numel + MASK_WORD_BITS - 1) // MASK_WORD_BITS


def magnitude_mask_words(values, threshold) -> np.ndarray:
    """The bitmap (uint32 words) of the magnitude rule for ``values`` (any real array, taken
    in order and converted to float32 exactly as storage dtypes convert)."""
    v = np.abs(np.asarray(values, dtype=np.float32).reshape(-1))
    bits = (v <= np.float32(threshold)).astype(np.uint8)  # NaN compares False
    pad = (-bits.size) % MASK_WORD_BITS
    bits = np.concatenate([bits, np.zeros(pad, dtype=np.uint8)])
    return np.packbits(bits, bitorder="little").view(np.uint32).copy()


def mask_bits(words, start: int, numel: int) -> np.ndarray:
    """The mask of local elements [start, start + numel) as a bool array."""
    if numel == 0:
        return np.zeros(0, dtype=bool)
    first, last = start // MASK_WORD_BITS, (start + numel - 1) // MASK_WORD_BITS
    w = np.ascontiguousarray(words[first: last + 1]).view(np.uint32)  # int32 or uint32 words
    bits = np.unpackbits(w.view(np.uint8), bitorder="little")
    skip = start - first * MASK_WORD_BITS
    return bits[skip: skip + numel].astype(bool)


# --------------------------------------------------------------------------- low-rank directions
#
# A low-rank direction (``lowrank=r`` of the optimizers, LOZO/SubZero style) replaces the dense
# z of a matrix by a rank-r one. A tensor of dim >= 2 and shape (m, ...) is viewed as the
# matrix (m, n), n = numel / m (row-major: local element j is row j div n, column j mod n);
# it takes a low-rank z when r <= min(m, n), every other tensor keeps its dense z.
#
# Factors, direction k: U (m, r) and V (n, r), float32, drawn from the noise stream itself
# (same distribution as the dense z would have) at global indices inside the tensor's own
# range [o, o + m*n), so that no two tensors share a draw:
#     U[i, l] = noise(u_seed, o + i*r + l, direction k)      (i*r + l < m*r <= m*n)
#     V[j, l] = noise(v_seed, o + j*r + l, direction k)      (j*r + l < n*r <= m*n)
# u_seed = derived_seed(seed, 0, PURPOSE_LOWRANK_U) of the call's seed (the step seed), and
# v_seed = derived_seed(v_key, 0, PURPOSE_LOWRANK_V) of a key that is the step seed too, or the
# seed of the first step of V's period: the optimizers' ``lowrank_period=p`` keys V on the
# seed of step p * (t div p), so V stays for p steps (LOZO's lazy V) while U changes.
#
# z of local element j = (row i, column c), each product and sum a separately rounded float32
# operation, summed in the order l = 0 .. r-1:
#     acc = U[i, 0] * V[c, 0];  acc = acc + U[i, l] * V[c, l]  (l = 1 .. r-1);  z = acc * s_r
# with s_r = float32(1 / sqrt(r)) (rounded once from double). E[z z^T] = I, as for dense z.
# Rademacher factors make acc an exact integer, so Rademacher low-rank z is exact on every
# backend; Gaussian low-rank z inherits the Gaussian factors' tolerance. Given the same factor
# tensors, every backend computes the same z bit for bit (the float contract: no FMA).

PURPOSE_LOWRANK_U = 0x10F40001  # Philox c3 of the derived seeds of U and V
PURPOSE_LOWRANK_V = 0x10F40002


def derived_seed(key_seed: int, index: int, purpose: int) -> int:
    """A seed in [0, 2**63) derived from ``key_seed``: Philox4x32-10 keyed by it on the counter
    (index mod 2**32, index div 2**32, 0, purpose), words 0 and 1 joined (word 1 high)."""
    if not 0 <= key_seed < SEED_LIMIT:
        raise ValueError(f"key_seed must be in [0, 2**63), got {key_seed}")
    if not 0 <= index < (1 << 64):
        raise ValueError(f"index must be in [0, 2**64), got {index}")
    w = philox4x32(np.uint32(index & 0xFFFFFFFF), np.uint32(index >> 32), np.uint32(0),
                   np.uint32(purpose), key_seed)
    return ((int(w[1]) << 32) | int(w[0])) & (SEED_LIMIT - 1)


def lowrank_shape(shape, rank: int):
    """(m, n) of the matrix view of a tensor of ``shape`` when it takes a rank-``rank`` z,
    else None (dim < 2, or rank > min(m, n): the tensor keeps its dense z)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or rank < 1:
        return None
    m = shape[0]
    n = int(np.prod(shape[1:], dtype=np.int64))
    if rank > min(m, n):
        return None
    return m, n


def lowrank_seeds(seed: int, v_key: int):
    """(u_seed, v_seed) of a step with seed ``seed`` whose V is keyed on ``v_key``."""
    return (derived_seed(seed, 0, PURPOSE_LOWRANK_U), derived_seed(v_key, 0, PURPOSE_LOWRANK_V))


def lowrank_scale(rank: int) -> np.float32:
    """s_r = float32(1 / sqrt(r)), rounded once from double."""
    return np.float32(1.0 / np.sqrt(np.float64(rank)))


def lowrank_factor(seed: int, start: int, rows: int, rank: int, distribution: str = "gaussian",
                   direction: int = 0) -> np.ndarray:
    """U (rows = m) or V (rows = n) of a tensor whose first global index is ``start``:
    element (i, l) is noise(seed, start + i*rank + l, direction), float32 (rows, rank)."""
    return noise(seed, start, rows * rank, distribution, direction).reshape(rows, rank)


def lowrank_z(u: np.ndarray, v: np.ndarray, start: int, numel: int) -> np.ndarray:
    """z of local elements [start, start + numel) of the (m, n) matrix with factors u (m, r)
    and v (n, r) (float32), by the fixed-order float32 formula above."""
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    r = u.shape[1]
    j = np.arange(start, start + numel, dtype=np.int64)
    rows, cols = j // v.shape[0], j % v.shape[0]
    acc = u[rows, 0] * v[cols, 0]
    for k in range(1, r):
        acc = acc + u[rows, k] * v[cols, k]
    return (acc * lowrank_scale(r)).astype(np.float32)
