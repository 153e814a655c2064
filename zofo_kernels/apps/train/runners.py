"""The runners: one method's training step over batch streams, with forward/backward counters.

:func:`make_runner` puts the PEFT block on the model (PEFT methods), draws the batch streams
and builds the runner, whose optimizer is the method's recipe on the run's resolved settings
(``config.method.build(model, config.settings)``).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from zofo_kernels.apps import data as data_mod
from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.measure import CountedLoss
from zofo_kernels.apps.train.config import RunConfig
from zofo_kernels.apps.train.inputs import to_device
from zofo_kernels.integrations.methods import Method


class Drawn:
    """A batch stream that counts the batches it handed out: its position, saved for
    ``--resume``, which rebuilds the stream from its seed and skips that many."""

    def __init__(self, stream: Iterator[dict]):
        self.stream = stream
        self.drawn = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.drawn += 1
        return next(self.stream)

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self.stream)
        self.drawn += n


class Runner(abc.ABC):
    """One method's training step over batch streams, with forward/backward counters.

    ``forward_count`` counts model forward passes over a batch and ``backward_count``
    backward passes (a forward pass and its backward are counted separately)."""

    opt: Any
    lower_adapter: Optional[str] = None  # Bilevel-ZOFO: the name of S's adapter

    def __init__(self, method: Method, model: torch.nn.Module, loss_fn: Callable,
                 streams: Dict[str, Iterator[dict]], device: torch.device):
        self.method = method.name
        self.model = self.eval_model = model
        self.loss = CountedLoss(loss_fn)
        self.streams = {name: s if isinstance(s, Drawn) else Drawn(s)
                        for name, s in streams.items()}
        self.device = device
        self.backward_count = 0
        # under torchrun: the data-parallel driver of a ZO optimizer (DataParallelZO), or the
        # context whose gradient all-reduce a first-order runner uses
        self.data_parallel = None
        self.dist_context = None

    def _next(self, stream: str) -> dict:
        return to_device(next(self.streams[stream]), self.device)

    def _optimizer_step(self, *args):
        return (self.data_parallel or self.opt).step(*args)

    @property
    def forward_count(self) -> int:
        return self.loss.calls

    @abc.abstractmethod
    def step(self) -> float:
        """One training step; returns the step's training loss."""

    def diagnostics(self) -> Optional[dict]:
        """The last step's inside view for metrics.jsonl (None: this method has none)."""
        return None

    def optimizer_state(self) -> dict:
        """What ``--resume`` needs besides the weights: the optimizer's state dict (ZO seed
        counter, Adam moments) and the forward/backward counters."""
        return {"optimizer": self.opt.state_dict(), "forward_count": self.forward_count,
                "backward_count": self.backward_count}

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.loss.calls = int(state["forward_count"])
        self.backward_count = int(state["backward_count"])


class ZORunner(Runner):
    """ZO-SGD with the fused kernels: MeZO (all weights) or ZO on a PEFT block."""

    def __init__(self, method: Method, model, loss_fn, batches: Iterator[dict], device,
                 settings):
        super().__init__(method, model, loss_fn, {"train": batches}, device)
        self.opt = method.build(model, settings)

    def step(self) -> float:
        batch = self._next("train")
        losses = []

        def closure():
            value = self.loss(self.model, batch)
            losses.append(float(value))
            return value

        with torch.no_grad():
            self._optimizer_step(closure)
        return sum(losses) / len(losses)


class FORunner(Runner):
    """First-order fine-tuning with Adam: all weights (fo-full) or a PEFT block (fo-lora)."""

    def __init__(self, method: Method, model, loss_fn, batches, device, settings):
        super().__init__(method, model, loss_fn, {"train": batches}, device)
        self.opt = method.build(model, settings)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

    def step(self) -> float:
        batch = self._next("train")
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model, batch)
        loss.backward()
        self.backward_count += 1
        if self.dist_context is not None:
            from zofo_kernels.core.distributed import allreduce_gradients
            allreduce_gradients(self.params, self.dist_context)
        self.opt.step()
        return float(loss.detach())


class BilevelRunner(Runner):
    """Bilevel-ZOFO (``zofo_kernels.core.optim.ZOFOOptimizer``): the inner FO steps on the
    lower copy S, one FO step on the upper copy P, one fused ZO step on the backbone.

    ``streams``: "lower" (D_g), "upper" (D_f) and, for a fresh B_g per upper step as in the
    authors' code, "penalty" (a second D_g stream); without it B_g is the last lower batch."""

    def __init__(self, method: Method, model, loss_fn, streams: Dict[str, Iterator[dict]],
                 device, settings):
        super().__init__(method, model, loss_fn, streams, device)
        self.opt = method.build(model, settings, loss_fn=lambda batch: self.loss(model, batch))
        self.lower_adapter = self.opt.adapter_names["lower"]
        self.last_result = None

    @property
    def forward_count(self) -> int:
        return int(self.opt.forward_count)

    @property
    def backward_count(self) -> int:  # type: ignore[override]
        return int(self.opt.backward_count)

    @backward_count.setter
    def backward_count(self, value) -> None:
        pass  # counted by the optimizer

    def step(self) -> float:
        fresh = "penalty" in self.streams
        upper = self._next("upper")
        n_lower = self.opt.inner_steps if fresh else max(1, self.opt.inner_steps)
        lowers = [self._next("lower") for _ in range(n_lower)]
        extra = [self._next("penalty")] if fresh else []
        self.last_result = self._optimizer_step(upper, lowers, *extra)
        return float(self.last_result.upper_loss)

    def diagnostics(self) -> Optional[dict]:
        """The last outer step's inside view (metrics.jsonl rows of kind "bilevel")."""
        r = self.last_result
        if r is None:
            return None
        return dict(f=r.upper_loss, g_upper=r.penalty_loss, g_lower=r.lower_penalty_loss,
                    gap=r.gap, objective=r.objective, projected_grads=r.projected_grads,
                    slopes=r.slopes, theta_step_rms=r.theta_step_rms,
                    lower_losses=r.lower_losses, skipped=r.skipped)

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])  # the counters are the optimizer's


def make_runner(config: RunConfig, model, device, encoded: Dict[str, Any],
                rank: int = 0) -> Runner:
    """The method's runner on ``model`` (wrapped with its PEFT block first if it has one).
    ``encoded``: the encoded example sets its streams draw from: "lower" and "upper"
    (Bilevel-ZOFO), "train" (the others)."""
    method, m = config.method, config.model
    loss_fn = models_mod.classification_loss
    stream_seed = config.seed + 1000 * rank  # each data-parallel rank draws its own batches

    def stream(name: str, offset: int):
        return data_mod.BatchStream(encoded[name], config.data.batch_size, stream_seed + offset)

    if method.peft:
        model = models_mod.add_peft(model, m.peft, lora_r=m.lora_r, lora_alpha=m.lora_alpha,
                                    num_virtual_tokens=m.num_virtual_tokens)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()  # no dropout: see the package docstring
    if method.name == "bilevel-zofo":
        streams = {"lower": stream("lower", 1), "upper": stream("upper", 2)}
        if config.settings.penalty_batch == "fresh":
            streams["penalty"] = stream("lower", 3)
        try:
            return BilevelRunner(method, model, loss_fn, streams, device, config.settings)
        except ValueError as exc:  # a setting the optimizer refuses (e.g. --backbone-regex)
            raise SystemExit(f"zofo-train: {exc}") from None
    runner_cls = ZORunner if method.zeroth_order else FORunner
    return runner_cls(method, model, loss_fn, stream("train", 1), device, config.settings)


def wire_data_parallel(runner: Runner, ctx) -> None:
    """Under torchrun: first-order runners all-reduce their gradients, ZO runners step
    through ``DataParallelZO`` (one all-reduce of the step's losses)."""
    if not ctx.distributed:
        return
    from zofo_kernels.core import distributed as dist_mod
    if isinstance(runner, FORunner):
        runner.dist_context = ctx
    else:
        runner.data_parallel = dist_mod.DataParallelZO(runner.opt, model=runner.model,
                                                       context=ctx)
