// CUDA kernels of zofo_kernels: the same operations as the CPU kernels, on the same
// per-element math (zofo_noise.h), one launch per call (= per dtype group).
//
// Work item: a "group" of 4 consecutive global indices 4G .. 4G + 3 (one Gaussian Philox
// block). A call's tensors are described by a device table of rows (pointer, numel, global
// offset, first group, bitmap or 0, low-rank factors U, V and the matrix view rows x cols, or
// 0); thread t of a grid-stride loop takes group number g, finds its row by binary search on
// first_group, and processes the 1-4 elements of that row inside the group: one 16-byte
// (float32) or 8-byte (16-bit) vector load and store when the group is complete and aligned,
// element by element otherwise; with a bitmap (sparse perturbation) only the elements whose
// bit is set. A call with low-rank factors (rank > 0) runs its own instantiation of the
// kernel, in which a row with factors takes each element's z from its factor rows
// (lowrank_value) instead of the noise; calls without factors run the dense kernel, which
// never reads the factor fields. magnitude_mask writes the bitmaps, one
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

// The z of a group's elements, direction by direction: the contract noise of the group.
struct DenseZ {
  uint64_t seed;
  uint64_t group;
  int distribution;

  __device__ __forceinline__ void operator()(uint32_t direction, float z[4]) const {
    noise4(seed, group, direction, distribution, z);
  }
  __device__ __forceinline__ const DenseZ& dense_z() const { return *this; }
};

// The low-rank arguments of a call: the rank r of every row with factors, and
// scale = lowrank_scale(r).
struct LowRank {
  int rank;
  float scale;
};

// The z of a group's elements in a kernel of a call with low-rank factors. A row without
// factors (u == 0), or a group with no element in its row, takes the noise (DenseZ). In a row
// with factors, element local0 + m, when it is in the row (bit m of `present`), is (row i,
// column c) of the (rows, cols) matrix view and takes, in direction k,
// lowrank_value(U + (k*rows + i)*r, V + (k*cols + c)*r, r, scale); an element outside the row
// gets 0 and reads nothing. (i, c) of the group's first element in the row is computed once
// (one 64-bit division) and stepped from there.
struct LowRankZ {
  DenseZ dense;
  const float* u;    // U (direction 0, row 0); nullptr: the noise
  const float* v;    // V (direction 0, row 0)
  int64_t u_stride;  // rows * r: one direction of U
  int64_t v_stride;  // cols * r: one direction of V
  int64_t cols;
  int64_t i0, c0;    // row and column of the group's first element in the row
  int present;
  LowRank lr;

  __device__ __forceinline__ LowRankZ(const ZofoSegmentRow& row, DenseZ d, int64_t local0,
                                      int present_bits, LowRank lowrank)
      : dense(d), u(nullptr), v(nullptr), u_stride(0), v_stride(0), cols(1), i0(0), c0(0),
        present(present_bits), lr(lowrank) {
    if (row.u == 0 || present_bits == 0) return;
    const int64_t j0 = local0 > 0 ? local0 : 0;
    u = reinterpret_cast<const float*>(row.u);
    v = reinterpret_cast<const float*>(row.v);
    cols = row.cols;
    u_stride = row.rows * (int64_t)lr.rank;
    v_stride = row.cols * (int64_t)lr.rank;
    i0 = j0 / cols;
    c0 = j0 - i0 * cols;
  }

  __device__ __forceinline__ const DenseZ& dense_z() const { return dense; }

  __device__ __forceinline__ void operator()(uint32_t direction, float z[4]) const {
    if (u == nullptr) {
      dense(direction, z);
      return;
    }
    const int64_t r = lr.rank;
    const float* uk = u + (int64_t)direction * u_stride;
    const float* vk = v + (int64_t)direction * v_stride;
    int64_t i = i0, c = c0;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      if (present & (1 << m)) {
        const float* ui = uk + i * r;  // U[k][i]
        const float* vc = vk + c * r;  // V[k][c]
        z[m] = lowrank_value(ui, vc, lr.rank, lr.scale);
        if (++c == cols) {
          c = 0;
          ++i;
        }
      } else {
        z[m] = 0.0f;
      }
    }
  }
};

// The z source of the dense kernels (DenseZ) and of the low-rank ones (LowRankZ).
template <bool kLowRank>
struct GroupZ {
  using type = DenseZ;
  __device__ __forceinline__ static DenseZ make(const ZofoSegmentRow&, DenseZ d, int64_t, int,
                                                LowRank) {
    return d;
  }
};
template <>
struct GroupZ<true> {
  using type = LowRankZ;
  __device__ __forceinline__ static LowRankZ make(const ZofoSegmentRow& row, DenseZ d,
                                                  int64_t local0, int present, LowRank lr) {
    return LowRankZ(row, d, local0, present, lr);
  }
};

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
// skipped before anything is loaded or any noise is made. Every z (restore and op) comes
// from the group's z source: the noise, or, with kLowRank, the factors of rows that have them.
template <typename T, typename Op, bool kLowRank>
__global__ void groups_kernel(const ZofoSegmentRow* __restrict__ rows, int64_t num_rows,
                              int64_t total, uint64_t seed, int distribution,
                              float restore_scale, uint32_t restore_direction, LowRank lowrank,
                              Op op) {
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
    const typename GroupZ<kLowRank>::type zs = GroupZ<kLowRank>::make(
        row, DenseZ{seed, group, distribution}, local0, present, lowrank);
    if (restore_scale != 0.0f) {
      float zr[4];
      zs(restore_direction, zr);
#pragma unroll
      for (int m = 0; m < 4; ++m) w[m] = restore_value<T>(w[m], restore_scale, zr[m]);
    }
    op.template apply<T>(zs, w);
    store_group<T>(p, local0, vec && keep == 0xF, present & keep, w);
  }
}

// perturb: p = rn(w + scale * z), z of `direction`.
struct PerturbOp {
  float scale;
  uint32_t direction;

  template <typename T, typename Z>
  __device__ __forceinline__ void apply(const Z& zs, float w[4]) const {
    float z[4];
    zs(direction, z);
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

  template <typename T, typename Z>
  __device__ __forceinline__ void apply(const Z& zs, float w[4]) const {
    float z[4], d[4];
    for (int64_t k = 0; k < q; ++k) {
      const float gk = grads[k];
      zs((uint32_t)k, z);
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
      const DenseZ& at = zs.dense_z();  // the group's seed and number
      uint32_t r[4];
      block_words(at.seed, at.group, 0u, kPurposeRounding, r);
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

// One launch of groups_kernel<T, Op, kLowRank> for the storage type T of `dtype`; kLowRank
// when rank > 0 (the rows' factors are read), with scale lowrank_scale(rank).
template <typename Op>
int launch_groups(const char* what, const ZofoSegmentRow* rows, int64_t num_rows,
                  int64_t total_groups, int dtype, uint64_t seed, int distribution,
                  float restore_scale, uint32_t restore_direction, int rank, const Op& op,
                  int device, void* stream, char* err, size_t errlen) {
  if (num_rows <= 0 || total_groups <= 0) return 0;
  int blocks = 0;
  const int rc = prepare(total_groups, device, &blocks, err, errlen);
  if (rc) return rc;
  if (!is_dtype_code(dtype)) {
    snprintf(err, errlen, "unsupported dtype code %d", dtype);
    return -1;
  }
  if (rank < 0) {
    snprintf(err, errlen, "low-rank rank must be >= 0 (0: no factors), got %d", rank);
    return -1;
  }
  const LowRank lowrank{rank, rank > 0 ? lowrank_scale(rank) : 0.0f};
  cudaStream_t s = (cudaStream_t)stream;
  ZOFO_DTYPE_SWITCH(dtype, T, [&] {
    ZOFO_BOOL_SWITCH(rank > 0, kLowRank, [&] {
      launch_kernel(groups_kernel<T, Op, kLowRank>, blocks, kThreads, s, rows, num_rows,
                    total_groups, seed, distribution, restore_scale, restore_direction,
                    lowrank, op);
    });
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
                                 float restore_scale, uint32_t restore_direction, int rank,
                                 int device, void* stream, char* err, size_t errlen) {
  return launch_groups("perturb kernel launch", rows, num_rows, total_groups, dtype, seed,
                       distribution, restore_scale, restore_direction, rank,
                       PerturbOp{scale, direction}, device, stream, err, errlen);
}

extern "C" int zofo_cuda_update(const ZofoSegmentRow* rows, int64_t num_rows,
                                int64_t total_groups, int dtype, uint64_t seed,
                                int distribution, float lr, const float* grads, int64_t q,
                                float restore_scale, uint32_t restore_direction,
                                float weight_decay, int stochastic_rounding, int rank,
                                int device, void* stream, char* err, size_t errlen) {
  const bool sr = stochastic_rounding != 0 && dtype != kFloat32;
  return launch_groups("update kernel launch", rows, num_rows, total_groups, dtype, seed,
                       distribution, restore_scale, restore_direction, rank,
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
