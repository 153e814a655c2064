"""The peft side of ``from_peft``: adapters of a ``peft.PeftModel`` as Bilevel-ZOFO's P and
S copies, and its backbone as theta. Every function that adds adapters leaves the model as it
was given when it fails."""

from __future__ import annotations

import copy
import re
from typing import List, Optional, Tuple

import torch

from zofo_kernels.core.optim.peft_pair import LEVELS


def adapter_names(peft_model) -> List[str]:
    """The adapter names of a ``peft.PeftModel`` (anything else is refused)."""
    cfg = getattr(peft_model, "peft_config", None)
    if not isinstance(cfg, dict) or not hasattr(peft_model, "set_adapter"):
        raise TypeError("from_peft needs a peft.PeftModel (got "
                        f"{type(peft_model).__name__})")
    return list(cfg)


def adapter_params(peft_model, adapter: str):
    """{name with the adapter component removed: parameter} of one adapter."""
    out = {}
    for name, p in peft_model.named_parameters():
        parts = name.split(".")
        if adapter in parts:
            key = ".".join(x for x in parts if x != adapter)
            out[key] = p
    return out


def check_new_adapter_name(peft_model, name: str) -> None:
    """``name`` can be added as an adapter: a non-empty string that names no adapter and no
    module of the model."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
    if name in peft_model.peft_config:
        raise ValueError(f"the model already has an adapter named {name!r}")
    modules = {part for n, _ in peft_model.named_modules() for part in n.split(".")}
    if name in modules:
        raise ValueError(f"adapter name {name!r} is also the name of a module of the model; "
                         "peft would confuse the two: choose another name")


def copy_adapter(peft_model, source: str, target: str) -> None:
    """Add adapter ``target`` with ``source``'s config and a copy of its current weights. On
    failure the model is left without ``target``."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    check_new_adapter_name(peft_model, target)
    try:
        peft_model.add_adapter(target, copy.deepcopy(peft_model.peft_config[source]))
        sd = get_peft_model_state_dict(peft_model, adapter_name=source)
        set_peft_model_state_dict(peft_model, sd, adapter_name=target)
        src, dst = adapter_params(peft_model, source), adapter_params(peft_model, target)
        if set(src) != set(dst):
            raise RuntimeError(f"adapter copy {target!r} does not mirror {source!r}")
        with torch.no_grad():  # exact copy, whatever the loader did (e.g. dtype casts)
            for k, p in src.items():
                dst[k].copy_(p)
    except BaseException:
        remove_adapters(peft_model, [target], source)
        raise


def remove_adapters(peft_model, names, active: str) -> None:
    """Make ``active`` the active adapter and delete those of ``names`` that exist."""
    peft_model.set_adapter(active)
    for name in names:
        if name in peft_model.peft_config:
            peft_model.delete_adapter(name)


def backbone_named_params(peft_model) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that belongs to no adapter. Excluded too: peft's
    ``original_module`` copies of modules_to_save, which no forward uses while an adapter is
    active."""
    adapters = set(adapter_names(peft_model))
    out = []
    for name, p in peft_model.named_parameters():
        parts = set(name.split("."))
        if parts & adapters or "original_module" in parts:
            continue
        out.append((name, p))
    if not out:
        raise ValueError("the PEFT model has no backbone parameters")
    return out


def select_backbone(peft_model, backbone_params=None,
                    backbone_regex: Optional[str] = None) -> List[torch.nn.Parameter]:
    """theta of ``from_peft``: ``backbone_params`` when given, else every non-adapter
    parameter, or those of them whose name matches ``backbone_regex`` (``re.search``)."""
    if backbone_regex is None:
        return ([p for _, p in backbone_named_params(peft_model)] if backbone_params is None
                else backbone_params)
    if backbone_params is not None:
        raise ValueError("give backbone_params or backbone_regex, not both")
    if not isinstance(backbone_regex, str) or not backbone_regex:
        raise ValueError(f"backbone_regex must be a non-empty regular expression, got "
                         f"{backbone_regex!r}")
    try:
        pattern = re.compile(backbone_regex)
    except re.error as exc:
        raise ValueError(f"backbone_regex {backbone_regex!r} is not a valid regular "
                         f"expression: {exc}") from None
    named = backbone_named_params(peft_model)
    chosen = [p for n, p in named if pattern.search(n)]
    if not chosen:
        examples = ", ".join(n for n, _ in named[:4])
        raise ValueError(f"backbone_regex {backbone_regex!r} matches no backbone parameter "
                         f"(names look like: {examples}, ...)")
    return chosen


def pair_from_adapters(peft_model, upper: str, lower: str):
    """(P's parameters, S's parameters, ``select_adapter``) of the adapters ``upper`` and
    ``lower``, in one order of their parameter names."""
    up, low = adapter_params(peft_model, upper), adapter_params(peft_model, lower)
    if not up:
        raise ValueError(f"adapter {upper!r} has no parameters")
    keys = sorted(up)
    if set(keys) != set(low):
        raise ValueError(f"adapters {upper!r} and {lower!r} do not have the same parameters")

    def select(level: str):
        if level not in LEVELS:
            raise ValueError(f"level must be 'upper' or 'lower', got {level!r}")
        peft_model.set_adapter(upper if level == "upper" else lower)

    return [up[k] for k in keys], [low[k] for k in keys], select
