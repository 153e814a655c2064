// Launch geometry and the kernel launch itself, for csrc/cuda_kernels.cu.
//
// Two builds include this header: nvcc (the real CUDA module) and the host-execution harness
// (csrc/host/, ZOFO_CUDA_HOST_EXEC defined), which compiles the same cuda_kernels.cu as plain
// C++ and runs its kernels on the CPU. Both take the block size and the grid size from here,
// so the harness walks exactly the grid the GPU would; only launch_kernel differs: `<<<>>>`
// under nvcc, the shim's sequential launcher (host/cuda_host_shim.h) otherwise.
#ifndef ZOFO_CUDA_LAUNCH_H_
#define ZOFO_CUDA_LAUNCH_H_

#include <stdint.h>

#include <utility>

namespace zofo {
namespace cudak {

constexpr int kThreads = 256;     // threads per block
constexpr int kBlocksPerSM = 16;  // grid cap per multiprocessor; grid-stride loops do the rest

// Blocks for `total` work items (total >= 1) on a device with `sms` multiprocessors:
// enough for one item per thread, at most kBlocksPerSM per multiprocessor.
inline int grid_blocks(int64_t total, int sms) {
  const int64_t needed = (total + kThreads - 1) / kThreads;
  const int64_t cap = (int64_t)(sms > 0 ? sms : 1) * kBlocksPerSM;
  return (int)(needed < cap ? needed : cap);
}

// Launches `kernel` on `blocks` x `threads` in `stream`; the caller checks cudaGetLastError().
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), int blocks, int threads,
                          cudaStream_t stream, Args&&... args) {
#if defined(ZOFO_CUDA_HOST_EXEC)
  ::zofo_host::launch(kernel, blocks, threads, stream, std::forward<Args>(args)...);
#else
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

}  // namespace cudak
}  // namespace zofo

#endif  // ZOFO_CUDA_LAUNCH_H_
