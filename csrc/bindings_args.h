// Argument checks shared by the pybind11 modules (bindings_cpu.cpp, bindings_cuda.cpp): the
// integer ranges of the noise contract (zofo_kernels/contract.py), refused with
// std::invalid_argument, which pybind11 raises as ValueError. Header-only; no CUDA header,
// no torch.
#ifndef ZOFO_BINDINGS_ARGS_H_
#define ZOFO_BINDINGS_ARGS_H_

#include <stdint.h>

#include <stdexcept>
#include <string>

namespace zofo {
namespace bindings {

// A seed: the Philox key, in [0, 2**63).
inline uint64_t seed64(uint64_t seed) {
  if (seed >> 63) throw std::invalid_argument("seed must be in [0, 2**63)");
  return seed;
}

// A direction (Philox counter word c2), in [0, 2**32); `name` is the argument's name.
inline uint32_t direction32(int64_t d, const char* name) {
  if (d < 0 || d > 0xFFFFFFFFLL)
    throw std::invalid_argument(std::string(name) + " must be in [0, 2**32)");
  return (uint32_t)d;
}

// Global indices [start, start + numel) inside the 2**63 index space.
inline void check_index_range(int64_t start, int64_t numel) {
  if (start < 0 || numel < 0 || (numel > 0 && numel - 1 > INT64_MAX - start))
    throw std::invalid_argument("start and numel must be non-negative, sum <= 2**63");
}

// The number of projected gradients of an update (directions 0 .. q-1), in [1, 2**32).
inline void check_q(int64_t q) {
  if (q < 1 || q > 0xFFFFFFFFLL) throw std::invalid_argument("q must be in [1, 2**32)");
}

}  // namespace bindings
}  // namespace zofo

#endif  // ZOFO_BINDINGS_ARGS_H_
