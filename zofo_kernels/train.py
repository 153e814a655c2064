"""zofo-train: few-shot fine-tuning of a sequence classifier with ZO, FO or Bilevel-ZOFO.

Methods
  bilevel-zofo  backbone by ZO-SGD (fused kernels), PEFT block by FO (Adam), bilevel penalty
  mezo          all weights by ZO-SGD (fused kernels)
  mezo-lora     the PEFT block (LoRA by default) by ZO-SGD
  fo-lora       the PEFT block (LoRA by default) by Adam
  fo-full       all weights by Adam

Example (MiniLM on SST-2, 1,000 examples, 15 minutes):
  zofo-train --model minilm --method bilevel-zofo --peft lora \\
      --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv \\
      --num-train 1000 --time-budget 900 --seed 0 --output runs/bzofo

Outputs in --output: metrics.jsonl (one row per log/eval event), summary.json, curves.png,
and the trained model in the layout of :mod:`zofo_kernels.checkpoint`: ``model/`` (the
backbone, a ``save_pretrained`` checkpoint, with the tokenizer), ``adapter/`` (PEFT methods:
the prediction adapter, Bilevel-ZOFO's P), ``resume/`` (S, optimizer state, run state) and
``zofo_checkpoint.json``. ``zofo_kernels.load_trained(folder)`` reloads the trained model
exactly; ``zofo-train --resume FOLDER --steps N`` continues the run bit for bit.
Dropout is disabled for every method (the model stays in eval mode), as in MeZO's ZO passes,
so that all methods optimise the same deterministic objective.

Heads (``--head``): ``prompt`` (default) classifies through the pretrained model with a
template and label words (``--template``, ``--label-words``; SST-2's "{sentence} It was" /
terrible,great), as MeZO and Bilevel-ZOFO do; the head belongs to the backbone, so PEFT
methods train the adapter only and every method starts from the same zero-shot classifier.
``random`` adds a new classification head, trained with the adapter by PEFT methods.

Model selection without dev data: at every evaluation the mean loss on the upper-level set
D_f (the last ``--upper-fraction`` of the sample; for methods other than Bilevel-ZOFO these
examples are part of their training data) is measured too, and the evaluation at its lowest
value is reported as ``selected_eval_accuracy`` (as the Bilevel-ZOFO code keeps the best
checkpoint by D_f loss); with saving on, that model is also written to ``best/``.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from . import checkpoint as ckpt_mod
from . import data as data_mod
from . import models as models_mod

METHODS = ("bilevel-zofo", "mezo", "mezo-lora", "fo-lora", "fo-full")

# Per-method defaults for a ~20 M-parameter model; every one can be overridden on the
# command line. The SST-2 study picks them by a sweep on held-out training examples.
DEFAULTS = {
    "mezo": dict(lr=1e-5, eps=1e-3, estimator="central"),
    "mezo-lora": dict(lr=1e-3, eps=1e-2, estimator="central"),
    "fo-lora": dict(lr=1e-3),
    "fo-full": dict(lr=3e-5),
    # lr: the SST-2 study's sweep choice (benchmarks/results/study_v2/: rms lr 1e-4 ended at
    # 0.832 on held-out training examples after 555 outer steps, 1e-3 fell from 0.834 to
    # 0.762); lam and the rest provisional until the study's lambda and main phases
    "bilevel-zofo": dict(lr=1e-4, eps=1e-3, peft_lr=1e-3, lam=10.0, inner_steps=3,
                         estimator="forward", theta_update="rms", order="official",
                         penalty_batch="fresh"),
}
HEADS = models_mod.HEADS


# --------------------------------------------------------------------------- utilities

def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


class Counter:
    """Wraps a loss function, counting and timing its calls (forward passes)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


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


# --------------------------------------------------------------------------- methods

class Runner(abc.ABC):
    """One method's training step over batch streams, with forward/backward counters.

    ``forward_count`` counts model forward passes over a batch and ``backward_count``
    backward passes (a forward pass and its backward are counted separately)."""

    method: str
    eval_model: torch.nn.Module
    model: torch.nn.Module
    opt: Any
    streams: Dict[str, Drawn]
    lower_adapter: Optional[str] = None  # Bilevel-ZOFO: the name of S's adapter

    def __init__(self, loss_fn: Callable):
        self.loss = Counter(loss_fn)
        self.backward_count = 0
        # under torchrun: the data-parallel driver of a ZO optimizer (DataParallelZO), or the
        # context whose gradient all-reduce a first-order runner uses
        self.data_parallel = None
        self.dist_context = None

    def _optimizer_step(self, *args):
        return (self.data_parallel or self.opt).step(*args)

    @property
    def forward_count(self) -> int:
        return self.loss.calls

    @abc.abstractmethod
    def step(self) -> float:
        """One training step; returns the step's training loss."""

    def optimizer_state(self) -> dict:
        """What ``--resume`` needs besides the weights: the optimizer's state dict (ZO seed
        counter, Adam moments) and the forward/backward counters."""
        return {"optimizer": self.opt.state_dict(), "forward_count": self.forward_count,
                "backward_count": self.backward_count}

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.loss.calls = int(state["forward_count"])
        self.backward_count = int(state["backward_count"])


def _peft_params(model) -> List[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the PEFT model has no trainable parameters")
    return params


class _OneStreamRunner(Runner):
    """A method that trains one set of weights from one batch stream: all weights, or the
    PEFT block when ``peft`` (ZO-SGD and Adam runners share this)."""

    def __init__(self, method, model, loss_fn, batches: Iterator[dict], device, peft):
        super().__init__(loss_fn)
        self.method = method
        self.model = self.eval_model = model
        self.batches = batches if isinstance(batches, Drawn) else Drawn(batches)
        self.streams = {"train": self.batches}
        self.device = device
        self.peft = peft

    def _trained_params(self) -> List[torch.nn.Parameter]:
        if self.peft:
            return _peft_params(self.model)
        for p in self.model.parameters():
            p.requires_grad_(True)
        return list(self.model.parameters())


class ZORunner(_OneStreamRunner):
    """ZO-SGD with the fused kernels (``zofo_kernels.optim.ZOOptimizer``): MeZO (all
    weights, groups from ``zo_param_groups`` so biases/norms skip weight decay) or ZO on a
    PEFT block."""

    def __init__(self, method, model, loss_fn, batches: Iterator[dict], device, lr, eps,
                 weight_decay, distribution, estimator, n_directions, seed, backend, peft):
        super().__init__(method, model, loss_fn, batches, device, peft)
        from .optim import ZOOptimizer, zo_param_groups
        trained = self._trained_params()
        # full ZO: biases and norms in a group without weight decay
        params = ([{"params": trained, "weight_decay": weight_decay}] if peft
                  else zo_param_groups(model, weight_decay))
        self.opt = ZOOptimizer(params, lr=lr, eps=eps, weight_decay=weight_decay,
                               distribution=distribution, estimator=estimator,
                               n_directions=n_directions, seed=seed, backend=backend)

    def step(self) -> float:
        batch = _to(next(self.batches), self.device)
        losses = []

        def closure():
            value = self.loss(self.model, batch)
            losses.append(float(value))
            return value

        with torch.no_grad():
            self._optimizer_step(closure)
        return sum(losses) / len(losses)


class FORunner(_OneStreamRunner):
    """First-order fine-tuning with Adam: all weights (fo-full) or a PEFT block (fo-lora)."""

    def __init__(self, method, model, loss_fn, batches, device, lr, weight_decay, peft):
        super().__init__(method, model, loss_fn, batches, device, peft)
        self.params = self._trained_params()
        self.opt = torch.optim.Adam(self.params, lr=lr, weight_decay=weight_decay)

    def step(self) -> float:
        batch = _to(next(self.batches), self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model, batch)
        loss.backward()
        self.backward_count += 1
        if self.dist_context is not None:
            from .distributed import allreduce_gradients
            allreduce_gradients(self.params, self.dist_context)
        self.opt.step()
        return float(loss.detach())


class BilevelRunner(Runner):
    """Bilevel-ZOFO (``zofo_kernels.optim.ZOFOOptimizer``): K inner FO steps on the lower
    copy S, one FO step on the upper copy P, one fused ZO step on the backbone."""

    method = "bilevel-zofo"

    def __init__(self, model, loss_fn, lower: Iterator[dict], upper: Iterator[dict], device,
                 lr, penalty: Optional[Iterator[dict]] = None, **settings):
        """``penalty``: the stream of fresh B_g batches for the upper step (a second D_g
        iterator, as in the authors' code); None: B_g is the last lower batch. ``settings``:
        the keyword settings of :class:`ZOFOOptimizer`."""
        super().__init__(loss_fn)
        from .optim import ZOFOOptimizer
        self.model = self.eval_model = model
        self.lower = lower if isinstance(lower, Drawn) else Drawn(lower)
        self.upper = upper if isinstance(upper, Drawn) else Drawn(upper)
        self.streams = {"lower": self.lower, "upper": self.upper}
        self.penalty = None
        if penalty is not None:
            self.penalty = penalty if isinstance(penalty, Drawn) else Drawn(penalty)
            self.streams["penalty"] = self.penalty
        self.device = device
        self.inner_steps = settings.get("inner_steps", 10)
        self.opt = ZOFOOptimizer.from_peft(
            model, lambda batch: self.loss(model, batch), lr=lr,
            peft_optimizer=torch.optim.Adam, **settings)
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
        upper = _to(next(self.upper), self.device)
        n_lower = self.inner_steps if self.penalty is not None else max(1, self.inner_steps)
        lowers = [_to(next(self.lower), self.device) for _ in range(n_lower)]
        if self.penalty is not None:
            result = self._optimizer_step(upper, lowers, _to(next(self.penalty), self.device))
        else:
            result = self._optimizer_step(upper, lowers)
        self.last_result = result
        return float(result.upper_loss)

    def diagnostics(self) -> dict:
        """The last outer step's inside view (metrics.jsonl rows of kind "bilevel")."""
        r = self.last_result
        if r is None:
            return {}
        return dict(f=r.upper_loss, g_upper=r.penalty_loss, g_lower=r.lower_penalty_loss,
                    gap=r.gap, objective=r.objective, projected_grads=r.projected_grads,
                    slopes=r.slopes, theta_step_rms=r.theta_step_rms,
                    lower_losses=r.lower_losses, skipped=r.skipped)

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])  # the counters are the optimizer's


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zofo-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Methods: " + ", ".join(METHODS) + ". Hyperparameters not given take the "
               "method's default (see DEFAULTS in zofo_kernels/train.py).")
    p.add_argument("--model", default="minilm",
                   help="minilm, opt-125m, opt-350m, opt-1.3b, tiny-bert, tiny-opt, or a local "
                        "model folder / hub id (default: minilm)")
    p.add_argument("--method", choices=METHODS, help="training method (required)")
    p.add_argument("--peft", default="lora", choices=models_mod.PEFT_KINDS,
                   help="PEFT block for bilevel-zofo, mezo-lora and fo-lora (default: lora)")
    p.add_argument("--head", default="prompt", choices=HEADS,
                   help="prompt: classify through the pretrained model with a template and "
                        "label words (the head is in the backbone); random: a new "
                        "classification head (default: prompt)")
    p.add_argument("--template", default=None,
                   help='prompt head: the template, with {sentence} once (default: '
                        '"{sentence} It was")')
    p.add_argument("--label-words", default=None,
                   help="prompt head: one word per class, comma-separated, in class order "
                        "(default: terrible,great)")
    p.add_argument("--train",
                   help="training data (required): .tsv/.csv/.jsonl file or a datasets name")
    p.add_argument("--eval", default=None,
                   help="evaluation data (same formats); optional with --holdout")
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--label-column", default="label")
    p.add_argument("--num-train", type=int, default=1000,
                   help="few-shot sample size drawn from --train with --data-seed (default 1000)")
    p.add_argument("--holdout", type=int, default=0,
                   help="also draw this many further training examples (disjoint from the "
                        "sample) and evaluate on them instead of --eval (model selection)")
    p.add_argument("--upper-fraction", type=float, default=1 / 3,
                   help="bilevel-zofo: share of the sample used as upper-level set D_f (1/3)")
    p.add_argument("--eval-max", type=int, default=None,
                   help="evaluate on at most this many examples (a seeded sample)")
    p.add_argument("--steps", type=int, default=None, help="number of training steps")
    p.add_argument("--time-budget", type=float, default=None,
                   help="training wall-clock budget in seconds (evaluation time not counted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the few-shot sample (default: --seed)")
    p.add_argument("--output", help="output folder (required; created)")
    p.add_argument("--resume", default=None, metavar="FOLDER",
                   help="continue the run saved in FOLDER (its output folder) bit for bit; "
                        "--steps / --time-budget then give the new totals; the other settings "
                        "are the saved ones (--output defaults to FOLDER)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-every", type=float, default=None,
                   help="evaluate every this many training seconds (default: budget/15, or "
                        "every steps/10 steps when only --steps is given)")
    p.add_argument("--eval-every-steps", type=int, default=None)
    p.add_argument("--log-every", type=int, default=10, help="write a loss row every N steps")
    h = p.add_argument_group("hyperparameters")
    h.add_argument("--lr", type=float, default=None,
                   help="learning rate (ZO: of the ZO-updated weights; FO: Adam's)")
    h.add_argument("--eps", type=float, default=None, help="ZO perturbation scale")
    h.add_argument("--weight-decay", type=float, default=0.0)
    h.add_argument("--distribution", default="gaussian", choices=("gaussian", "rademacher"))
    h.add_argument("--estimator", default=None, choices=("central", "forward"),
                   help="ZO estimator (default: central for mezo/mezo-lora as in MeZO, "
                        "forward for bilevel-zofo as in the Bilevel-ZOFO code)")
    h.add_argument("--n-directions", type=int, default=1)
    h.add_argument("--lam", type=float, default=None, help="bilevel-zofo penalty weight")
    h.add_argument("--inner-steps", type=int, default=None,
                   help="bilevel-zofo: lower (S) steps per outer step; the paper's K is "
                        "inner_steps + 1")
    h.add_argument("--peft-lr", type=float, default=None, help="bilevel-zofo Adam lr of P and S")
    h.add_argument("--theta-update", default=None, choices=("rms", "sgd", "scaled-sgd", "adam"),
                   help="bilevel-zofo: the backbone's update (default rms: ZO-SGD on the "
                        "projected gradient over its running RMS; adam: the authors' "
                        "materialised Adam on theta and P, three backbone-sized buffers)")
    h.add_argument("--order", default=None, choices=("official", "p-first"),
                   help="bilevel-zofo: official (P's gradient, the ZO step reusing f and g_P, "
                        "then P's step) or p-first (P steps before the ZO step)")
    h.add_argument("--penalty-batch", default=None, choices=("fresh", "last"),
                   help="bilevel-zofo: B_g of the upper step, a fresh D_g batch (default) or "
                        "the last lower batch")
    h.add_argument("--lora-r", type=int, default=8)
    h.add_argument("--lora-alpha", type=int, default=16)
    h.add_argument("--num-virtual-tokens", type=int, default=None)
    p.add_argument("--backend", default=None, help="kernel backend (default: fastest available)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(models_mod.DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no-save", action="store_true",
                   help="do not write the trained weights (sweeps and studies)")
    return p


# settings a resumed run may change; every other one must stay as saved
RESUME_OVERRIDABLE = ("steps", "time_budget", "output", "resume", "no_progress", "threads",
                      "eval_every", "eval_every_steps", "log_every", "no_save", "backend",
                      "eval_batch_size")


def given_options(argv: List[str]) -> List[str]:
    """The destinations of the options that ``argv`` sets explicitly."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(probe.parse_args(argv)))


def resume_args(args, given: Optional[List[str]] = None):
    """(the saved run's arguments with the allowed overrides from ``args``, its run state).
    ``given``: the options set on the command line (default: those differing from the
    parser's defaults)."""
    folder = Path(args.resume)
    try:
        manifest = ckpt_mod.read_manifest(folder)
    except ckpt_mod.CheckpointError as exc:
        raise SystemExit(f"zofo-train --resume: {exc}") from None
    if not manifest.get("run_state") or not manifest.get("optimizer"):
        raise SystemExit(f"zofo-train --resume: {folder} holds no zofo-train run state "
                         f"({ckpt_mod.RUN_STATE_FILE}); only zofo-train output folders resume "
                         "this way (ZOFOTrainer checkpoints: "
                         "Trainer.train(resume_from_checkpoint))")
    state = json.loads((folder / manifest["run_state"]).read_text())
    saved = dict(state["args"])
    if given is None:
        defaults = vars(build_parser().parse_args(["--method", "mezo"]))
        given = [k for k, v in vars(args).items() if k in defaults and v != defaults[k]
                 and k != "method"] + (["method"] if args.method is not None else [])
    changed = [k for k in given if k not in RESUME_OVERRIDABLE
               and getattr(args, k) != saved.get(k)]
    if changed:
        raise SystemExit(
            "zofo-train --resume: these settings differ from the saved run and cannot change "
            "when resuming: " + ", ".join(f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, "
                                          f"given {getattr(args, k)!r})" for k in changed))
    merged = argparse.Namespace(**saved)
    for k in given:
        if k in RESUME_OVERRIDABLE:
            setattr(merged, k, getattr(args, k))
    merged.resume = str(folder)
    if "output" not in given or args.output is None:
        merged.output = str(folder)
    return merged, state


def _hp(args, name):
    value = getattr(args, name, None)
    if value is None:
        value = DEFAULTS[args.method].get(name)
    return value


def _validate(args) -> None:
    for name in ("method", "train", "output"):
        if getattr(args, name) is None:
            raise SystemExit(f"zofo-train: --{name} is required (or --resume FOLDER)")
    if args.steps is None and args.time_budget is None:
        raise SystemExit("zofo-train: give --steps and/or --time-budget")
    if args.steps is not None and args.steps <= 0:
        raise SystemExit("zofo-train: --steps must be positive")
    if args.time_budget is not None and args.time_budget <= 0:
        raise SystemExit("zofo-train: --time-budget must be positive")
    if args.eval is None and args.holdout <= 0:
        raise SystemExit("zofo-train: give --eval FILE or --holdout N")
    if args.num_train <= 0 or args.batch_size <= 0 or args.max_length <= 0:
        raise SystemExit("zofo-train: --num-train, --batch-size and --max-length must be positive")
    if args.inner_steps is not None and args.inner_steps < 0:
        raise SystemExit("zofo-train: --inner-steps must be >= 0")
    if args.head == "random" and (args.template is not None or args.label_words is not None):
        raise SystemExit("zofo-train: --template / --label-words need --head prompt")


def _make_runner(args, model, device, train_enc, lower_enc, upper_enc, rank=0) -> Runner:
    loss_fn = models_mod.classification_loss
    seed = args.seed
    stream_seed = seed + 1000 * rank  # each data-parallel rank draws its own batches
    peft_kwargs = dict(lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                       num_virtual_tokens=args.num_virtual_tokens)
    if args.method in ("mezo-lora", "fo-lora", "bilevel-zofo"):
        model = models_mod.add_peft(model, args.peft, **peft_kwargs)
    model.eval()  # no dropout: see the module docstring
    if args.method == "bilevel-zofo":
        lower = data_mod.BatchStream(lower_enc, args.batch_size, stream_seed + 1)
        upper = data_mod.BatchStream(upper_enc, args.batch_size, stream_seed + 2)
        penalty = (data_mod.BatchStream(lower_enc, args.batch_size, stream_seed + 3)
                   if _hp(args, "penalty_batch") == "fresh" else None)
        return BilevelRunner(model, loss_fn, lower, upper, device, lr=_hp(args, "lr"),
                             penalty=penalty, eps=_hp(args, "eps"), lam=_hp(args, "lam"),
                             inner_steps=_hp(args, "inner_steps"), peft_lr=_hp(args, "peft_lr"),
                             estimator=_hp(args, "estimator"), weight_decay=args.weight_decay,
                             seed=seed, backend=args.backend, distribution=args.distribution,
                             n_directions=args.n_directions,
                             theta_update=_hp(args, "theta_update"), order=_hp(args, "order"))
    stream = data_mod.BatchStream(train_enc, args.batch_size, stream_seed + 1)
    if args.method in ("mezo", "mezo-lora"):
        return ZORunner(args.method, model, loss_fn, stream, device, lr=_hp(args, "lr"),
                        eps=_hp(args, "eps"), weight_decay=args.weight_decay,
                        distribution=args.distribution, estimator=_hp(args, "estimator"),
                        n_directions=args.n_directions, seed=seed, backend=args.backend,
                        peft=args.method == "mezo-lora")
    return FORunner(args.method, model, loss_fn, stream, device, lr=_hp(args, "lr"),
                    weight_decay=args.weight_decay, peft=args.method == "fo-lora")


def run(args, given: Optional[List[str]] = None,
        on_trained: Optional[Callable[[Runner], None]] = None) -> dict:
    """Train as ``args`` says; returns the summary (also written to summary.json).

    ``on_trained(runner)`` is called on rank 0 after the last step, before anything is saved
    (the trained model is ``runner.model``). With ``args.resume`` the saved run continues
    (see :func:`resume_args`; ``given`` lists the options set on the command line). Under ``torchrun`` (``WORLD_SIZE`` set) the run is data
    parallel: every rank draws its own batches, ZO methods all-reduce only their losses
    (``DataParallelZO``), first-order methods their gradients, and rank 0 alone writes the
    outputs."""
    resume = None
    if getattr(args, "resume", None):
        args, resume = resume_args(args, given)
    _validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("zofo-train: --device cuda but CUDA is not available")
    from . import distributed as dist_mod
    ctx = dist_mod.setup_from_env()
    try:
        if ctx.distributed and device.type == "cuda":
            device = ctx.device
        return _run(args, device, ctx, resume, on_trained)
    finally:
        dist_mod.shutdown(ctx)


@dataclasses.dataclass
class Progress:
    """Where a run stands: saved in resume/run_state.json and restored by ``--resume``."""
    step: int = 0
    train_time: float = 0.0    # seconds inside training steps (what --time-budget counts)
    eval_time: float = 0.0
    elapsed: float = 0.0       # wall-clock seconds spent by earlier processes of this run
    initial_acc: float = float("nan")
    final_acc: float = float("nan")
    best: float = -1.0
    last_eval_t: float = 0.0
    last_eval_step: int = 0
    recent: List[float] = dataclasses.field(default_factory=list)  # losses since the last row
    nonfinite: bool = False
    select_loss: float = float("inf")   # the lowest mean D_f loss seen at an evaluation
    selected_acc: float = float("nan")  # the evaluation accuracy there
    selected_step: int = 0


class MetricsLog:
    """metrics.jsonl, written row by row; the file (and the output folder) is created with
    the first row, so a run that fails before that leaves nothing behind."""

    def __init__(self, path: Path, enabled: bool, rows=()):
        self.path, self.enabled = path, enabled
        self.rows: List[dict] = []
        self._fh = None
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w")
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def save_run(folder: Path, runner: Runner, tokenizer, args, progress: Progress,
             initial_args: dict) -> List[Path]:
    """Write the trained model and everything ``--resume`` needs to ``folder`` (one
    :func:`zofo_kernels.checkpoint.save_trained` call); returns the files written."""
    run_state = dict(args=initial_args, progress=dataclasses.asdict(progress),
                     streams={name: s.drawn for name, s in runner.streams.items()})
    optimizer_state = dict(runner.optimizer_state(), torch_rng=torch.get_rng_state())
    return ckpt_mod.save_trained(folder, runner.model, tokenizer=tokenizer, method=args.method,
                                 lower_adapter=runner.lower_adapter,
                                 optimizer_state=optimizer_state, run_state=run_state)


def _restore(runner: Runner, folder: Path, state: dict) -> Progress:
    """Put ``runner`` (freshly built from the saved arguments) where the saved run stopped:
    weights, optimizer state, counters, batch-stream positions."""
    try:
        ckpt_mod.load_weights_into(runner.model, folder)
    except ckpt_mod.CheckpointError as exc:
        raise SystemExit(f"zofo-train --resume: {exc}") from None
    opt_state = torch.load(folder / ckpt_mod.OPTIMIZER_FILE, map_location="cpu",
                           weights_only=True)
    runner.load_optimizer_state(opt_state)
    torch.set_rng_state(opt_state["torch_rng"])
    if set(state["streams"]) != set(runner.streams):
        raise SystemExit(f"zofo-train --resume: {folder} saved the batch streams "
                         f"{sorted(state['streams'])}, this method has {sorted(runner.streams)}")
    for name, drawn in state["streams"].items():
        runner.streams[name].skip(int(drawn))
    if hasattr(runner.opt, "eval_mode"):
        runner.opt.eval_mode()
    return Progress(**state["progress"])


def _run(args, device, ctx, resume=None, on_trained=None) -> dict:
    from . import distributed as dist_mod
    out = Path(args.output)
    initial_args = {k: v for k, v in vars(args).items() if k != "resume"}
    data_seed = args.seed if args.data_seed is None else args.data_seed

    try:
        pool = data_mod.read_examples(args.train, args.text_column, args.label_column)
        picked = data_mod.sample(pool, args.num_train + args.holdout, data_seed)
        train_ex, held = picked[:args.num_train], picked[args.num_train:]
        if args.holdout > 0:
            eval_ex, eval_name = held, f"holdout of {args.train}"
        else:
            eval_ex, eval_name = data_mod.read_examples(
                args.eval, args.text_column, args.label_column), args.eval
        if args.eval_max is not None and args.eval_max < len(eval_ex):
            eval_ex = data_mod.sample(eval_ex, args.eval_max, data_seed + 7)
        lower_ex, upper_ex = (data_mod.split(train_ex, args.upper_fraction)
                              if args.method == "bilevel-zofo" else (train_ex, []))
        # D_f, the examples that model selection reads (every method: see the docstring)
        select_ex = data_mod.split(train_ex, args.upper_fraction)[1]
        n_labels = data_mod.num_labels(train_ex, eval_ex)
        head = getattr(args, "head", "random")  # run states saved before --head existed
        spec = None
        if head == "prompt":
            from .prompting import PromptError, PromptSpec
            try:
                spec = PromptSpec.parse(args.template, args.label_words)
            except PromptError as exc:
                raise SystemExit(f"zofo-train: {exc}") from None
            if spec.num_labels != max(2, n_labels):
                raise SystemExit(f"zofo-train: {spec.num_labels} label words for "
                                 f"{max(2, n_labels)} classes; give --label-words with one "
                                 "word per class")
            train_ex, eval_ex, lower_ex, upper_ex, select_ex = (
                [data_mod.Example(spec.text(e.text), e.label) for e in exs]
                for exs in (train_ex, eval_ex, lower_ex, upper_ex, select_ex))
        loaded = models_mod.load_model(args.model, num_labels=max(2, n_labels), dtype=args.dtype,
                                       seed=args.seed, device=str(device), head=head,
                                       prompt=spec)
    except (data_mod.DataError, models_mod.ModelError) as exc:
        raise SystemExit(f"zofo-train: {exc}") from None

    tok = loaded.tokenizer
    enc = lambda ex: (data_mod.Encoded(ex, tok, args.max_length,  # noqa: E731
                                       add_special_tokens=loaded.add_special_tokens)
                      if ex else None)
    train_enc, eval_enc = enc(train_ex), enc(eval_ex)
    lower_enc, upper_enc, select_enc = enc(lower_ex), enc(upper_ex), enc(select_ex)
    torch.manual_seed(args.seed)
    try:
        runner = _make_runner(args, loaded.model, device, train_enc, lower_enc, upper_enc,
                              rank=ctx.rank)
    except models_mod.ModelError as exc:
        hint = ""
        if args.peft == "prefix":
            hint = (" (prefix tuning works with CAUSAL_LM task types on OPT, Llama and GPT-2 "
                    "models; zofo-train trains sequence classifiers)")
        raise SystemExit(f"zofo-train: {exc}{hint}") from None
    progress, prior_rows = Progress(), []
    if resume is not None:
        folder = Path(args.resume)
        progress = _restore(runner, folder, resume)
        if (folder / "metrics.jsonl").is_file():
            prior_rows = [json.loads(line) for line in
                          (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if ((args.steps is None or progress.step >= args.steps)
                and (args.time_budget is None or progress.train_time >= args.time_budget)):
            raise SystemExit(f"zofo-train --resume: the saved run already reached step "
                             f"{progress.step} ({progress.train_time:.1f} s of training); give "
                             "a larger --steps or --time-budget (totals for the whole run)")
    if ctx.distributed:
        if isinstance(runner, FORunner):
            runner.dist_context = ctx
        else:
            runner.data_parallel = dist_mod.DataParallelZO(runner.opt, model=runner.model,
                                                           context=ctx)

    def evaluate() -> float:
        return models_mod.accuracy(runner.eval_model, _DeviceEncoded(eval_enc, device),
                                   args.eval_batch_size)

    def select_loss() -> float:
        return models_mod.mean_loss(runner.eval_model, _DeviceEncoded(select_enc, device),
                                    args.eval_batch_size)

    best_files: set = set()

    def record_selection(acc: float) -> dict:
        """D_f loss now; keeps the evaluation (and, when saving, the model) at its lowest."""
        loss = select_loss()
        if loss < pr.select_loss:
            pr.select_loss, pr.selected_acc, pr.selected_step = loss, acc, pr.step
            if not args.no_save and ctx.is_main:
                best_files.update(ckpt_mod.save_trained(out / "best", runner.model,
                                                        tokenizer=tok, method=args.method))
        return dict(select_loss=loss)

    budget = args.time_budget
    eval_every, eval_every_steps = args.eval_every, args.eval_every_steps
    if eval_every is None and eval_every_steps is None:
        if budget is not None:
            eval_every = budget / 15
        else:
            eval_every_steps = max(1, args.steps // 10)

    from tqdm import tqdm
    by_time = args.steps is None
    bar = tqdm(total=int(math.ceil(budget)) if by_time else args.steps,
               initial=int(progress.train_time) if by_time else progress.step,
               unit="s" if by_time else "step", disable=args.no_progress or not ctx.is_main,
               desc=f"{args.method}", dynamic_ncols=True)
    log = MetricsLog(out / "metrics.jsonl", ctx.is_main, prior_rows)
    pr = progress
    t_start = time.perf_counter()

    def elapsed() -> float:
        return round(pr.elapsed + time.perf_counter() - t_start, 3)

    if resume is None:
        pr.initial_acc = pr.final_acc = pr.best = evaluate()
        selection = record_selection(pr.initial_acc)
        pr.eval_time += time.perf_counter() - t_start
        log.write(dict(kind="eval", step=0, wall_time_s=0.0, elapsed_s=round(pr.eval_time, 3),
                       eval_accuracy=pr.initial_acc, forward_count=0, backward_count=0,
                       **selection))
    while True:
        if args.steps is not None and pr.step >= args.steps:
            break
        if budget is not None and pr.train_time >= budget:
            break
        t0 = time.perf_counter()
        loss = runner.step()
        pr.train_time += time.perf_counter() - t0
        if ctx.distributed and budget is not None:
            pr.train_time = dist_mod.agree_on_max(pr.train_time, ctx)  # all ranks stop together
        pr.step += 1
        pr.recent.append(loss)
        if isinstance(runner, BilevelRunner):
            log.write(dict(kind="bilevel", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           **runner.diagnostics()))
        if by_time:
            bar.n = min(bar.total, int(pr.train_time))
            bar.set_postfix(step=pr.step, loss=f"{loss:.4f}", acc=f"{pr.final_acc:.3f}")
            bar.refresh()
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{pr.final_acc:.3f}")
        if not math.isfinite(loss):
            pr.nonfinite = True
        if pr.step % args.log_every == 0 or pr.nonfinite:
            log.write(dict(kind="train", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           elapsed_s=elapsed(), loss=loss,
                           loss_avg=sum(pr.recent) / len(pr.recent),
                           forward_count=runner.forward_count,
                           backward_count=runner.backward_count))
            pr.recent = []
        done = ((args.steps is not None and pr.step >= args.steps)
                or (budget is not None and pr.train_time >= budget) or pr.nonfinite)
        due = ((eval_every is not None and pr.train_time - pr.last_eval_t >= eval_every)
               or (eval_every_steps is not None
                   and pr.step - pr.last_eval_step >= eval_every_steps))
        if due or done:
            te = time.perf_counter()
            pr.final_acc = evaluate()
            selection = record_selection(pr.final_acc)
            pr.eval_time += time.perf_counter() - te
            pr.best = max(pr.best, pr.final_acc)
            pr.last_eval_t, pr.last_eval_step = pr.train_time, pr.step
            log.write(dict(kind="eval", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           elapsed_s=elapsed(), eval_accuracy=pr.final_acc,
                           forward_count=runner.forward_count,
                           backward_count=runner.backward_count, **selection))
        if pr.nonfinite:
            break
    bar.close()
    log.close()

    if not ctx.is_main:
        return {}
    if on_trained is not None:
        on_trained(runner)
    out.mkdir(parents=True, exist_ok=True)
    pr.elapsed = elapsed()
    written: List[Path] = []
    if not args.no_save:
        written = save_run(out, runner, tok, args, pr, initial_args)
    summary = dict(
        method=args.method, model=args.model, peft=args.peft if args.method in (
            "bilevel-zofo", "mezo-lora", "fo-lora") else None,
        eval_accuracy=pr.final_acc, best_eval_accuracy=pr.best,
        initial_eval_accuracy=pr.initial_acc, selected_eval_accuracy=pr.selected_acc,
        selected_step=pr.selected_step, selection_loss=pr.select_loss,
        selection_data=f"D_f: last {args.upper_fraction:.3g} of the training sample "
                       f"({len(select_ex)} examples)",
        head=head, template=spec.template if spec else None,
        label_words=list(spec.label_words) if spec else None,
        eval_data=str(eval_name), eval_examples=len(eval_enc),
        wall_time_s=round(pr.train_time, 3), eval_time_s=round(pr.eval_time, 3),
        elapsed_s=pr.elapsed, steps=pr.step,
        forward_count=runner.forward_count, backward_count=runner.backward_count,
        peak_memory_bytes=peak_memory_bytes(device),
        peak_memory_kind="cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        model_parameters=sum(p.numel() for p in loaded.model.parameters()),
        num_train=len(train_ex), num_lower=len(lower_ex) if upper_ex else None,
        num_upper=len(upper_ex) or None, seed=args.seed, data_seed=data_seed,
        stopped_on_nonfinite_loss=pr.nonfinite, resumed_from=args.resume,
        hyperparameters=dict(lr=_hp(args, "lr"), eps=_hp(args, "eps"),
                             weight_decay=args.weight_decay, batch_size=args.batch_size,
                             max_length=args.max_length, estimator=_hp(args, "estimator"),
                             distribution=args.distribution, n_directions=args.n_directions,
                             lam=_hp(args, "lam"), inner_steps=_hp(args, "inner_steps"),
                             peft_lr=_hp(args, "peft_lr"), lora_r=args.lora_r,
                             lora_alpha=args.lora_alpha, dtype=args.dtype,
                             theta_update=_hp(args, "theta_update"), order=_hp(args, "order"),
                             penalty_batch=_hp(args, "penalty_batch")),
        time_budget_s=budget, max_steps=args.steps,
        threads=torch.get_num_threads(), device=str(device), world_size=ctx.world_size,
    )
    from . import plotting
    plotting.plot_run(log.rows, out / "curves.png",
                      title=f"{args.method} on {args.model} ({len(train_ex)} examples)")
    files = sorted({str(p.relative_to(out)) for p in list(written) + sorted(best_files)}
                   | {"metrics.jsonl", "summary.json", "curves.png"})
    summary.update(output=str(out.resolve()), files=files)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class _DeviceEncoded:
    """An Encoded set whose batches are moved to ``device``."""

    def __init__(self, enc, device):
        self.enc, self.device = enc, device

    def __len__(self):
        return len(self.enc)

    def batches(self, batch_size):
        for b in self.enc.batches(batch_size):
            yield _to(b, self.device)


# Third-party deprecation warnings that a zofo-train user cannot act on (they come from the
# installed transformers / peft, not from anything the user passed). Matched by category and
# message; filtered in the command-line entry points only.
_THIRD_PARTY_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`past_key_values` is deprecated and will be removed"),
)


def filter_third_party_warnings() -> None:
    import warnings
    for category, message in _THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def print_outputs(summary: dict, stream=None) -> None:
    """The output folder and the files a run wrote (after its JSON line)."""
    stream = stream or sys.stdout
    out = Path(summary["output"])
    files = summary["files"]
    weights = [f for f in files if f.endswith((".safetensors", ".pt"))]
    print(f"output folder: {out}", file=stream)
    kinds = [("weights", ", ".join(weights) if weights else "not saved (--no-save)"),
             ("metrics", "metrics.jsonl"), ("summary", "summary.json"), ("plot", "curves.png")]
    for label, what in kinds:
        print(f"  {label:8s} {what}", file=stream)
    if weights:
        print(f"  reload   zofo_kernels.load_trained({str(out)!r}); continue with "
              f"zofo-train --resume {out} --steps N", file=stream)


def main(argv: Optional[List[str]] = None) -> int:
    filter_third_party_warnings()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-file save/load bars; the run has its own bar
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    summary = run(args, given=given_options(argv))
    if not summary:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print(json.dumps({k: summary[k] for k in (
        "method", "eval_accuracy", "best_eval_accuracy", "wall_time_s", "steps",
        "peak_memory_bytes")}))
    print_outputs(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
