"""Where each ZO parameter sits in the global noise index space.

The noise contract (docs/noise-contract.md) gives element j of a parameter whose first element
sits at global offset o the noise of index o + j. The optimizers lay all of their parameters
end to end in ``param_groups`` order (group 0's parameters first, each group's parameters in
the order the user gave them). This module is the single place that decides the mapping
parameter -> (tensor updated in place, global offset), so that a sharded parameter can later
map to its local shard and that shard's own offset without touching the optimizers.
"""

from __future__ import annotations

from typing import Iterable, List, Mapping, Sequence, Tuple

import torch

Layout = List[List[Tuple[torch.Tensor, int]]]


def sharded_parameter(param_groups: Sequence[Mapping]):
    """The first parameter that is a DTensor with a non-replicated placement (an FSDP2
    shard), or None: the settings that need whole tensors on every rank refuse it."""
    for g in param_groups:
        for p in g["params"]:
            placements = getattr(p, "placements", None)
            if placements is not None and not all(pl.is_replicate() for pl in placements):
                return p
    return None


def zo_numel(param_groups: Sequence[Mapping]) -> int:
    """Total number of elements of all parameters of all groups (the index space size)."""
    return sum(p.numel() for g in param_groups for p in g["params"])


def _dtensor_entry(p, pos: int) -> Tuple[torch.Tensor, int]:
    """(local shard, its global offset) of a DTensor parameter whose first element sits at
    ``pos`` in the canonical layout."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in p.placements:
        if type(placement) is Replicate or (type(placement) is Shard and placement.dim == 0):
            continue
        raise ValueError(
            f"ZO parameter of global shape {tuple(p.shape)} has placements "
            f"{p.placements}: only Replicate and Shard(0) (FSDP2 fully_shard) keep a local "
            "shard one contiguous range of the global noise index; reshard it along dim 0")
    local = p.detach().to_local()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                          p.placements)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(
            f"local shard of shape {tuple(local.shape)} does not match the shape "
            f"{tuple(shape)} that the placements {p.placements} give for global shape "
            f"{tuple(p.shape)}")
    if p.dim() == 0 or local.numel() == 0:
        return local, pos
    row_numel = 1
    for n in p.shape[1:]:
        row_numel *= n
    return local, pos + offset[0] * row_numel


def zo_layout(param_groups: Sequence[Mapping], trainable_only: bool = False) -> Layout:
    """Per group, the list of ``(tensor to update in place, global offset)``.

    Offsets follow the canonical layout: all parameters of all groups laid end to end in
    ``param_groups`` order. Empty parameters keep their place (they occupy no indices).
    With ``trainable_only``, parameters with ``requires_grad=False`` get no entry but keep
    their place too, so freezing a parameter never changes the noise of the others.

    A parameter that is a DTensor (FSDP2 ``fully_shard``: placement ``Shard(0)`` on each mesh
    dimension, or ``Replicate``) occupies the offsets of its global shape; its entry is the
    local shard, whose offset is the parameter's offset + first_row * row_numel, so each rank
    perturbs and updates exactly its slice of the unsharded run. Uneven and empty last shards
    follow from the DTensor's own shard layout. Other placements (``Shard(d)`` with d > 0,
    ``Partial``, strided shards) do not make the local shard one contiguous index range and
    raise ``ValueError``.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: every parameter is a plain tensor
        DTensor = ()

    out: Layout = []
    pos = 0
    for group in param_groups:
        entries = []
        for p in group["params"]:
            if trainable_only and not p.requires_grad:
                pass
            elif isinstance(p, DTensor):
                entries.append(_dtensor_entry(p, pos))
            else:
                entries.append((p.detach(), pos))
            pos += p.numel()
        out.append(entries)
    return out


def split_by_device(entries: Iterable[Tuple[torch.Tensor, int]]):
    """``{device: ([tensors], [offsets])}``: one kernel call per device of a group."""
    by_dev = {}
    for t, off in entries:
        if t.numel() == 0:
            continue
        ts, offs = by_dev.setdefault(t.device, ([], []))
        ts.append(t)
        offs.append(off)
    return by_dev
