"""C++ CPU backend: the kernels of ``csrc/cpu_kernels.cpp`` through a module ``_C_<variant>``.

The variant (generic, avx2, avx512: the same kernels for different instruction sets, with
bit-identical results) is chosen once per process by ``zofo_kernels.core.backends.native.loader`` from the CPU's
features, or forced by ``ZOFO_CPU_VARIANT``; ``CpuBackend(variant=...)`` uses a named one.

One call into C++ per dtype group: the tensors' data pointers, sizes and global offsets go
down as integers and one OpenMP parallel region processes all of them (blocks of 128
elements, split evenly across threads). The thread count follows ``torch.get_num_threads()``.
Sparse masks go down as one more list, the bitmaps' addresses: a block with no kept element
is skipped before its noise is made, and only kept elements are written. ``magnitude_mask``
is one more parallel region over the call's bitmap words. Low-rank factors go down as the
addresses of each tensor's U and V (0 for a dense tensor), V's row count n and the directions
they hold, plus the call's rank; the kernels transpose each V_k the call uses once and fill
a unit's z from the factors instead of the noise.
"""

from __future__ import annotations

import torch

from zofo_kernels.core.backends.native import loader as _native
from zofo_kernels.core.backends.base import (DISTRIBUTION_CODES, Backend, BackendStatus,
                                             call_directions, check_factors, check_group,
                                             check_masks, register)


def _mask_ptrs(masks) -> list:
    """The bitmaps' addresses for the native call: [] when dense, else one per tensor."""
    return [] if masks is None else [m.data_ptr() for m in masks]


def _factor_args(factors, rank: int) -> dict:
    """The low-rank keyword arguments of the native call ({} when no tensor has factors):
    per tensor the addresses of U (D, m, r) and V (D, n, r) (0: dense), n and D; the rank."""
    if not rank:
        return {}
    return dict(lowrank_u=[0 if f is None else f[0].data_ptr() for f in factors],
                lowrank_v=[0 if f is None else f[1].data_ptr() for f in factors],
                lowrank_cols=[0 if f is None else int(f[1].shape[1]) for f in factors],
                lowrank_depth=[0 if f is None else int(f[0].shape[0]) for f in factors],
                rank=rank)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, variant=None, module=None):
        """``variant``: a CPU variant name (generic, avx2, avx512, native) instead of the one
        chosen for this process; ``module``: an imported native module to use instead (e.g.
        a ``-march=native`` build from elsewhere, for benchmarks)."""
        if module is not None:
            self._mod, self._error = module, None
            self._how = f"module {getattr(module, '__file__', module)}"
        elif variant is None:
            self._mod, self._error = _native.cpu_module()
            self._how = _native.cpu_choice()[1] if self._mod is not None else ""
        else:
            self._mod, self._error = _native.cpu_module(variant)
            self._how = "requested by name"
        self.variant = getattr(self._mod, "variant", None)

    def status(self) -> BackendStatus:
        if self._mod is None:
            return BackendStatus(self.name, False,
                                 f"the C++ extension zofo_kernels._C_* is unavailable: "
                                 f"{self._error}")
        threads = "OpenMP" if self._mod.openmp else "single-threaded (built without OpenMP)"
        return BackendStatus(self.name, True,
                             f"C++ kernels, {self.variant} build ({self._how}), {threads}, "
                             f"compiled with {self._mod.compile_flags}")

    def supports_device(self, device: torch.device) -> bool:
        return self._mod is not None and torch.device(device).type == "cpu"

    def _native(self):
        if self._mod is None:
            raise RuntimeError(self.status().reason)
        return self._mod

    def noise(self, seed, start, numel, distribution, direction, device):
        mod = self._native()
        out = torch.empty(numel, dtype=torch.float32)
        mod.noise(out.data_ptr(), seed, start, numel, DISTRIBUTION_CODES[distribution], direction,
                  torch.get_num_threads())
        return out.to(device)

    def perturb(self, tensors, offsets, seed, distribution, scale, direction,
                restore_scale, restore_direction, *, masks=None, factors=None):
        mod = self._native()
        code = check_group(tensors, offsets, self.name, device_type="cpu")
        check_masks(tensors, masks, self.name)
        rank = check_factors(tensors, factors, call_directions(
            (direction,), restore_scale, restore_direction), self.name, masks)
        mod.perturb([t.data_ptr() for t in tensors], [t.numel() for t in tensors],
                    [int(o) for o in offsets], code, seed, DISTRIBUTION_CODES[distribution],
                    float(scale), direction, float(restore_scale), restore_direction,
                    torch.get_num_threads(), masks=_mask_ptrs(masks),
                    **_factor_args(factors, rank))

    def update(self, tensors, offsets, seed, distribution, *, lr, projected_grads,
               restore_scale, restore_direction, weight_decay, stochastic_rounding, masks=None,
               factors=None):
        mod = self._native()
        code = check_group(tensors, offsets, self.name, device_type="cpu")
        check_masks(tensors, masks, self.name)
        grads = projected_grads.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if grads.dim() != 1 or grads.numel() < 1:
            raise ValueError("projected_grads must be a 1-D tensor with at least one value")
        q = grads.numel()
        rank = check_factors(tensors, factors, call_directions(
            range(q), restore_scale, restore_direction), self.name, masks)
        mod.update([t.data_ptr() for t in tensors], [t.numel() for t in tensors],
                   [int(o) for o in offsets], code, seed, DISTRIBUTION_CODES[distribution],
                   float(lr), grads.data_ptr(), grads.numel(), float(restore_scale),
                   restore_direction, float(weight_decay), bool(stochastic_rounding),
                   torch.get_num_threads(), masks=_mask_ptrs(masks),
                   **_factor_args(factors, rank))

    def magnitude_mask(self, tensors, thresholds, masks):
        mod = self._native()
        code = check_group(tensors, [0] * len(tensors), self.name, device_type="cpu")
        if masks is None or len(thresholds) != len(tensors):
            raise ValueError(f"magnitude_mask needs one threshold and one bitmap per tensor "
                             f"({len(tensors)} tensors)")
        check_masks(tensors, masks, self.name)
        mod.magnitude_mask([t.data_ptr() for t in tensors], [t.numel() for t in tensors],
                           [float(x) for x in thresholds], _mask_ptrs(masks), code,
                           torch.get_num_threads())


register("cpu", CpuBackend)
