// pybind11 module zofo_kernels._C_cuda: the CUDA kernels through the C entry points of
// cuda_api.h. Device pointers, the device index and the cudaStream_t come in as Python ints;
// this file includes no CUDA header and the module does not link libtorch. cudart is linked
// statically, so importing the module needs no CUDA library; without a driver or a device the
// calls raise RuntimeError with the CUDA error.

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "bindings_args.h"
#include "cuda_api.h"

#ifndef ZOFO_CUDA_ARCHS_STR
#define ZOFO_CUDA_ARCHS_STR ""
#endif

namespace py = pybind11;
using namespace zofo::bindings;  // seed64, direction32, check_index_range, check_q

namespace {

constexpr size_t kErrLen = 512;

void check(int rc, const char* err) {
  if (rc != 0) throw std::runtime_error(err);
}

// The low-rank rank of a perturb or update call: 0 (no row has factors) or the r of every
// row's factors (a device table cannot be checked here; the Python backend checks the factors
// themselves, base.check_factors).
int rank32(int64_t rank) {
  if (rank < 0 || rank > 0x7FFFFFFFLL)
    throw std::invalid_argument("rank must be in [0, 2**31) (0: no low-rank factors), got " +
                                std::to_string(rank));
  return (int)rank;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "zofo_kernels CUDA kernels (raw device pointers and streams; no libtorch)";
  m.attr("cuda_archs") = ZOFO_CUDA_ARCHS_STR;

  m.def(
      "device_count",
      []() {
        char err[kErrLen] = {0};
        int count = 0;
        const int rc = zofo_cuda_device_count(&count, err, kErrLen);
        return std::make_pair(count, rc == 0 ? std::string() : std::string(err));
      },
      "(number of devices, \"\") or (0, CUDA error message).");

  m.def("runtime_version", []() {
    char err[kErrLen] = {0};
    int v = 0;
    check(zofo_cuda_runtime_version(&v, err, kErrLen), err);
    return v;
  });

  m.def(
      "noise",
      [](uintptr_t out, uint64_t seed, int64_t start, int64_t numel, int distribution,
         int64_t direction, int device, uintptr_t stream) {
        check_index_range(start, numel);
        char err[kErrLen] = {0};
        const uint32_t dir = direction32(direction, "direction");
        int rc;
        {
          py::gil_scoped_release release;
          rc = zofo_cuda_noise(reinterpret_cast<float*>(out), seed64(seed), start, numel,
                               distribution, dir, device, reinterpret_cast<void*>(stream), err,
                               kErrLen);
        }
        check(rc, err);
      },
      py::arg("out"), py::arg("seed"), py::arg("start"), py::arg("numel"),
      py::arg("distribution"), py::arg("direction"), py::arg("device"), py::arg("stream"));

  m.def(
      "perturb",
      [](uintptr_t rows, int64_t num_rows, int64_t total_groups, int dtype, uint64_t seed,
         int distribution, double scale, int64_t direction, double restore_scale,
         int64_t restore_direction, int device, uintptr_t stream, int64_t rank) {
        char err[kErrLen] = {0};
        const uint32_t dir = direction32(direction, "direction");
        const uint32_t rdir = direction32(restore_direction, "restore_direction");
        const int r = rank32(rank);
        int rc;
        {
          py::gil_scoped_release release;
          rc = zofo_cuda_perturb(reinterpret_cast<const ZofoSegmentRow*>(rows), num_rows,
                                 total_groups, dtype, seed64(seed), distribution, (float)scale,
                                 dir, (float)restore_scale, rdir, r, device,
                                 reinterpret_cast<void*>(stream), err, kErrLen);
        }
        check(rc, err);
      },
      py::arg("rows"), py::arg("num_rows"), py::arg("total_groups"), py::arg("dtype"),
      py::arg("seed"), py::arg("distribution"), py::arg("scale"), py::arg("direction"),
      py::arg("restore_scale"), py::arg("restore_direction"), py::arg("device"),
      py::arg("stream"), py::arg("rank") = 0,
      "rows: a device table of ZofoSegmentRow; rank: the r of the rows' low-rank factors, 0 "
      "when no row has any.");

  m.def(
      "update",
      [](uintptr_t rows, int64_t num_rows, int64_t total_groups, int dtype, uint64_t seed,
         int distribution, double lr, uintptr_t grads, int64_t q, double restore_scale,
         int64_t restore_direction, double weight_decay, bool stochastic_rounding, int device,
         uintptr_t stream, int64_t rank) {
        check_q(q);
        char err[kErrLen] = {0};
        const uint32_t rdir = direction32(restore_direction, "restore_direction");
        const int r = rank32(rank);
        int rc;
        {
          py::gil_scoped_release release;
          rc = zofo_cuda_update(reinterpret_cast<const ZofoSegmentRow*>(rows), num_rows,
                                total_groups, dtype, seed64(seed), distribution, (float)lr,
                                reinterpret_cast<const float*>(grads), q, (float)restore_scale,
                                rdir, (float)weight_decay, stochastic_rounding ? 1 : 0, r,
                                device, reinterpret_cast<void*>(stream), err, kErrLen);
        }
        check(rc, err);
      },
      py::arg("rows"), py::arg("num_rows"), py::arg("total_groups"), py::arg("dtype"),
      py::arg("seed"), py::arg("distribution"), py::arg("lr"), py::arg("grads"), py::arg("q"),
      py::arg("restore_scale"), py::arg("restore_direction"), py::arg("weight_decay"),
      py::arg("stochastic_rounding"), py::arg("device"), py::arg("stream"),
      py::arg("rank") = 0,
      "rows: a device table of ZofoSegmentRow; rank: the r of the rows' low-rank factors, 0 "
      "when no row has any.");

  m.def(
      "magnitude_mask",
      [](uintptr_t rows, int64_t num_rows, int64_t total_words, int dtype, int device,
         uintptr_t stream) {
        char err[kErrLen] = {0};
        int rc;
        {
          py::gil_scoped_release release;
          rc = zofo_cuda_magnitude_mask(reinterpret_cast<const ZofoMaskRow*>(rows), num_rows,
                                        total_words, dtype, device,
                                        reinterpret_cast<void*>(stream), err, kErrLen);
        }
        check(rc, err);
      },
      py::arg("rows"), py::arg("num_rows"), py::arg("total_words"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"),
      "Bitmaps of float32(|x|) <= threshold (NaN: 0); rows: a device table of ZofoMaskRow.");
}
