"""One ``zofo-train`` run from its :class:`~zofo_kernels.apps.train.config.RunConfig`: load the
data and the model, build the runner, (resume,) train, save, summarise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, List, Optional

import torch

from zofo_kernels.apps import data as data_mod
from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.measure import peak_memory_bytes, peak_memory_kind
from zofo_kernels.apps.train.config import RunConfig
from zofo_kernels.apps.train.inputs import RunData, encode, load_data
from zofo_kernels.apps.train.loop import Evaluation, MetricsLog, Progress, train_loop
from zofo_kernels.apps.train.runners import Runner, make_runner, wire_data_parallel
from zofo_kernels.integrations import checkpoint as ckpt_mod

# the optimizer settings summary.json reports (None where the method has none)
SUMMARY_SETTINGS = ("lr", "eps", "estimator", "lam", "inner_steps", "peft_lr", "theta_update",
                    "order", "penalty_batch", "backbone_regex", "weight_decay", "distribution",
                    "n_directions")


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
    log = MetricsLog(out / "metrics.jsonl", ctx.is_main, prior_rows)
    train_loop(config, runner, pr, log, evaluation, ctx, first_eval=config.resume is None)
    if not ctx.is_main:
        return {}
    if on_trained is not None:
        on_trained(runner)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    if config.save:
        written = save_run(config, runner, loaded.tokenizer, pr)
    summary = run_summary(config, data, loaded, runner, pr, device, ctx)
    from zofo_kernels.apps import plotting
    plotting.plot_run(log.rows, out / "curves.png", title=f"{config.method.name} on "
                      f"{config.model.name} ({len(data.train)} examples)")
    files = sorted({str(p.relative_to(out)) for p in list(written)
                    + sorted(evaluation.best_files)}
                   | {"metrics.jsonl", "summary.json", "curves.png"})
    summary.update(output=str(out.resolve()), files=files)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
            hint = (" (prefix tuning works with CAUSAL_LM task types on OPT, Llama and GPT-2 "
                    "models; zofo-train trains sequence classifiers)")
        raise SystemExit(f"zofo-train: {exc}{hint}") from None


def save_run(config: RunConfig, runner: Runner, tokenizer, progress: Progress) -> List[Path]:
    """Write the trained model and everything ``--resume`` needs to the output folder (one
    :func:`zofo_kernels.integrations.checkpoint.save_trained` call); returns the files
    written. ``run_state.json`` holds the options (``args``: what ``--resume`` reads back),
    the progress and the batch-stream positions."""
    run_state = dict(args=dict(config.options), progress=dataclasses.asdict(progress),
                     streams={name: s.drawn for name, s in runner.streams.items()})
    optimizer_state = dict(runner.optimizer_state(), torch_rng=torch.get_rng_state())
    return ckpt_mod.save_trained(Path(config.output), runner.model, tokenizer=tokenizer,
                                 method=config.method.name, lower_adapter=runner.lower_adapter,
                                 optimizer_state=optimizer_state, run_state=run_state)


def restore(runner: Runner, config: RunConfig) -> Progress:
    """Put ``runner`` (freshly built from the saved options) where the saved run stopped:
    weights, optimizer state, counters, batch-stream positions."""
    resume = config.resume
    folder = Path(resume.folder)
    try:
        ckpt_mod.load_weights_into(runner.model, folder)
    except ckpt_mod.CheckpointError as exc:
        raise SystemExit(f"zofo-train --resume: {exc}") from None
    opt_state = torch.load(folder / ckpt_mod.OPTIMIZER_FILE, map_location="cpu",
                           weights_only=True)
    runner.load_optimizer_state(opt_state)
    torch.set_rng_state(opt_state["torch_rng"])
    if set(resume.streams) != set(runner.streams):
        raise SystemExit(f"zofo-train --resume: {folder} saved the batch streams "
                         f"{sorted(resume.streams)}, this method has {sorted(runner.streams)}")
    for name, drawn in resume.streams.items():
        runner.streams[name].skip(int(drawn))
    if hasattr(runner.opt, "eval_mode"):
        runner.opt.eval_mode()
    return Progress(**resume.progress)


def resume_progress(config: RunConfig, runner: Runner):
    """(the saved run's progress, its metrics rows) with ``runner`` put where it stopped."""
    folder = Path(config.resume.folder)
    pr = restore(runner, config)
    rows = []
    if (folder / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in
                (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
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
        num_upper=len(data.upper) or None, seed=config.seed, data_seed=data.data_seed,
        stopped_on_nonfinite_loss=pr.nonfinite,
        resumed_from=config.resume.folder if config.resume else None,
        hyperparameters=hyper, time_budget_s=sched.time_budget, max_steps=sched.steps,
        threads=torch.get_num_threads(), device=str(device), world_size=ctx.world_size)
