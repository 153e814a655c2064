// Noise contract and per-element math shared by the C++ CPU kernels and the CUDA kernels.
//
// Everything here is a pure function of its arguments and is compiled both by the host
// compiler (ZOFO_HD is then just `inline`) and by nvcc (`__host__ __device__`). The CPU
// build calls these functions inside loops over arrays of lanes, which the compiler
// vectorises; the CUDA build calls them per thread. The rules implemented here are the ones
// of zofo_kernels/contract.py and the float-math contract of zofo_kernels/backends/base.py:
//
//   * Philox4x32-10, counter (c0, c1, c2, c3) = (block lo, block hi, direction, purpose),
//     key (seed lo, seed hi);
//   * Rademacher: block = i / 128, bit (i % 128) of the four words (word-major, LSB first);
//   * Gaussian: block = i / 4, Triton's uint->uniform mapping, clamp at 1e-7, Box-Muller in
//     float32 on (w0, w1) and (w2, w3), lanes cos0, sin0, cos1, sin1;
//   * stochastic rounding: the bit rule of contract.stochastic_round_bits, word i % 4 of the
//     purpose-1 stream at block i / 4, direction 0;
//   * sparse masks: the bitmap layout of contract.mask_bits (local index j -> bit j % 32 of
//     word j / 32) and the magnitude rule of contract.magnitude_mask_words;
//   * low-rank directions: z of element (row i, column c) from the factor rows U[i, :] and
//     V[c, :] (contract.lowrank_z), summed in a fixed order.
//
// Storage<T> converts between float32 and the storage types; ZOFO_DTYPE_SWITCH and
// ZOFO_BOOL_SWITCH turn a dtype code and a flag into template arguments (host code of both
// builds).
//
// Floating point: every sum and product is a separate float32 operation. The build passes
// -ffp-contract=off (host) and --fmad=false (nvcc) so no multiply-add is fused; nothing here
// may be compiled with fast-math.
//
// log, sin and cos are our own, in float32 arithmetic without libm calls or branches, so
// that the CPU loops vectorise (16 lanes with AVX-512): range reduction plus a short series.
// Measured against float64 math (python_tests/test_native_build.py): log < 1 ulp; sin and
// cos < 2 ulp of max(|value|, 1/2), i.e. an absolute error below 2**-23 (what matters for
// r*cos t, whose error the contract bounds relative to r).

#ifndef ZOFO_NOISE_H_
#define ZOFO_NOISE_H_

#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__CUDACC__)
#define ZOFO_HD __host__ __device__ __forceinline__
#else
#define ZOFO_HD inline
#endif

namespace zofo {

// ----------------------------------------------------------------------------- constants

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Distribution : int { kGaussian = 0, kRademacher = 1 };

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies c0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies c2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increment of k0
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key increment of k1
constexpr int kPhiloxRounds = 10;

constexpr uint32_t kPurposeNoise = 0;
constexpr uint32_t kPurposeRounding = 1;

constexpr int kRademacherBlock = 128;
constexpr int kGaussianBlock = 4;
constexpr int kRoundingBlock = 4;

constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kUniformMin = 1.0e-7f;
constexpr float kMinusTwo = -2.0f;

// ----------------------------------------------------------------------------- bit casts

// The bits of x as a value of type To of the same size (C++20's std::bit_cast). memcpy of
// one register-sized value compiles to a move, on the host and on the device.
template <typename To, typename From>
ZOFO_HD To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To y;
  memcpy(&y, &x, sizeof(y));
  return y;
}

ZOFO_HD uint32_t f2u(float x) { return bit_cast<uint32_t>(x); }
ZOFO_HD float u2f(uint32_t u) { return bit_cast<float>(u); }

// ----------------------------------------------------------------------------- Philox

// One Philox round on a counter held in four variables (so that array-of-lanes loops on the
// CPU vectorise); mulhilo through a 64-bit product.
ZOFO_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                          uint32_t k0, uint32_t k1) {
  const uint64_t p0 = (uint64_t)c0 * (uint64_t)kPhiloxM0;
  const uint64_t p1 = (uint64_t)c2 * (uint64_t)kPhiloxM1;
  const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
  c1 = (uint32_t)p1;
  c3 = (uint32_t)p0;
  c0 = n0;
  c2 = n2;
}

// Philox4x32-10 of counter (c0..c3) under key = seed; results overwrite the counter.
ZOFO_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                           uint64_t seed) {
  uint32_t k0 = (uint32_t)seed;
  uint32_t k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The four words of block `block` of stream (direction, purpose).
ZOFO_HD void block_words(uint64_t seed, uint64_t block, uint32_t direction, uint32_t purpose,
                         uint32_t w[4]) {
  uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32), c2 = direction, c3 = purpose;
  philox4x32_10(c0, c1, c2, c3, seed);
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// ----------------------------------------------------------------------------- uniforms

// Triton's uint_to_uniform_float: int32 view, ~x if negative, float32(x) * 2**-31 (approx).
ZOFO_HD float uniform_from_word(uint32_t w) {
  int32_t x = (int32_t)w;
  x = x < 0 ? ~x : x;
  return (float)x * kUniformScale;
}

// ----------------------------------------------------------------------------- log, sin, cos

// Natural log of a positive, finite, normal float32 (the Box-Muller argument lies in
// [1e-7, 1]), in float32 arithmetic. x = 2**e * m with m in [sqrt(1/2), sqrt(2));
// f = m - 1 is exact (Sterbenz). With s = f / (2 + f), log(1 + f) = 2 atanh(s) rearranged as
// f - (hf - s (hf + R)), hf = f^2/2, R = 2 s^2/3 + 2 s^4/5 + 2 s^6/7 + 2 s^8/9 (series
// truncation < 1e-9 relative): the exact f dominates and the rounding errors of the small
// terms are damped. e ln2 is added as e*hi (exact: hi has 12 significant bits) + e*lo.
ZOFO_HD float log_f32(float x) {
  const uint32_t b = f2u(x);
  int32_t e = (int32_t)(b >> 23) - 127;
  const uint32_t mant = b & 0x007FFFFFu;
  const bool big = mant > 0x003504F3u;  // m > sqrt(2)
  const uint32_t mb = mant | (big ? 0x3F000000u : 0x3F800000u);
  e += big ? 1 : 0;
  const float f = u2f(mb) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  float R = 2.0f / 9.0f;
  R = R * z + 2.0f / 7.0f;
  R = R * z + 2.0f / 5.0f;
  R = R * z + 2.0f / 3.0f;
  R = R * z;
  const float hf = 0.5f * f * f;
  const float ef = (float)e;
  const float lnm_lo = ef * 3.194618329871446e-05f - (hf - s * (hf + R));  // ln2 - hi
  return ef * 0.693115234375f + (f + lnm_lo);
}

// sin and cos of a float32 angle t in [0, 2*pi] (the Box-Muller angle), in float32
// arithmetic. Cody-Waite reduction t = j*pi/2 + r with pi/2 = A + B + C, A and B short enough
// that j*A and j*B are exact for j <= 4 and t - j*A exact (Sterbenz); the absolute error of r
// is below 1e-13. Taylor series to r^9 / r^10 on |r| <= pi/4.
ZOFO_HD void sincos_f32(float t, float* sin_out, float* cos_out) {
  const float kRound = 12582912.0f;  // 1.5 * 2**23: adding it rounds to an integer
  const float jf = (t * 0.636619772f + kRound) - kRound;
  const int32_t q = (int32_t)(f2u(jf + kRound) & 3u);
  float r = t - jf * 1.5703125f;
  r = r - jf * 4.837512969970703125e-04f;
  r = r - jf * 7.549790126404332e-08f;
  const float z = r * r;
  float sp = 1.0f / 362880.0f;  // 1/9!
  sp = sp * z - 1.0f / 5040.0f;
  sp = sp * z + 1.0f / 120.0f;
  sp = sp * z - 1.0f / 6.0f;
  const float sr = r + r * z * sp;
  float cp = -1.0f / 3628800.0f;  // -1/10!
  cp = cp * z + 1.0f / 40320.0f;
  cp = cp * z - 1.0f / 720.0f;
  cp = cp * z + 1.0f / 24.0f;
  const float cr = (1.0f - 0.5f * z) + z * z * cp;
  // quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s)
  const float s_ = (q & 1) ? cr : sr;
  const float c_ = (q & 1) ? sr : cr;
  *sin_out = (q & 2) ? -s_ : s_;
  *cos_out = ((q + 1) & 2) ? -c_ : c_;
}

// Box-Muller on one pair of words: (r cos t, r sin t) in float32 as the contract orders it.
ZOFO_HD void box_muller(uint32_t wa, uint32_t wb, float* n_cos, float* n_sin) {
  float ua = uniform_from_word(wa);
  ua = ua > kUniformMin ? ua : kUniformMin;  // max(1e-7, u)
  const float ub = uniform_from_word(wb);
  const float t = kTwoPi * ub;
  const float r = sqrtf(kMinusTwo * log_f32(ua));
  float s, c;
  sincos_f32(t, &s, &c);
  *n_cos = r * c;
  *n_sin = r * s;
}

// Four Gaussian values of block i / 4 (lanes cos0, sin0, cos1, sin1).
ZOFO_HD void gaussian4(uint64_t seed, uint64_t block, uint32_t direction, float z[4]) {
  uint32_t w[4];
  block_words(seed, block, direction, kPurposeNoise, w);
  box_muller(w[0], w[1], &z[0], &z[1]);
  box_muller(w[2], w[3], &z[2], &z[3]);
}

// Rademacher sign of element `bit` (0..127) of a block whose words are w.
ZOFO_HD float rademacher_from_words(const uint32_t w[4], int bit) {
  return ((w[bit >> 5] >> (bit & 31)) & 1u) ? 1.0f : -1.0f;
}

// ----------------------------------------------------------------------------- 16-bit storage

ZOFO_HD float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

// The conversions below compute every case and select, without branches, so that the CPU
// loops over arrays of them vectorise.

// Round to nearest even; NaN becomes the quiet NaN 0x7FC0 (as c10::BFloat16 does).
ZOFO_HD uint16_t f32_to_bf16(float x) {
  const uint32_t b = f2u(x);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return (uint16_t)((b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// Exact. Normal halves: shift the bits into float32 position and rebias the exponent by
// 127 - 15; subnormal halves: mag * 2**-24 (an exact int->float conversion and a power-of-two
// scaling, no denormal arithmetic); infinities and NaNs get the float32 all-ones exponent.
ZOFO_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  const uint32_t mag = (uint32_t)h & 0x7FFFu;
  const uint32_t special = 0x7F800000u | (mag << 13);
  const uint32_t normal = (mag << 13) + 0x38000000u;
  const uint32_t subnormal = f2u((float)(int32_t)mag * 5.9604644775390625e-08f);  // 2**-24
  uint32_t v = mag >= 0x0400u ? normal : subnormal;
  v = mag >= 0x7C00u ? special : v;
  return u2f(v | sign);
}

// Round to nearest even, IEEE binary16: overflow to infinity, subnormals, NaN -> 0x7E00
// (as c10::Half does).
ZOFO_HD uint16_t f32_to_f16(float x) {
  const uint32_t b = f2u(x);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t mag = b & 0x7FFFFFFFu;
  // >= 2**-14: normal half; rebias the exponent and round on bit 13
  const uint32_t normal = (mag - 0x38000000u + 0x0FFFu + ((mag >> 13) & 1u)) >> 13;
  // below: subnormal half or zero; the FPU rounds in the binade [0.5, 1), whose spacing is
  // the subnormal half spacing 2**-24
  const uint32_t subnormal = f2u(u2f(mag < 0x38800000u ? mag : 0u) + 0.5f) - 0x3F000000u;
  uint32_t h = mag >= 0x38800000u ? normal : subnormal;
  h = mag >= 0x477FF000u ? 0x7C00u : h;  // >= 65520 (and inf): rounds to infinity
  h = mag > 0x7F800000u ? 0x7E00u : h;   // NaN
  return (uint16_t)(h | sign);
}

// Storage types: float for float32, and tags for the uint16_t bit patterns of bfloat16 and
// float16 with their exact widening and round-to-nearest-even narrowing.
struct BF16Bits {
  static constexpr int kCode = kBFloat16;
  ZOFO_HD static float widen(uint16_t h) { return bf16_to_f32(h); }
  ZOFO_HD static uint16_t narrow(float x) { return f32_to_bf16(x); }
};

struct F16Bits {
  static constexpr int kCode = kFloat16;
  ZOFO_HD static float widen(uint16_t h) { return f16_to_f32(h); }
  ZOFO_HD static uint16_t narrow(float x) { return f32_to_f16(x); }
};

// Storage<T> for a storage type T: raw_t is the type of one stored element (float, or the
// uint16_t bit pattern of a bfloat16/float16); load/store convert between it and float32,
// round() is store-then-load (round to nearest even in the storage type). Plain scalar types
// let the CPU loops vectorise. The primary template serves the 16-bit tags.
template <typename Bits16>
struct Storage {
  using raw_t = uint16_t;
  static constexpr int kCode = Bits16::kCode;
  ZOFO_HD static float load(uint16_t v) { return Bits16::widen(v); }
  ZOFO_HD static uint16_t store(float v) { return Bits16::narrow(v); }
  ZOFO_HD static float round(float v) { return Bits16::widen(Bits16::narrow(v)); }
};

template <>
struct Storage<float> {
  using raw_t = float;
  static constexpr int kCode = kFloat32;
  ZOFO_HD static float load(float v) { return v; }
  ZOFO_HD static float store(float v) { return v; }
  ZOFO_HD static float round(float v) { return v; }
};

// ----------------------------------------------------------------------------- static dispatch
//
// Runtime values to compile-time ones, in the manner of flash-attention's static_switch.h:
// the body (a lambda) is compiled once per case with the case's type or constant in scope.
//
//   ZOFO_DTYPE_SWITCH(dtype, T, [&] { kernel<T>(...); });
//   ZOFO_BOOL_SWITCH(restore, kRestore, [&] { body<kRestore>(...); });
//
// ZOFO_DTYPE_SWITCH takes a valid DType code (check is_dtype_code first): T is float,
// BF16Bits or F16Bits, and any other code runs the F16Bits case.

constexpr bool is_dtype_code(int code) {
  return code == kFloat32 || code == kBFloat16 || code == kFloat16;
}

#define ZOFO_DTYPE_SWITCH(CODE, TYPE, ...)      \
  [&] {                                         \
    if ((CODE) == ::zofo::kFloat32) {           \
      using TYPE = float;                       \
      return __VA_ARGS__();                     \
    } else if ((CODE) == ::zofo::kBFloat16) {   \
      using TYPE = ::zofo::BF16Bits;            \
      return __VA_ARGS__();                     \
    } else {                                    \
      using TYPE = ::zofo::F16Bits;             \
      return __VA_ARGS__();                     \
    }                                           \
  }()

#define ZOFO_BOOL_SWITCH(COND, NAME, ...)       \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool NAME = true;        \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool NAME = false;       \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// ----------------------------------------------------------------------------- stochastic rounding

// contract.stochastic_round_bits for one element: a float32 exactly representable in the
// target type (bfloat16 when kind == kBFloat16, float16 when kind == kFloat16).
ZOFO_HD float stochastic_round(float x, uint32_t r, int kind) {
  const uint32_t bits = f2u(x);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t mag = bits & 0x7FFFFFFFu;
  // dropped low bits: 16 for bfloat16; for float16 13, plus one per binade below 2**-14
  const int32_t extra = 113 - (int32_t)(mag >> 23);  // -14 - (exponent - 127)
  const int32_t shift16 = 13 + (extra > 0 ? extra : 0);
  const int32_t shift_raw = kind == kFloat16 ? shift16 : 16;
  const int32_t shift = shift_raw > 23 ? 23 : shift_raw;
  const uint32_t mask = (1u << shift) - 1u;
  const uint32_t rounded = (mag + (r & mask)) & ~mask;
  // float16 only, |x| < 2**-24: 2**-24 with probability |x| * 2**24 (top 24 bits of r)
  const float scaled = u2f(mag) * 16777216.0f;
  const float uniform24 = (float)(int32_t)(r >> 8) * 5.9604644775390625e-08f;
  const uint32_t tiny = uniform24 < scaled ? 0x33800000u : 0u;
  const uint32_t out = (shift_raw > 23 ? tiny : rounded) | sign;
  return mag >= 0x7F800000u ? x : u2f(out);  // non-finite: unchanged
}

// ----------------------------------------------------------------------------- element formulas

// perturb: w = rn(p + rs * z_r) (only if rs != 0); p = rn(w + s * z_d). Returns float32 of
// the value to store (already representable in the storage type only after Storage::store).
template <typename T>
ZOFO_HD float restore_value(float p, float rs, float zr) {
  return Storage<T>::round(p + rs * zr);
}

// update tail: d includes sum_k g_k z_k; v = w - lr * (d + wd * w).
ZOFO_HD float update_value(float w, float d, float lr, float wd) {
  const float dd = d + wd * w;
  return w - lr * dd;
}

// ----------------------------------------------------------------------------- sparse masks
//
// A bitmap holds element j of a tensor (local index) in bit j % 32 of 32-bit word j / 32,
// least significant bit first (contract.mask_bits); a bit of 0 means "do not write".

ZOFO_HD uint32_t mask_bit(const uint32_t* mask, int64_t j) {
  return (mask[j >> 5] >> (j & 31)) & 1u;
}

// The magnitude rule float32(|x|) <= threshold (NaN: never) as an integer comparison of |x|'s
// bit pattern with a limit made once from the threshold. Non-negative floats (infinity
// included) order like their bit patterns, so this is IEEE's comparison; in integers it also
// stays exact where an FPU flushes subnormal operands (DAZ), and reads the same on the host
// and the device. Limit -1: nothing passes (a NaN or negative threshold); a threshold of -0
// passes +-0 like +0 does.
ZOFO_HD int64_t magnitude_limit(float threshold) {
  const uint32_t t = f2u(threshold);
  const uint32_t mag = t & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return -1;     // NaN
  if (t >> 31) return mag == 0 ? 0 : -1;
  return (int64_t)t;
}

ZOFO_HD bool magnitude_keep(float x, int64_t limit) {
  return (int64_t)(f2u(x) & 0x7FFFFFFFu) <= limit;  // a NaN's pattern exceeds every limit
}

// One bitmap word: bit b = the magnitude rule for p[b], b < count (<= 32); the bits from
// count on are 0.
template <typename T>
ZOFO_HD uint32_t magnitude_word(const typename Storage<T>::raw_t* p, int count, int64_t limit) {
  uint32_t word = 0;
  for (int b = 0; b < count; ++b)
    word |= (uint32_t)magnitude_keep(Storage<T>::load(p[b]), limit) << b;
  return word;
}

// ----------------------------------------------------------------------------- low-rank z
//
// contract.lowrank_z: the direction's z of element (i, c) of an (m, n) matrix with factors
// U (m, r) and V (n, r), row-major float32: acc = u[0] * v[0], then acc = acc + u[l] * v[l]
// for l = 1 .. r-1 (separate float32 operations, this order), z = acc * scale with
// scale = float32(1 / sqrt(r)) (lowrank_scale). u = U + i * r and v = V + c * r.

ZOFO_HD float lowrank_value(const float* u, const float* v, int rank, float scale) {
  float acc = u[0] * v[0];
  for (int l = 1; l < rank; ++l) acc = acc + u[l] * v[l];
  return acc * scale;
}

// float32(1 / sqrt(r)), rounded once from double, as contract.lowrank_scale (host code: the
// kernels take it as an argument).
inline float lowrank_scale(int rank) { return (float)(1.0 / sqrt((double)rank)); }

}  // namespace zofo

#endif  // ZOFO_NOISE_H_
