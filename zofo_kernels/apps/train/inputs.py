"""A run's examples: read, sampled, split, prompt-wrapped and encoded as its configuration
says."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from zofo_kernels.apps import data as data_mod
from zofo_kernels.apps.train.config import RunConfig


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


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


def load_data(config: RunConfig) -> RunData:
    """Read and sample the run's examples (``DataError`` on bad data; ``SystemExit`` on a bad
    prompt)."""
    d = config.data
    pool = data_mod.read_examples(d.train, d.text_column, d.label_column)
    picked = data_mod.sample(pool, d.num_train + d.holdout, d.data_seed)
    train_ex, held = picked[:d.num_train], picked[d.num_train:]
    if d.holdout > 0:
        eval_ex, eval_name = held, f"holdout of {d.train}"
    else:
        eval_ex = data_mod.read_examples(d.eval, d.text_column, d.label_column)
        eval_name = d.eval
    if d.eval_max is not None and d.eval_max < len(eval_ex):
        eval_ex = data_mod.sample(eval_ex, d.eval_max, d.data_seed + 7)
    lower_ex, upper_ex = (data_mod.split(train_ex, d.upper_fraction) if d.split
                          else (train_ex, []))
    select_ex = data_mod.split(train_ex, d.upper_fraction)[1][:d.select_max]
    data = RunData(train_ex, eval_ex, lower_ex, upper_ex, select_ex, str(eval_name),
                   max(2, data_mod.num_labels(train_ex, eval_ex)), d.data_seed,
                   config.model.head)
    if data.head == "prompt":
        apply_prompt(config, data)
    return data


def apply_prompt(config: RunConfig, data: RunData) -> None:
    """Wrap every example set in the prompt template."""
    from zofo_kernels.integrations.prompting import PromptError, PromptSpec
    try:
        spec = PromptSpec.parse(config.model.template, config.model.label_words)
    except PromptError as exc:
        raise SystemExit(f"zofo-train: {exc}") from None
    if spec.num_labels != data.num_labels:
        raise SystemExit(f"zofo-train: {spec.num_labels} label words for {data.num_labels} "
                         "classes; give --label-words with one word per class")
    for name in ("train", "eval", "lower", "upper", "select"):
        setattr(data, name, [data_mod.Example(spec.text(e.text), e.label)
                             for e in getattr(data, name)])
    data.spec = spec


def check_label_words(tokenizer, spec) -> None:
    """``SystemExit`` when two label words are the same to the model's tokenizer (an uncased
    model reads "great" and "Great" alike: the two classes would be identical)."""
    if spec is None or tokenizer is None:
        return
    seen = {}
    for word in spec.label_words:
        ids = tuple(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if ids in seen:
            raise SystemExit(f"zofo-train: --label-words {seen[ids]!r} and {word!r} are the same "
                             "to this model's tokenizer (the two classes would be identical); "
                             "choose words that differ")
        seen[ids] = word


def encode(loaded, examples, max_length: int):
    """``examples`` tokenized by the loaded model's tokenizer (None for no examples)."""
    if not examples:
        return None
    return data_mod.Encoded(examples, loaded.tokenizer, max_length,
                            add_special_tokens=loaded.add_special_tokens)


class DeviceEncoded:
    """An Encoded set whose batches are moved to ``device``."""

    def __init__(self, enc, device):
        self.enc, self.device = enc, device

    def __len__(self):
        return len(self.enc)

    def batches(self, batch_size):
        for b in self.enc.batches(batch_size):
            yield to_device(b, self.device)
