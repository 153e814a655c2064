"""``theta_update="adam"`` of Bilevel-ZOFO: the authors' update, for exact reproduction.

theta.grad = sum_k c_k z_k is materialised from the ZO step's seed (the parameters laid end
to end as the noise contract says) and one ``torch.optim.AdamW`` steps theta and P together.
It costs three backbone-sized buffers (grad, exp_avg, exp_avg_sq): not memory-efficient.
The ZO step here is always dense: Bilevel-ZOFO refuses ``sparse_fraction`` and ``lowrank``
with this update
(theta.grad would have to be m * z, and AdamW's moments and weight decay would still move the
weights outside the mask).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from zofo_kernels.core.ops import noise


def theta_adamw(backbone: Sequence[torch.Tensor], uppers: Sequence[Sequence[torch.Tensor]],
                lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The AdamW of theta (group 0, with ``weight_decay``) and of every P (no weight decay)."""
    return torch.optim.AdamW([{"params": list(backbone), "weight_decay": weight_decay}]
                             + [{"params": list(up), "weight_decay": 0.0} for up in uppers],
                             lr=lr)


def adam_theta_step(opt: torch.optim.AdamW, zo, step: dict) -> float:
    """theta.grad = sum_k c_k z_k for the ZO step described by ``step`` (``zo.last_step``),
    P.grad from its pass; one AdamW step of both. Returns the RMS change per backbone weight
    of that step (from AdamW's moments; weight decay excluded), 0 for a skipped step."""
    if step["skipped"]:
        opt.zero_grad(set_to_none=True)
        return 0.0
    offset = 0
    for group in zo.param_groups:
        for p in group["params"]:
            grad = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for k, c in enumerate(step["update_coefficients"]):
                z = noise(step["seed"], offset, p.numel(), zo.distribution, k, device=p.device)
                grad.add_(z.view(p.shape), alpha=c)
            p.grad = grad.to(p.dtype)
            offset += p.numel()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return _backbone_step_rms(opt)


def _backbone_step_rms(opt: torch.optim.AdamW) -> float:
    """RMS over the backbone group (group 0) of |lr * m_hat / (sqrt(v_hat) + eps)|."""
    beta1, beta2 = opt.param_groups[0]["betas"]
    total, n = 0.0, 0
    with torch.no_grad():
        for group in opt.param_groups[:1]:  # the backbone group
            for p in group["params"]:
                state = opt.state[p]
                t = float(state["step"])
                # |lr * m_hat / (sqrt(v_hat) + eps)|^2 summed, with one float32 temporary
                tmp = state["exp_avg_sq"].float().sqrt()
                tmp.div_(math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                torch.div(state["exp_avg"].float(), tmp, out=tmp)
                total += float(tmp.pow_(2).sum()) * (group["lr"] / (1 - beta1 ** t)) ** 2
                n += p.numel()
                del tmp
    return math.sqrt(total / max(1, n))
