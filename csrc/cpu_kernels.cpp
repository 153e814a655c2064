// C++ CPU kernels: OpenMP over blocks of 128 global indices, one parallel region per call.
//
// A call processes a list of tensors. Each tensor is cut at the global 128-element block
// boundaries (the Rademacher block of the contract, and 32 Gaussian blocks); the resulting
// units of all tensors are laid end to end and every thread takes one contiguous run of
// units of (almost) equal count, so the split is balanced however unequal the tensors are.
// Within a unit the noise of the whole 128-block is generated into small arrays by loops
// over lanes that the compiler vectorises, then the weights of the unit are updated in one
// more vectorisable loop. All indices are 64-bit. A tensor with low-rank factors fills the
// unit's z from them instead of the noise (see "low-rank z" below); everything else is the
// same.

#include "cpu_kernels.h"

#include <algorithm>
#include <cstring>
#include <memory>
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

// ----------------------------------------------------------------------------- low-rank z
//
// A segment with factors takes, in direction k, z of local element j = (row i, column c) =
// lowrank_value(U_k + i*r, V_k + c*r, r, s_r) of zofo_noise.h: acc = u[0]*v[0], then
// acc = acc + u[l]*v[l] (l = 1 .. r-1), z = acc * s_r. To vectorise it over the columns, each
// V_k the call uses is transposed once per call into Vt_k (r rows of `vt_stride(cols)`
// floats; r = 1: V_k is its own transpose and is read in place); a unit then walks its
// elements row span by row span (one division per unit; a row changes at most once per unit
// when cols >= 128) and computes each span in runs of kChunk columns whose sums stay in
// registers through the r terms, z[e] = z[e] + u[l] * Vt_k[l][c + e], the row's u[l]
// broadcast. Per element that is exactly lowrank_value's sequence of separately rounded
// float32 operations (the build never contracts them into FMAs), so the bits are the
// reference's on every variant. Vt costs about cols * r floats per direction and tensor: no
// more than V itself.

// Row stride of Vt, in floats: whole 64-byte lines, an odd number of them, so that the r rows
// a run reads fall into different L1 sets (with a power-of-two cols, rows 2**k bytes apart
// share a set and evict each other: measured 2x slower at r = 16).
inline int64_t vt_stride(int64_t cols) {
  const int64_t lines = (cols + 15) / 16;
  return 16 * (lines | 1);
}

// The directions of a call (one slot each) and, per segment with factors and slot, Vt_k
// (nullptr for a dense segment).
struct LowRank {
  bool any = false;
  int rank = 0;
  float scale = 0.0f;
  std::vector<uint32_t> dirs;
  std::vector<const float*> vt;  // [segment * dirs.size() + slot]
  std::vector<int64_t> stride;   // [segment]: Vt's row stride (0 when r = 1)
  std::vector<std::unique_ptr<float[]>> owned;

  const float* v_of(size_t seg, size_t slot) const { return vt[seg * dirs.size() + slot]; }
};

// Checks the segments' factors against the call (`dirs`: every direction it uses).
void check_lowrank(const std::vector<Segment>& segs, int rank,
                   const std::vector<uint32_t>& dirs) {
  for (size_t t = 0; t < segs.size(); ++t) {
    const Segment& s = segs[t];
    if ((s.fu == nullptr) != (s.fv == nullptr))
      throw std::invalid_argument("tensor " + std::to_string(t) +
                                  ": low-rank factors need both U and V");
    if (s.fu == nullptr) continue;
    if (s.mask != nullptr)
      throw std::invalid_argument("masks and low-rank factors cannot be combined");
    if (rank < 1)
      throw std::invalid_argument("rank must be >= 1 when low-rank factors are given");
    if (s.cols < 1 || s.rows < 0 || s.rows * s.cols != s.numel)
      throw std::invalid_argument("tensor " + std::to_string(t) + ": factor rows * cols (" +
                                  std::to_string(s.rows) + " * " + std::to_string(s.cols) +
                                  ") must equal numel " + std::to_string(s.numel));
    for (uint32_t d : dirs)
      if ((int64_t)d >= s.depth)
        throw std::invalid_argument("tensor " + std::to_string(t) + ": factors hold " +
                                    std::to_string(s.depth) + " direction(s); the call uses " +
                                    "direction " + std::to_string(d));
  }
}

// The call's LowRank: checks the factors, then transposes each V_k it needs (in parallel over
// all the call's columns).
LowRank make_lowrank(const std::vector<Segment>& segs, int rank, std::vector<uint32_t> dirs,
                     int num_threads) {
  LowRank f;
  for (const Segment& s : segs) f.any = f.any || s.fu != nullptr || s.fv != nullptr;
  if (!f.any) return f;
  check_lowrank(segs, rank, dirs);
  f.rank = rank;
  f.scale = lowrank_scale(rank);
  f.dirs = std::move(dirs);
  const size_t slots = f.dirs.size();
  f.vt.assign(segs.size() * slots, nullptr);
  f.stride.assign(segs.size(), 0);
  struct Job {
    const float* v;  // V_k, (cols, r)
    float* out;      // Vt_k, (r, stride)
    int64_t stride;
  };
  std::vector<Job> jobs;
  std::vector<int64_t> prefix{0};  // columns before job j
  for (size_t t = 0; t < segs.size(); ++t) {
    const Segment& s = segs[t];
    if (s.fu == nullptr || s.cols == 0 || s.numel == 0) continue;
    if (rank > 1) f.stride[t] = vt_stride(s.cols);
    for (size_t k = 0; k < slots; ++k) {
      const float* v = s.fv + (int64_t)f.dirs[k] * s.cols * rank;
      if (rank == 1) {
        f.vt[t * slots + k] = v;
        continue;
      }
      f.owned.emplace_back(new float[(size_t)(f.stride[t] * rank)]);
      f.vt[t * slots + k] = f.owned.back().get();
      jobs.push_back({v, f.owned.back().get(), f.stride[t]});
      prefix.push_back(prefix.back() + s.cols);
    }
  }
  const int64_t total = prefix.back();
  if (total == 0) return f;
  parallel_range(total, threads_for(total * rank, num_threads),
                 [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    size_t j = std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1;
    for (int64_t c0 = begin; c0 < end; j++) {
      const Job& job = jobs[j];
      const int64_t a = c0 - prefix[j];
      const int64_t b = std::min(end, prefix[j + 1]) - prefix[j];
      for (int64_t cb = a; cb < b; cb += 256) {  // 256 columns at a time stay in L1
        const int64_t ce = std::min(b, cb + 256);
        for (int l = 0; l < rank; ++l) {
          float* __restrict o = job.out + l * job.stride;
          const float* __restrict v = job.v + l;
          for (int64_t c = cb; c < ce; ++c) o[c] = v[c * rank];
        }
      }
      c0 = prefix[j] + b;
    }
  });
  return f;
}

// z[e] for the `len` columns c .. c + len - 1 of one row: u = the row of U_k (r floats),
// vt = &Vt_k[0][c], Vt_k's rows `stride` apart. Runs of kChunk = 32 columns keep their sums
// in kRunVecs vector registers through all r terms (per term: a vector multiply by the
// broadcast u[l], then a vector add, lane by lane exactly the scalar operations); what is
// left of the span goes one vector at a time, then the last < kVecLanes columns scalar. The
// vectors are GCC/Clang vector extensions, not plain loops: GCC 12 fully unrolled plain
// 16-column loops into scalar code in some inlined copies (2.4x slower). 32 columns, on a
// 4096 x 4096 sweep: SSE2 (8 registers) 10-40% faster than 16 columns, AVX2 (4 registers)
// the same within 7%; AVX-512 (2 registers) not measured (no such machine at hand).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef float LowRankVec __attribute__((vector_size(kVecBytes)));
constexpr int kVecLanes = kVecBytes / (int)sizeof(float);
constexpr int kChunk = 32;
constexpr int kRunVecs = kChunk / kVecLanes;

inline LowRankVec load_vec(const float* p) {
  LowRankVec v;
  memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

// z[e .. e + kN * kVecLanes) of lowrank_span.
template <int kN>
inline void lowrank_run(const float* __restrict u, const float* __restrict vt, int64_t stride,
                        int rank, float scale, float* __restrict z) {
  LowRankVec acc[kN];
  const float u0 = u[0];
  for (int q = 0; q < kN; ++q) acc[q] = u0 * load_vec(vt + q * kVecLanes);
  for (int l = 1; l < rank; ++l) {
    const float ul = u[l];
    const float* v = vt + l * stride;
    for (int q = 0; q < kN; ++q) acc[q] = acc[q] + ul * load_vec(v + q * kVecLanes);
  }
  for (int q = 0; q < kN; ++q) {
    const LowRankVec out = acc[q] * scale;
    memcpy(z + q * kVecLanes, &out, sizeof(out));
  }
}

inline void lowrank_span(const float* __restrict u, const float* __restrict vt, int64_t stride,
                         int rank, float scale, int64_t len, float* __restrict z) {
  int64_t e = 0;
  for (; e + kChunk <= len; e += kChunk)
    lowrank_run<kRunVecs>(u, vt + e, stride, rank, scale, z + e);
  for (; e + kVecLanes <= len; e += kVecLanes)
    lowrank_run<1>(u, vt + e, stride, rank, scale, z + e);
  for (; e < len; ++e) {
    float acc = u[0] * vt[e];
    for (int l = 1; l < rank; ++l) acc = acc + u[l] * vt[l * stride + e];
    z[e] = acc * scale;
  }
}

// The low-rank z of slot `slot` for the unit's local elements [local, local + n) into
// z[j0 .. j0 + n) (the unit's 128-block layout, as noise_unit); the rest of z[0 .. 128) is
// set to 0, so that loops over the whole block read defined values.
inline void lowrank_unit(const Segment& s, const LowRank& f, size_t seg, size_t slot,
                         int64_t local, int64_t n, int j0, float* __restrict z) {
  const int rank = f.rank;
  const float* vt = f.v_of(seg, slot);
  const int64_t stride = f.stride[seg];
  int64_t i = local / s.cols;
  int64_t c = local - i * s.cols;
  const float* u = s.fu + ((int64_t)f.dirs[slot] * s.rows + i) * rank;
  float* out = z + j0;
  for (int64_t e = 0;;) {
    const int64_t len = std::min(n - e, s.cols - c);
    lowrank_span(u, vt + c, stride, rank, f.scale, len, out + e);
    e += len;
    if (e >= n) break;
    c = 0;
    u += rank;
  }
  if (j0 > 0 || n < kBlock) {
    for (int j = 0; j < j0; ++j) z[j] = 0.0f;
    for (int j = j0 + (int)n; j < kBlock; ++j) z[j] = 0.0f;
  }
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
                   uint32_t dir, float rs, uint32_t rdir, int num_threads, int rank) {
  const bool restore = rs != 0.0f;
  // low-rank slots: 0 = dir, 1 = rdir (when restoring another direction)
  std::vector<uint32_t> dirs{dir};
  if (restore && rdir != dir) dirs.push_back(rdir);
  const size_t rslot = dirs.size() - 1;
  const LowRank lowrank = make_lowrank(segs, rank, dirs, num_threads);
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
      const bool low = segs[t].fu != nullptr;
      if (low) {
        lowrank_unit(segs[t], lowrank, t, 0, local, n, j0, zd);
      } else {
        noise_unit(seed, unit, dir, dist, zd);
      }
      ZOFO_BOOL_SWITCH(restore, kRestore, [&] {
        if (kRestore) {
          if (low) {
            lowrank_unit(segs[t], lowrank, t, rslot, local, n, j0, zr);
          } else {
            noise_unit(seed, unit, rdir, dist, zr);
          }
        }
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
                  int num_threads, int rank) {
  const bool restore = rs != 0.0f;
  const bool stochastic = sr && Storage<T>::kCode != kFloat32;
  std::vector<float> g(grads, grads + q);
  // low-rank slots: k = direction k (k < q), then rdir when restoring a direction >= q
  const bool lowrank_any = std::any_of(segs.begin(), segs.end(),
                                       [](const Segment& x) { return x.fu != nullptr; });
  std::vector<uint32_t> dirs;
  if (lowrank_any) {
    for (int64_t k = 0; k < q; ++k) dirs.push_back((uint32_t)k);
    if (restore && (int64_t)rdir >= q) dirs.push_back(rdir);
  }
  const size_t rslot = restore && (int64_t)rdir < q ? (size_t)rdir : (size_t)q;
  const LowRank lowrank = make_lowrank(segs, rank, std::move(dirs), num_threads);
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
      // low-rank: z of the unit's elements, 0 elsewhere in the block (the loops below run
      // over the whole block)
      const bool low = segs[t].fu != nullptr;
      if (restore) {
        if (low) {
          lowrank_unit(segs[t], lowrank, t, rslot, local, n, j0, zr);
        } else {
          noise_unit(seed, unit, rdir, dist, zr);
        }
      }
      for (int64_t k = 0; k < q; ++k) {
        const float* zk = z;
        if (restore && (uint64_t)k == rdir) {
          zk = zr;
        } else if (low) {
          lowrank_unit(segs[t], lowrank, t, (size_t)k, local, n, j0, z);
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
             int num_threads, int rank) {
  check_dtype(dtype);
  check_distribution(distribution);
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    perturb_typed<T>(segments, seed, distribution, scale, direction, restore_scale,
                     restore_direction, num_threads, rank);
  });
}

void update(const std::vector<Segment>& segments, int dtype, uint64_t seed, int distribution,
            float lr, const float* grads, int64_t q, float restore_scale,
            uint32_t restore_direction, float weight_decay, bool stochastic_rounding,
            int num_threads, int rank) {
  check_dtype(dtype);
  check_distribution(distribution);
  if (q < 1) throw std::invalid_argument("update needs at least one projected gradient");
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    update_typed<T>(segments, seed, distribution, lr, grads, q, restore_scale,
                    restore_direction, weight_decay, stochastic_rounding, num_threads, rank);
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
