"""Small models and datasets shared by the optimizer and trainer tests, and the (backend,
device) cases the kernel tests parametrize over."""

from __future__ import annotations

import pytest
import torch


def backend_cases():
    """(backend, device) pytest params of every available kernel backend; without a GPU the
    cuda and triton GPU cases are still listed (marked gpu), so they show as skipped, never
    silently absent."""
    import zofo_kernels as zk
    from zofo_kernels.core.backends import base
    out = []
    for name, st in zk.available_backends().items():
        if not st.available:
            continue
        backend = base.get(name)
        if backend.supports_device(torch.device("cpu")):
            out.append(pytest.param(name, "cpu", id=f"{name}-cpu"))
        if torch.cuda.is_available() and backend.supports_device(torch.device("cuda")):
            out.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu))
    if not torch.cuda.is_available():
        for name in ("cuda", "triton"):
            out.append(pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu))
    return out


class Rows(torch.utils.data.Dataset):
    """A map-style dataset over a list of ready examples (dicts of token ids and a label)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class AdapterNet(torch.nn.Module):
    """A backbone (body: Linear 6 -> 8, tanh; head: Linear 8 -> ``classes``) with residual
    adapters (Linear 8 -> 8, no bias) by name: forward(x) = head(h + adapters[active](h)),
    h = tanh(body(x)), with the backbone in ``self.dtype`` (float32 until :meth:`mix`) and the
    adapters in float32. The modules are made in the order body, head, adapters (their default
    initialisation draws the global RNG); subclasses set the weights with :meth:`randomize_`."""

    def __init__(self, classes, adapters, active):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, classes)
        self.adapters = torch.nn.ModuleDict(
            {name: torch.nn.Linear(8, 8, bias=False) for name in adapters})
        self.active = active
        self.dtype = torch.float32

    def forward(self, x):
        h = torch.tanh(self.body(x.to(self.dtype))).float()
        h = h + self.adapters[self.active](h)
        return self.head(h.to(self.dtype)).float()

    def backbone(self):
        return [self.body.weight, self.body.bias, self.head.weight, self.head.bias]

    @staticmethod
    def randomize_(params, generator, scale):
        """Each of ``params`` in turn <- ``scale`` * standard normal values from ``generator``."""
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)

    def tie_(self, adapter, to):
        """Adapter ``adapter`` starts as a copy of adapter ``to``."""
        with torch.no_grad():
            self.adapters[adapter].weight.copy_(self.adapters[to].weight)

    def mix(self, dtype):
        """The backbone in ``dtype`` on the grid of :meth:`to_grid`; the adapters stay float32
        (as peft keeps them)."""
        self.body.to(dtype)
        self.head.to(dtype)
        self.dtype = dtype
        self.to_grid()

    def to_grid(self):
        """Dyadic backbone weights on a 1/64 grid in [-1, 1]: the Rademacher round trip with
        eps = 2**-6 is then exact in every dtype."""
        with torch.no_grad():
            for p in self.backbone():
                p.copy_((p.float().clamp(-1, 1) * 64).round() / 64)


def with_fault(loss_fn, fault, calls, error=RuntimeError):
    """``loss_fn`` with a fault at one call: ``calls["n"]`` counts the calls, and the one at
    which it reaches ``calls["at"]`` raises ``error("injected")`` (fault "raise"), raises
    KeyboardInterrupt ("interrupt") or returns the loss times NaN ("nan")."""

    def fn(batch):
        calls["n"] += 1
        loss = loss_fn(batch)
        if calls["n"] == calls["at"]:
            if fault == "raise":
                raise error("injected")
            if fault == "interrupt":
                raise KeyboardInterrupt
            return loss * float("nan")
        return loss

    return fn


def full_head_label_logits(model, batch: dict) -> torch.Tensor:
    """The label-word logits of a prompt-based causal LM read off the full LM head over every
    position: the slow way, the reference the library's label-rows-only path is tested
    against."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=input_ids, attention_mask=mask)
    logits = out.logits if hasattr(out, "logits") else out[0]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.tensor(base.config.zofo_label_token_ids, device=logits.device)
    shift = logits.shape[1] - input_ids.shape[1]
    last = mask.long().sum(1) - 1 + shift
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last][:, ids]
