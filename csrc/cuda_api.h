// Plain C entry points of the CUDA kernels (csrc/cuda_kernels.cu), so that the pybind11 glue
// (csrc/bindings_cuda.cpp) is compiled by the host compiler without any CUDA header.
//
// Every function returns 0 on success, or a non-zero code and a message in err[errlen].
// Pointers are device pointers; `stream` is a cudaStream_t (e.g. torch's current stream);
// `device` is the CUDA device index the tensors live on.
#ifndef ZOFO_CUDA_API_H_
#define ZOFO_CUDA_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One row of the device table of a multi-tensor call (nine int64 values, as the Python side
// builds it): data pointer, numel, global offset of element 0, first_group = number of
// 4-element work groups of the rows before this one (groups: global indices 4G .. 4G + 3),
// the tensor's bitmap (ceil(numel / 32) uint32 words; local element j is bit j % 32 of
// word j / 32), or 0 when every element is written, and the tensor's low-rank factors: U and
// V (float32, contiguous, (D, rows, r) and (D, cols, r) with rows * cols = numel and D above
// every direction of the call; r is the call's `rank`), or u = v = 0 (and rows = cols = 0)
// for the dense contract noise. Local element j is (row j / cols, column j % cols).
typedef struct {
  int64_t ptr;
  int64_t numel;
  int64_t offset;
  int64_t first_group;
  int64_t mask;
  int64_t u;
  int64_t v;
  int64_t rows;
  int64_t cols;
} ZofoSegmentRow;

// One row of the device table of a magnitude_mask call (five int64 values): data pointer,
// numel, the bitmap's pointer (ceil(numel / 32) words, all written), first_word = number of
// bitmap words of the rows before this one, and the threshold's float32 bit pattern.
typedef struct {
  int64_t ptr;
  int64_t numel;
  int64_t words;
  int64_t first_word;
  int64_t threshold_bits;
} ZofoMaskRow;

int zofo_cuda_device_count(int* count, char* err, size_t errlen);
int zofo_cuda_runtime_version(int* version, char* err, size_t errlen);

int zofo_cuda_noise(float* out, uint64_t seed, int64_t start, int64_t numel, int distribution,
                    uint32_t direction, int device, void* stream, char* err, size_t errlen);

// perturb and update: `rank` is the r of every row with factors (the rows' u and v are read
// only when rank > 0; rank 0 runs the dense kernels, which never look at them). The z of a
// row with factors is lowrank_value (zofo_noise.h) of its element's factor rows, times
// lowrank_scale(rank), in every direction the call uses.
int zofo_cuda_perturb(const ZofoSegmentRow* rows, int64_t num_rows, int64_t total_groups,
                      int dtype, uint64_t seed, int distribution, float scale,
                      uint32_t direction, float restore_scale, uint32_t restore_direction,
                      int rank, int device, void* stream, char* err, size_t errlen);

int zofo_cuda_update(const ZofoSegmentRow* rows, int64_t num_rows, int64_t total_groups,
                     int dtype, uint64_t seed, int distribution, float lr, const float* grads,
                     int64_t q, float restore_scale, uint32_t restore_direction,
                     float weight_decay, int stochastic_rounding, int rank, int device,
                     void* stream, char* err, size_t errlen);

// Bitmaps of float32(|x|) <= threshold (NaN: 0) of every row; bits past numel 0.
int zofo_cuda_magnitude_mask(const ZofoMaskRow* rows, int64_t num_rows, int64_t total_words,
                             int dtype, int device, void* stream, char* err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif  // ZOFO_CUDA_API_H_
