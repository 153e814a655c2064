"""The training loop: steps on the run's schedule, metrics rows, evaluations and model
selection by the D_f loss."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.train.config import RunConfig
from zofo_kernels.apps.train.inputs import DeviceEncoded
from zofo_kernels.apps.train.runners import Runner
from zofo_kernels.integrations import checkpoint as ckpt_mod
from zofo_kernels.integrations import durable, library_warnings


@dataclasses.dataclass
class Progress:
    """Where a run stands: saved in resume/run_state.json and restored by ``--resume``."""
    step: int = 0
    train_time: float = 0.0    # seconds inside training steps (what --time-budget counts)
    eval_time: float = 0.0
    elapsed: float = 0.0       # wall-clock seconds spent by earlier processes of this run
    initial_acc: float = float("nan")
    initial_acc_calibrated: float = float("nan")  # prompt heads: minus content-free logits
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
            self._fh = None

    def reopen(self) -> None:
        """After a save swapped the output folder: append to the file now in its place."""
        if self._fh is not None:
            self._fh.close()
            self._fh = open(self.path, "a")


class Evaluation:
    """Evaluation accuracy, and model selection by the D_f loss: keeps the evaluation (and,
    when saving, the model in ``best/``) at the lowest D_f loss seen."""

    def __init__(self, config: RunConfig, runner: Runner, eval_enc, select_enc, device,
                 tokenizer, ctx, spec=None, add_special_tokens: bool = True):
        self.config, self.runner, self.tokenizer, self.ctx = config, runner, tokenizer, ctx
        self.eval_set = DeviceEncoded(eval_enc, device)
        self.select_set = DeviceEncoded(select_enc, device)
        self.best_files: set = set()
        self.spec, self.device, self.add_special_tokens = spec, device, add_special_tokens

    def zero_shot(self, pr: Progress, acc: float) -> str:
        """The zero-shot line: the accuracy before training and, for a prompt head, the same
        calibrated by a content-free input (recorded in ``pr``)."""
        pr.initial_acc = acc
        line = f"zero-shot accuracy: {acc:.4f}"
        if self.spec is not None:
            from zofo_kernels.integrations.prompting import CONTENT_FREE, content_free_logits
            model = self.runner.eval_model
            with library_warnings.forward_of(model):
                offset = content_free_logits(model, self.tokenizer, self.spec,
                                             self.add_special_tokens, self.device)
            pr.initial_acc_calibrated = models_mod.accuracy(
                model, self.eval_set, self.config.data.eval_batch_size, offset=offset)
            line += (f" (calibrated by the content-free input {CONTENT_FREE!r}: "
                     f"{pr.initial_acc_calibrated:.4f})")
        return line + f" on {len(self.eval_set)} examples"

    def __call__(self, pr: Progress) -> dict:
        """Evaluate now; updates ``pr`` (accuracy, best, selection); returns the row's
        fields."""
        model, bs = self.runner.eval_model, self.config.data.eval_batch_size
        acc = models_mod.accuracy(model, self.eval_set, bs)
        loss = models_mod.mean_loss(model, self.select_set, bs)
        pr.final_acc, pr.best = acc, max(pr.best, acc)
        if loss < pr.select_loss:
            pr.select_loss, pr.selected_acc, pr.selected_step = loss, acc, pr.step
            if self.config.save and self.ctx.is_main:
                self.best_files.update(ckpt_mod.save_trained(
                    Path(self.config.output) / "best", self.runner.model,
                    tokenizer=self.tokenizer, method=self.config.method.name))
        return dict(eval_accuracy=acc, select_loss=loss)


def train_loop(config: RunConfig, runner: Runner, pr: Progress, log: MetricsLog,
               evaluation: Evaluation, ctx, first_eval: bool = True, *,
               checkpoint: Optional[Callable[[Progress], None]] = None,
               stop=None) -> bool:
    """Step until the step count or the time budget is reached (or the loss is not finite),
    logging every ``--log-every`` steps and evaluating when the schedule says.
    ``checkpoint(progress)`` writes a resumable checkpoint; it is called when the schedule's
    checkpoint period has passed and when ``stop`` (a StopRequest) was requested, after which
    the loop ends. Returns True when it ended on ``stop``."""
    from tqdm import tqdm
    sched = config.schedule
    by_time = sched.steps is None
    bar = tqdm(total=int(math.ceil(sched.time_budget)) if by_time else sched.steps,
               initial=int(pr.train_time) if by_time else pr.step,
               unit="s" if by_time else "step",
               disable=not config.progress_bar or not ctx.is_main,
               desc=config.method.name, dynamic_ncols=True)
    clock = _Clock(pr)
    if first_eval:
        fields = evaluation(pr)
        line = evaluation.zero_shot(pr, fields["eval_accuracy"])
        if ctx.is_main:
            bar.write(line, file=sys.stderr)  # above the bar, not inside its line
        pr.eval_time += time.perf_counter() - clock.start
        log.write(dict(kind="eval", step=0, wall_time_s=0.0, elapsed_s=round(pr.eval_time, 3),
                       **fields, forward_count=0, backward_count=0))
    stopped = False
    while not sched.finished(pr.step, pr.train_time):
        durable.crash_point("loop:before-step")
        loss = _one_step(runner, pr, ctx, sched)
        durable.crash_point("loop:after-step")
        _record_step(config, runner, pr, log, evaluation, clock, loss)
        show(bar, by_time, pr, loss)
        if pr.nonfinite or sched.finished(pr.step, pr.train_time):
            break  # the end of the run: its final save follows
        stopped = stop is not None and _agreed(stop.requested, ctx)
        due = sched.checkpoint_due(pr.step, clock.checkpoint_step,
                                   time.monotonic() - clock.checkpoint_t)
        if checkpoint is not None and (stopped or due):
            checkpoint(dataclasses.replace(pr, elapsed=clock.elapsed()))
            log.reopen()
            clock.checkpoint_step, clock.checkpoint_t = pr.step, time.monotonic()
        if stopped:
            break
    bar.close()
    log.close()
    pr.elapsed = clock.elapsed()
    return stopped


class _Clock:
    """A run's timers in this process: the loop's start, the last checkpoint."""

    def __init__(self, pr: Progress):
        self.pr = pr
        self.start = time.perf_counter()
        self.checkpoint_t, self.checkpoint_step = time.monotonic(), pr.step

    def elapsed(self) -> float:
        return round(self.pr.elapsed + time.perf_counter() - self.start, 3)


def _agreed(flag: bool, ctx) -> bool:
    """``flag`` on any rank (every rank stops at the same step under torchrun)."""
    if not ctx.distributed:
        return flag
    from zofo_kernels.core import distributed as dist_mod
    return dist_mod.agree_on_max(1.0 if flag else 0.0, ctx) > 0


def _one_step(runner: Runner, pr: Progress, ctx, sched) -> float:
    t0 = time.perf_counter()
    loss = runner.step()
    pr.train_time += time.perf_counter() - t0
    if ctx.distributed and sched.time_budget is not None:
        from zofo_kernels.core import distributed as dist_mod
        pr.train_time = dist_mod.agree_on_max(pr.train_time, ctx)  # all ranks stop together
    pr.step += 1
    pr.recent.append(loss)
    pr.nonfinite = pr.nonfinite or not math.isfinite(loss)
    return loss


def _record_step(config: RunConfig, runner: Runner, pr: Progress, log: MetricsLog,
                 evaluation: Evaluation, clock: _Clock, loss: float) -> None:
    """The step's metrics rows, and the evaluation when one is due."""
    sched = config.schedule
    counts = dict(forward_count=runner.forward_count, backward_count=runner.backward_count)
    inside = runner.diagnostics()
    if inside is not None:
        log.write(dict(kind="bilevel", step=pr.step, wall_time_s=round(pr.train_time, 3),
                       **inside))
    if pr.step % sched.log_every == 0 or pr.nonfinite:
        log.write(dict(kind="train", step=pr.step, wall_time_s=round(pr.train_time, 3),
                       elapsed_s=clock.elapsed(), loss=loss,
                       loss_avg=sum(pr.recent) / len(pr.recent), **counts))
        pr.recent = []
    if (sched.eval_due(pr.step, pr.train_time, pr.last_eval_step, pr.last_eval_t)
            or sched.finished(pr.step, pr.train_time) or pr.nonfinite):
        te = time.perf_counter()
        fields = evaluation(pr)
        pr.eval_time += time.perf_counter() - te
        pr.last_eval_t, pr.last_eval_step = pr.train_time, pr.step
        log.write(dict(kind="eval", step=pr.step, wall_time_s=round(pr.train_time, 3),
                       elapsed_s=clock.elapsed(), **fields, **counts))


def show(bar, by_time: bool, pr: Progress, loss: float) -> None:
    """The progress bar after a step (and its evaluation, if one was due): the step's loss
    and the latest evaluation's accuracy with its step, drawn once, all of the same
    moment."""
    fields = dict(loss=f"{loss:.4f}", eval_acc=f"{pr.final_acc:.3f}@{pr.last_eval_step}")
    if by_time:
        bar.n = min(bar.total, int(pr.train_time))
        bar.set_postfix(step=pr.step, **fields, refresh=False)
        bar.refresh()
    else:
        bar.set_postfix(**fields, refresh=False)  # then one draw, by update
        bar.update(1)
