"""A faithful re-implementation of MeZO's reference ZO-SGD step (the benchmark baseline).

Source being reproduced: princeton-nlp/MeZO, ``large_models/trainer.py``
(``zo_perturb_parameters``, ``zo_forward``, ``zo_step``, ``zo_update``). Its costs are
kept on purpose, because they are what this project is measured against:

* the global RNG is reseeded with ``torch.manual_seed`` before every sweep over the weights;
* every sweep loops over the parameters in Python and draws a fresh full-size
  ``torch.normal`` tensor per parameter (four sweeps per step: +eps, -2eps, +eps, update);
* weights are replaced out of place (``param.data = param.data + ...``), which allocates
  a new tensor per parameter and frees the old one;
* ``loss.item()`` synchronises once per step for the projected gradient;
* weight decay skips parameters whose name contains "bias", "layer_norm" or "layernorm".

Part of the package so that an installed ``zofo-bench`` has its baseline; import it as
``from zofo_kernels.apps.mezo_reference import MeZOReference``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import torch


class MeZOReference:
    """MeZO's step as a small object: ``step(closure)`` where ``closure()`` returns the loss
    of the current batch (the model's forward on fixed inputs)."""

    def __init__(self, named_parameters, lr: float, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: Optional[int] = None):
        self.params: List[Tuple[str, torch.nn.Parameter]] = [
            (n, p) for n, p in named_parameters if p.requires_grad]
        if not self.params:
            raise ValueError("MeZOReference got no parameters that require grad")
        self.lr = lr
        self.eps = eps
        self.weight_decay = weight_decay
        # MeZO draws each step's seed from numpy's global generator.
        self.rng = np.random.RandomState(seed)
        self.zo_random_seed = 0
        self.projected_grad = 0.0

    def zo_perturb_parameters(self, scaling_factor: float = 1.0) -> None:
        torch.manual_seed(self.zo_random_seed)
        for _, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.eps

    @staticmethod
    def zo_forward(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            loss = closure()
        return loss.detach()

    def zo_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.zo_random_seed = int(self.rng.randint(1000000000))
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(closure)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(closure)
        self.projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self) -> None:
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self.lr * (
                    self.projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One MeZO iteration (``zo_step`` then ``zo_update``); returns L(theta + eps z)."""
        loss = self.zo_step(closure)
        self.zo_update()
        return loss
