"""The check that a ZO loss runs without dropout, made once per optimizer at its first step.

A ZO step compares losses of the same batch at nearby weights; with dropout active every
evaluation draws a new mask, and the difference measures the masks, not the weights (a
forgotten ``model.eval()``). The optimizer sees parameters, not the model, so the check
watches what the loss actually runs: the first loss evaluation of an optimizer's first step
runs under a :class:`~torch.overrides.TorchFunctionMode` that notes every dropout call with
p > 0 in training mode (``nn.Dropout`` and its kin, ``F.dropout`` called by a model's own
code, attention dropout in ``F.scaled_dot_product_attention``), and an
:class:`ActiveDropoutWarning` follows if there was one. Later evaluations run unwatched.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class ActiveDropoutWarning(UserWarning):
    """The loss of a ZO step ran with dropout active (a module with p > 0 in training
    mode)."""


MESSAGE = ("the loss of this ZO step ran with dropout active ({what}): a module with "
           "dropout p > 0 is in training mode. Every loss evaluation then draws a new dropout "
           "mask, so the ZO loss differences are mask noise, not the effect of the weights. "
           "Call model.eval() before training (ZO methods need no dropout; ZOFOTrainer and "
           "zofo-train do this).")

# the Python dropout functions: (input, p=0.5, training=..., inplace=False), each with its
# own default for training
_PYTHON_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                    F.feature_alpha_dropout)
# the builtins they call: (input, p, train)
_BUILTIN_DROPOUTS = (torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                     torch.feature_alpha_dropout)
_SIGNATURES: Dict[Callable, inspect.Signature] = {}


def _argument(args, kwargs, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def dropout_rate(func: Callable, args, kwargs) -> float:
    """The dropout probability that the call ``func(*args, **kwargs)`` applies (0.0 when it
    is no dropout, or dropout in eval mode)."""
    if func is F.scaled_dot_product_attention:
        return float(_argument(args, kwargs, 4, "dropout_p", 0.0))
    if func in _PYTHON_DROPOUTS:
        sig = _SIGNATURES.get(func)
        if sig is None:
            sig = _SIGNATURES[func] = inspect.signature(func)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return 0.0
        bound.apply_defaults()
        return float(bound.arguments["p"]) if bound.arguments["training"] else 0.0
    if func in _BUILTIN_DROPOUTS:
        train = _argument(args, kwargs, 2, "train", False)
        return float(_argument(args, kwargs, 1, "p", 0.0)) if train else 0.0
    return 0.0


class DropoutWatch(TorchFunctionMode):
    """While active, ``found`` becomes the name of the first dropout call with p > 0."""

    def __init__(self):
        super().__init__()
        self.found: Optional[str] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None:
            try:
                rate = dropout_rate(func, args, kwargs)
            except (TypeError, ValueError):  # an argument that is no number: not our concern
                rate = 0.0
            if rate > 0:
                self.found = f"{getattr(func, '__name__', func)} with p = {rate:g}"
        return func(*args, **kwargs)


def watched_once(evaluate: Callable[[], Any], on_checked: Callable[[], None]
                 ) -> Callable[[], Any]:
    """``evaluate`` whose first call runs under a :class:`DropoutWatch`: an
    :class:`ActiveDropoutWarning` if that call used dropout, then ``on_checked()`` (the
    caller's "checked" mark; not called if the evaluation raised, so the next step checks
    again). Later calls run ``evaluate`` as it is."""
    state = {"done": False}

    def first_watched():
        if state["done"]:
            return evaluate()
        with DropoutWatch() as watch:
            value = evaluate()
        state["done"] = True
        on_checked()
        if watch.found is not None:
            warnings.warn(MESSAGE.format(what=watch.found), ActiveDropoutWarning)
        return value

    return first_watched
