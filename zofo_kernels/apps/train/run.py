"""One ``zofo-train`` run from its :class:`~zofo_kernels.apps.train.config.RunConfig`: load the
data and the model, build the runner, (resume,) train, save, summarise."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

from zofo_kernels.apps import data as data_mod
from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.measure import peak_memory_bytes, peak_memory_kind
from zofo_kernels.apps.train import stopping
from zofo_kernels.apps.train.config import RunConfig
from zofo_kernels.apps.train.inputs import RunData, check_label_words, encode, load_data
from zofo_kernels.apps.train.loop import Evaluation, MetricsLog, Progress, train_loop
from zofo_kernels.apps.train.runners import Runner, make_runner, wire_data_parallel
from zofo_kernels.integrations import checkpoint as ckpt_mod
from zofo_kernels.integrations import durable

# the optimizer settings summary.json reports (None where the method has none)
SUMMARY_SETTINGS = ("lr", "eps", "estimator", "lam", "inner_steps", "peft_lr", "theta_update",
                    "order", "penalty_batch", "backbone_regex", "weight_decay", "distribution",
                    "n_directions", "normalize", "sparse_fraction", "lowrank",
                    "lowrank_period")


def run(config: RunConfig, on_trained: Optional[Callable[[Runner], None]] = None) -> dict:
    """Train as ``config`` says; returns the summary (also written to summary.json).

    ``on_trained(runner)`` is called on rank 0 after the last step, before anything is saved
    (the trained model is ``runner.model``). With ``config.resume`` the saved run continues.
    Under ``torchrun`` (``WORLD_SIZE`` set) the run is data parallel: every rank draws its own
    batches, ZO methods all-reduce only their losses (``DataParallelZO``), first-order
    methods their gradients, and rank 0 alone writes the outputs. The parts, in order:
    :func:`~zofo_kernels.apps.train.inputs.load_data`, :func:`build_runner`,
    :func:`~zofo_kernels.apps.train.runners.wire_data_parallel`,
    :func:`~zofo_kernels.apps.train.loop.train_loop`, :func:`save_run`, :func:`run_summary`."""
    if not isinstance(config, RunConfig):
        raise TypeError("run() takes a RunConfig: zofo_kernels.apps.train.parse(argv) "
                        f"builds one (got {type(config).__name__})")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("zofo-train: --device cuda but CUDA is not available")
    from zofo_kernels.core import distributed as dist_mod
    ctx = dist_mod.setup_from_env()
    try:
        if ctx.distributed and device.type == "cuda":
            device = ctx.device
        return train_and_report(config, device, ctx, on_trained)
    finally:
        dist_mod.shutdown(ctx)


def train_and_report(config: RunConfig, device, ctx, on_trained=None) -> dict:
    """The run on ``device`` in the data-parallel context ``ctx`` (see :func:`run`)."""
    try:
        data = load_data(config)
        loaded = models_mod.load_model(config.model.name, num_labels=data.num_labels,
                                       dtype=config.model.dtype, seed=config.seed,
                                       device=str(device), head=data.head, prompt=data.spec)
    except (data_mod.DataError, models_mod.ModelError) as exc:
        raise SystemExit(f"zofo-train: {exc}") from None
    check_label_words(loaded.tokenizer, data.spec)
    runner = build_runner(config, data, loaded, device, ctx)
    pr, prior_rows = Progress(), []
    if config.resume is not None:
        pr, prior_rows = resume_progress(config, runner)
    wire_data_parallel(runner, ctx)
    max_length = config.data.max_length
    evaluation = Evaluation(config, runner, encode(loaded, data.eval, max_length),
                            encode(loaded, data.select, max_length), device,
                            loaded.tokenizer, ctx, spec=data.spec,
                            add_special_tokens=loaded.add_special_tokens)
    out = Path(config.output)
    if ctx.is_main:
        clear_for_overwrite(config)
    log = MetricsLog(out / "metrics.jsonl", ctx.is_main, prior_rows)
    save = None
    if config.save and ctx.is_main:
        save = lambda p: save_run(config, runner, loaded.tokenizer, p, len(log.rows))  # noqa
    with stopping.stop_on_signals() as stop:
        stopped = train_loop(config, runner, pr, log, evaluation, ctx,
                             first_eval=config.resume is None, checkpoint=save, stop=stop)
    if stopped:
        raise SystemExit(stopped_message(config, stop, pr, ctx, saved=save is not None))
    if not ctx.is_main:
        return {}
    if on_trained is not None:
        on_trained(runner)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    if config.save:
        written = save_run(config, runner, loaded.tokenizer, pr, len(log.rows))
    summary = run_summary(config, data, loaded, runner, pr, device, ctx)
    from zofo_kernels.apps import plotting
    plotting.plot_run(log.rows, out / "curves.png", title=f"{config.method.name} on "
                      f"{config.model.name} ({len(data.train)} examples)")
    files = sorted({str(p.relative_to(out)) for p in list(written)
                    + sorted(evaluation.best_files)}
                   | {"metrics.jsonl", "summary.json", "curves.png"})
    summary.update(output=str(out.resolve()), files=files)
    write_file(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def write_file(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all (a temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + durable.TMP_TAG + str(os.getpid()))
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def clear_for_overwrite(config: RunConfig) -> None:
    """--overwrite: what the output folder holds goes (unless it is the folder resumed)."""
    out = Path(config.output)
    resumed = config.resume is not None and out.resolve() == Path(config.resume.folder).resolve()
    if config.overwrite and out.exists() and not resumed:
        old = out.with_name(out.name + durable.OLD_TAG)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        shutil.rmtree(old)


def stopped_message(config: RunConfig, stop, pr: Progress, ctx, saved: bool) -> int:
    """Print how the stopped run continues (rank 0); the exit status."""
    if ctx.is_main:
        out = Path(config.output)
        length = (f"--steps {config.schedule.steps}" if config.schedule.steps is not None
                  else f"--time-budget {config.schedule.time_budget:g}")
        how = (f"checkpoint written to {out}; continue with: zofo-train --resume {out} {length}"
               if saved else "no checkpoint written (--no-save)")
        print(f"zofo-train: stopped by {stop.name} after step {pr.step}; {how}",
              file=sys.stderr, flush=True)
    return stopping.EXIT_STOPPED


def build_runner(config: RunConfig, data: RunData, loaded, device, ctx) -> Runner:
    """The method's runner on the loaded model (this rank's batch streams)."""
    sets = ("lower", "upper") if config.data.split else ("train",)
    encoded = {k: encode(loaded, getattr(data, k), config.data.max_length) for k in sets}
    torch.manual_seed(config.seed)
    try:
        return make_runner(config, loaded.model, device, encoded, rank=ctx.rank)
    except models_mod.ModelError as exc:
        hint = ""
        if config.model.peft == "prefix":
            hint = (" (zofo-train runs prefix tuning on causal LMs with --head prompt, e.g. "
                    "--model tiny-opt, opt-125m or gemma3-270m; "
                    f"--model {config.model.name} with --head {config.model.head} cannot take "
                    "it)")
        raise SystemExit(f"zofo-train: {exc}{hint}") from None


def save_run(config: RunConfig, runner: Runner, tokenizer, progress: Progress,
             metrics_rows: Optional[int] = None) -> List[Path]:
    """Write the trained model and everything ``--resume`` needs to the output folder (one
    crash-safe :func:`zofo_kernels.integrations.checkpoint.save_trained` call: the final save
    and every periodic checkpoint); returns the files written. ``run_state.json`` holds the
    options (``args``: what ``--resume`` reads back), the progress, the batch-stream
    positions and the number of metrics.jsonl rows written so far (a resumed run drops the
    rows after them)."""
    args = {k: v for k, v in config.options.items() if k != "overwrite"}
    run_state = dict(args=args, progress=dataclasses.asdict(progress),
                     streams={name: s.drawn for name, s in runner.streams.items()},
                     metrics_rows=metrics_rows)
    optimizer_state = dict(runner.optimizer_state(), torch_rng=torch.get_rng_state())
    return ckpt_mod.save_trained(Path(config.output), runner.model, tokenizer=tokenizer,
                                 method=config.method.name, lower_adapter=runner.lower_adapter,
                                 optimizer_state=optimizer_state, run_state=run_state)


def restore(runner: Runner, config: RunConfig) -> Progress:
    """Put ``runner`` (freshly built from the saved options) where the saved run stopped:
    weights, optimizer state, counters, batch-stream positions. Everything is checked before
    the model is touched (``SystemExit`` naming the file and the problem)."""
    resume = config.resume
    folder = Path(resume.folder)
    progress = checked_progress(resume, runner, config)
    path = folder / ckpt_mod.OPTIMIZER_FILE
    try:
        opt_state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(opt_state, dict) or "optimizer" not in opt_state:
            raise ValueError("no optimizer state in it")
        rng = opt_state["torch_rng"]
    except Exception as exc:  # torch.load's unpickler raises many kinds
        raise SystemExit(f"zofo-train --resume: {path} is damaged "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None
    try:
        ckpt_mod.load_weights_into(runner.model, folder)
    except ckpt_mod.CheckpointError as exc:
        raise SystemExit(f"zofo-train --resume: {exc}") from None
    runner.load_optimizer_state(opt_state)
    torch.set_rng_state(rng)
    for name, drawn in resume.streams.items():
        runner.streams[name].skip(int(drawn))
    if hasattr(runner.opt, "eval_mode"):
        runner.opt.eval_mode()
    return progress


def checked_progress(resume, runner: Runner, config: RunConfig) -> Progress:
    """The saved progress, its fields in range, and the batch-stream positions the saved
    step count implies."""
    where = Path(resume.folder) / ckpt_mod.RUN_STATE_FILE
    try:
        pr = Progress(**resume.progress)
        if not (isinstance(pr.step, int) and pr.step >= 0):
            raise ValueError(f"step {pr.step!r} is not a count >= 0")
        for name in ("train_time", "eval_time", "elapsed"):
            value = getattr(pr, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} {value!r} is not a finite time >= 0")
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"zofo-train --resume: {where} is damaged ({exc})") from None
    expected = stream_positions(runner, config, pr.step)
    given = {k: v for k, v in resume.streams.items()}
    if given != expected:
        raise SystemExit(f"zofo-train --resume: {where} is damaged (batch-stream positions "
                         f"{given} do not match step {pr.step}: expected {expected})")
    return pr


def stream_positions(runner: Runner, config: RunConfig, step: int) -> dict:
    """How many batches each stream has handed out after ``step`` steps."""
    if "upper" not in runner.streams:
        return {name: step for name in runner.streams}
    fresh = "penalty" in runner.streams
    inner = config.settings.inner_steps
    out = {"upper": step, "lower": step * (inner if fresh else max(1, inner))}
    if fresh:
        out["penalty"] = step
    return out


def resume_progress(config: RunConfig, runner: Runner):
    """(the saved run's progress, its metrics rows up to the checkpoint) with ``runner`` put
    where it stopped."""
    folder = Path(config.resume.folder)
    pr = restore(runner, config)
    rows = []
    path = folder / "metrics.jsonl"
    if path.is_file():
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        except ValueError as exc:
            raise SystemExit(f"zofo-train --resume: {path} is damaged ({exc})") from None
    if config.resume.metrics_rows is not None:
        rows = rows[:int(config.resume.metrics_rows)]
    else:  # saved before the count was kept: the rows up to the saved step
        rows = [r for r in rows if isinstance(r, dict) and r.get("step", 0) <= pr.step]
    steps, budget = config.schedule.steps, config.schedule.time_budget
    if (steps is None or pr.step >= steps) and (budget is None or pr.train_time >= budget):
        raise SystemExit(f"zofo-train --resume: the saved run already reached step "
                         f"{pr.step} ({pr.train_time:.1f} s of training); give "
                         "a larger --steps or --time-budget (totals for the whole run)")
    return pr, rows


def run_summary(config: RunConfig, data: RunData, loaded, runner: Runner, pr: Progress,
                device, ctx) -> dict:
    """summary.json's fields (without the output folder and its files)."""
    hyper = {k: config.setting(k) for k in SUMMARY_SETTINGS}
    hyper.update(batch_size=config.data.batch_size, max_length=config.data.max_length,
                 lora_r=config.model.lora_r, lora_alpha=config.model.lora_alpha,
                 dtype=config.model.dtype)
    spec, sched = data.spec, config.schedule
    return dict(
        method=config.method.name, model=config.model.name, peft=config.model.peft,
        eval_accuracy=pr.final_acc, best_eval_accuracy=pr.best,
        initial_eval_accuracy=pr.initial_acc,
        initial_eval_accuracy_calibrated=pr.initial_acc_calibrated,
        selected_eval_accuracy=pr.selected_acc,
        selected_step=pr.selected_step, selection_loss=pr.select_loss,
        selection_data=f"D_f: last {config.data.upper_fraction:.3g} of the training sample "
                       f"({len(data.select)} examples"
                       f"{'' if config.data.select_max is None else ', --select-max'})",
        head=data.head, template=spec.template if spec else None,
        label_words=list(spec.label_words) if spec else None,
        eval_data=data.eval_name, eval_examples=len(data.eval),
        wall_time_s=round(pr.train_time, 3), eval_time_s=round(pr.eval_time, 3),
        elapsed_s=pr.elapsed, steps=pr.step,
        forward_count=runner.forward_count, backward_count=runner.backward_count,
        peak_memory_bytes=peak_memory_bytes(device), peak_memory_kind=peak_memory_kind(device),
        model_parameters=sum(p.numel() for p in loaded.model.parameters()),
        num_train=len(data.train), num_lower=len(data.lower) if data.upper else None,
        num_upper=len(data.upper) or None, seed=config.seed, data_seed=data.data_seed,
        stopped_on_nonfinite_loss=pr.nonfinite,
        resumed_from=config.resume.folder if config.resume else None,
        hyperparameters=hyper, time_budget_s=sched.time_budget, max_steps=sched.steps,
        threads=torch.get_num_threads(), device=str(device), world_size=ctx.world_size)
