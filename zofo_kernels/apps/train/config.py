"""One run's configuration: frozen, typed, resolved once.

:func:`zofo_kernels.apps.train.cli.parse` reads the command line (and, for ``--resume``, the
saved run's options), checks it, and calls :func:`build` once; the run reads nothing else.
``RunConfig.settings`` is the method's optimizer settings with every default applied (the
registry's :meth:`~zofo_kernels.integrations.methods.Method.resolve`, the one merge of
defaults); ``RunConfig.method`` is the registry entry, looked up once.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping, Optional

from zofo_kernels.integrations import methods as methods_mod


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which examples a run trains and evaluates on, and how they are batched."""
    train: str
    eval: Optional[str]
    text_column: str
    label_column: str
    num_train: int
    holdout: int
    upper_fraction: float   # D_f: the last share of the sample (Bilevel-ZOFO's upper level)
    eval_max: Optional[int]
    select_max: Optional[int]  # the model-selection loss reads at most the first N of D_f
    data_seed: int          # --data-seed, or --seed
    split: bool             # Bilevel-ZOFO: the sample is split into D_g and D_f
    batch_size: int
    eval_batch_size: int
    max_length: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model a run loads, its head and its PEFT block."""
    name: str
    dtype: str
    head: str                    # "prompt" or "random"
    template: Optional[str]      # prompt head: None takes the PromptSpec default
    label_words: Optional[str]
    peft: Optional[str]          # the PEFT kind of a PEFT method, None otherwise
    lora_r: int
    lora_alpha: int
    num_virtual_tokens: Optional[int]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a run trains, and when it logs and evaluates (the evaluation period is
    resolved: ``--eval-every`` / ``--eval-every-steps``, else 15 times over the budget, else
    10 times over the steps)."""
    steps: Optional[int]
    time_budget: Optional[float]
    eval_every: Optional[float]
    eval_every_steps: Optional[int]
    log_every: int
    checkpoint_every: float = 0.0              # seconds of the run between checkpoints (0: off)
    checkpoint_every_steps: Optional[int] = None

    def checkpoint_due(self, step: int, last_step: int, seconds_since: float) -> bool:
        """A periodic checkpoint is due (``seconds_since`` the last one, or the run's
        start)."""
        return ((self.checkpoint_every > 0 and seconds_since >= self.checkpoint_every)
                or (self.checkpoint_every_steps is not None
                    and step - last_step >= self.checkpoint_every_steps))

    def finished(self, step: int, train_time: float) -> bool:
        """The run has made its steps or spent its budget."""
        return ((self.steps is not None and step >= self.steps)
                or (self.time_budget is not None and train_time >= self.time_budget))

    def eval_due(self, step: int, train_time: float, last_step: int, last_time: float) -> bool:
        """An evaluation period has passed since the last evaluation."""
        return ((self.eval_every is not None and train_time - last_time >= self.eval_every)
                or (self.eval_every_steps is not None
                    and step - last_step >= self.eval_every_steps))


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a resumed run continues: its folder, and the saved progress and batch-stream
    positions (resume/run_state.json)."""
    folder: str
    progress: Mapping[str, Any]
    streams: Mapping[str, int]
    metrics_rows: Optional[int] = None   # metrics.jsonl rows the checkpoint had written


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one ``zofo-train`` run does."""
    method: methods_mod.Method   # the registry's entry
    settings: Any                # its settings, resolved (method.settings_type)
    seed: int
    data: DataConfig
    model: ModelConfig
    schedule: Schedule
    output: str
    save: bool                   # write the trained model (not --no-save)
    progress_bar: bool
    device: str
    threads: Optional[int]
    resume: Optional[Resume]
    overwrite: bool              # --overwrite: what --output holds is replaced
    # the options as given (None where not given; without --resume): written to
    # resume/run_state.json, which --resume reads back, compares and resolves again
    options: Mapping[str, Any]

    def setting(self, name: str) -> Any:
        """The resolved optimizer setting ``name``; None where the method has none."""
        return getattr(self.settings, name, None)


def _schedule(o: Mapping[str, Any]) -> Schedule:
    every_s, every_steps = o["eval_every"], o["eval_every_steps"]
    if every_s is None and every_steps is None:
        if o["time_budget"] is not None:
            every_s = o["time_budget"] / 15
        else:
            every_steps = max(1, o["steps"] // 10)
    return Schedule(o["steps"], o["time_budget"], every_s, every_steps, o["log_every"],
                    float(o.get("checkpoint_every") or 0.0), o.get("checkpoint_every_steps"))


def build(options: Mapping[str, Any], resume: Optional[Resume] = None) -> RunConfig:
    """The run's configuration from checked command-line options (a mapping of option
    destinations; see :func:`zofo_kernels.apps.train.cli.parse`). The method's settings are
    the options named like one of them (:meth:`Method.setting_names`), resolved once."""
    o = dict(options)
    o.pop("resume", None)
    method = methods_mod.get(o["method"])
    settings = method.resolve(**{k: o[k] for k in method.setting_names() if k in o})
    data = DataConfig(
        train=o["train"], eval=o["eval"], text_column=o["text_column"],
        label_column=o["label_column"], num_train=o["num_train"], holdout=o["holdout"],
        upper_fraction=o["upper_fraction"], eval_max=o["eval_max"],
        select_max=o.get("select_max"),
        data_seed=o["seed"] if o["data_seed"] is None else o["data_seed"],
        split=method.name == "bilevel-zofo", batch_size=o["batch_size"],
        eval_batch_size=o["eval_batch_size"], max_length=o["max_length"])
    model = ModelConfig(
        name=o["model"], dtype=o["dtype"], head=o["head"], template=o["template"],
        label_words=o["label_words"], peft=o["peft"] if method.peft else None,
        lora_r=o["lora_r"], lora_alpha=o["lora_alpha"],
        num_virtual_tokens=o["num_virtual_tokens"])
    return RunConfig(method=method, settings=settings, seed=o["seed"], data=data, model=model,
                     schedule=_schedule(o), output=o["output"], save=not o["no_save"],
                     progress_bar=not o["no_progress"], device=o["device"],
                     threads=o["threads"], resume=resume, overwrite=bool(o.get("overwrite")),
                     options=types.MappingProxyType(o))
