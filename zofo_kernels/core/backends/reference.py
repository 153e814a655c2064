"""Reference backend: the noise contract in numpy, the arithmetic in torch float32.

Slow but obviously correct; processes each tensor in chunks of ``CHUNK`` elements so its
temporaries stay bounded whatever the model size. Every other backend is tested against it.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from zofo_kernels.core import contract
from zofo_kernels.core.backends.base import Backend, BackendStatus, check_masks, register

CHUNK = 1 << 18

_SR_KIND = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _z(seed, start, numel, distribution, direction) -> torch.Tensor:
    return torch.from_numpy(contract.noise(seed, start, numel, distribution, direction))


class ReferenceBackend(Backend):
    name = "reference"

    def status(self) -> BackendStatus:
        return BackendStatus(self.name, True, "numpy/torch implementation of the contract")

    def supports_device(self, device: torch.device) -> bool:
        return True

    def noise(self, seed, start, numel, distribution, direction, device):
        return _z(seed, start, numel, distribution, direction).to(device)

    def _chunks(self, tensors: List[torch.Tensor], offsets: List[int],
                masks: Optional[List[torch.Tensor]]):
        """(flat tensor, a, b, global start of a, mask of [a, b) as a bool tensor or None)."""
        for i, (t, off) in enumerate(zip(tensors, offsets)):
            flat = t.view(-1)
            words = None if masks is None else masks[i].detach().cpu().numpy()
            for a in range(0, flat.numel(), CHUNK):
                b = min(a + CHUNK, flat.numel())
                keep = None if words is None else torch.from_numpy(
                    contract.mask_bits(words, a, b - a))
                yield flat, a, b, off + a, keep

    @staticmethod
    def _store(flat, a, b, v, keep) -> None:
        """flat[a:b] <- v, only where the mask (if any) is set."""
        old = flat[a:b].detach().cpu()
        new = v.to(flat.dtype)
        if keep is not None:
            new = torch.where(keep, new, old)
        flat[a:b] = new.to(flat.device)

    def _restored(self, w, seed, dist, start, n, restore_scale, restore_direction, dtype):
        if restore_scale == 0.0:
            return w
        zr = _z(seed, start, n, dist, restore_direction)
        return (w + zr * _f32(restore_scale)).to(dtype).float()

    def perturb(self, tensors, offsets, seed, distribution, scale, direction,
                restore_scale, restore_direction, *, masks=None):
        check_masks(tensors, masks, self.name)
        s = _f32(scale)
        for flat, a, b, start, keep in self._chunks(tensors, offsets, masks):
            w = flat[a:b].detach().float().cpu()
            w = self._restored(w, seed, distribution, start, b - a, restore_scale,
                               restore_direction, flat.dtype)
            w = w + _z(seed, start, b - a, distribution, direction) * s
            self._store(flat, a, b, w, keep)

    def update(self, tensors, offsets, seed, distribution, *, lr, projected_grads,
               restore_scale, restore_direction, weight_decay, stochastic_rounding,
               masks=None):
        check_masks(tensors, masks, self.name)
        grads = projected_grads.detach().float().cpu()
        lr32, wd32 = _f32(lr), _f32(weight_decay)
        for flat, a, b, start, keep in self._chunks(tensors, offsets, masks):
            n = b - a
            w = flat[a:b].detach().float().cpu()
            w = self._restored(w, seed, distribution, start, n, restore_scale,
                               restore_direction, flat.dtype)
            d = grads[0] * _z(seed, start, n, distribution, 0)
            for k in range(1, grads.numel()):
                d = d + grads[k] * _z(seed, start, n, distribution, k)
            d = d + wd32 * w
            v = w - lr32 * d
            if stochastic_rounding and flat.dtype in _SR_KIND:
                bits = contract.rounding_words(seed, start, n)
                v = torch.from_numpy(
                    contract.stochastic_round_bits(v.numpy(), bits, _SR_KIND[flat.dtype]).copy())
            self._store(flat, a, b, v, keep)

    def magnitude_mask(self, tensors, thresholds, masks):
        check_masks(tensors, masks, self.name)
        for t, threshold, m in zip(tensors, thresholds, masks):
            values = t.detach().reshape(-1).float().cpu().numpy()
            words = contract.magnitude_mask_words(values, threshold)
            m.copy_(torch.from_numpy(words.view(np.int32)).to(m.device))


register("reference", ReferenceBackend)
