// C++ CPU kernels: OpenMP over blocks of 128 global indices, one parallel region per call.
//
// A call processes a list of tensors. Each tensor is cut at the global 128-element block
// boundaries (the Rademacher block of the contract, and 32 Gaussian blocks); the resulting
// units of all tensors are laid end to end and every thread takes one contiguous run of
// units of (almost) equal count, so the split is balanced however unequal the tensors are.
// Within a unit the noise of the whole 128-block is generated into small arrays by loops
// over lanes that the compiler vectorises, then the weights of the unit are updated in one
// more vectorisable loop. All indices are 64-bit.

#include "cpu_kernels.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "zofo_noise.h"

namespace zofo {
namespace cpu {
namespace {

constexpr int kBlock = kRademacherBlock;                 // 128 elements per unit
constexpr int kLanes = kBlock / kGaussianBlock;          // 32 Philox calls per unit (Gaussian)
constexpr int kPairs = 2 * kLanes;                       // 64 Box-Muller pairs per unit
constexpr int64_t kSerialBelow = 1 << 15;                // elements: no threads below this

#if defined(__AVX512F__)
// 16 Philox lanes per register: the 32x32->64 products of the even and of the odd 32-bit
// lanes (vpmuludq), recombined into the high and low words with two blends.
inline void mulhilo16(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *lo = _mm512_mullo_epi32(a, m);
  *hi = _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#endif

// Philox on the 32 consecutive 4-blocks of unit `unit` (4-block b = 32 * unit + l):
// results in w0..w3 [l]. 32 * unit + l never carries into the high word across lanes.
inline void philox_lanes(uint64_t seed, uint64_t unit, uint32_t direction, uint32_t purpose,
                         uint32_t* __restrict w0, uint32_t* __restrict w1,
                         uint32_t* __restrict w2, uint32_t* __restrict w3) {
  const uint64_t first = unit * (uint64_t)kLanes;
  const uint32_t lo = (uint32_t)first;
  const uint32_t hi = (uint32_t)(first >> 32);
  uint32_t k0 = (uint32_t)seed;
  uint32_t k1 = (uint32_t)(seed >> 32);
#if defined(__AVX512F__)
  // kV registers of 16 lanes, advanced round by round together so that their independent
  // multiply chains overlap (one chain alone is latency-bound).
  constexpr int kV = kLanes / 16;
  const __m512i m0 = _mm512_set1_epi32((int)kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi32((int)kPhiloxM1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[kV], c1[kV], c2[kV], c3[kV];
  for (int v = 0; v < kV; ++v) {
    c0[v] = _mm512_add_epi32(_mm512_set1_epi32((int)(lo + 16u * v)), iota);
    c1[v] = _mm512_set1_epi32((int)hi);
    c2[v] = _mm512_set1_epi32((int)direction);
    c3[v] = _mm512_set1_epi32((int)purpose);
  }
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i key0 = _mm512_set1_epi32((int)k0);
    const __m512i key1 = _mm512_set1_epi32((int)k1);
    for (int v = 0; v < kV; ++v) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0[v], m0, &hi0, &lo0);
      mulhilo16(c2[v], m1, &hi1, &lo1);
      c0[v] = _mm512_ternarylogic_epi32(hi1, c1[v], key0, 0x96);  // 3-way xor
      c2[v] = _mm512_ternarylogic_epi32(hi0, c3[v], key1, 0x96);
      c1[v] = lo1;
      c3[v] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int v = 0; v < kV; ++v) {
    _mm512_storeu_si512((void*)(w0 + 16 * v), c0[v]);
    _mm512_storeu_si512((void*)(w1 + 16 * v), c1[v]);
    _mm512_storeu_si512((void*)(w2 + 16 * v), c2[v]);
    _mm512_storeu_si512((void*)(w3 + 16 * v), c3[v]);
  }
#else
  for (int l = 0; l < kLanes; ++l) {
    w0[l] = lo + (uint32_t)l;
    w1[l] = hi;
    w2[l] = direction;
    w3[l] = purpose;
  }
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int l = 0; l < kLanes; ++l) philox_round(w0[l], w1[l], w2[l], w3[l], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
#endif
}

void gaussian_unit(uint64_t seed, uint64_t unit, uint32_t direction, float* __restrict z) {
  alignas(64) uint32_t wa[kPairs];
  alignas(64) uint32_t wb[kPairs];
  // pair l: words (w0, w1) of lane l; pair 32 + l: words (w2, w3) of lane l
  philox_lanes(seed, unit, direction, kPurposeNoise, wa, wb, wa + kLanes, wb + kLanes);
  alignas(64) float nc[kPairs];
  alignas(64) float ns[kPairs];
  for (int p = 0; p < kPairs; ++p) box_muller(wa[p], wb[p], &nc[p], &ns[p]);
  for (int l = 0; l < kLanes; ++l) {
    z[4 * l + 0] = nc[l];
    z[4 * l + 1] = ns[l];
    z[4 * l + 2] = nc[kLanes + l];
    z[4 * l + 3] = ns[kLanes + l];
  }
}

void rademacher_unit(uint64_t seed, uint64_t unit, uint32_t direction, float* __restrict z) {
  uint32_t w[4];
  block_words(seed, unit, direction, kPurposeNoise, w);
  // branch-free: the sign bit of +-1.0f is the complement of the noise bit
  for (int k = 0; k < 4; ++k) {
    const uint32_t word = w[k];
    for (int b = 0; b < 32; ++b) z[32 * k + b] = u2f(0x3F800000u | ((~(word >> b) & 1u) << 31));
  }
}

inline void noise_unit(uint64_t seed, uint64_t unit, uint32_t direction, int distribution,
                       float* __restrict z) {
  if (distribution == kRademacher) {
    rademacher_unit(seed, unit, direction, z);
  } else {
    gaussian_unit(seed, unit, direction, z);
  }
}

// Stochastic-rounding words of the 128 elements of a unit (purpose 1, direction 0).
void rounding_unit(uint64_t seed, uint64_t unit, uint32_t* __restrict r) {
  alignas(64) uint32_t w0[kLanes], w1[kLanes], w2[kLanes], w3[kLanes];
  philox_lanes(seed, unit, 0u, kPurposeRounding, w0, w1, w2, w3);
  for (int l = 0; l < kLanes; ++l) {
    r[4 * l + 0] = w0[l];
    r[4 * l + 1] = w1[l];
    r[4 * l + 2] = w2[l];
    r[4 * l + 3] = w3[l];
  }
}

// ----------------------------------------------------------------------------- work split

struct Plan {
  std::vector<int64_t> prefix;  // prefix[t] = units before segment t; prefix.back() = total
  int64_t total_elements = 0;
};

Plan make_plan(const std::vector<Segment>& segs) {
  Plan plan;
  plan.prefix.resize(segs.size() + 1);
  int64_t units = 0;
  for (size_t t = 0; t < segs.size(); ++t) {
    plan.prefix[t] = units;
    const Segment& s = segs[t];
    if (s.numel < 0 || s.offset < 0) throw std::invalid_argument("negative numel or offset");
    if (s.numel > 0) {
      units += (s.offset + (s.numel - 1)) / kBlock - s.offset / kBlock + 1;  // no overflow at 2**63
      plan.total_elements += s.numel;
    }
  }
  plan.prefix[segs.size()] = units;
  return plan;
}

// [begin, end) units of thread `th` out of `nt`.
inline void thread_range(int64_t total, int th, int nt, int64_t* begin, int64_t* end) {
  *begin = (int64_t)((unsigned __int128)total * (unsigned)th / (unsigned)nt);
  *end = (int64_t)((unsigned __int128)total * (unsigned)(th + 1) / (unsigned)nt);
}

// Calls fn(segment index, global unit number, first local index, element count, position of
// the first element inside the 128-block) for every unit in [begin, end).
template <typename Fn>
void for_units(const std::vector<Segment>& segs, const Plan& plan, int64_t begin, int64_t end,
               Fn&& fn) {
  if (begin >= end) return;
  size_t t = std::upper_bound(plan.prefix.begin(), plan.prefix.end(), begin) -
             plan.prefix.begin() - 1;
  for (int64_t u = begin; u < end; ++u) {
    while (u >= plan.prefix[t + 1]) ++t;
    const Segment& s = segs[t];
    const int64_t unit = s.offset / kBlock + (u - plan.prefix[t]);
    // inclusive ends, so that a segment ending exactly at index 2**63 does not overflow
    const int64_t g0 = std::max(s.offset, unit * kBlock);
    const int64_t last = std::min(s.offset + (s.numel - 1), unit * kBlock + (kBlock - 1));
    fn(t, (uint64_t)unit, g0 - s.offset, last - g0 + 1, (int)(g0 - unit * kBlock));
  }
}

// body(begin, end) on `nt` threads, each with its share of [0, total) (one parallel region).
template <typename Body>
void parallel_range(int64_t total, int nt, Body&& body) {
  if (nt <= 1) {
    body((int64_t)0, total);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    int64_t begin, end;
    thread_range(total, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
    body(begin, end);
  }
#else
  body((int64_t)0, total);
#endif
}

template <typename Body>
void parallel_units(const std::vector<Segment>& segs, int num_threads, Body&& body) {
  const Plan plan = make_plan(segs);
  const int64_t total = plan.prefix.back();
  if (total == 0) return;
  parallel_range(total, threads_for(plan.total_elements, num_threads),
                 [&](int64_t begin, int64_t end) { body(plan, begin, end); });
}

// ----------------------------------------------------------------------------- operations
//
// Masked units: the bits of the unit's elements are gathered first (mask_window); a unit
// with none set is skipped before any noise is made. Otherwise the values of all its
// elements are computed into a small array by the same vectorisable loop as a dense unit
// (the same per-element function, so the kept elements get the dense bits), and only the
// kept ones change: the others are written back with their own bits (store_kept).

// Bits of the local elements [local, local + n) (n <= 128) of a bitmap: element local + e is
// bit e % 32 of keep[e / 32]; bits from n on are 0. Reads only the words holding them.
inline void mask_window(const uint32_t* mask, int64_t local, int64_t n, uint32_t keep[4]) {
  const int64_t last = (local + n - 1) >> 5;
  const int s = (int)(local & 31);
  int64_t j = local >> 5;
  for (int k = 0; k < 4; ++k, ++j) {
    uint32_t v = 0;
    if (j <= last) {
      v = mask[j] >> s;
      if (s != 0 && j + 1 <= last) v |= mask[j + 1] << (32 - s);
    }
    const int64_t rest = n - 32 * k;  // elements of output word k
    keep[k] = rest >= 32 ? v : (rest > 0 ? v & ((1u << rest) - 1u) : 0u);
  }
}

inline bool any_bit(const uint32_t keep[4]) {
  return (keep[0] | keep[1] | keep[2] | keep[3]) != 0;
}

// p[e] = v[e] for the elements whose bit in keep (mask_window's layout) is set, a 32-element
// word at a time: a full word is a plain copy, an empty one is skipped, a mixed one a blend
// of the raw storage bits (an element whose bit is 0 gets its own bits back, so its pattern,
// NaN payloads included, is kept). The blend vectorises on every instruction set; masked
// vector stores (vmaskmov) would avoid the write-back but are slow on several CPUs: measured
// here, they made a 20%-dense float32 sweep 2.4x slower than a dense one.
template <typename R>
inline void store_kept(R* __restrict p, const R* __restrict v, int64_t n,
                       const uint32_t keep[4]) {
  for (int k = 0; k < 4 && 32 * k < n; ++k) {
    const uint32_t word = keep[k];
    const int m = (int)std::min<int64_t>(32, n - 32 * k);
    R* __restrict pk = p + 32 * k;
    const R* __restrict vk = v + 32 * k;
    if (word == 0xFFFFFFFFu) {
      for (int b = 0; b < 32; ++b) pk[b] = vk[b];
    } else if (word != 0) {
      for (int b = 0; b < m; ++b) pk[b] = ((word >> b) & 1u) ? vk[b] : pk[b];
    }
  }
}

// The unit's bitmap window into keep; returns the pointer the element loops take (nullptr:
// dense) and sets *skip when the segment is masked and no element of the unit is kept.
inline const uint32_t* unit_mask(const Segment& seg, int64_t local, int64_t n, uint32_t keep[4],
                                 bool* skip) {
  *skip = false;
  if (seg.mask == nullptr) return nullptr;
  mask_window(seg.mask, local, n, keep);
  *skip = !any_bit(keep);
  return keep;
}

// One element of perturb, from its stored value to the value to store.
template <typename T, bool kRestore>
inline typename Storage<T>::raw_t perturb_one(typename Storage<T>::raw_t raw, float zd,
                                              float zr, float s, float rs) {
  float w = Storage<T>::load(raw);
  if (kRestore) w = restore_value<T>(w, rs, zr);
  return Storage<T>::store(w + s * zd);
}

template <typename T, bool kRestore>
inline void perturb_elems(typename Storage<T>::raw_t* __restrict p, int64_t n,
                          const uint32_t* keep, const float* __restrict zd,
                          const float* __restrict zr, float s, float rs) {
  if (keep == nullptr) {
    for (int64_t e = 0; e < n; ++e)
      p[e] = perturb_one<T, kRestore>(p[e], zd[e], kRestore ? zr[e] : 0.0f, s, rs);
    return;
  }
  alignas(64) typename Storage<T>::raw_t v[kBlock];
  for (int64_t e = 0; e < n; ++e)
    v[e] = perturb_one<T, kRestore>(p[e], zd[e], kRestore ? zr[e] : 0.0f, s, rs);
  store_kept(p, v, n, keep);
}

template <typename T>
void perturb_typed(const std::vector<Segment>& segs, uint64_t seed, int dist, float s,
                   uint32_t dir, float rs, uint32_t rdir, int num_threads) {
  const bool restore = rs != 0.0f;
  parallel_units(segs, num_threads, [&](const Plan& plan, int64_t begin, int64_t end) {
    alignas(64) float zd[kBlock];
    alignas(64) float zr[kBlock];
    for_units(segs, plan, begin, end, [&](size_t t, uint64_t unit, int64_t local, int64_t n,
                                          int j0) {
      uint32_t bits[4];
      bool skip;
      const uint32_t* keep = unit_mask(segs[t], local, n, bits, &skip);
      if (skip) return;
      auto* p = static_cast<typename Storage<T>::raw_t*>(segs[t].ptr) + local;
      noise_unit(seed, unit, dir, dist, zd);
      ZOFO_BOOL_SWITCH(restore, kRestore, [&] {
        if (kRestore) noise_unit(seed, unit, rdir, dist, zr);
        perturb_elems<T, kRestore>(p, n, keep, zd + j0, zr + j0, s, rs);
      });
    });
  });
}

// One element of update, from its stored value to the value to store.
template <typename T, bool kRestore, bool kStochastic>
inline typename Storage<T>::raw_t update_one(typename Storage<T>::raw_t raw, float d, float zr,
                                             uint32_t r, float rs, float lr, float wd) {
  float w = Storage<T>::load(raw);
  if (kRestore) w = restore_value<T>(w, rs, zr);
  float v = update_value(w, d, lr, wd);
  if (kStochastic) v = stochastic_round(v, r, Storage<T>::kCode);
  return Storage<T>::store(v);
}

template <typename T, bool kRestore, bool kStochastic>
inline void update_elems(typename Storage<T>::raw_t* __restrict p, int64_t n,
                         const uint32_t* keep, const float* __restrict d,
                         const float* __restrict zr, const uint32_t* __restrict r, float rs,
                         float lr, float wd) {
  if (keep == nullptr) {
    for (int64_t e = 0; e < n; ++e)
      p[e] = update_one<T, kRestore, kStochastic>(p[e], d[e], kRestore ? zr[e] : 0.0f,
                                                  kStochastic ? r[e] : 0u, rs, lr, wd);
    return;
  }
  alignas(64) typename Storage<T>::raw_t v[kBlock];
  for (int64_t e = 0; e < n; ++e)
    v[e] = update_one<T, kRestore, kStochastic>(p[e], d[e], kRestore ? zr[e] : 0.0f,
                                                kStochastic ? r[e] : 0u, rs, lr, wd);
  store_kept(p, v, n, keep);
}

template <typename T>
void update_typed(const std::vector<Segment>& segs, uint64_t seed, int dist, float lr,
                  const float* grads, int64_t q, float rs, uint32_t rdir, float wd, bool sr,
                  int num_threads) {
  const bool restore = rs != 0.0f;
  const bool stochastic = sr && Storage<T>::kCode != kFloat32;
  std::vector<float> g(grads, grads + q);
  parallel_units(segs, num_threads, [&](const Plan& plan, int64_t begin, int64_t end) {
    alignas(64) float z[kBlock];
    alignas(64) float zr[kBlock];
    alignas(64) float d[kBlock];
    alignas(64) uint32_t r[kBlock];
    for_units(segs, plan, begin, end, [&](size_t t, uint64_t unit, int64_t local, int64_t n,
                                          int j0) {
      uint32_t bits[4];
      bool skip;
      const uint32_t* keep = unit_mask(segs[t], local, n, bits, &skip);
      if (skip) return;
      auto* p = static_cast<typename Storage<T>::raw_t*>(segs[t].ptr) + local;
      if (restore) noise_unit(seed, unit, rdir, dist, zr);
      for (int64_t k = 0; k < q; ++k) {
        const float* zk = z;
        if (restore && (uint64_t)k == rdir) {
          zk = zr;
        } else {
          noise_unit(seed, unit, (uint32_t)k, dist, z);
        }
        const float gk = g[k];
        if (k == 0) {
          for (int j = 0; j < kBlock; ++j) d[j] = gk * zk[j];
        } else {
          for (int j = 0; j < kBlock; ++j) d[j] = d[j] + gk * zk[j];
        }
      }
      if (stochastic) rounding_unit(seed, unit, r);
      ZOFO_BOOL_SWITCH(restore, kRestore, [&] {
        ZOFO_BOOL_SWITCH(stochastic, kStochastic, [&] {
          update_elems<T, kRestore, kStochastic>(p, n, keep, d + j0, zr + j0, r + j0, rs, lr,
                                                 wd);
        });
      });
    });
  });
}

// magnitude_mask: the call's bitmap words laid end to end, split evenly across threads.
template <typename T>
void magnitude_typed(const std::vector<MaskTarget>& targets, int num_threads) {
  using R = typename Storage<T>::raw_t;
  std::vector<int64_t> prefix(targets.size() + 1, 0);  // words before target t
  std::vector<int64_t> limits(targets.size());
  int64_t elements = 0;
  for (size_t t = 0; t < targets.size(); ++t) {
    prefix[t + 1] = prefix[t] + (targets[t].numel + 31) / 32;
    limits[t] = magnitude_limit(targets[t].threshold);
    elements += targets[t].numel;
  }
  const int64_t total = prefix.back();
  if (total == 0) return;
  parallel_range(total, threads_for(elements, num_threads), [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    size_t t = std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1;
    for (int64_t u = begin; u < end; ++u) {
      while (u >= prefix[t + 1]) ++t;
      const MaskTarget& m = targets[t];
      const int64_t j = u - prefix[t];
      const int count = (int)std::min<int64_t>(32, m.numel - 32 * j);
      m.words[j] = magnitude_word<T>(static_cast<const R*>(m.ptr) + 32 * j, count, limits[t]);
    }
  });
}

void check_dtype(int dtype) {
  if (!is_dtype_code(dtype))
    throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
}

void check_distribution(int distribution) {
  if (distribution != kGaussian && distribution != kRademacher)
    throw std::invalid_argument("unknown distribution code " + std::to_string(distribution));
}

}  // namespace

int threads_for(int64_t total, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  if (total < kSerialBelow) return 1;
  const int64_t useful = total / (kSerialBelow / 2);
  return (int)std::min<int64_t>(num_threads, std::max<int64_t>(1, useful));
}

void noise(float* out, uint64_t seed, int64_t start, int64_t numel, int distribution,
           uint32_t direction, int num_threads) {
  check_distribution(distribution);
  std::vector<Segment> segs{{out, numel, start}};
  parallel_units(segs, num_threads, [&](const Plan& plan, int64_t begin, int64_t end) {
    alignas(64) float z[kBlock];
    for_units(segs, plan, begin, end, [&](size_t, uint64_t unit, int64_t local, int64_t n,
                                          int j0) {
      noise_unit(seed, unit, direction, distribution, z);
      std::copy(z + j0, z + j0 + n, out + local);
    });
  });
}

void perturb(const std::vector<Segment>& segments, int dtype, uint64_t seed, int distribution,
             float scale, uint32_t direction, float restore_scale, uint32_t restore_direction,
             int num_threads) {
  check_dtype(dtype);
  check_distribution(distribution);
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    perturb_typed<T>(segments, seed, distribution, scale, direction, restore_scale,
                     restore_direction, num_threads);
  });
}

void update(const std::vector<Segment>& segments, int dtype, uint64_t seed, int distribution,
            float lr, const float* grads, int64_t q, float restore_scale,
            uint32_t restore_direction, float weight_decay, bool stochastic_rounding,
            int num_threads) {
  check_dtype(dtype);
  check_distribution(distribution);
  if (q < 1) throw std::invalid_argument("update needs at least one projected gradient");
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    update_typed<T>(segments, seed, distribution, lr, grads, q, restore_scale,
                    restore_direction, weight_decay, stochastic_rounding, num_threads);
  });
}

void magnitude_mask(const std::vector<MaskTarget>& targets, int dtype, int num_threads) {
  check_dtype(dtype);
  for (const MaskTarget& m : targets)
    if (m.numel < 0) throw std::invalid_argument("negative numel");
  ZOFO_DTYPE_SWITCH(dtype, T, [&] { magnitude_typed<T>(targets, num_threads); });
}

std::vector<int64_t> split_elements(const std::vector<Segment>& segments, int num_threads) {
  const Plan plan = make_plan(segments);
  const int nt = std::max(1, num_threads);
  std::vector<int64_t> counts(nt, 0);
  for (int th = 0; th < nt; ++th) {
    int64_t begin, end;
    thread_range(plan.prefix.back(), th, nt, &begin, &end);
    for_units(segments, plan, begin, end,
              [&](size_t, uint64_t, int64_t, int64_t n, int) { counts[th] += n; });
  }
  return counts;
}

void log_f32_array(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = log_f32(in[i]);
}

void sincos_f32_array(const float* in, float* sin_out, float* cos_out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) sincos_f32(in[i], &sin_out[i], &cos_out[i]);
}

void round_to_storage(const float* in, void* out, int64_t n, int dtype) {
  check_dtype(dtype);
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    auto* o = static_cast<typename Storage<T>::raw_t*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = Storage<T>::store(in[i]);
  });
}

void stochastic_round_array(const float* in, const uint32_t* bits, float* out, int64_t n,
                            int dtype) {
  if (dtype != kBFloat16 && dtype != kFloat16)
    throw std::invalid_argument("stochastic rounding targets bfloat16 or float16 only");
  for (int64_t i = 0; i < n; ++i) out[i] = stochastic_round(in[i], bits[i], dtype);
}

void rounding_words(uint32_t* out, uint64_t seed, int64_t start, int64_t numel) {
  uint32_t w[4];
  int64_t cached = -1;
  for (int64_t j = 0; j < numel; ++j) {
    const int64_t i = start + j;
    const int64_t b = i / kRoundingBlock;
    if (b != cached) {
      block_words(seed, (uint64_t)b, 0u, kPurposeRounding, w);
      cached = b;
    }
    out[j] = w[i % kRoundingBlock];
  }
}

}  // namespace cpu
}  // namespace zofo
