"""Hugging Face ``Trainer`` integration: MeZO and Bilevel-ZOFO by changing the class.

::

    from zofo_kernels.integrations.hf_trainer import ZOConfig, ZOFOTrainer

    trainer = ZOFOTrainer(model=model, args=training_args, train_dataset=train,
                          eval_dataset=dev, zo_config=ZOConfig(method="mezo", eps=1e-3))
    trainer.train()                                  # or train(resume_from_checkpoint=True)

Everything else of the user's script stays: ``TrainingArguments`` (``learning_rate`` is the ZO
learning rate of the backbone, with its scheduler and warm-up; ``weight_decay``; ``max_steps``;
logging, evaluation and save strategies), data collators, metrics, callbacks, ``torchrun``.

Methods (the zeroth-order ones of the registry, :mod:`zofo_kernels.integrations.methods`)
-------------------------------------------------------------------------
* ``"mezo"``: ZO-SGD (:class:`~zofo_kernels.core.optim.ZOOptimizer`) on every trainable
  parameter (biases and normalisation weights without weight decay).
* ``"mezo-lora"``: ZO-SGD on the adapter of a ``peft.PeftModel``.
* ``"bilevel-zofo"``: Bilevel-ZOFO (:class:`~zofo_kernels.core.optim.ZOFOOptimizer`) on a
  ``peft.PeftModel``: the active adapter is P, a copy S is added, the backbone is theta.
  The training set is the lower-level data D_g; the upper-level data D_f is ``upper_dataset``
  or, if not given, a seeded third of the training set (the paper's 2 : 1 split).

The long form, with the logged quantities and checkpoints: docs/trainer.md.

Gradient accumulation (``gradient_accumulation_steps = G``)
-----------------------------------------------------------
* MeZO: one ZO step per G micro-batches, with one direction z for the whole window: each
  loss evaluation runs the G micro-batches and averages their losses (weighted by examples),
  so the step equals a ZO step on the concatenated batch, at the activation memory of one
  micro-batch. A step costs 2qG forwards (central) or (q + 1)G (forward).
* Bilevel-ZOFO: one Trainer step is one outer iteration; its B_f is the next batch of D_f.
  With ``ZOConfig.penalty_batch="fresh"`` (the default when G >= 2) the window's first G - 1
  micro-batches are the lower steps of S (``inner_steps = G - 1``) and the last one is only
  B_g of the upper step, a batch S has not trained on. With ``"last"`` (the default when
  G = 1) all G micro-batches are lower steps (``inner_steps = G``) and the last is also B_g.

Under ``torchrun`` (the Trainer's distributed mode) the optimizer is wrapped in
:class:`~zofo_kernels.core.distributed.DataParallelZO`: each rank evaluates its own micro-batches,
the losses are all-reduced (16 bytes per central step), P and S gradients are all-reduced, and
the parameters are compared across ranks every ``check_every`` steps.

Saving (``save_model`` and every ``checkpoint-N``) writes the layout of
:mod:`zofo_kernels.integrations.checkpoint`: ``model/`` (the backbone, which ZO changed, as a normal
``save_pretrained`` checkpoint, with the tokenizer), ``adapter/`` (PEFT models: the prediction
adapter, Bilevel-ZOFO's P, a normal peft folder), ``resume/lower_adapter/`` (Bilevel-ZOFO's S)
and ``zofo_checkpoint.json``. Reload with ``zofo_kernels.load_trained(folder)`` or with
``AutoModelFor...from_pretrained(folder/model)`` then ``PeftModel.from_pretrained(model,
folder/adapter)``. A checkpoint also holds the Trainer's ``optimizer.pt`` (base seed, step
counter, P and S optimizer states, the position in D_f), scheduler, RNG and trainer state, and
``train(resume_from_checkpoint=...)`` continues exactly.

Logging: the Trainer's ``grad_norm`` (always 0: ZO leaves no gradients) is replaced by the
ZO quantities of the last step: ``zo_projected_grad`` (mean over directions), and for
Bilevel-ZOFO ``upper_loss`` (f at P), ``penalty_loss`` (g at P), ``lower_penalty_loss`` (g at
S), ``gap`` (g_P - g_S), ``theta_step_rms``, ``lower_loss`` (last inner step), each where the
optimizer computed it; with ``ZOConfig(sparse_fraction=f)``, ``perturbed_fraction`` (the share
of the ZO-trained weights the step perturbed and updated).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from transformers import Trainer

from zofo_kernels.integrations import checkpoint as ckpt_mod
from zofo_kernels.integrations import durable, library_warnings
from zofo_kernels.integrations import methods as methods_mod
from zofo_kernels.core.distributed import DataParallelZO, setup_from_env
from zofo_kernels.core.optim import ZOOptimizer
from zofo_kernels.integrations.hf_models import accepts_past_key_values


def check_prefix_tuning(model) -> None:
    """Refuse prefix tuning where peft cannot inject the prefix (at construction, not at the
    first step): peft passes it as ``past_key_values``, which the model (or its transformer
    backbone) must take."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for name, cfg in configs.items():
        kind = getattr(cfg.peft_type, "value", cfg.peft_type)
        if kind != "PREFIX_TUNING":
            continue
        base = model.get_base_model()
        task = getattr(cfg.task_type, "value", cfg.task_type)
        # peft's causal-LM path hands the prefix to the model's own cache argument (transformers
        # 5 renamed past_key_values to cache and still takes the old name); the other task
        # types need a forward that names past_key_values, as peft checks at the first step
        if task == "CAUSAL_LM" or accepts_past_key_values(base):
            continue
        import transformers
        raise ValueError(
            f"prefix tuning (adapter {name!r}, task type {task}) cannot run on this "
            f"{type(base).__name__} with transformers {transformers.__version__}: peft injects "
            "the prefix as past_key_values, which this model's forward does not take. Prefix "
            "tuning works with CAUSAL_LM task types on OPT, Llama and GPT-2 models (e.g. "
            "OPTForCausalLM with PrefixTuningConfig(task_type='CAUSAL_LM')); for sequence "
            "classification use LoRA or prompt tuning.")


# the registry's zeroth-order methods: what a Trainer step can run
METHODS = methods_mod.names(zeroth_order=True)
# optimizer settings that come from TrainingArguments, never from ZOConfig
_FROM_TRAINING_ARGS = {"lr": "learning_rate", "weight_decay": "weight_decay",
                       "inner_steps": "gradient_accumulation_steps"}


# what the ZO step's last_step says about its directions (sparse, low-rank), kept with the
# Bilevel-ZOFO outer step's record
DIRECTION_KEYS = ("sparse_fraction", "perturbed_fraction", "lowrank")

class ZOConfig:
    """Zeroth-order settings that ``TrainingArguments`` has no field for.

    ``method``: a zeroth-order method of the registry (:mod:`zofo_kernels.integrations.methods`):
    "mezo" (every trainable parameter), "mezo-lora" (the adapter of a ``PeftModel``) or
    "bilevel-zofo". ``check_every``: data-parallel divergence check period in steps (0:
    never). ``upper_fraction`` (Bilevel-ZOFO): the share of the training set used as D_f
    when no ``upper_dataset`` is given. ``penalty_batch`` (Bilevel-ZOFO), with
    ``gradient_accumulation_steps = G``: "fresh" (the last micro-batch of each window is B_g
    of the upper step and is not a lower step: ``inner_steps = G - 1``; needs G >= 2) or
    "last" (every micro-batch is a lower step and the last one is also B_g:
    ``inner_steps = G``); default: "fresh" when G >= 2, else "last".

    Every other keyword is a setting of the method's optimizer: a field of its settings
    dataclass in the registry (:class:`~zofo_kernels.integrations.methods.ZOSettings`:
    ``eps``, ``estimator``, ``n_directions``, ``distribution``, ``seed`` (default:
    ``TrainingArguments.seed``), ``backend``, ``sparse_fraction``, ...;
    :class:`~zofo_kernels.integrations.methods.BilevelSettings`: ``lam``, ``peft_lr``,
    ``lower_lr``, ``peft_optimizer``, ``theta_update``, ``order``, ...), handed to the
    optimizer by the method's recipe and checked there; one not given takes the method's
    default. ``lr``, ``weight_decay`` and ``inner_steps`` come from ``TrainingArguments``
    (``learning_rate``, ``weight_decay``, and ``gradient_accumulation_steps`` through
    ``penalty_batch`` as above). Reading
    ``config.<setting>`` gives this config's value or the method's default (``seed``: None
    means ``TrainingArguments.seed``); :meth:`resolve` gives all of them under the Trainer's
    arguments.
    """

    def __init__(self, method: str = "mezo", *, check_every: int = 100,
                 upper_fraction: float = 1.0 / 3.0, penalty_batch: Optional[str] = None,
                 **settings):
        registered = methods_mod.REGISTRY.get(method)
        if registered is not None and not registered.zeroth_order:
            raise ValueError(f"ZOConfig.method {method!r} is first-order: train it with the "
                             f"plain transformers.Trainer (ZOFOTrainer runs {', '.join(METHODS)})")
        # the registry's entry, looked up once: its settings, defaults and recipe
        self.method_spec = methods_mod.get(method, among=METHODS)
        self.method = self.method_spec.name
        if not 0.0 < upper_fraction < 1.0:
            raise ValueError(f"upper_fraction must be in (0, 1), got {upper_fraction}")
        if penalty_batch not in (None, "fresh", "last"):
            raise ValueError("ZOConfig.penalty_batch must be 'fresh', 'last' or None, got "
                             f"{penalty_batch!r}")
        owned = sorted(set(settings) & set(_FROM_TRAINING_ARGS))
        if owned:
            raise ValueError("set " + ", ".join(f"TrainingArguments.{_FROM_TRAINING_ARGS[k]}"
                                                f" (not ZOConfig {k}=)" for k in owned))
        accepted = set(self.method_spec.setting_names())
        unknown = sorted(set(settings) - accepted)
        if unknown:
            raise TypeError(f"ZOConfig: {', '.join(unknown)} is not a setting of method "
                            f"{self.method!r}; its optimizer takes "
                            f"{', '.join(sorted(accepted - set(_FROM_TRAINING_ARGS)))}")
        self.check_every = check_every
        self.upper_fraction = float(upper_fraction)
        self.penalty_batch = penalty_batch
        self.settings = dict(settings)

    def __getattr__(self, name: str):
        settings, spec = self.__dict__.get("settings"), self.__dict__.get("method_spec")
        if settings is None or spec is None or name.startswith("_"):
            raise AttributeError(name)
        if name not in spec.setting_names():
            raise AttributeError(f"ZOConfig has no setting {name!r}")
        return getattr(spec.resolve(**settings), name)

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return (f"ZOConfig(method={self.method!r}, check_every={self.check_every}, "
                f"upper_fraction={self.upper_fraction:g}, penalty_batch={self.penalty_batch!r}"
                + (f", {given}" if given else "") + ")")

    def resolve(self, args, **trainer_settings):
        """The method's settings (its frozen settings dataclass) under ``TrainingArguments``
        ``args``: one merge of the method's defaults, this config's settings and the
        Trainer's (``lr``, ``weight_decay``, ``seed`` unless given here, and
        ``trainer_settings``, e.g. Bilevel-ZOFO's ``inner_steps``)."""
        given = dict(self.settings, lr=args.learning_rate, weight_decay=args.weight_decay,
                     **trainer_settings)
        if given.get("seed") is None:
            given["seed"] = args.seed
        return self.method_spec.resolve(**given)


class _TrainerOptimizer(torch.optim.Optimizer):
    """What the Trainer sees as its optimizer.

    The ZO step runs inside :meth:`ZOFOTrainer.training_step` (that is where the micro-batches
    and the loss are); the Trainer's own ``optimizer.step()`` afterwards only checks that the
    window's step was taken. ``param_groups`` are the backbone's ZO groups themselves, so LR
    schedulers drive theta's learning rate. ``state_dict`` holds the whole ZO/ZOFO state."""

    def __init__(self, inner, zo: ZOOptimizer, trainer: "ZOFOTrainer"):
        params = [p for g in zo.param_groups for p in g["params"]]
        super().__init__(params, dict(zo.defaults))
        self.param_groups = zo.param_groups
        self.inner = inner
        self.zo = zo
        self._trainer = trainer

    def step(self, closure=None):  # noqa: D401 - see class docstring
        if closure is not None:
            raise RuntimeError("ZOFOTrainer takes its ZO steps in training_step; "
                               "optimizer.step() accepts no closure")
        if not self._trainer._window_stepped:
            raise RuntimeError("optimizer.step() was called before the ZO step of this "
                               "accumulation window ran (training_step was not called?)")
        self._trainer._window_stepped = False
        return None

    def zero_grad(self, set_to_none: bool = True):
        return None  # ZO parameters have no gradients; the FO optimizers clear their own

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "trainer": self._trainer._zo_trainer_state()}

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict["inner"])
        self._trainer._load_zo_trainer_state(state_dict["trainer"])


class ZOFOTrainer(Trainer):
    """A ``transformers.Trainer`` that fine-tunes with MeZO or Bilevel-ZOFO (see the module
    docstring). Extra arguments: ``zo_config`` (:class:`ZOConfig`) and, for Bilevel-ZOFO,
    ``upper_dataset`` (D_f). ``optimizers`` may not be given: the ZO optimizer is built here.
    """

    def __init__(self, *args, zo_config: Optional[ZOConfig] = None, upper_dataset=None,
                 **kwargs):
        opts = kwargs.get("optimizers")
        if opts is not None and any(o is not None for o in opts):
            raise ValueError("ZOFOTrainer builds its own ZO optimizer; do not pass optimizers=")
        self.zo_config = zo_config if zo_config is not None else ZOConfig()
        if not isinstance(self.zo_config, ZOConfig):
            raise TypeError("zo_config must be a ZOConfig")
        super().__init__(*args, **kwargs)
        check_prefix_tuning(self.model)
        adapt_training_args(self.args)
        self._window_batches: List[Dict[str, Any]] = []  # MeZO: this window's micro-batches
        self._window_lower_losses: List[float] = []      # Bilevel-ZOFO: its lower steps' losses
        self._window_stepped = False
        self._upper_drawn = 0
        self._upper_iter = None
        self._comm_mark = 0
        self.zo_last_step: Dict[str, Any] = {}
        self._bilevel = self.zo_config.method == "bilevel-zofo"
        if self._bilevel:
            self._prepare_zofo_data(upper_dataset)
        elif upper_dataset is not None:
            raise ValueError("upper_dataset is only used by method='bilevel-zofo'")
        self._build_zo()
        # the step of the method, picked once: one ZO step per accumulation window
        self._window_step = self._bilevel_micro_step if self._bilevel else self._mezo_micro_step

    # -- construction ----------------------------------------------------------------------
    def _prepare_zofo_data(self, upper_dataset) -> None:
        if upper_dataset is None:
            if self.train_dataset is None:
                raise ValueError("Bilevel-ZOFO needs a train_dataset")
            n = len(self.train_dataset)
            n_upper = max(1, int(round(n * self.zo_config.upper_fraction)))
            if n_upper >= n:
                raise ValueError(f"the training set ({n} examples) is too small to split into "
                                 "lower- and upper-level data")
            g = torch.Generator().manual_seed(self.args.seed)
            perm = torch.randperm(n, generator=g).tolist()
            upper_idx, lower_idx = sorted(perm[:n_upper]), sorted(perm[n_upper:])
            upper_dataset = _subset(self.train_dataset, upper_idx)
            self.train_dataset = _subset(self.train_dataset, lower_idx)
        self.upper_dataset = upper_dataset

    def _build_zo(self) -> None:
        """The method's optimizer (the registry's recipe on the settings of
        :meth:`ZOConfig.resolve`), wrapped data-parallel under torchrun."""
        cfg, args, model = self.zo_config, self.args, self.model
        method = cfg.method_spec
        if method.peft and not hasattr(model, "peft_config"):
            raise TypeError(f"method={cfg.method!r} needs a peft.PeftModel (wrap the model "
                            "with peft.get_peft_model first)")
        if self._bilevel:
            gas = args.gradient_accumulation_steps
            self._fresh_penalty = (cfg.penalty_batch or ("fresh" if gas >= 2 else "last")
                                   ) == "fresh"
            if self._fresh_penalty and gas < 2:
                raise ValueError("ZOConfig.penalty_batch='fresh' takes the last micro-batch of "
                                 "each accumulation window as B_g: set "
                                 "gradient_accumulation_steps >= 2 (G - 1 lower steps and B_g)")
            settings = cfg.resolve(args, inner_steps=gas - 1 if self._fresh_penalty else gas)
            self.zo_optimizer = method.build(model, settings, loss_fn=self._zofo_loss)
            self._zo = self.zo_optimizer.zo
        else:
            self.zo_optimizer = method.build(model, cfg.resolve(args))
            self._zo = self.zo_optimizer
        self.zo_context = setup_from_env()
        self.zo_dp = None
        if self.zo_context.distributed:
            self.zo_dp = DataParallelZO(self.zo_optimizer, model=model, context=self.zo_context,
                                        check_every=cfg.check_every)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = _TrainerOptimizer(self.zo_optimizer, self._zo, self)
        return self.optimizer

    # -- losses ----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, *args, **kwargs):
        with library_warnings.forward_of(model):  # a prefix-tuned causal LM: peft's notice
            return super().compute_loss(model, inputs, *args, **kwargs)

    def _batch_loss(self, model, inputs) -> torch.Tensor:
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if loss.dim() > 0:
            loss = loss.mean()
        return loss

    def _zofo_loss(self, inputs) -> torch.Tensor:
        return self._batch_loss(self.model, inputs)

    # -- the step --------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        # ZO loss differences must come from the weights, not from dropout masks
        model.eval()
        inputs = self._prepare_inputs(inputs)
        loss = self._window_step(model, inputs, self.accelerator.sync_gradients)
        if loss is None:  # the window goes on: the step happens at its last micro-batch
            return torch.zeros((), device=self.args.device)
        self._end_window()
        return torch.tensor(loss, dtype=torch.float32, device=self.args.device)

    def _mezo_micro_step(self, model, inputs, last: bool) -> Optional[float]:
        """MeZO: collect the window's micro-batches; at its last one, one ZO step whose loss
        is the example-weighted mean over them."""
        self._window_batches.append(inputs)
        if not last:
            return None
        window, self._window_batches = self._window_batches, []
        weights = [_n_examples(b) for b in window]
        total = float(sum(weights))

        def closure():
            loss = None
            for w, batch in zip(weights, window):
                part = self._batch_loss(model, batch).double() * (w / total)
                loss = part if loss is None else loss + part
            return loss
        value = (self.zo_dp if self.zo_dp is not None else self.zo_optimizer).step(closure)
        self.zo_last_step = dict(self._zo.last_step)
        return value

    def _bilevel_micro_step(self, model, inputs, last: bool) -> Optional[float]:
        """Bilevel-ZOFO: micro-batches are lower steps; the last one closes the window (and
        with penalty_batch="fresh" is only B_g, which S has not trained on)."""
        zofo = self.zo_optimizer
        if not (last and self._fresh_penalty):
            self._window_lower_losses.append(zofo.lower_step(inputs).lower_losses[-1])
        if not last:
            return None
        upper = self._prepare_inputs(self._next_upper_batch())
        def upper_step():
            return zofo.upper_step(upper, inputs)
        up = self.zo_dp.run_step(upper_step) if self.zo_dp is not None else upper_step()
        lower_losses, self._window_lower_losses = self._window_lower_losses, []
        directions = {k: zofo.zo.last_step[k] for k in DIRECTION_KEYS}
        self.zo_last_step = dict(up.as_dict(), lower_losses=lower_losses, **directions)
        return up.loss

    def _end_window(self) -> None:
        self._window_stepped = True
        if self.zo_dp is not None:  # bytes of the whole window, inner steps included
            total = self.zo_dp.stats.total_bytes(("loss", "grad"))
            self.zo_last_step["comm_bytes"] = total - self._comm_mark
            self._comm_mark = total

    def _upper_loader(self):
        ds = self.upper_dataset
        if hasattr(ds, "column_names") and self.args.remove_unused_columns:
            ds = self._remove_unused_columns(ds, description="upper-level")
        sampler = None
        ctx = self.zo_context
        if ctx.distributed:
            sampler = torch.utils.data.DistributedSampler(
                ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                seed=self.args.seed, drop_last=False)
        return ds, sampler

    def _next_upper_batch(self):
        """Batch number ``_upper_drawn`` of the D_f stream: reshuffled per pass with a seed
        that depends only on the pass number, so a resumed run draws the same batches."""
        if self._upper_iter is None:
            self._upper_iter = self._upper_stream(self._upper_drawn)
        self._upper_drawn += 1
        return next(self._upper_iter)

    def _upper_stream(self, skip: int):
        ds, sampler = self._upper_loader()
        return upper_batches(ds, sampler, self.data_collator,
                             self.args.per_device_train_batch_size, self.args.seed, skip)

    # -- state -----------------------------------------------------------------------------
    def _zo_trainer_state(self) -> Dict[str, Any]:
        state = {"upper_drawn": self._upper_drawn}
        if self.zo_dp is not None:
            state["dp_steps"] = self.zo_dp.steps
        return state

    def _load_zo_trainer_state(self, state: Dict[str, Any]) -> None:
        self._upper_drawn = int(state.get("upper_drawn", 0))
        self._upper_iter = None
        if self.zo_dp is not None and "dp_steps" in state:
            self.zo_dp.steps = int(state["dp_steps"])

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """The layout of :mod:`zofo_kernels.integrations.checkpoint` instead of the Trainer's
        root-level weights (for a PeftModel those would be the adapter alone, and a plain
        ``PeftModel.from_pretrained`` on them would silently use the pretrained backbone)."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        lower = self.zo_optimizer.adapter_names["lower"] if self._bilevel else None
        model = self.accelerator.unwrap_model(self.model)
        ckpt_mod.save_trained(output_dir, model, tokenizer=tokenizer,
                              method=self.zo_config.method, lower_adapter=lower,
                              metadata={"trainer": type(self).__name__,
                                        "global_step": int(self.state.global_step)})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's ``checkpoint-N``, sealed: once the Trainer has written all of it
        (this layout, then optimizer, scheduler, RNG and trainer state) a completion record of
        every file is written last, before older checkpoints are rotated away; resuming takes
        the newest sealed one (:func:`last_complete_checkpoint`)."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            seal_checkpoint(os.path.join(run_dir, f"checkpoint-{self.state.global_step}"),
                            run_dir, limit, self.state.best_model_checkpoint)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest complete
        (sealed) checkpoint, and a named one must be complete (ValueError otherwise)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif resume_from_checkpoint:
            check_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             **kwargs)

    def _load_weights(self, folder: str, model=None) -> None:
        ckpt_mod.load_weights_into(model if model is not None else self.model, folder)
        if self._bilevel:
            self.zo_optimizer.eval_mode()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._load_weights(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        self._load_weights(self.state.best_model_checkpoint)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            logs.pop("grad_norm", None)  # always 0: the ZO step leaves no gradients
            logs.update(zo_log_entries(self.zo_last_step, self._bilevel))
        super().log(logs, start_time)


def adapt_training_args(args) -> None:
    """What a ZO run changes in the user's ``TrainingArguments``: ``max_grad_norm`` 0 (there
    are no gradients to clip) and, on a CPU run, ``dataloader_pin_memory`` False (pinned
    memory only speeds up copies to an accelerator; torch warns when there is none)."""
    if args.max_grad_norm and args.max_grad_norm > 0:
        args.max_grad_norm = 0.0
    if args.dataloader_pin_memory and args.device.type == "cpu":
        args.dataloader_pin_memory = False


def seal_checkpoint(folder: str, run_dir: str, limit, best) -> None:
    """Write the completion record of a Trainer checkpoint (every file), then rotate the
    older ones away as the Trainer would (``save_total_limit``)."""
    from transformers.trainer_utils import rotate_checkpoints
    if os.path.isdir(folder):
        durable.crash_point("trainer:checkpoint-written")
        durable.write_complete_record(Path(folder))
    rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                       best_model_checkpoint=best, use_mtime=True)


def check_checkpoint(folder) -> None:
    """ValueError unless ``folder`` is a complete Trainer checkpoint of this package (sealed,
    with the Trainer's state), or one of an earlier version (no record, a format-1
    manifest)."""
    folder = Path(folder)
    try:
        manifest = ckpt_mod.read_manifest(folder, verify=False)
        if (folder / durable.COMPLETE).exists():
            files = durable.recorded_files(folder)
            if "trainer_state.json" not in files:
                raise ckpt_mod.CheckpointError(
                    f"{folder} was not completely written (its Trainer state is missing)")
        elif int(manifest.get("version", 0)) >= 2:
            raise ckpt_mod.CheckpointError(f"{folder} was not completely written")
    except (ckpt_mod.CheckpointError, durable.IncompleteFolderError) as exc:
        raise ValueError(f"cannot resume from {folder}: {exc}") from None


def last_complete_checkpoint(output_dir) -> str:
    """The newest ``checkpoint-N`` of ``output_dir`` that is complete (a checkpoint cut short
    by a crash is passed over); ValueError if there is none."""
    import re
    steps = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(r"checkpoint-(\d+)", name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, folder in sorted(steps, reverse=True):
        try:
            check_checkpoint(folder)
        except ValueError:
            continue
        return folder
    raise ValueError(f"No valid checkpoint found in output directory ({output_dir}): none is "
                     "complete")


def upper_batches(ds, sampler, collator, batch_size: int, seed: int, skip: int = 0):
    """The D_f batches, endlessly, from batch number ``skip`` on: each pass over ``ds`` in the
    ``sampler``'s order for its epoch (under torchrun), else reshuffled with a seed that
    depends only on the pass number, so a resumed run draws the same batches."""
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
            order = list(sampler)
        else:
            g = torch.Generator().manual_seed(seed + 7919 * (epoch + 1))
            order = torch.randperm(len(ds), generator=g).tolist()
        for a in range(0, len(order), batch_size):
            if skip > 0:
                skip -= 1
                continue
            yield collator([ds[i] for i in order[a:a + batch_size]])


def zo_log_entries(last_step: Dict[str, Any], bilevel: bool) -> Dict[str, float]:
    """The logged ZO quantities of the last step (``ZOFOTrainer.zo_last_step``) that were
    computed (None ones are left out)."""
    st = last_step
    if not st:
        return {}
    out: Dict[str, float] = {}
    grads = st.get("projected_grads") or []
    if grads:
        out["zo_projected_grad"] = float(sum(grads) / len(grads))
    names = {"upper_loss": "upper_loss", "penalty_loss": "penalty_loss",
             "lower_penalty_loss": "lower_penalty_loss", "gap": "gap",
             "theta_step_rms": "theta_step_rms", "comm_bytes": "comm_bytes_per_step"}
    if not bilevel:
        names = {"update_rms": "theta_step_rms", "comm_bytes": "comm_bytes_per_step"}
    for key, name in names.items():
        value = st.get(key)
        if value is not None:
            out[name] = float(value)
    if st.get("lower_losses"):
        out["lower_loss"] = float(st["lower_losses"][-1])
    if st.get("sparse_fraction") is not None:  # sparse perturbation: the share it moved
        out["perturbed_fraction"] = float(st["perturbed_fraction"])
    return out


def _n_examples(batch) -> int:
    for key in ("labels", "input_ids"):
        v = batch.get(key) if isinstance(batch, dict) else None
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    for v in (batch.values() if isinstance(batch, dict) else []):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def _subset(dataset, indices):
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return torch.utils.data.Subset(dataset, indices)
