"""Tolerances of the kernel and optimizer tests, and the ulp they are measured in: one place for
every bound (test_kernels.py, test_native_build.py, test_triton_backend.py, test_faults_zo.py,
test_zo_optimizer.py, test_zofo_optimizer.py, test_meta.py, test_prompting.py).

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
# (rtol, atol): a known answer printed to 8 significant digits against the float32 value it
# stands for: half a unit of the 8th digit (5e-8 relative) plus float32's rounding (6e-8).
PRINTED_8_DIGITS = dict(rtol=2e-7, atol=1e-7)

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


# --------------------------------------------------------------------------- optimizer tests
#
# test_zo_optimizer.py, test_zofo_optimizer.py, test_meta.py. ``dict`` entries are the
# (rtol, atol) of torch.testing.assert_close; the others a pytest.approx rel or abs.

# rel: float64 values from the same float64 formula on the same float32 losses, the operations
# in another order (the loss_reduce'd losses, projected gradients, the RMS state): a few ulp.
F64_SAME_FORMULA_REL = 1e-12
# rel: a float64 difference quotient (L+ - L-) / (2 eps) recomputed from the reduced losses:
# the cancellation magnifies their relative rounding by |L| / |L+ - L-| (below 1e3 here).
F64_DIFFERENCE_QUOTIENT_REL = 1e-9
# rel: a value carried in float32 somewhere on its way (a float32 loss, a float32 weight
# update, AdamW's moments): a few float32 roundings of 2**-24 each; pytest.approx's default.
F32_REL = 1e-6
# abs: float64 sums of O(1) loss terms, grouped differently (the objective from its terms, the
# three terms' slopes summed back, each divided by eps = 1e-3): far below 1e-6.
F64_REGROUPED_ABS = 1e-6
# (rtol, atol): a kernel's float32 update (a handful of separately rounded float32 operations)
# against the same update written out in float64: a few float32 ulp, plus a floor near 0.
F32_UPDATE = dict(rtol=1e-6, atol=1e-7)
# atol: a few float32 roundings of weights with |w| < 4 (half an ulp, at most 2**-22, each).
F32_WEIGHT_ROUNDING_ATOL = 1e-6
# atol: perturb +eps, -2 eps, +eps (eps = 1e-2) of bfloat16 weights with |w| < 4: three
# roundings of at most half a bfloat16 spacing (2**-7 below 4), 0.023 in all.
BF16_ROUND_TRIP_ATOL = 0.05
# abs: a ZO slope is a difference quotient of float32 losses, resolved to about
# ulp(L) / eps = 1.2e-4 per unit of loss whatever the implementation.
ZO_SLOPE_ABS = 1e-3
# (rtol, atol): AdamW steps of theta and P against torch's AdamW on gradients computed by other
# float32 operations (g * z accumulated into a buffer vs multiplied; autograd through the
# module vs through the reference formula): Adam's m / (sqrt(v) + eps) carries a gradient's
# relative rounding into the step, lr-sized (1e-2) for the first steps: 1e-5 relative.
ADAMW_STEP = dict(rtol=1e-5, atol=1e-6)
# rel: the expected RMS change per weight (E z^2 = 1) against the one measured over 200,000
# weights: relative standard error sqrt(2 / 200000) = 0.3%, so 0.02 is about 6 sigma.
UPDATE_RMS_SAMPLE_REL = 0.02
# rel: theta_update="rms" moves a weight by lr * |g_t| / RMS(g_1..g_t) per step (bias-corrected
# running RMS: exactly lr on the first step); the mean over 5 steps stays within 0.4 to 1.6 lr.
RMS_STEP_REL = 0.6
