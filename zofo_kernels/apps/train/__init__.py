"""zofo-train: few-shot fine-tuning of a sequence classifier with ZO, FO or Bilevel-ZOFO.

One run's settings take one route: ``cli.parse(argv)`` parses the command line (merging a
``--resume`` folder's saved options), checks it and builds the frozen ``config.RunConfig``,
with the method looked up in the registry and its settings resolved once;
``run.run(config)`` loads the data and the model and builds the runner
(``runners.make_runner``), whose optimizer is the method's recipe
(``config.method.build(model, config.settings)``); ``loop.train_loop`` trains.

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

from zofo_kernels.apps.train.cli import (HEADS, METHODS, build_parser,  # noqa: F401
                                         main, parse, print_outputs)
from zofo_kernels.apps.train.config import RunConfig  # noqa: F401
from zofo_kernels.apps.train.run import run  # noqa: F401

__all__ = ["HEADS", "METHODS", "RunConfig", "build_parser", "main", "parse", "print_outputs",
           "run"]
