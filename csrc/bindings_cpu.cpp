// pybind11 module zofo_kernels._C_<variant>: the C++ CPU kernels on raw pointers (Python
// ints). Tensors stay on the Python side; this module never sees torch and does not link
// libtorch. CMakeLists.txt compiles this file once per CPU variant (generic, avx2, avx512,
// optionally native) with that variant's instruction set; ZOFO_MODULE_NAME names the module.
// cpu_features() reports what the running CPU and OS support, so that zofo_kernels/_native.py
// can pick the variant to import (it asks the generic module, which runs everywhere).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "bindings_args.h"
#include "cpu_kernels.h"
#include "zofo_noise.h"

#ifndef ZOFO_MODULE_NAME
#define ZOFO_MODULE_NAME _C_generic
#endif
#ifndef ZOFO_CPU_VARIANT
#define ZOFO_CPU_VARIANT "generic"
#endif
#ifndef ZOFO_COMPILE_FLAGS
#define ZOFO_COMPILE_FLAGS ""
#endif

namespace py = pybind11;
using namespace zofo::bindings;  // seed64, direction32, check_index_range, check_q
using zofo::cpu::Segment;

namespace {

using Segments = std::vector<Segment>;

// Low-rank factors of a call, one entry per tensor in each list (or all lists empty): the
// addresses of U (depth, rows, rank) and V (depth, cols, rank), both 0 for a dense tensor,
// V's row count `cols` (rows = numel / cols) and the directions `depth` they hold; one rank
// for the call.
struct LowRankArgs {
  std::vector<uintptr_t> u, v;
  std::vector<int64_t> cols, depth;
  int64_t rank = 0;
};

// `masks`: empty (every tensor dense), or one bitmap pointer per tensor, 0 for a dense one.
// `lowrank`: see LowRankArgs; the directions each tensor's factors must hold are checked by
// the kernels, which know the call's directions.
Segments segments(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels,
                  const std::vector<int64_t>& offsets,
                  const std::vector<uintptr_t>& masks = std::vector<uintptr_t>(),
                  const LowRankArgs& lowrank = LowRankArgs()) {
  if (ptrs.size() != numels.size() || ptrs.size() != offsets.size())
    throw std::invalid_argument("ptrs, numels and offsets must have the same length");
  if (!masks.empty() && masks.size() != ptrs.size())
    throw std::invalid_argument("masks must be empty or have one pointer (0: none) per tensor");
  const size_t nf = lowrank.u.size();
  if (lowrank.v.size() != nf || lowrank.cols.size() != nf || lowrank.depth.size() != nf ||
      (nf != 0 && nf != ptrs.size()))
    throw std::invalid_argument(
        "lowrank_u, lowrank_v, lowrank_cols and lowrank_depth must all be empty or have one "
        "entry per tensor (0: dense)");
  if (lowrank.rank < 0 || lowrank.rank > INT32_MAX)
    throw std::invalid_argument("rank must be in [0, 2**31)");
  Segments out;
  out.reserve(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) {
    if (numels[i] < 0 || offsets[i] < 0)
      throw std::invalid_argument("numel and offset must be non-negative");
    if (numels[i] > 0 && ptrs[i] == 0) throw std::invalid_argument("null data pointer");
    if (numels[i] > 0 && numels[i] - 1 > INT64_MAX - offsets[i])
      throw std::invalid_argument("offset + numel overflows the 2**63 global index space");
    const uintptr_t mask = masks.empty() ? 0 : masks[i];
    Segment seg{reinterpret_cast<void*>(ptrs[i]), numels[i], offsets[i],
                reinterpret_cast<const uint32_t*>(mask)};
    if (nf != 0 && (lowrank.u[i] != 0 || lowrank.v[i] != 0)) {
      const std::string which = "tensor " + std::to_string(i) + ": ";
      if (lowrank.u[i] == 0 || lowrank.v[i] == 0)
        throw std::invalid_argument(which + "null low-rank factor pointer (give both U and V, "
                                    "or neither)");
      if (mask != 0)
        throw std::invalid_argument(which + "masks and low-rank factors cannot be combined");
      if (lowrank.rank < 1)
        throw std::invalid_argument("rank must be >= 1 when low-rank factors are given");
      if (lowrank.cols[i] < 1 || numels[i] % lowrank.cols[i] != 0)
        throw std::invalid_argument(which + "lowrank_cols must be >= 1 and divide numel " +
                                    std::to_string(numels[i]));
      if (lowrank.depth[i] < 1)
        throw std::invalid_argument(which + "lowrank_depth must be >= 1");
      seg.fu = reinterpret_cast<const float*>(lowrank.u[i]);
      seg.fv = reinterpret_cast<const float*>(lowrank.v[i]);
      seg.cols = lowrank.cols[i];
      seg.rows = numels[i] / lowrank.cols[i];
      seg.depth = lowrank.depth[i];
    }
    out.push_back(seg);
  }
  return out;
}

// m.def of an operation on a list of tensors: Python passes the lists ptrs, numels and offsets
// first, then the other arguments (named by `extra`), and optionally the keyword arguments
// masks (bitmap pointers, see segments()) and lowrank_u, lowrank_v, lowrank_cols,
// lowrank_depth and rank (LowRankArgs); `fn` receives the checked Segments, the rank, then
// the others.
template <typename... Rest, typename... Extra>
void def_multi_tensor(py::module_& m, const char* name,
                      void (*fn)(const Segments&, int, Rest...), const Extra&... extra) {
  m.def(
      name,
      [fn](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels,
           const std::vector<int64_t>& offsets, Rest... rest,
           const std::vector<uintptr_t>& masks, const std::vector<uintptr_t>& lowrank_u,
           const std::vector<uintptr_t>& lowrank_v, const std::vector<int64_t>& lowrank_cols,
           const std::vector<int64_t>& lowrank_depth, int64_t rank) {
        const LowRankArgs lowrank{lowrank_u, lowrank_v, lowrank_cols, lowrank_depth, rank};
        fn(segments(ptrs, numels, offsets, masks, lowrank), (int)rank, rest...);
      },
      py::arg("ptrs"), py::arg("numels"), py::arg("offsets"), extra...,
      py::arg("masks") = std::vector<uintptr_t>(),
      py::arg("lowrank_u") = std::vector<uintptr_t>(),
      py::arg("lowrank_v") = std::vector<uintptr_t>(),
      py::arg("lowrank_cols") = std::vector<int64_t>(),
      py::arg("lowrank_depth") = std::vector<int64_t>(), py::arg("rank") = (int64_t)0);
}

void perturb(const Segments& segs, int rank, int dtype, uint64_t seed, int distribution,
             double scale, int64_t direction, double restore_scale, int64_t restore_direction,
             int num_threads) {
  const uint32_t dir = direction32(direction, "direction");
  const uint32_t rdir = direction32(restore_direction, "restore_direction");
  py::gil_scoped_release release;
  zofo::cpu::perturb(segs, dtype, seed64(seed), distribution, (float)scale, dir,
                     (float)restore_scale, rdir, num_threads, rank);
}

void update(const Segments& segs, int rank, int dtype, uint64_t seed, int distribution,
            double lr, uintptr_t grads, int64_t q, double restore_scale,
            int64_t restore_direction, double weight_decay, bool stochastic_rounding,
            int num_threads) {
  check_q(q);
  if (grads == 0) throw std::invalid_argument("null projected-gradient pointer");
  const uint32_t rdir = direction32(restore_direction, "restore_direction");
  py::gil_scoped_release release;
  zofo::cpu::update(segs, dtype, seed64(seed), distribution, (float)lr,
                    reinterpret_cast<const float*>(grads), q, (float)restore_scale, rdir,
                    (float)weight_decay, stochastic_rounding, num_threads, rank);
}

// Per tensor: `numel` elements at ptrs[i] (storage dtype `dtype`), the rule's threshold, and
// its bitmap of ceil(numel / 32) words at words[i].
void magnitude_mask(const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& numels,
                    const std::vector<double>& thresholds, const std::vector<uintptr_t>& words,
                    int dtype, int num_threads) {
  if (ptrs.size() != numels.size() || ptrs.size() != thresholds.size() ||
      ptrs.size() != words.size())
    throw std::invalid_argument("ptrs, numels, thresholds and words must have the same length");
  std::vector<zofo::cpu::MaskTarget> targets;
  targets.reserve(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) {
    if (numels[i] < 0) throw std::invalid_argument("numel must be non-negative");
    if (numels[i] > 0 && (ptrs[i] == 0 || words[i] == 0))
      throw std::invalid_argument("null data or bitmap pointer");
    targets.push_back({reinterpret_cast<const void*>(ptrs[i]), numels[i],
                       (float)thresholds[i], reinterpret_cast<uint32_t*>(words[i])});
  }
  py::gil_scoped_release release;
  zofo::cpu::magnitude_mask(targets, dtype, num_threads);
}

// CPUID and XGETBV: the instruction-set extensions the variants use, each true only if the
// CPU has it and (for the AVX and AVX-512 register state) the OS saves it.
py::dict cpu_features() {
  py::dict f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a = 0, b = 0, c = 0, d = 0;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  unsigned c1 = 0, b7 = 0, cx = 0;
  if (max_leaf >= 1 && __get_cpuid(1, &a, &b, &c, &d)) c1 = c;
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    b7 = b;
  }
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000001u &&
      __get_cpuid(0x80000001u, &a, &b, &c, &d))
    cx = c;
  uint64_t xcr0 = 0;
  if (c1 & (1u << 27)) {  // OSXSAVE: XGETBV is usable
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = ((uint64_t)hi << 32) | lo;
  }
  auto bit = [](unsigned reg, int i) { return ((reg >> i) & 1u) != 0; };
  f["x86_64"] = true;
  f["sse3"] = bit(c1, 0);
  f["ssse3"] = bit(c1, 9);
  f["fma"] = bit(c1, 12);
  f["cx16"] = bit(c1, 13);
  f["sse4_1"] = bit(c1, 19);
  f["sse4_2"] = bit(c1, 20);
  f["movbe"] = bit(c1, 22);
  f["popcnt"] = bit(c1, 23);
  f["avx"] = bit(c1, 28);
  f["f16c"] = bit(c1, 29);
  f["bmi1"] = bit(b7, 3);
  f["avx2"] = bit(b7, 5);
  f["bmi2"] = bit(b7, 8);
  f["avx512f"] = bit(b7, 16);
  f["avx512dq"] = bit(b7, 17);
  f["avx512cd"] = bit(b7, 28);
  f["avx512bw"] = bit(b7, 30);
  f["avx512vl"] = bit(b7, 31);
  f["lahf_lm"] = bit(cx, 0);
  f["lzcnt"] = bit(cx, 5);
  f["os_avx"] = (xcr0 & 0x6) == 0x6;       // XMM and YMM state
  f["os_avx512"] = (xcr0 & 0xE6) == 0xE6;  // plus opmask and ZMM state
#else
  f["x86_64"] = false;
#endif
  return f;
}

}  // namespace

PYBIND11_MODULE(ZOFO_MODULE_NAME, m) {
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
  m.attr("variant") = ZOFO_CPU_VARIANT;
  m.def("cpu_features", &cpu_features,
        "Instruction-set extensions of the running CPU (CPUID) that the OS enables (XGETBV).");
  m.attr("compile_flags") = ZOFO_COMPILE_FLAGS;

  m.def(
      "noise",
      [](uintptr_t out, uint64_t seed, int64_t start, int64_t numel, int distribution,
         int64_t direction, int num_threads) {
        check_index_range(start, numel);
        if (numel > 0 && out == 0) throw std::invalid_argument("null output pointer");
        const uint32_t dir = direction32(direction, "direction");
        py::gil_scoped_release release;
        zofo::cpu::noise(reinterpret_cast<float*>(out), seed64(seed), start, numel,
                         distribution, dir, num_threads);
      },
      py::arg("out"), py::arg("seed"), py::arg("start"), py::arg("numel"),
      py::arg("distribution"), py::arg("direction"), py::arg("num_threads"),
      "z for global indices [start, start + numel) into the float32 buffer at `out`.");

  def_multi_tensor(m, "perturb", &perturb, py::arg("dtype"), py::arg("seed"),
                   py::arg("distribution"), py::arg("scale"), py::arg("direction"),
                   py::arg("restore_scale"), py::arg("restore_direction"), py::arg("num_threads"),
                   "In place on every tensor: p = rn(rn(p + restore_scale*z_r) + scale*z) "
                   "(only the elements whose bit is set, for a tensor with a bitmap in masks; "
                   "z from the low-rank factors for a tensor that has them).");
  def_multi_tensor(m, "update", &update, py::arg("dtype"), py::arg("seed"),
                   py::arg("distribution"), py::arg("lr"), py::arg("grads"), py::arg("q"),
                   py::arg("restore_scale"), py::arg("restore_direction"),
                   py::arg("weight_decay"), py::arg("stochastic_rounding"),
                   py::arg("num_threads"),
                   "Fused restore + ZO-SGD update in place; grads points to q float32 values "
                   "(only the elements whose bit is set, for a tensor with a bitmap in masks; "
                   "every z from the low-rank factors for a tensor that has them).");

  m.def("magnitude_mask", &magnitude_mask, py::arg("ptrs"), py::arg("numels"),
        py::arg("thresholds"), py::arg("words"), py::arg("dtype"), py::arg("num_threads"),
        "Bitmaps of float32(|x|) <= threshold (NaN: 0) into the int32 words at words[i].");

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
