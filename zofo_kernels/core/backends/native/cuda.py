"""CUDA backend: the kernels of ``csrc/cuda_kernels.cu`` through the native module ``_C_cuda``.

One kernel launch per dtype group, on torch's current stream of the tensors' device. The
tensors of a call are described to the kernel by a small device table (per tensor: pointer,
numel, global offset, first work group, sparse-perturbation bitmap or 0, low-rank factors U
and V and the matrix view (m, n), or 0, 0, 0, 0) that is built once per distinct list of
tensors (and bitmaps, factors) and cached, and uploaded from pinned memory without blocking;
the projected gradients are read from device memory. A call with factors passes their rank r
and runs the kernels' low-rank instantiation. So a training step
never synchronises with the host here. ``magnitude_mask`` has a table of its own (pointer,
numel, bitmap, first bitmap word, threshold per tensor), cached the same way.

When the package was built without CUDA, or no GPU/driver is usable, ``status()`` says why.
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

import torch

from zofo_kernels.core.backends.native import loader as _native
from zofo_kernels.core.backends.base import (DISTRIBUTION_CODES, Backend, BackendStatus,
                                             LaunchTables, call_directions, check_factors,
                                             check_group, check_masks, register)

GROUP = 4  # global indices per work item (one Gaussian Philox block)


def _groups(offset: int, numel: int) -> int:
    return (offset + numel - 1) // GROUP - offset // GROUP + 1


def _float32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _upload(rows, device: torch.device) -> torch.Tensor:
    """An int64 table on ``device``, copied from pinned memory without blocking."""
    host = torch.tensor(rows, dtype=torch.int64)
    if torch.cuda.is_available():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._mod, self._error = _native.cuda_module()
        self._status = None
        self._tables = LaunchTables()
        self._mask_tables = LaunchTables()

    # ------------------------------------------------------------------ availability

    def _compute_status(self) -> BackendStatus:
        if self._mod is None:
            if "was not built" in (self._error or ""):
                return BackendStatus(self.name, False,
                                     "built without CUDA (zofo_kernels._C_cuda is absent; "
                                     "reinstall with ZOFO_BUILD_CUDA=1 and a CUDA toolkit)")
            return BackendStatus(self.name, False, f"CUDA extension unavailable: {self._error}")
        if not torch.cuda.is_available():
            return BackendStatus(self.name, False, "no CUDA device visible to torch")
        count, err = self._mod.device_count()
        if err:
            return BackendStatus(self.name, False, err)
        if count == 0:
            return BackendStatus(self.name, False, "the CUDA runtime sees no device")
        archs = [int(a) for a in str(self._mod.cuda_archs).split(",") if a.strip()]
        major, minor = torch.cuda.get_device_capability()
        cc = 10 * major + minor
        if archs and cc < min(archs):
            return BackendStatus(
                self.name, False,
                f"device compute capability {major}.{minor} is older than the built "
                f"architectures {archs} (rebuild with ZOFO_CUDA_ARCHS={cc})")
        return BackendStatus(self.name, True,
                             f"CUDA kernels for sm_{archs}, {count} device(s), runtime "
                             f"{self._mod.runtime_version()}")

    def status(self) -> BackendStatus:
        if self._status is None:
            self._status = self._compute_status()
        return self._status

    def supports_device(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda" and self.status().available

    def _native(self):
        st = self.status()
        if not st.available:
            raise RuntimeError(f"cuda backend unavailable: {st.reason}")
        return self._mod

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _device_index(device: torch.device) -> int:
        device = torch.device(device)
        return device.index if device.index is not None else torch.cuda.current_device()

    def _table(self, tensors: List[torch.Tensor], offsets: List[int],
               masks: Optional[List[torch.Tensor]] = None,
               factors=None) -> Tuple[torch.Tensor, int]:
        """(device table of rows (pointer, numel, offset, first group, bitmap or 0, U, V, m, n
        or 0, 0, 0, 0), total groups)."""
        mask_ptrs = [0] * len(tensors) if masks is None else [m.data_ptr() for m in masks]
        lowrank = [(0, 0, 0, 0) if f is None else
                   (f[0].data_ptr(), f[1].data_ptr(), int(f[0].shape[1]), int(f[1].shape[1]))
                   for f in (factors or [None] * len(tensors))]

        def build():
            rows, first = [], 0
            for t, o, m, lr in zip(tensors, offsets, mask_ptrs, lowrank):
                rows.append((t.data_ptr(), t.numel(), int(o), first, m) + lr)
                first += _groups(int(o), t.numel())
            return _upload(rows, tensors[0].device), first

        return self._tables.get(tensors, offsets, build,
                                extra=(tuple(mask_ptrs), tuple(lowrank)))

    def _mask_table(self, tensors: List[torch.Tensor], thresholds: List[float],
                    masks: List[torch.Tensor]) -> Tuple[torch.Tensor, int]:
        """(device table of rows (pointer, numel, bitmap, first word, threshold bits), total
        bitmap words)."""
        bits = [_float32_bits(float(x)) for x in thresholds]
        ptrs = [m.data_ptr() for m in masks]

        def build():
            rows, first = [], 0
            for t, m, b in zip(tensors, ptrs, bits):
                rows.append((t.data_ptr(), t.numel(), m, first, b))
                first += (t.numel() + 31) // 32
            return _upload(rows, tensors[0].device), first

        return self._mask_tables.get(tensors, [0] * len(tensors), build,
                                     extra=(tuple(ptrs), tuple(bits)))

    # ------------------------------------------------------------------ operations

    def noise(self, seed, start, numel, distribution, direction, device):
        mod = self._native()
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the cuda backend makes noise on CUDA devices, not {device}")
        out = torch.empty(numel, dtype=torch.float32, device=device)
        if numel:
            idx = self._device_index(device)
            mod.noise(out.data_ptr(), seed, start, numel, DISTRIBUTION_CODES[distribution],
                      direction, idx, torch.cuda.current_stream(idx).cuda_stream)
        return out

    def perturb(self, tensors, offsets, seed, distribution, scale, direction,
                restore_scale, restore_direction, *, masks=None, factors=None):
        mod = self._native()
        code = check_group(tensors, offsets, self.name, device_type="cuda", nonempty=True)
        check_masks(tensors, masks, self.name)
        rank = check_factors(tensors, factors, call_directions(
            (direction,), restore_scale, restore_direction), self.name, masks)
        idx = self._device_index(tensors[0].device)
        table, total = self._table(tensors, offsets, masks, factors)
        mod.perturb(table.data_ptr(), len(tensors), total, code, seed,
                    DISTRIBUTION_CODES[distribution], float(scale), direction,
                    float(restore_scale), restore_direction, idx,
                    torch.cuda.current_stream(idx).cuda_stream, rank)

    def update(self, tensors, offsets, seed, distribution, *, lr, projected_grads,
               restore_scale, restore_direction, weight_decay, stochastic_rounding, masks=None,
               factors=None):
        mod = self._native()
        code = check_group(tensors, offsets, self.name, device_type="cuda", nonempty=True)
        check_masks(tensors, masks, self.name)
        if projected_grads.dim() != 1 or projected_grads.numel() < 1:
            raise ValueError("projected_grads must be a 1-D tensor with at least one value")
        q = projected_grads.numel()
        rank = check_factors(tensors, factors, call_directions(
            range(q), restore_scale, restore_direction), self.name, masks)
        idx = self._device_index(tensors[0].device)
        grads = projected_grads.detach().to(device=tensors[0].device,
                                            dtype=torch.float32).contiguous()
        table, total = self._table(tensors, offsets, masks, factors)
        mod.update(table.data_ptr(), len(tensors), total, code, seed,
                   DISTRIBUTION_CODES[distribution], float(lr), grads.data_ptr(), grads.numel(),
                   float(restore_scale), restore_direction, float(weight_decay),
                   bool(stochastic_rounding), idx, torch.cuda.current_stream(idx).cuda_stream,
                   rank)

    def magnitude_mask(self, tensors, thresholds, masks):
        mod = self._native()
        code = check_group(tensors, [0] * len(tensors), self.name, device_type="cuda",
                           nonempty=True)
        if masks is None or len(thresholds) != len(tensors):
            raise ValueError(f"magnitude_mask needs one threshold and one bitmap per tensor "
                             f"({len(tensors)} tensors)")
        check_masks(tensors, masks, self.name)
        idx = self._device_index(tensors[0].device)
        table, total = self._mask_table(tensors, thresholds, masks)
        mod.magnitude_mask(table.data_ptr(), len(tensors), total, code, idx,
                           torch.cuda.current_stream(idx).cuda_stream)


register("cuda", CudaBackend)
