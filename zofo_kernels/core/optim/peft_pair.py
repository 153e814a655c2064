"""One (P, S) PEFT pair of Bilevel-ZOFO: two copies of the same PEFT block (P, the upper
level, used for prediction; S, the lower level), their first-order optimizers, the switch that
makes the model's forward use one or the other, and the loss function."""

from __future__ import annotations

import copy
from typing import List

import torch

LEVELS = ("upper", "lower")
PEFT_DTYPES = (torch.float32, torch.float64)


def param_list(params, name: str) -> List[torch.Tensor]:
    """Flatten parameters or parameter groups into a list of tensors (for checks)."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{name} must be an iterable of parameters or parameter groups, "
                        "not a single tensor")
    out = []
    for item in params:
        if isinstance(item, dict):
            ps = item.get("params")
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            out.extend(ps)
        else:
            out.append(item)
    for p in out:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} contains a {type(p).__name__}, not a tensor")
        if not p.is_leaf:
            raise ValueError(f"{name} contains a non-leaf tensor")
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def _check_copies(name, upper: List[torch.Tensor], lower: List[torch.Tensor]) -> None:
    """P and S must be two float32 (or float64) copies of one block."""
    if len(upper) != len(lower) or any(a.shape != b.shape for a, b in zip(upper, lower)):
        raise ValueError(f"upper and lower parameters of {name!r} must be two copies of the "
                         "same PEFT block (same number of tensors, same shapes, same order)")
    for a, b in zip(upper, lower):
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"upper and lower parameters of {name!r} must have the same "
                             f"dtypes and devices (got {a.dtype} on {a.device} and "
                             f"{b.dtype} on {b.device})")
    for p in upper + lower:
        if not p.is_floating_point():
            raise TypeError("PEFT parameters must be floating point")
        if p.dtype not in PEFT_DTYPES:
            raise TypeError(
                f"PEFT parameters of {name!r} are {p.dtype}: P and S are trained "
                "first-order with Adam, whose eps and second moments underflow in 16-bit "
                "types. Keep the adapter in float32 (peft does so by default, "
                "autocast_adapter_dtype=True) and the backbone in 16 bits if you like")


class PeftPair:
    """One (P, S) PEFT pair with its optimizers, adapter switch and loss.

    ``upper``/``lower``: parameters or parameter groups of P and S; ``select_adapter(level)``
    makes the model's forward use P ("upper") or S ("lower"); ``loss_fn(batch)``: the scalar
    loss of the model on a batch. ``opt_cls(groups, lr=..., **opt_kwargs)`` makes S's
    optimizer and, with ``upper_optimizer``, P's."""

    def __init__(self, name, upper, lower, select_adapter, loss_fn, *, opt_cls, upper_lr,
                 lower_lr, opt_kwargs, upper_optimizer=True):
        self.name = name
        upper_groups, lower_groups = list(upper), list(lower)
        self.upper = param_list(upper_groups, f"upper_params ({name})")
        self.lower = param_list(lower_groups, f"lower_params ({name})")
        _check_copies(name, self.upper, self.lower)
        if not callable(select_adapter):
            raise TypeError("select_adapter must be callable: select_adapter('upper'|'lower')")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(batch) -> scalar loss tensor")
        self.select_adapter = select_adapter
        self.loss_fn = loss_fn
        self.opt_upper = (opt_cls(upper_groups, lr=upper_lr, **opt_kwargs)
                          if upper_optimizer else None)
        self.opt_lower = opt_cls(lower_groups, lr=lower_lr, **opt_kwargs)

    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.opt_upper, self.opt_lower) if o is not None]

    def snapshot(self):
        """A copy of P, S and their optimizers' states, for :meth:`restore`."""
        return ([t.detach().clone() for t in self.upper + self.lower],
                [copy.deepcopy(o.state_dict()) for o in self.optimizers()])

    def restore(self, snapshot) -> None:
        """Put P, S and their optimizers' states back as in ``snapshot`` (gradients cleared,
        P selected)."""
        weights, states = snapshot
        with torch.no_grad():
            for t, w in zip(self.upper + self.lower, weights):
                t.copy_(w)
                t.grad = None
            for o, s in zip(self.optimizers(), states):
                o.load_state_dict(s)
            self.select_adapter("upper")
