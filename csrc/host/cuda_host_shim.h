// Host shim: what csrc/cuda_kernels.cu needs from CUDA, for compiling that very file as plain
// C++ and running its kernels on the CPU (the host-execution harness; see cuda_host_main.cpp
// and docs/kernels.md, "Running the CUDA kernels on the CPU").
//
// cuda_kernels.cu includes this header instead of <cuda_runtime.h> when ZOFO_CUDA_HOST_EXEC is
// defined; nothing of the kernels is copied. It provides:
//   * the execution-space keywords as nothing (__global__, __device__, __host__) or `inline`
//     (__forceinline__);
//   * the vector types the kernels load and store (float4, uint2) with CUDA's alignment, so
//     that UndefinedBehaviorSanitizer flags a vector access at a misaligned address exactly
//     where the GPU would fault;
//   * blockIdx, threadIdx, blockDim, gridDim as thread_local variables;
//   * the runtime calls the launch code makes (device selection, multiprocessor count, error
//     strings, last error), answering for one fake device whose multiprocessor count the
//     harness sets;
//   * zofo_host::launch, which runs a kernel on the grid the real launch code computed: every
//     (block, thread) pair once, sequentially, in a shuffled order (seeded), so that a kernel
//     relying on some order of blocks or threads does not pass by luck.
// The kernels use no shared memory, barriers, warp functions or atomics (a launch here would
// need real concurrency for them); zofo_host::launch rejects a launch configuration the GPU
// would reject.
#ifndef ZOFO_CUDA_HOST_SHIM_H_
#define ZOFO_CUDA_HOST_SHIM_H_

#if defined(__CUDACC__)
#error "cuda_host_shim.h is for the host-execution build (plain C++), not for nvcc"
#endif

#include <stdint.h>
#include <stdio.h>

#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// ----------------------------------------------------------------------------- built-ins

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
using uint3 = dim3;

// Per (OS) thread, as CUDA's are per GPU thread: zofo_host::launch sets them before it runs
// each GPU thread's body.
inline thread_local uint3 blockIdx;
inline thread_local uint3 threadIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};

// ----------------------------------------------------------------------------- runtime API

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};

enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace zofo_host {

struct Launch {
  int blocks;
  int threads;
};

// The fake device and what the launches did; set and read by the harness.
struct State {
  int sms = 108;               // multiprocessors of the fake device (A100: 108, H100: 132)
  int device_count = 1;
  uint64_t order_seed = 1;     // seeds the order in which the GPU threads run
  cudaError_t last_error = cudaSuccess;
  std::vector<Launch> launches;
};

inline State& state() {
  static State s;
  return s;
}

// Runs kernel(args...) once per GPU thread of a blocks x threads grid (1-D, as the kernels
// launch), in a random order. The arguments are converted to the kernel's parameter types
// once, as the CUDA runtime copies them into parameter memory, and every thread gets a copy.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int blocks, int threads, cudaStream_t /*stream*/,
            Args&&... args) {
  State& st = state();
  if (blocks < 1 || threads < 1 || threads > 1024) {
    st.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  st.launches.push_back({blocks, threads});
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  // Fisher-Yates shuffle of the thread ids 0 .. blocks*threads - 1 (splitmix64 numbers)
  std::vector<uint64_t> order((size_t)blocks * (size_t)threads);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  uint64_t x = st.order_seed + st.launches.size();
  for (size_t i = order.size() - 1; i > 0; --i) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t r = x;
    r = (r ^ (r >> 30)) * 0xBF58476D1CE4E5B9ull;
    r = (r ^ (r >> 27)) * 0x94D049BB133111EBull;
    r ^= r >> 31;
    const size_t j = (size_t)(r % (uint64_t)(i + 1));
    const uint64_t t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  gridDim = dim3{(unsigned)blocks, 1, 1};
  blockDim = dim3{(unsigned)threads, 1, 1};
  for (const uint64_t id : order) {
    blockIdx = uint3{(unsigned)(id / (uint64_t)threads), 0, 0};
    threadIdx = uint3{(unsigned)(id % (uint64_t)threads), 0, 0};
    std::apply(kernel, params);
  }
}

}  // namespace zofo_host

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = zofo_host::state().device_count;
  return cudaSuccess;
}

inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= zofo_host::state().device_count) return cudaErrorInvalidDevice;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= zofo_host::state().device_count) return cudaErrorInvalidDevice;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = zofo_host::state().sms;
  return cudaSuccess;
}

inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;  // no CUDA runtime here
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = zofo_host::state().last_error;
  zofo_host::state().last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
  }
  return "cudaErrorUnknown";
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}

#endif  // ZOFO_CUDA_HOST_SHIM_H_
