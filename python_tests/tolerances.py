"""Tolerances of the kernel and optimizer tests, and the ulp they are measured in: one place for
every bound (test_kernels.py, test_native_build.py, test_triton_backend.py, test_faults_zo.py).

Why each bound holds is argued in the docstring of the test file that uses it; in short:

* Gaussian z of two backends differ only through their float32 log/sin/cos: by at most
  GAUSS_ULPS float32 ulp of the Box-Muller pair's radius r = sqrt(-2 log u) (r >= |z|, so the
  bound scales with r, not with |z|). Every radius is below sqrt(-2 ln 1e-7) < 8, whose ulp is
  MAX_RADIUS_ULP: GAUSS_Z_BOUND = GAUSS_ULPS * MAX_RADIUS_ULP bounds any z difference.
* The shared header's own log and sin/cos against float64 math: LOG_ULPS ulp of the value, and
  SINCOS_ULPS ulp of max(|value|, 1/2).
* A compiled Triton Gaussian result may sit GAUSS_STORAGE_ULPS storage ulp per rounding step
  away from the reference's (a z a few float32 ulp away can cross one rounding boundary).
* Rademacher noise, uniforms, 16-bit conversions and stochastic-rounding decisions: bit for bit
  (no tolerance).
"""

from __future__ import annotations

import numpy as np
import torch

GAUSS_ULPS = 4.0
MAX_RADIUS_ULP = 2.0 ** -21
GAUSS_Z_BOUND = GAUSS_ULPS * MAX_RADIUS_ULP  # any Gaussian z difference between backends
LOG_ULPS = 1.0
SINCOS_ULPS = 2.0
GAUSS_STORAGE_ULPS = {torch.float32: 1.0, torch.bfloat16: 1.0, torch.float16: 1.0}

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
MIN_NORMAL_EXP = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |x| (the ulp above |x|; the subnormal spacing below the
    smallest normal), as a float64 CPU tensor."""
    x = x.detach().double().abs().cpu()
    e = torch.floor(torch.log2(torch.clamp(x, min=2.0 ** -149)))
    e = torch.clamp(e, min=MIN_NORMAL_EXP[dtype])
    return torch.pow(2.0, e - MANTISSA_BITS[dtype])


def ulp32(x: np.ndarray) -> np.ndarray:
    """:func:`ulp` in float32 of a numpy array's values rounded to float32, as float64 numpy."""
    return ulp(torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.float32).numpy()


# A float32 dot product of n terms, summed in any order, is within gamma_n * sum|a_i b_i| of the
# exact value, gamma_n = n u / (1 - n u), u = 2^-24 (Higham, "Accuracy and Stability of
# Numerical Algorithms", 2nd ed., eq. 3.5). Two results of the same dot product computed by
# different kernels (a GEMM over the whole vocabulary vs one over the label words' rows, which
# block the sum differently) therefore differ by at most twice that.
def dot_reorder_bound(abs_dot: torch.Tensor, n: int) -> torch.Tensor:
    """Largest difference between two float32 evaluations of dot products of length ``n``
    whose sums of absolute products are ``abs_dot``."""
    u = 2.0 ** -24
    return 2.0 * n * u / (1.0 - n * u) * abs_dot
