"""zofo-train: few-shot fine-tuning of a sequence classifier with ZO, FO or Bilevel-ZOFO.

Methods: those of the registry (:mod:`zofo_kernels.integrations.methods`), listed by ``zofo-train
--help``; the long form is docs/cli.md.

Example (MiniLM on SST-2, 1,000 examples, 15 minutes):
  zofo-train --model minilm --method bilevel-zofo --peft lora \\
      --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv \\
      --num-train 1000 --time-budget 900 --seed 0 --output runs/bzofo

Outputs in --output: metrics.jsonl (one row per log/eval event), summary.json, curves.png,
and the trained model in the layout of :mod:`zofo_kernels.integrations.checkpoint`: ``model/`` (the
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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from zofo_kernels.integrations import checkpoint as ckpt_mod
from zofo_kernels.apps import data as data_mod
from zofo_kernels.integrations import methods as methods_mod
from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.measure import CountedLoss, peak_memory_bytes, peak_memory_kind

METHODS = methods_mod.names()
HEADS = models_mod.HEADS


# --------------------------------------------------------------------------- utilities

def _to_device(batch: dict, device: torch.device) -> dict:
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

    The optimizer comes from the method registry (:mod:`zofo_kernels.integrations.methods`).
    ``forward_count`` counts model forward passes over a batch and ``backward_count``
    backward passes (a forward pass and its backward are counted separately)."""

    method: str
    opt: Any
    lower_adapter: Optional[str] = None  # Bilevel-ZOFO: the name of S's adapter

    def __init__(self, method: str, model: torch.nn.Module, loss_fn: Callable,
                 streams: Dict[str, Iterator[dict]], device: torch.device):
        self.method = method
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
        return _to_device(next(self.streams[stream]), self.device)

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

    def __init__(self, method, model, loss_fn, batches: Iterator[dict], device, settings):
        super().__init__(method, model, loss_fn, {"train": batches}, device)
        self.opt = methods_mod.build_optimizer(method, model, **settings)

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

    def __init__(self, method, model, loss_fn, batches, device, settings):
        super().__init__(method, model, loss_fn, {"train": batches}, device)
        self.opt = methods_mod.build_optimizer(method, model, **settings)
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
    """Bilevel-ZOFO (``zofo_kernels.core.optim.ZOFOOptimizer``): the inner FO steps on the lower
    copy S, one FO step on the upper copy P, one fused ZO step on the backbone.

    ``streams``: "lower" (D_g), "upper" (D_f) and, for a fresh B_g per upper step as in the
    authors' code, "penalty" (a second D_g stream); without it B_g is the last lower batch."""

    def __init__(self, model, loss_fn, streams: Dict[str, Iterator[dict]], device, settings):
        super().__init__("bilevel-zofo", model, loss_fn, streams, device)
        self.opt = methods_mod.build_optimizer(
            "bilevel-zofo", model, loss_fn=lambda batch: self.loss(model, batch), **settings)
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


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zofo-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {m.name:13s} {m.summary}"
                                         for m in methods_mod.REGISTRY.values())
               + "\n\nHyperparameters not given take the method's default (the registry, "
                 "zofo_kernels/methods.py).")
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
    h.add_argument("--backbone-regex", default=None, metavar="REGEX",
                   help="bilevel-zofo: the ZO step updates only the backbone parameters whose "
                        "name matches REGEX (re.search), e.g. 'LayerNorm|bias|label_head'; "
                        "the rest of the backbone stays pretrained (default: all of it)")
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


def _setting(args, name):
    """The setting ``name`` of this run: the command line's, else the method's default."""
    return methods_mod.get(args.method).setting(name, getattr(args, name, None))


# command-line settings handed to the method's optimizer when it takes them
_OPTIMIZER_ARGS = ("lr", "eps", "weight_decay", "distribution", "estimator", "n_directions",
                   "lam", "inner_steps", "peft_lr", "theta_update", "order", "seed", "backend",
                   "backbone_regex")


def optimizer_settings(args) -> dict:
    """The keyword settings of the run's optimizer: those of ``args`` that the method takes
    (None: the method's default), the rest from the registry."""
    method = methods_mod.get(args.method)
    accepted = set(method.setting_names())
    return method.optimizer_settings(**{k: getattr(args, k, None) for k in _OPTIMIZER_ARGS
                                        if k in accepted})


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
    if getattr(args, "backbone_regex", None) is not None and args.method != "bilevel-zofo":
        raise SystemExit("zofo-train: --backbone-regex is a bilevel-zofo setting (the subset "
                         f"of the backbone its ZO step trains), not one of {args.method}")
    if args.head == "random" and (args.template is not None or args.label_words is not None):
        raise SystemExit("zofo-train: --template / --label-words need --head prompt")


def _make_runner(args, model, device, encoded: Dict[str, Any], rank: int = 0) -> Runner:
    """The method's runner on ``model`` (wrapped with its PEFT block first if it has one).
    ``encoded``: the encoded example sets its streams draw from: "lower" and "upper"
    (Bilevel-ZOFO), "train" (the others)."""
    method = methods_mod.get(args.method)
    loss_fn = models_mod.classification_loss
    stream_seed = args.seed + 1000 * rank  # each data-parallel rank draws its own batches

    def stream(name: str, offset: int):
        return data_mod.BatchStream(encoded[name], args.batch_size, stream_seed + offset)

    if method.peft:
        model = models_mod.add_peft(model, args.peft, lora_r=args.lora_r,
                                    lora_alpha=args.lora_alpha,
                                    num_virtual_tokens=args.num_virtual_tokens)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()  # no dropout: see the module docstring
    settings = optimizer_settings(args)
    if method.name == "bilevel-zofo":
        streams = {"lower": stream("lower", 1), "upper": stream("upper", 2)}
        if _setting(args, "penalty_batch") == "fresh":
            streams["penalty"] = stream("lower", 3)
        try:
            return BilevelRunner(model, loss_fn, streams, device, settings)
        except ValueError as exc:  # a setting the optimizer refuses (e.g. --backbone-regex)
            raise SystemExit(f"zofo-train: {exc}") from None
    runner_cls = ZORunner if method.zeroth_order else FORunner
    return runner_cls(method.name, model, loss_fn, stream("train", 1), device, settings)


def run(args, given: Optional[List[str]] = None,
        on_trained: Optional[Callable[[Runner], None]] = None) -> dict:
    """Train as ``args`` says; returns the summary (also written to summary.json).

    ``on_trained(runner)`` is called on rank 0 after the last step, before anything is saved
    (the trained model is ``runner.model``). With ``args.resume`` the saved run continues
    (see :func:`resume_args`; ``given`` lists the options set on the command line). Under
    ``torchrun`` (``WORLD_SIZE`` set) the run is data parallel: every rank draws its own
    batches, ZO methods all-reduce only their losses (``DataParallelZO``), first-order
    methods their gradients, and rank 0 alone writes the outputs. The parts, in order:
    :func:`load_data`, :func:`build_runner`, :func:`wire_data_parallel`, :func:`train_loop`
    (with :class:`Evaluation` on an :class:`EvalSchedule`), :func:`run_summary`."""
    resume = None
    if getattr(args, "resume", None):
        args, resume = resume_args(args, given)
    _validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("zofo-train: --device cuda but CUDA is not available")
    from zofo_kernels.core import distributed as dist_mod
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
    :func:`zofo_kernels.integrations.checkpoint.save_trained` call); returns the files written."""
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


@dataclasses.dataclass
class RunData:
    """The example sets of a run (prompt-wrapped with a prompt head) and where they came
    from. ``lower``/``upper``: Bilevel-ZOFO's D_g and D_f (other methods: ``train`` and
    nothing); ``select``: D_f, the examples model selection reads (every method)."""
    train: list
    eval: list
    lower: list
    upper: list
    select: list
    eval_name: str
    num_labels: int
    data_seed: int
    head: str
    spec: Any = None  # the PromptSpec of a prompt head


def load_data(args) -> RunData:
    """Read and sample the run's examples as ``args`` says (``SystemExit`` on bad data)."""
    data_seed = args.seed if args.data_seed is None else args.data_seed
    pool = data_mod.read_examples(args.train, args.text_column, args.label_column)
    picked = data_mod.sample(pool, args.num_train + args.holdout, data_seed)
    train_ex, held = picked[:args.num_train], picked[args.num_train:]
    if args.holdout > 0:
        eval_ex, eval_name = held, f"holdout of {args.train}"
    else:
        eval_ex = data_mod.read_examples(args.eval, args.text_column, args.label_column)
        eval_name = args.eval
    if args.eval_max is not None and args.eval_max < len(eval_ex):
        eval_ex = data_mod.sample(eval_ex, args.eval_max, data_seed + 7)
    lower_ex, upper_ex = (data_mod.split(train_ex, args.upper_fraction)
                          if args.method == "bilevel-zofo" else (train_ex, []))
    data = RunData(train_ex, eval_ex, lower_ex, upper_ex,
                   data_mod.split(train_ex, args.upper_fraction)[1], str(eval_name),
                   max(2, data_mod.num_labels(train_ex, eval_ex)), data_seed,
                   getattr(args, "head", "random"))  # run states saved before --head existed
    if data.head == "prompt":
        _apply_prompt(args, data)
    return data


def _apply_prompt(args, data: RunData) -> None:
    """Wrap every example set in the prompt template."""
    from zofo_kernels.integrations.prompting import PromptError, PromptSpec
    try:
        spec = PromptSpec.parse(args.template, args.label_words)
    except PromptError as exc:
        raise SystemExit(f"zofo-train: {exc}") from None
    if spec.num_labels != data.num_labels:
        raise SystemExit(f"zofo-train: {spec.num_labels} label words for {data.num_labels} "
                         "classes; give --label-words with one word per class")
    for name in ("train", "eval", "lower", "upper", "select"):
        setattr(data, name, [data_mod.Example(spec.text(e.text), e.label)
                             for e in getattr(data, name)])
    data.spec = spec


def build_runner(args, data: RunData, loaded, device, ctx) -> Runner:
    """The method's runner on the loaded model (this rank's batch streams)."""
    sets = ("lower", "upper") if args.method == "bilevel-zofo" else ("train",)
    encoded = {k: _encode(loaded, getattr(data, k), args.max_length) for k in sets}
    torch.manual_seed(args.seed)
    try:
        runner = _make_runner(args, loaded.model, device, encoded, rank=ctx.rank)
    except models_mod.ModelError as exc:
        hint = ""
        if args.peft == "prefix":
            hint = (" (prefix tuning works with CAUSAL_LM task types on OPT, Llama and GPT-2 "
                    "models; zofo-train trains sequence classifiers)")
        raise SystemExit(f"zofo-train: {exc}{hint}") from None
    return runner


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


def _encode(loaded, examples, max_length):
    if not examples:
        return None
    return data_mod.Encoded(examples, loaded.tokenizer, max_length,
                            add_special_tokens=loaded.add_special_tokens)


class Evaluation:
    """Evaluation accuracy, and model selection by the D_f loss: keeps the evaluation (and,
    when saving, the model in ``best/``) at the lowest D_f loss seen."""

    def __init__(self, args, runner: Runner, eval_enc, select_enc, device, tokenizer, ctx):
        self.args, self.runner, self.tokenizer, self.ctx = args, runner, tokenizer, ctx
        self.eval_set = _DeviceEncoded(eval_enc, device)
        self.select_set = _DeviceEncoded(select_enc, device)
        self.best_files: set = set()

    def __call__(self, pr: "Progress") -> dict:
        """Evaluate now; updates ``pr`` (accuracy, best, selection); returns the row's
        fields."""
        model, bs = self.runner.eval_model, self.args.eval_batch_size
        acc = models_mod.accuracy(model, self.eval_set, bs)
        loss = models_mod.mean_loss(model, self.select_set, bs)
        pr.final_acc, pr.best = acc, max(pr.best, acc)
        if loss < pr.select_loss:
            pr.select_loss, pr.selected_acc, pr.selected_step = loss, acc, pr.step
            if not self.args.no_save and self.ctx.is_main:
                self.best_files.update(ckpt_mod.save_trained(
                    Path(self.args.output) / "best", self.runner.model,
                    tokenizer=self.tokenizer, method=self.args.method))
        return dict(eval_accuracy=acc, select_loss=loss)


class EvalSchedule:
    """When to evaluate: every ``--eval-every`` training seconds and/or
    ``--eval-every-steps`` steps (default: 15 times over the budget, or 10 times over the
    steps), and when the run ends."""

    def __init__(self, args):
        self.every_s, self.every_steps = args.eval_every, args.eval_every_steps
        if self.every_s is None and self.every_steps is None:
            if args.time_budget is not None:
                self.every_s = args.time_budget / 15
            else:
                self.every_steps = max(1, args.steps // 10)

    def due(self, pr: "Progress") -> bool:
        return ((self.every_s is not None and pr.train_time - pr.last_eval_t >= self.every_s)
                or (self.every_steps is not None
                    and pr.step - pr.last_eval_step >= self.every_steps))


def _finished(args, pr: "Progress") -> bool:
    return ((args.steps is not None and pr.step >= args.steps)
            or (args.time_budget is not None and pr.train_time >= args.time_budget))


def _run(args, device, ctx, resume=None, on_trained=None) -> dict:
    initial_args = {k: v for k, v in vars(args).items() if k != "resume"}
    try:
        data = load_data(args)
        loaded = models_mod.load_model(args.model, num_labels=data.num_labels,
                                       dtype=args.dtype, seed=args.seed, device=str(device),
                                       head=data.head, prompt=data.spec)
    except (data_mod.DataError, models_mod.ModelError) as exc:
        raise SystemExit(f"zofo-train: {exc}") from None
    runner = build_runner(args, data, loaded, device, ctx)
    pr, prior_rows = Progress(), []
    if resume is not None:
        pr, prior_rows = _resume_progress(args, runner, resume)
    wire_data_parallel(runner, ctx)
    evaluation = Evaluation(args, runner, _encode(loaded, data.eval, args.max_length),
                            _encode(loaded, data.select, args.max_length), device,
                            loaded.tokenizer, ctx)
    log = MetricsLog(Path(args.output) / "metrics.jsonl", ctx.is_main, prior_rows)
    train_loop(args, runner, pr, log, evaluation, ctx, first_eval=resume is None)
    if not ctx.is_main:
        return {}
    if on_trained is not None:
        on_trained(runner)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    if not args.no_save:
        written = save_run(out, runner, loaded.tokenizer, args, pr, initial_args)
    summary = run_summary(args, data, loaded, runner, pr, device, ctx)
    from zofo_kernels.apps import plotting
    plotting.plot_run(log.rows, out / "curves.png",
                      title=f"{args.method} on {args.model} ({len(data.train)} examples)")
    files = sorted({str(p.relative_to(out)) for p in list(written)
                    + sorted(evaluation.best_files)}
                   | {"metrics.jsonl", "summary.json", "curves.png"})
    summary.update(output=str(out.resolve()), files=files)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _resume_progress(args, runner: Runner, state: dict):
    """(the saved run's progress, its metrics rows) with ``runner`` put where it stopped."""
    folder = Path(args.resume)
    pr = _restore(runner, folder, state)
    rows = []
    if (folder / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in
                (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if ((args.steps is None or pr.step >= args.steps)
            and (args.time_budget is None or pr.train_time >= args.time_budget)):
        raise SystemExit(f"zofo-train --resume: the saved run already reached step "
                         f"{pr.step} ({pr.train_time:.1f} s of training); give "
                         "a larger --steps or --time-budget (totals for the whole run)")
    return pr, rows


def train_loop(args, runner: Runner, pr: "Progress", log: "MetricsLog",
               evaluation: Evaluation, ctx, first_eval: bool = True) -> None:
    """Step until the step count or the time budget is reached (or the loss is not finite),
    logging every ``--log-every`` steps and evaluating on ``EvalSchedule``."""
    from tqdm import tqdm
    from zofo_kernels.core import distributed as dist_mod
    schedule, by_time = EvalSchedule(args), args.steps is None
    bar = tqdm(total=int(math.ceil(args.time_budget)) if by_time else args.steps,
               initial=int(pr.train_time) if by_time else pr.step,
               unit="s" if by_time else "step", disable=args.no_progress or not ctx.is_main,
               desc=f"{args.method}", dynamic_ncols=True)
    t_start = time.perf_counter()
    counts = lambda: dict(forward_count=runner.forward_count,  # noqa: E731
                          backward_count=runner.backward_count)
    elapsed = lambda: round(pr.elapsed + time.perf_counter() - t_start, 3)  # noqa: E731
    if first_eval:
        fields = evaluation(pr)
        pr.initial_acc = fields["eval_accuracy"]
        pr.eval_time += time.perf_counter() - t_start
        log.write(dict(kind="eval", step=0, wall_time_s=0.0, elapsed_s=round(pr.eval_time, 3),
                       **fields, forward_count=0, backward_count=0))
    while not _finished(args, pr):
        t0 = time.perf_counter()
        loss = runner.step()
        pr.train_time += time.perf_counter() - t0
        if ctx.distributed and args.time_budget is not None:
            pr.train_time = dist_mod.agree_on_max(pr.train_time, ctx)  # all ranks stop together
        pr.step += 1
        pr.recent.append(loss)
        pr.nonfinite = pr.nonfinite or not math.isfinite(loss)
        inside = runner.diagnostics()
        if inside is not None:
            log.write(dict(kind="bilevel", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           **inside))
        _show(bar, by_time, pr, loss)
        if pr.step % args.log_every == 0 or pr.nonfinite:
            log.write(dict(kind="train", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           elapsed_s=elapsed(), loss=loss,
                           loss_avg=sum(pr.recent) / len(pr.recent), **counts()))
            pr.recent = []
        if schedule.due(pr) or _finished(args, pr) or pr.nonfinite:
            te = time.perf_counter()
            fields = evaluation(pr)
            pr.eval_time += time.perf_counter() - te
            pr.last_eval_t, pr.last_eval_step = pr.train_time, pr.step
            log.write(dict(kind="eval", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           elapsed_s=elapsed(), **fields, **counts()))
        if pr.nonfinite:
            break
    bar.close()
    log.close()
    pr.elapsed = elapsed()


def _show(bar, by_time: bool, pr: "Progress", loss: float) -> None:
    if by_time:
        bar.n = min(bar.total, int(pr.train_time))
        bar.set_postfix(step=pr.step, loss=f"{loss:.4f}", acc=f"{pr.final_acc:.3f}")
        bar.refresh()
    else:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{pr.final_acc:.3f}")


def run_summary(args, data: RunData, loaded, runner: Runner, pr: "Progress", device,
                ctx) -> dict:
    """summary.json's fields (without the output folder and its files)."""
    method = methods_mod.get(args.method)
    hyper = {k: _setting(args, k) for k in ("lr", "eps", "estimator", "lam", "inner_steps",
                                             "peft_lr", "theta_update", "order",
                                             "penalty_batch", "backbone_regex")}
    hyper.update(weight_decay=args.weight_decay, batch_size=args.batch_size,
                 max_length=args.max_length, distribution=args.distribution,
                 n_directions=args.n_directions, lora_r=args.lora_r,
                 lora_alpha=args.lora_alpha, dtype=args.dtype)
    spec = data.spec
    return dict(
        method=args.method, model=args.model, peft=args.peft if method.peft else None,
        eval_accuracy=pr.final_acc, best_eval_accuracy=pr.best,
        initial_eval_accuracy=pr.initial_acc, selected_eval_accuracy=pr.selected_acc,
        selected_step=pr.selected_step, selection_loss=pr.select_loss,
        selection_data=f"D_f: last {args.upper_fraction:.3g} of the training sample "
                       f"({len(data.select)} examples)",
        head=data.head, template=spec.template if spec else None,
        label_words=list(spec.label_words) if spec else None,
        eval_data=data.eval_name, eval_examples=len(data.eval),
        wall_time_s=round(pr.train_time, 3), eval_time_s=round(pr.eval_time, 3),
        elapsed_s=pr.elapsed, steps=pr.step,
        forward_count=runner.forward_count, backward_count=runner.backward_count,
        peak_memory_bytes=peak_memory_bytes(device), peak_memory_kind=peak_memory_kind(device),
        model_parameters=sum(p.numel() for p in loaded.model.parameters()),
        num_train=len(data.train), num_lower=len(data.lower) if data.upper else None,
        num_upper=len(data.upper) or None, seed=args.seed, data_seed=data.data_seed,
        stopped_on_nonfinite_loss=pr.nonfinite, resumed_from=args.resume,
        hyperparameters=hyper, time_budget_s=args.time_budget, max_steps=args.steps,
        threads=torch.get_num_threads(), device=str(device), world_size=ctx.world_size)


class _DeviceEncoded:
    """An Encoded set whose batches are moved to ``device``."""

    def __init__(self, enc, device):
        self.enc, self.device = enc, device

    def __len__(self):
        return len(self.enc)

    def batches(self, batch_size):
        for b in self.enc.batches(batch_size):
            yield _to_device(b, self.device)


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
