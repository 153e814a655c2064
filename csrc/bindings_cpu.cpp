// pybind11 module zofo_kernels._C: the C++ CPU kernels on raw pointers (Python ints).
// Tensors stay on the Python side; this module never sees torch and does not link libtorch.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "zofo_noise.h"

namespace py = pybind11;
using zofo::cpu::Segment;

namespace {

std::vector<Segment> segments(const std::vector<uintptr_t>& ptrs,
                              const std::vector<int64_t>& numels,
                              const std::vector<int64_t>& offsets) {
  if (ptrs.size() != numels.size() || ptrs.size() != offsets.size())
    throw std::invalid_argument("ptrs, numels and offsets must have the same length");
  std::vector<Segment> out;
  out.reserve(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) {
    if (numels[i] < 0 || offsets[i] < 0)
      throw std::invalid_argument("numel and offset must be non-negative");
    if (numels[i] > 0 && ptrs[i] == 0) throw std::invalid_argument("null data pointer");
    if (numels[i] > 0 && numels[i] - 1 > INT64_MAX - offsets[i])
      throw std::invalid_argument("offset + numel overflows the 2**63 global index space");
    out.push_back(Segment{reinterpret_cast<void*>(ptrs[i]), numels[i], offsets[i]});
  }
  return out;
}

uint32_t direction32(int64_t d, const char* name) {
  if (d < 0 || d > 0xFFFFFFFFLL)
    throw std::invalid_argument(std::string(name) + " must be in [0, 2**32)");
  return (uint32_t)d;
}

uint64_t seed64(uint64_t seed) {
  if (seed >> 63) throw std::invalid_argument("seed must be in [0, 2**63)");
  return seed;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "zofo_kernels C++ CPU kernels (raw pointers; no libtorch)";
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("dtype_float32") = (int)zofo::kFloat32;
  m.attr("dtype_bfloat16") = (int)zofo::kBFloat16;
  m.attr("dtype_float16") = (int)zofo::kFloat16;
  m.attr("gaussian") = (int)zofo::kGaussian;
  m.attr("rademacher") = (int)zofo::kRademacher;
#ifdef ZOFO_COMPILE_FLAGS
  m.attr("compile_flags") = ZOFO_COMPILE_FLAGS;
#else
  m.attr("compile_flags") = "";
#endif

  m.def(
      "noise",
      [](uintptr_t out, uint64_t seed, int64_t start, int64_t numel, int distribution,
         int64_t direction, int num_threads) {
        if (start < 0 || numel < 0 || (numel > 0 && numel - 1 > INT64_MAX - start))
          throw std::invalid_argument("start and numel must be non-negative, sum <= 2**63");
        if (numel > 0 && out == 0) throw std::invalid_argument("null output pointer");
        const uint32_t dir = direction32(direction, "direction");
        py::gil_scoped_release release;
        zofo::cpu::noise(reinterpret_cast<float*>(out), seed64(seed), start, numel,
                         distribution, dir, num_threads);
      },
      py::arg("out"), py::arg("seed"), py::arg("start"), py::arg("numel"),
      py::arg("distribution"), py::arg("direction"), py::arg("num_threads"),
      "z for global indices [start, start + numel) into the float32 buffer at `out`.");

  m.def(
      "perturb",
      [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels,
         const std::vector<int64_t>& offsets, int dtype, uint64_t seed, int distribution,
         double scale, int64_t direction, double restore_scale, int64_t restore_direction,
         int num_threads) {
        auto segs = segments(ptrs, numels, offsets);
        const uint32_t dir = direction32(direction, "direction");
        const uint32_t rdir = direction32(restore_direction, "restore_direction");
        py::gil_scoped_release release;
        zofo::cpu::perturb(segs, dtype, seed64(seed), distribution, (float)scale, dir,
                           (float)restore_scale, rdir, num_threads);
      },
      py::arg("ptrs"), py::arg("numels"), py::arg("offsets"), py::arg("dtype"), py::arg("seed"),
      py::arg("distribution"), py::arg("scale"), py::arg("direction"),
      py::arg("restore_scale"), py::arg("restore_direction"), py::arg("num_threads"),
      "In place on every tensor: p = rn(rn(p + restore_scale*z_r) + scale*z).");

  m.def(
      "update",
      [](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels,
         const std::vector<int64_t>& offsets, int dtype, uint64_t seed, int distribution,
         double lr, uintptr_t grads, int64_t q, double restore_scale, int64_t restore_direction,
         double weight_decay, bool stochastic_rounding, int num_threads) {
        auto segs = segments(ptrs, numels, offsets);
        if (q < 1 || q > 0xFFFFFFFFLL) throw std::invalid_argument("q must be in [1, 2**32)");
        if (grads == 0) throw std::invalid_argument("null projected-gradient pointer");
        const uint32_t rdir = direction32(restore_direction, "restore_direction");
        py::gil_scoped_release release;
        zofo::cpu::update(segs, dtype, seed64(seed), distribution, (float)lr,
                          reinterpret_cast<const float*>(grads), q, (float)restore_scale, rdir,
                          (float)weight_decay, stochastic_rounding, num_threads);
      },
      py::arg("ptrs"), py::arg("numels"), py::arg("offsets"), py::arg("dtype"), py::arg("seed"),
      py::arg("distribution"), py::arg("lr"), py::arg("grads"), py::arg("q"),
      py::arg("restore_scale"), py::arg("restore_direction"), py::arg("weight_decay"),
      py::arg("stochastic_rounding"), py::arg("num_threads"),
      "Fused restore + ZO-SGD update in place; grads points to q float32 values.");

  m.def(
      "split_elements",
      [](const std::vector<int64_t>& numels, const std::vector<int64_t>& offsets,
         int num_threads) {
        std::vector<uintptr_t> fake(numels.size(), 1);
        return zofo::cpu::split_elements(segments(fake, numels, offsets), num_threads);
      },
      py::arg("numels"), py::arg("offsets"), py::arg("num_threads"),
      "Elements each of num_threads threads processes in a multi-tensor call.");
  m.def("threads_for", &zofo::cpu::threads_for, py::arg("total"), py::arg("num_threads"),
        "Threads a call over `total` elements uses when num_threads are allowed.");

  // Element-wise functions of the shared header, for tests.
  m.def(
      "log_f32",
      [](uintptr_t in, uintptr_t out, int64_t n) {
        zofo::cpu::log_f32_array(reinterpret_cast<const float*>(in),
                                 reinterpret_cast<float*>(out), n);
      },
      py::arg("src"), py::arg("out"), py::arg("n"));
  m.def(
      "sincos_f32",
      [](uintptr_t in, uintptr_t sin_out, uintptr_t cos_out, int64_t n) {
        zofo::cpu::sincos_f32_array(reinterpret_cast<const float*>(in),
                                    reinterpret_cast<float*>(sin_out),
                                    reinterpret_cast<float*>(cos_out), n);
      },
      py::arg("src"), py::arg("sin_out"), py::arg("cos_out"), py::arg("n"));
  m.def(
      "round_to_storage",
      [](uintptr_t in, uintptr_t out, int64_t n, int dtype) {
        zofo::cpu::round_to_storage(reinterpret_cast<const float*>(in),
                                    reinterpret_cast<void*>(out), n, dtype);
      },
      py::arg("src"), py::arg("out"), py::arg("n"), py::arg("dtype"));
  m.def(
      "stochastic_round",
      [](uintptr_t in, uintptr_t bits, uintptr_t out, int64_t n, int dtype) {
        zofo::cpu::stochastic_round_array(reinterpret_cast<const float*>(in),
                                          reinterpret_cast<const uint32_t*>(bits),
                                          reinterpret_cast<float*>(out), n, dtype);
      },
      py::arg("src"), py::arg("bits"), py::arg("out"), py::arg("n"), py::arg("dtype"));
  m.def(
      "rounding_words",
      [](uintptr_t out, uint64_t seed, int64_t start, int64_t numel) {
        zofo::cpu::rounding_words(reinterpret_cast<uint32_t*>(out), seed64(seed), start, numel);
      },
      py::arg("out"), py::arg("seed"), py::arg("start"), py::arg("numel"));
}
