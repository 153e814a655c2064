"""The training loop: steps on the run's schedule, metrics rows, evaluations and model
selection by the D_f loss."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import List

from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.train.config import RunConfig
from zofo_kernels.apps.train.inputs import DeviceEncoded
from zofo_kernels.apps.train.runners import Runner
from zofo_kernels.integrations import checkpoint as ckpt_mod


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
               evaluation: Evaluation, ctx, first_eval: bool = True) -> None:
    """Step until the step count or the time budget is reached (or the loss is not finite),
    logging every ``--log-every`` steps and evaluating when the schedule says."""
    from tqdm import tqdm
    from zofo_kernels.core import distributed as dist_mod
    sched = config.schedule
    by_time = sched.steps is None
    bar = tqdm(total=int(math.ceil(sched.time_budget)) if by_time else sched.steps,
               initial=int(pr.train_time) if by_time else pr.step,
               unit="s" if by_time else "step",
               disable=not config.progress_bar or not ctx.is_main,
               desc=config.method.name, dynamic_ncols=True)
    t_start = time.perf_counter()
    counts = lambda: dict(forward_count=runner.forward_count,  # noqa: E731
                          backward_count=runner.backward_count)
    elapsed = lambda: round(pr.elapsed + time.perf_counter() - t_start, 3)  # noqa: E731
    if first_eval:
        fields = evaluation(pr)
        line = evaluation.zero_shot(pr, fields["eval_accuracy"])
        if ctx.is_main:
            print(line, file=sys.stderr, flush=True)
        pr.eval_time += time.perf_counter() - t_start
        log.write(dict(kind="eval", step=0, wall_time_s=0.0, elapsed_s=round(pr.eval_time, 3),
                       **fields, forward_count=0, backward_count=0))
    while not sched.finished(pr.step, pr.train_time):
        t0 = time.perf_counter()
        loss = runner.step()
        pr.train_time += time.perf_counter() - t0
        if ctx.distributed and sched.time_budget is not None:
            pr.train_time = dist_mod.agree_on_max(pr.train_time, ctx)  # all ranks stop together
        pr.step += 1
        pr.recent.append(loss)
        pr.nonfinite = pr.nonfinite or not math.isfinite(loss)
        inside = runner.diagnostics()
        if inside is not None:
            log.write(dict(kind="bilevel", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           **inside))
        show(bar, by_time, pr, loss)
        if pr.step % sched.log_every == 0 or pr.nonfinite:
            log.write(dict(kind="train", step=pr.step, wall_time_s=round(pr.train_time, 3),
                           elapsed_s=elapsed(), loss=loss,
                           loss_avg=sum(pr.recent) / len(pr.recent), **counts()))
            pr.recent = []
        if (sched.eval_due(pr.step, pr.train_time, pr.last_eval_step, pr.last_eval_t)
                or sched.finished(pr.step, pr.train_time) or pr.nonfinite):
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


def show(bar, by_time: bool, pr: Progress, loss: float) -> None:
    """The progress bar after a step."""
    if by_time:
        bar.n = min(bar.total, int(pr.train_time))
        bar.set_postfix(step=pr.step, loss=f"{loss:.4f}", acc=f"{pr.final_acc:.3f}")
        bar.refresh()
    else:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{pr.final_acc:.3f}")
