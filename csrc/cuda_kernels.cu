// CUDA kernels of zofo_kernels: the same operations as the CPU kernels, on the same
// per-element math (zofo_noise.h), one launch per call (= per dtype group).
//
// Work item: a "group" of 4 consecutive global indices 4G .. 4G + 3 (one Gaussian Philox
// block). A call's tensors are described by a device table of rows (pointer, numel, global
// offset, first group, bitmap or 0); thread t of a grid-stride loop takes group number g,
// finds its row by binary search on first_group, and processes the 1-4 elements of that row
// inside the group: one 16-byte (float32) or 8-byte (16-bit) vector load and store when the
// group is complete and aligned, element by element otherwise; with a bitmap (sparse
// perturbation) only the elements whose bit is set. magnitude_mask writes such bitmaps, one
// 32-element word per work item. All indices are 64-bit. The projected gradients
// are read from device memory, so nothing waits for the host. Compiled with --fmad=false:
// no multiply-add contraction, as the float-math contract requires.
//
// The same file also compiles as plain C++ (ZOFO_CUDA_HOST_EXEC, csrc/host/): a shim stands
// in for the CUDA runtime and a host launcher runs the kernels on the CPU, on the grid
// computed here, for the sanitizer tests (python_tests/core/test_cuda_host.py). So the launch
// geometry and the launch itself go through cuda_launch.h, and nothing here may need more of
// CUDA than the shim provides.

#if defined(ZOFO_CUDA_HOST_EXEC)
#include "host/cuda_host_shim.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdio.h>

#include "cuda_api.h"
#include "cuda_launch.h"
#include "zofo_noise.h"

namespace zofo {
namespace cudak {

// The first work item (group or bitmap word) of a row of either table.
__device__ __forceinline__ int64_t first_item(const ZofoSegmentRow& row) {
  return row.first_group;
}
__device__ __forceinline__ int64_t first_item(const ZofoMaskRow& row) { return row.first_word; }

// The row of work item g: the last row whose first item is <= g (rows owning no item share
// their successor's first item and are passed over).
template <typename Row>
__device__ __forceinline__ int64_t find_row(const Row* rows, int64_t n, int64_t g) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (first_item(rows[mid]) <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// z of the four global indices 4G .. 4G + 3 for one direction.
__device__ __forceinline__ void noise4(uint64_t seed, uint64_t group, uint32_t direction,
                                       int distribution, float z[4]) {
  if (distribution == kRademacher) {
    uint32_t w[4];
    block_words(seed, group >> 5, direction, kPurposeNoise, w);
    const int base = (int)(group & 31u) * 4;
#pragma unroll
    for (int m = 0; m < 4; ++m) z[m] = rademacher_from_words(w, base + m);
  } else {
    gaussian4(seed, group, direction, z);
  }
}

// Four stored elements as one vector: 16 bytes of float32, 8 bytes of 16-bit values.
template <typename T>
struct Vec4 {
  using type = uint2;
};
template <>
struct Vec4<float> {
  using type = float4;
};

// Loads the elements of one group into w[4]; `mask` bit m set when element m is in the row.
template <typename T>
__device__ __forceinline__ bool load_group(const typename Storage<T>::raw_t* p, int64_t local0,
                                           int64_t numel, float w[4], int* mask) {
  using R = typename Storage<T>::raw_t;
  using V = typename Vec4<T>::type;
  const bool full = local0 >= 0 && local0 + 4 <= numel;
  const bool aligned = full && (reinterpret_cast<uintptr_t>(p + local0) % sizeof(V) == 0);
  if (aligned) {
    const V v = *reinterpret_cast<const V*>(p + local0);
    const R* e = reinterpret_cast<const R*>(&v);
#pragma unroll
    for (int m = 0; m < 4; ++m) w[m] = Storage<T>::load(e[m]);
    *mask = 0xF;
    return true;
  }
  *mask = 0;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t i = local0 + m;
    if (i >= 0 && i < numel) {
      w[m] = Storage<T>::load(p[i]);
      *mask |= 1 << m;
    } else {
      w[m] = 0.0f;
    }
  }
  return false;
}

// Bit m (m = 0..3) of element local0 + m of a row's bitmap; 0 for elements outside the row.
__device__ __forceinline__ int bitmap_bits4(const uint32_t* bitmap, int64_t local0,
                                            int64_t numel) {
  int bits = 0;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const int64_t j = local0 + m;
    if (j >= 0 && j < numel) bits |= (int)mask_bit(bitmap, j) << m;
  }
  return bits;
}

template <typename T>
__device__ __forceinline__ void store_group(typename Storage<T>::raw_t* p, int64_t local0,
                                            bool vector, int mask, const float v[4]) {
  using R = typename Storage<T>::raw_t;
  using V = typename Vec4<T>::type;
  if (vector) {
    V out;
    R* e = reinterpret_cast<R*>(&out);
#pragma unroll
    for (int m = 0; m < 4; ++m) e[m] = Storage<T>::store(v[m]);
    *reinterpret_cast<V*>(p + local0) = out;
    return;
  }
#pragma unroll
  for (int m = 0; m < 4; ++m)
    if (mask & (1 << m)) p[local0 + m] = Storage<T>::store(v[m]);
}

// One operation's kernel: a grid-stride loop over the work groups of a multi-tensor call.
// Each group's elements are loaded from their row as float32 and restored,
// w = rn(p + restore_scale * z_r), when restore_scale != 0; op.apply<T> turns them in place
// into the values to store (PerturbOp, UpdateOp below), and they are stored. A row with a
// bitmap stores only the elements whose bit is set (the others are never written, so the
// 4-element vector store serves only groups kept whole), and a group with none set is
// skipped before anything is loaded or any noise is made.
template <typename T, typename Op>
__global__ void groups_kernel(const ZofoSegmentRow* __restrict__ rows, int64_t num_rows,
                              int64_t total, uint64_t seed, int distribution,
                              float restore_scale, uint32_t restore_direction, Op op) {
  using R = typename Storage<T>::raw_t;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += stride) {
    const ZofoSegmentRow row = rows[find_row(rows, num_rows, g)];
    const uint64_t group = (uint64_t)(row.offset >> 2) + (uint64_t)(g - row.first_group);
    const int64_t local0 = (int64_t)(group * 4) - row.offset;
    R* p = reinterpret_cast<R*>(row.ptr);
    int keep = 0xF;
    if (row.mask != 0) {
      keep = bitmap_bits4(reinterpret_cast<const uint32_t*>(row.mask), local0, row.numel);
      if (keep == 0) continue;
    }
    float w[4];
    int present;
    const bool vec = load_group<T>(p, local0, row.numel, w, &present);
    if (restore_scale != 0.0f) {
      float zr[4];
      noise4(seed, group, restore_direction, distribution, zr);
#pragma unroll
      for (int m = 0; m < 4; ++m) w[m] = restore_value<T>(w[m], restore_scale, zr[m]);
    }
    op.template apply<T>(seed, group, distribution, w);
    store_group<T>(p, local0, vec && keep == 0xF, present & keep, w);
  }
}

// perturb: p = rn(w + scale * z), z of `direction`.
struct PerturbOp {
  float scale;
  uint32_t direction;

  template <typename T>
  __device__ __forceinline__ void apply(uint64_t seed, uint64_t group, int distribution,
                                        float w[4]) const {
    float z[4];
    noise4(seed, group, direction, distribution, z);
#pragma unroll
    for (int m = 0; m < 4; ++m) w[m] = w[m] + scale * z[m];
  }
};

// update: d = sum_k g_k z_k (k < q, g_k read from device memory); v = w - lr * (d + wd * w);
// p = sr(v) when `stochastic` (16-bit storage only), else rn(v).
struct UpdateOp {
  float lr;
  const float* grads;
  int64_t q;
  float weight_decay;
  bool stochastic;

  template <typename T>
  __device__ __forceinline__ void apply(uint64_t seed, uint64_t group, int distribution,
                                        float w[4]) const {
    float z[4], d[4];
    for (int64_t k = 0; k < q; ++k) {
      const float gk = grads[k];
      noise4(seed, group, (uint32_t)k, distribution, z);
      if (k == 0) {
#pragma unroll
        for (int m = 0; m < 4; ++m) d[m] = gk * z[m];
      } else {
#pragma unroll
        for (int m = 0; m < 4; ++m) d[m] = d[m] + gk * z[m];
      }
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) w[m] = update_value(w[m], d[m], lr, weight_decay);
    if (stochastic) {
      uint32_t r[4];
      block_words(seed, group, 0u, kPurposeRounding, r);
#pragma unroll
      for (int m = 0; m < 4; ++m) w[m] = stochastic_round(w[m], r[m], Storage<T>::kCode);
    }
  }
};

__global__ void noise_kernel(float* __restrict__ out, int64_t start, int64_t numel,
                             int64_t total, uint64_t seed, int distribution,
                             uint32_t direction) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += stride) {
    const uint64_t group = (uint64_t)(start >> 2) + (uint64_t)g;
    const int64_t local0 = (int64_t)(group * 4) - start;
    float z[4];
    noise4(seed, group, direction, distribution, z);
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t i = local0 + m;
      if (i >= 0 && i < numel) out[i] = z[m];
    }
  }
}

// magnitude_mask: a grid-stride loop over the bitmap words of a multi-tensor call, one word
// (32 elements, fewer in a row's last word) per work item. Every word of every row is
// written, its bits past numel 0. (One thread per word needs no warp vote, so the host
// harness runs it as it is.)
template <typename T>
__global__ void magnitude_kernel(const ZofoMaskRow* __restrict__ rows, int64_t num_rows,
                                 int64_t total) {
  using R = typename Storage<T>::raw_t;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += stride) {
    const ZofoMaskRow row = rows[find_row(rows, num_rows, u)];
    const int64_t j = u - row.first_word;
    const int64_t rest = row.numel - 32 * j;
    const int count = rest < 32 ? (int)rest : 32;
    const int64_t limit = magnitude_limit(u2f((uint32_t)row.threshold_bits));
    const R* p = reinterpret_cast<const R*>(row.ptr) + 32 * j;
    reinterpret_cast<uint32_t*>(row.words)[j] = magnitude_word<T>(p, count, limit);
  }
}

int fail(cudaError_t e, const char* what, char* err, size_t errlen) {
  snprintf(err, errlen, "CUDA runtime error in %s: %s (%s)", what, cudaGetErrorString(e),
           cudaGetErrorName(e));
  return (int)e == 0 ? -1 : (int)e;
}

// Selects `device` and computes the grid for `total` work items on it (grid-stride loops
// cover the rest).
int prepare(int64_t total, int device, int* blocks, char* err, size_t errlen) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return fail(e, "cudaSetDevice", err, errlen);
  int sms = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return fail(e, "cudaDeviceGetAttribute", err, errlen);
  *blocks = grid_blocks(total, sms);
  return 0;
}

int check_launch(const char* what, char* err, size_t errlen) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(e, what, err, errlen);
  return 0;
}

// One launch of groups_kernel<T, Op> for the storage type T of `dtype`.
template <typename Op>
int launch_groups(const char* what, const ZofoSegmentRow* rows, int64_t num_rows,
                  int64_t total_groups, int dtype, uint64_t seed, int distribution,
                  float restore_scale, uint32_t restore_direction, const Op& op, int device,
                  void* stream, char* err, size_t errlen) {
  if (num_rows <= 0 || total_groups <= 0) return 0;
  int blocks = 0;
  const int rc = prepare(total_groups, device, &blocks, err, errlen);
  if (rc) return rc;
  if (!is_dtype_code(dtype)) {
    snprintf(err, errlen, "unsupported dtype code %d", dtype);
    return -1;
  }
  cudaStream_t s = (cudaStream_t)stream;
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    launch_kernel(groups_kernel<T, Op>, blocks, kThreads, s, rows, num_rows, total_groups,
                  seed, distribution, restore_scale, restore_direction, op);
  });
  return check_launch(what, err, errlen);
}

}  // namespace cudak
}  // namespace zofo

using namespace zofo;
using namespace zofo::cudak;

extern "C" int zofo_cuda_device_count(int* count, char* err, size_t errlen) {
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    *count = 0;
    return fail(e, "cudaGetDeviceCount", err, errlen);
  }
  return 0;
}

extern "C" int zofo_cuda_runtime_version(int* version, char* err, size_t errlen) {
  cudaError_t e = cudaRuntimeGetVersion(version);
  if (e != cudaSuccess) return fail(e, "cudaRuntimeGetVersion", err, errlen);
  return 0;
}

extern "C" int zofo_cuda_noise(float* out, uint64_t seed, int64_t start, int64_t numel,
                               int distribution, uint32_t direction, int device, void* stream,
                               char* err, size_t errlen) {
  if (numel <= 0) return 0;
  const int64_t total = (start + (numel - 1)) / 4 - start / 4 + 1;  // no overflow at 2**63
  int blocks = 0;
  const int rc = prepare(total, device, &blocks, err, errlen);
  if (rc) return rc;
  launch_kernel(noise_kernel, blocks, kThreads, (cudaStream_t)stream, out, start, numel, total,
                seed, distribution, direction);
  return check_launch("noise kernel launch", err, errlen);
}

extern "C" int zofo_cuda_perturb(const ZofoSegmentRow* rows, int64_t num_rows,
                                 int64_t total_groups, int dtype, uint64_t seed,
                                 int distribution, float scale, uint32_t direction,
                                 float restore_scale, uint32_t restore_direction, int device,
                                 void* stream, char* err, size_t errlen) {
  return launch_groups("perturb kernel launch", rows, num_rows, total_groups, dtype, seed,
                       distribution, restore_scale, restore_direction,
                       PerturbOp{scale, direction}, device, stream, err, errlen);
}

extern "C" int zofo_cuda_update(const ZofoSegmentRow* rows, int64_t num_rows,
                                int64_t total_groups, int dtype, uint64_t seed,
                                int distribution, float lr, const float* grads, int64_t q,
                                float restore_scale, uint32_t restore_direction,
                                float weight_decay, int stochastic_rounding, int device,
                                void* stream, char* err, size_t errlen) {
  const bool sr = stochastic_rounding != 0 && dtype != kFloat32;
  return launch_groups("update kernel launch", rows, num_rows, total_groups, dtype, seed,
                       distribution, restore_scale, restore_direction,
                       UpdateOp{lr, grads, q, weight_decay, sr}, device, stream, err, errlen);
}

extern "C" int zofo_cuda_magnitude_mask(const ZofoMaskRow* rows, int64_t num_rows,
                                        int64_t total_words, int dtype, int device,
                                        void* stream, char* err, size_t errlen) {
  if (num_rows <= 0 || total_words <= 0) return 0;
  int blocks = 0;
  const int rc = prepare(total_words, device, &blocks, err, errlen);
  if (rc) return rc;
  if (!is_dtype_code(dtype)) {
    snprintf(err, errlen, "unsupported dtype code %d", dtype);
    return -1;
  }
  cudaStream_t s = (cudaStream_t)stream;
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    launch_kernel(magnitude_kernel<T>, blocks, kThreads, s, rows, num_rows, total_words);
  });
  return check_launch("magnitude_mask kernel launch", err, errlen);
}
