"""Triton backend: the kernels of :mod:`zofo_kernels.core.backends.triton.kernels`, one launch per group.

Runs on CUDA tensors (compiled kernels) or, when the environment variable TRITON_INTERPRET=1
was set before Triton was imported, on CPU tensors through Triton's interpreter (how the
test-suite exercises the kernels on machines without a GPU). Triton is imported lazily: a
missing or broken Triton makes this backend unavailable, never ``import zofo_kernels`` fail.

Each launch is described by two small int64/int32 tables (see the kernels module) that
depend only on the tensors' data pointers, sizes and global offsets (and the bitmaps' data
pointers of a sparse call, the factors' data pointers and shapes of a low-rank call); they are
built once and cached, so the repeated perturb/update calls of an optimizer step reuse them.

A low-rank call (``factors`` with at least one pair) is one launch of the HAS_FACTORS variant:
its table has four more columns (U and V data pointers, m, n; zeros and n = 1 for the tensors
without factors, which keep their dense noise through a per-program branch). A call whose
factors are all None is a dense launch.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import numpy as np
import torch

from zofo_kernels.core import contract
from zofo_kernels.core.backends.base import (DISTRIBUTION_CODES, Backend, BackendStatus,
                                             LaunchTables, call_directions, check_factors,
                                             check_group, check_masks, register)


def _pointers(tensors) -> np.ndarray:
    return np.asarray([t.data_ptr() for t in tensors], dtype=np.uint64).view(np.int64)


def _program_table(count: np.ndarray):
    """(first program id of each tensor, tensor index of each program, programs)."""
    first_program = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    programs = int(count.sum())
    if programs >= 2 ** 31:
        raise ValueError("too many elements for one launch; split the call")
    return first_program, np.repeat(np.arange(len(count), dtype=np.int32), count), programs


class TritonBackend(Backend):
    """``block``: elements per program (a multiple of 128); ``num_warps`` for compiled mode."""

    name = "triton"

    def __init__(self, block: int = 1024, num_warps: int = 4):
        if block < 128 or block % 128 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 128, got {block}")
        self.block = block
        self.num_warps = num_warps
        self._kernels = None
        self._import_error: Optional[str] = None
        self._tables = LaunchTables()

    # ------------------------------------------------------------------ availability

    def _load(self):
        if self._kernels is None and self._import_error is None:
            try:
                from zofo_kernels.core.backends.triton import kernels as triton_kernels
            except Exception as exc:  # ImportError, or a broken Triton install
                self._import_error = f"triton is not importable ({type(exc).__name__}: {exc})"
            else:
                self._kernels = triton_kernels
        return self._kernels

    @property
    def table_builds(self) -> int:
        """How many launch tables were built (not served from the cache)."""
        return self._tables.builds

    @property
    def interpreted(self) -> bool:
        """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
        tk = self._load()
        return tk is not None and tk.INTERPRETED

    def status(self) -> BackendStatus:
        if self._load() is None:
            return BackendStatus(self.name, False, self._import_error)
        if self.interpreted:
            return BackendStatus(self.name, True, "interpreter on CPU tensors")
        if torch.cuda.is_available():
            return BackendStatus(self.name, True, f"GPU ({torch.cuda.get_device_name()})")
        return BackendStatus(self.name, False,
                             "no GPU and TRITON_INTERPRET unset (set TRITON_INTERPRET=1 before "
                             "importing triton to run the kernels on CPU tensors)")

    def supports_device(self, device: torch.device) -> bool:
        device = torch.device(device)
        if self._load() is None:
            return False
        if self.interpreted:
            # the interpreter dereferences the pointer tables on the host
            return device.type == "cpu"
        return device.type == "cuda" and torch.cuda.is_available()

    def _require(self, device: torch.device):
        tk = self._load()
        if tk is None:
            raise RuntimeError(f"triton backend unavailable: {self._import_error}")
        if not self.supports_device(device):
            mode = "the interpreter" if self.interpreted else "compiled mode"
            raise ValueError(f"the triton backend in {mode} cannot run on device {device}")
        return tk

    def _launch_options(self) -> dict:
        # no FMA contraction: the float contract asks for separately rounded operations
        return {"num_warps": self.num_warps, "enable_fp_fusion": False}

    def _precise(self) -> bool:
        # libdevice log/sin/cos in compiled mode; the interpreter uses numpy's float32 math
        return not self.interpreted

    # ------------------------------------------------------------------ launch tables

    def _table(self, tensors: List[torch.Tensor], offsets: List[int], align: int,
               masks: Optional[List[torch.Tensor]] = None, factors=None):
        """(tensor_table, program_table, programs, aligned), cached on the tensors' layout,
        the bitmaps' addresses (None: no masks) and the factors' addresses and shapes (None:
        no factors, or none but None entries: a dense launch with the 6-column table)."""
        if factors is not None and all(f is None for f in factors):
            factors = None
        mask_ptrs = None if masks is None else tuple(m.data_ptr() for m in masks)
        factor_key = None if factors is None else tuple(
            None if f is None else (f[0].data_ptr(), f[1].data_ptr(), f[0].shape[1],
                                    f[1].shape[1]) for f in factors)
        return self._tables.get(
            tensors, offsets, lambda: self._build_table(tensors, offsets, align, masks, factors),
            extra=(align, self.block, mask_ptrs, factor_key))

    def _build_table(self, tensors: List[torch.Tensor], offsets: List[int], align: int,
                     masks: Optional[List[torch.Tensor]], factors=None):
        device = tensors[0].device
        ptrs = [t.data_ptr() for t in tensors]
        block = self.block
        off = np.asarray(offsets, dtype=np.int64)
        n = np.asarray([t.numel() for t in tensors], dtype=np.int64)
        first = off - off % align
        count = np.where(n > 0, (off + n - first + block - 1) // block, 0)
        first_program, program_table, programs = _program_table(count)
        mask_ptrs = np.zeros(len(tensors), np.int64) if masks is None else _pointers(masks)
        columns = [_pointers(tensors), off, n, first, first_program, mask_ptrs]
        if factors is not None:  # U, V data pointers, m, n (0, 0, 0, 1: no factors)
            lowrank = np.zeros((len(tensors), 4), np.int64)
            lowrank[:, 3] = 1
            for i, f in enumerate(factors):
                if f is not None:
                    lowrank[i] = (*_pointers(f), f[0].shape[1], f[1].shape[1])
            columns += list(lowrank.T)
        table = np.stack(columns, axis=1)
        itemsize = tensors[0].element_size()
        aligned = all((p - o * itemsize) % 16 == 0 for p, o in zip(ptrs, offsets))
        return (torch.from_numpy(np.ascontiguousarray(table)).to(device),
                torch.from_numpy(program_table).to(device), programs, aligned)

    def _mask_table(self, tensors: List[torch.Tensor], masks: List[torch.Tensor]):
        """(mask_table, program_table, programs) of a magnitude_mask launch, cached."""
        words = self.block // 32  # bitmap words per program

        def build():
            n = np.asarray([t.numel() for t in tensors], dtype=np.int64)
            count = (n + 32 * words - 1) // (32 * words)
            first_program, program_table, programs = _program_table(count)
            table = np.stack([_pointers(tensors), n, _pointers(masks), first_program], axis=1)
            device = tensors[0].device
            return (torch.from_numpy(np.ascontiguousarray(table)).to(device),
                    torch.from_numpy(program_table).to(device), programs)
        return self._tables.get(tensors, [0] * len(tensors), build,
                                extra=("magnitude", words, tuple(m.data_ptr() for m in masks)))

    @staticmethod
    def _device_guard(device: torch.device):
        if device.type == "cuda":
            return torch.cuda.device(device)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ operations

    def noise(self, seed, start, numel, distribution, direction, device):
        device = torch.device(device)
        tk = self._require(device)
        out = torch.empty(numel, dtype=torch.float32, device=device)
        if numel == 0:
            return out
        align = tk.WINDOW_ALIGN  # windows start on a Philox block boundary
        programs = (start % align + numel + self.block - 1) // self.block
        with self._device_guard(device):
            tk._noise_kernel[(programs,)](
                out, seed, start, numel, direction,
                BLOCK=self.block, ALIGN=align, DIST=DISTRIBUTION_CODES[distribution],
                PRECISE=self._precise(), **self._launch_options())
        return out

    @staticmethod
    def _lowrank_args(rank: int):
        """(rank, float32(1/sqrt(rank))) launch arguments; placeholders without factors."""
        return (rank, float(contract.lowrank_scale(rank))) if rank else (1, 1.0)

    def perturb(self, tensors, offsets, seed, distribution, scale, direction,
                restore_scale, restore_direction, *, masks=None, factors=None):
        code = check_group(tensors, offsets, self.name)
        check_masks(tensors, masks, self.name)
        rank = check_factors(tensors, factors, call_directions(
            (direction,), restore_scale, restore_direction), self.name, masks)
        device = tensors[0].device
        tk = self._require(device)
        table, program_table, programs, aligned = self._table(
            tensors, offsets, tk.WINDOW_ALIGN, masks, factors)
        if programs == 0:
            return
        with self._device_guard(device):
            tk._perturb_kernel[(programs,)](
                table, program_table, seed, float(scale), direction,
                float(restore_scale), restore_direction, *self._lowrank_args(rank),
                STORAGE=code, BLOCK=self.block,
                DIST=DISTRIBUTION_CODES[distribution], HAS_RESTORE=restore_scale != 0.0,
                PRECISE=self._precise(), ALIGNED=aligned, HAS_MASK=masks is not None,
                HAS_FACTORS=rank > 0, **self._launch_options())

    def update(self, tensors, offsets, seed, distribution, *, lr, projected_grads,
               restore_scale, restore_direction, weight_decay, stochastic_rounding,
               masks=None, factors=None):
        code = check_group(tensors, offsets, self.name)
        check_masks(tensors, masks, self.name)
        device = tensors[0].device
        grads = projected_grads.detach().reshape(-1)
        if grads.numel() == 0:
            raise ValueError("projected_grads is empty: give one scalar per direction (q >= 1)")
        rank = check_factors(tensors, factors, call_directions(
            range(grads.numel()), restore_scale, restore_direction), self.name, masks)
        tk = self._require(device)
        grads = grads.to(device=device, dtype=torch.float32).contiguous()
        table, program_table, programs, aligned = self._table(
            tensors, offsets, tk.WINDOW_ALIGN, masks, factors)
        if programs == 0:
            return
        dtype = tensors[0].dtype
        stochastic = bool(stochastic_rounding) and dtype != torch.float32
        with self._device_guard(device):
            tk._update_kernel[(programs,)](
                table, program_table, seed, float(lr), grads, grads.numel(),
                float(restore_scale), restore_direction, float(weight_decay),
                *self._lowrank_args(rank),
                STORAGE=code, BLOCK=self.block,
                DIST=DISTRIBUTION_CODES[distribution], HAS_RESTORE=restore_scale != 0.0,
                STOCHASTIC=stochastic, PRECISE=self._precise(), ALIGNED=aligned,
                HAS_MASK=masks is not None, HAS_FACTORS=rank > 0, **self._launch_options())

    def magnitude_mask(self, tensors, thresholds, masks):
        code = check_group(tensors, [0] * len(tensors), self.name)
        check_masks(tensors, masks, self.name)
        if len(thresholds) != len(tensors):
            raise ValueError(f"{len(thresholds)} thresholds for {len(tensors)} tensors")
        device = tensors[0].device
        tk = self._require(device)
        table, program_table, programs = self._mask_table(tensors, masks)
        if programs == 0:
            return
        # thresholds are float32 values already (exact here); they change every step
        limits = torch.tensor([float(x) for x in thresholds], dtype=torch.float32).to(device)
        with self._device_guard(device):
            tk._magnitude_mask_kernel[(programs,)](
                table, program_table, limits, STORAGE=code, WORDS=self.block // 32,
                num_warps=self.num_warps)


register("triton", TritonBackend)
