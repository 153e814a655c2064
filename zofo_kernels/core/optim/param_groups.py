"""zo_param_groups: the usual two parameter groups (weight decay for weight matrices, none
for biases, normalisation weights and other vectors), for any optimizer of this package."""

from __future__ import annotations

from typing import Callable, List, Sequence, Union

import torch

from zofo_kernels.core.validation import real


def _is_norm_module(module: torch.nn.Module) -> bool:
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
    rms = getattr(torch.nn, "RMSNorm", None)
    if rms is not None:
        norm_types = norm_types + (rms,)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def zo_param_groups(model_or_named_params, weight_decay: float,
                    no_decay: Union[None, Sequence[str], Callable[[str, torch.Tensor], bool]] = None,
                    trainable_only: bool = True) -> List[dict]:
    """Two parameter groups: ``weight_decay`` for weight matrices, 0 for the rest.

    ``model_or_named_params``: an ``nn.Module`` or an iterable of ``(name, parameter)``.
    ``no_decay`` decides which parameters get no weight decay:

    * ``None`` (default): biases (names ending in "bias"), every parameter of a normalisation
      module (LayerNorm, RMSNorm, GroupNorm, BatchNorm, any module class whose name contains
      "Norm"; only detectable when a module is given) and every parameter with at most one
      dimension;
    * a sequence of strings: a parameter is excluded when its name contains one of them;
    * a callable ``(name, parameter) -> bool``.

    With ``trainable_only`` (default) parameters with ``requires_grad=False`` are left out.
    Parameter order is the model's order within each group; empty groups are dropped.
    """
    wd = real(weight_decay, "weight_decay", nonneg=True)
    norm_names = set()
    if isinstance(model_or_named_params, torch.nn.Module):
        for mod_name, mod in model_or_named_params.named_modules():
            if _is_norm_module(mod):
                for pn, _ in mod.named_parameters(recurse=False):
                    norm_names.add(f"{mod_name}.{pn}" if mod_name else pn)
        named = list(model_or_named_params.named_parameters())
    else:
        named = list(model_or_named_params)
        for i, item in enumerate(named):
            if (not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], str)
                    or not isinstance(item[1], torch.Tensor)):
                raise TypeError(f"item {i} is not a (name, parameter) pair")
    if no_decay is None:
        def excluded(name, p):
            return name.endswith("bias") or name in norm_names or p.dim() <= 1
    elif callable(no_decay):
        excluded = no_decay
    elif isinstance(no_decay, (list, tuple)) and all(isinstance(s, str) for s in no_decay):
        patterns = tuple(no_decay)

        def excluded(name, p):
            return any(s in name for s in patterns)
    else:
        raise TypeError("no_decay must be None, a sequence of strings or a callable")
    decay, keep = [], []
    for name, p in named:
        if trainable_only and not p.requires_grad:
            continue
        (keep if excluded(name, p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": wd})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no parameters selected (all frozen?)")
    return groups
