"""Reference backend: the noise contract in numpy, the arithmetic in torch float32.

Slow but obviously correct; processes each tensor in chunks of ``CHUNK`` elements so its
temporaries stay bounded whatever the model size. Every other backend is tested against it.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch

from zofo_kernels.core import contract
from zofo_kernels.core.backends.base import (Backend, BackendStatus, call_directions,
                                             check_factors, check_masks, register)

CHUNK = 1 << 18

_SR_KIND = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _z(seed, start, numel, distribution, direction) -> torch.Tensor:
    return torch.from_numpy(contract.noise(seed, start, numel, distribution, direction))


class _Chunk:
    """Elements [a, b) of one tensor: its flat view, the global index of a, the mask of
    [a, b) as a bool tensor (or None) and the tensor's low-rank factors (or None)."""
    __slots__ = ("flat", "a", "b", "start", "keep", "factors")

    def __init__(self, flat, a, b, start, keep, factors):
        self.flat, self.a, self.b, self.start, self.keep, self.factors = \
            flat, a, b, start, keep, factors

    def z(self, seed, distribution, direction) -> torch.Tensor:
        """z of the chunk's elements in ``direction``: the contract noise, or the low-rank z
        of the tensor's factors."""
        if self.factors is None:
            return _z(seed, self.start, self.b - self.a, distribution, direction)
        u, v = (f[direction].detach().cpu().numpy() for f in self.factors)
        return torch.from_numpy(contract.lowrank_z(u, v, self.a, self.b - self.a))


class ReferenceBackend(Backend):
    name = "reference"

    def status(self) -> BackendStatus:
        return BackendStatus(self.name, True, "numpy/torch implementation of the contract")

    def supports_device(self, device: torch.device) -> bool:
        return True

    def noise(self, seed, start, numel, distribution, direction, device):
        return _z(seed, start, numel, distribution, direction).to(device)

    def _chunks(self, tensors: List[torch.Tensor], offsets: List[int],
                masks: Optional[List[torch.Tensor]], factors) -> "Iterator[_Chunk]":
        for i, (t, off) in enumerate(zip(tensors, offsets)):
            flat = t.view(-1)
            words = None if masks is None else masks[i].detach().cpu().numpy()
            pair = None if factors is None else factors[i]
            for a in range(0, flat.numel(), CHUNK):
                b = min(a + CHUNK, flat.numel())
                keep = None if words is None else torch.from_numpy(
                    contract.mask_bits(words, a, b - a))
                yield _Chunk(flat, a, b, off + a, keep, pair)

    @staticmethod
    def _store(c: _Chunk, v) -> None:
        """The chunk's elements <- v, only where the mask (if any) is set."""
        old = c.flat[c.a:c.b].detach().cpu()
        new = v.to(c.flat.dtype)
        if c.keep is not None:
            new = torch.where(c.keep, new, old)
        c.flat[c.a:c.b] = new.to(c.flat.device)

    @staticmethod
    def _restored(c: _Chunk, w, seed, dist, restore_scale, restore_direction):
        if restore_scale == 0.0:
            return w
        return (w + c.z(seed, dist, restore_direction) * _f32(restore_scale)).to(
            c.flat.dtype).float()

    def perturb(self, tensors, offsets, seed, distribution, scale, direction,
                restore_scale, restore_direction, *, masks=None, factors=None):
        check_masks(tensors, masks, self.name)
        check_factors(tensors, factors, call_directions((direction,), restore_scale,
                                                        restore_direction), self.name, masks)
        s = _f32(scale)
        for c in self._chunks(tensors, offsets, masks, factors):
            w = c.flat[c.a:c.b].detach().float().cpu()
            w = self._restored(c, w, seed, distribution, restore_scale, restore_direction)
            w = w + c.z(seed, distribution, direction) * s
            self._store(c, w)

    def update(self, tensors, offsets, seed, distribution, *, lr, projected_grads,
               restore_scale, restore_direction, weight_decay, stochastic_rounding,
               masks=None, factors=None):
        check_masks(tensors, masks, self.name)
        grads = projected_grads.detach().float().cpu()
        check_factors(tensors, factors, call_directions(range(grads.numel()), restore_scale,
                                                        restore_direction), self.name, masks)
        lr32, wd32 = _f32(lr), _f32(weight_decay)
        for c in self._chunks(tensors, offsets, masks, factors):
            w = c.flat[c.a:c.b].detach().float().cpu()
            w = self._restored(c, w, seed, distribution, restore_scale, restore_direction)
            d = grads[0] * c.z(seed, distribution, 0)
            for k in range(1, grads.numel()):
                d = d + grads[k] * c.z(seed, distribution, k)
            d = d + wd32 * w
            v = w - lr32 * d
            if stochastic_rounding and c.flat.dtype in _SR_KIND:
                bits = contract.rounding_words(seed, c.start, c.b - c.a)
                v = torch.from_numpy(contract.stochastic_round_bits(
                    v.numpy(), bits, _SR_KIND[c.flat.dtype]).copy())
            self._store(c, v)

    def magnitude_mask(self, tensors, thresholds, masks):
        check_masks(tensors, masks, self.name)
        for t, threshold, m in zip(tensors, thresholds, masks):
            values = t.detach().reshape(-1).float().cpu().numpy()
            words = contract.magnitude_mask_words(values, threshold)
            m.copy_(torch.from_numpy(words.view(np.int32)).to(m.device))


register("reference", ReferenceBackend)
