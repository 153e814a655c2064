// C++ CPU kernels of zofo_kernels: plain functions on raw pointers (no libtorch).
#ifndef ZOFO_CPU_KERNELS_H_
#define ZOFO_CPU_KERNELS_H_

#include <stdint.h>

#include <vector>

namespace zofo {
namespace cpu {

// One tensor of a multi-tensor call: contiguous storage at `ptr`, `numel` elements, the
// first of which has global index `offset`. `mask`: nullptr (every element is written), or
// the tensor's bitmap of ceil(numel / 32) words (local element j: bit j % 32 of word j / 32);
// an element whose bit is 0 is neither computed into nor written.
// `fu`, `fv`: nullptr (z is the dense contract noise), or the tensor's low-rank factors
// U (depth, rows, r) and V (depth, cols, r), contiguous float32, rows * cols = numel, r the
// call's `rank`: in direction k < depth, z of local element j (row i = j / cols, column
// c = j % cols) is lowrank_value(U + (k*rows + i)*r, V + (k*cols + c)*r, r, lowrank_scale(r))
// (zofo_noise.h). A segment never has both a mask and factors (the bindings refuse it).
struct Segment {
  void* ptr;
  int64_t numel;
  int64_t offset;
  const uint32_t* mask = nullptr;
  const float* fu = nullptr;
  const float* fv = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t depth = 0;
};

// One tensor of a magnitude_mask call: `numel` elements at `ptr`, the rule's threshold, and
// the ceil(numel / 32) words of its bitmap at `words` (all overwritten).
struct MaskTarget {
  const void* ptr;
  int64_t numel;
  float threshold;
  uint32_t* words;
};

// z for global indices [start, start + numel) of direction `direction`, into out[numel].
void noise(float* out, uint64_t seed, int64_t start, int64_t numel, int distribution,
           uint32_t direction, int num_threads);

// p <- rn(rn(p + restore_scale * z_restore) + scale * z), the restore only if
// restore_scale != 0, for the elements each segment's mask keeps. All segments have storage
// dtype `dtype` (DType code). `rank`: the r of the segments with factors (>= 1 if any has
// them; ignored otherwise); their z are the low-rank ones of the same directions.
void perturb(const std::vector<Segment>& segments, int dtype, uint64_t seed, int distribution,
             float scale, uint32_t direction, float restore_scale, uint32_t restore_direction,
             int num_threads, int rank = 0);

// w = rn(p + restore_scale * z_r) (if restore_scale != 0); d = sum_k g_k z_k (k < q);
// v = w - lr * (d + weight_decay * w); p = sr(v) for 16-bit storage when
// stochastic_rounding, else rn(v), for the elements each segment's mask keeps. `grads` holds
// q float32 values. `rank`: as in perturb (every z_k and z_r of a segment with factors is
// its low-rank z; the rounding bits still come from `seed`).
void update(const std::vector<Segment>& segments, int dtype, uint64_t seed, int distribution,
            float lr, const float* grads, int64_t q, float restore_scale,
            uint32_t restore_direction, float weight_decay, bool stochastic_rounding,
            int num_threads, int rank = 0);

// Bitmaps of the magnitude rule: bit j of target t = float32(|x_j|) <= threshold (NaN: 0),
// bits past numel 0. All targets have storage dtype `dtype`.
void magnitude_mask(const std::vector<MaskTarget>& targets, int dtype, int num_threads);

// Elements each thread processes under the work split of a multi-tensor call (for tests).
std::vector<int64_t> split_elements(const std::vector<Segment>& segments, int num_threads);

// Threads a call with `total` elements uses when `num_threads` are allowed.
int threads_for(int64_t total, int num_threads);

// Element-wise functions of the shared math, exposed for the tests.
void log_f32_array(const float* in, float* out, int64_t n);
void sincos_f32_array(const float* in, float* sin_out, float* cos_out, int64_t n);
void round_to_storage(const float* in, void* out, int64_t n, int dtype);
void stochastic_round_array(const float* in, const uint32_t* bits, float* out, int64_t n,
                            int dtype);
void rounding_words(uint32_t* out, uint64_t seed, int64_t start, int64_t numel);

}  // namespace cpu
}  // namespace zofo

#endif  // ZOFO_CPU_KERNELS_H_
