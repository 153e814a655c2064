"""First-order steps of Bilevel-ZOFO's PEFT copies, guarded against non-finite values: a loss
or gradient that is not finite, or an optimizer step that writes a non-finite weight, makes no
update (gradients cleared, weights and optimizer state as before) and is reported to
``on_nonfinite(message)``, which raises or returns (the step is then skipped)."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from zofo_kernels.core.validation import loss_value

Losses = Sequence[Tuple[float, Callable[[], torch.Tensor]]]  # (weight, loss thunk)


@contextlib.contextmanager
def only_trainable(managed: Sequence[torch.Tensor], trainable: Sequence[torch.Tensor]):
    """Inside: requires_grad is True exactly for ``trainable`` among the ``managed`` tensors
    (restored afterwards)."""
    saved = [p.requires_grad for p in managed]
    keep = {id(p) for p in trainable}
    try:
        for p in managed:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in zip(managed, saved):
            p.requires_grad_(flag)


def _clear_grads(params) -> None:
    for p in params:
        p.grad = None


def backprop(params: Sequence[torch.Tensor], losses: Losses, *,
             managed: Sequence[torch.Tensor], on_nonfinite: Callable[[str], None],
             what: str) -> Tuple[Optional[List[float]], int]:
    """Backpropagate the weighted ``losses`` into ``params``' .grad (the only trainable tensors
    of ``managed`` meanwhile), one at a time so that only one forward graph is alive (FO-PEFT's
    activation peak). Returns (the unweighted loss values, or None with the grads cleared when
    a loss or gradient is not finite; the number of backward passes made)."""
    values, backwards = [], 0
    _clear_grads(params)
    with only_trainable(managed, params), torch.enable_grad():
        for weight, thunk in losses:
            loss = thunk()
            value = loss_value(loss)
            values.append(value)
            if not math.isfinite(value):
                _clear_grads(params)
                on_nonfinite(f"non-finite {what} loss ({value}); no update made")
                return None, backwards
            (loss * weight if weight != 1.0 else loss).backward()
            backwards += 1
            del loss
    if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
        _clear_grads(params)
        on_nonfinite(f"non-finite {what} gradient (finite loss {values}); no update made")
        return None, backwards
    return values, backwards


def guarded_step(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], *,
                 on_nonfinite: Callable[[str], None],
                 what: str) -> Optional[List[torch.Tensor]]:
    """``opt.step()`` on gradients already in ``params`` (cleared afterwards); undone if it
    wrote a non-finite weight. Returns the weights from before the step when it was kept,
    else None."""
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    opt.step()
    _clear_grads(params)
    if all(bool(torch.isfinite(p).all()) for p in params):
        return before
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    opt.load_state_dict(state)
    on_nonfinite(f"the first-order {what} step produced non-finite weights; undone")
    return None
