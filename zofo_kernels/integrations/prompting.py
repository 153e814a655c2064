"""Prompt-based classification, as MeZO and the Bilevel-ZOFO paper run it (docs/cli.md,
"Heads").

A task is a template and one label word per class, e.g. SST-2's ``"{sentence} It was"`` with
``terrible`` / ``great``. The classifier is the pretrained model itself, so its head belongs
to the backbone theta and the PEFT block (P and S) is the adapter only, the paper's split:

* **causal LMs** (OPT, Llama, GPT-2 families): the logits of class c are the LM head's
  next-token logits of the first token of " <word_c>" after the filled-in template. The
  label token ids are stored in the model's config (``zofo_label_token_ids``), so a
  checkpoint saved with ``save_pretrained`` reloads as the same classifier.
* **encoders without an MLM head** (BERT-style sentence encoders such as MiniLM):
  :class:`BertPromptClassifier`, the encoder, mean pooling over the tokens, L2 normalisation
  (what the sentence encoder was trained with) and a linear head whose row c is
  ``head_temperature`` (20) times the normalised embedding of the label description
  "<template without the sentence> <word_c>." (e.g. "It was great."), so the untrained model
  already classifies by similarity. The head is a parameter of theta.

:func:`classification_logits` gives the (batch, classes) logits of any of these models, of a
peft model wrapping them, and of an ordinary sequence classifier (the random-head mode).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

# the encoder prompt head lives in a self-contained module (torch and transformers only) that
# save_pretrained copies into every saved folder, so that a saved model loads without
# zofo_kernels (``trust_remote_code=True``); the SST-2 prompt is defined there too
from zofo_kernels.integrations.modeling_zofo_prompt import (SST2_LABEL_WORDS, SST2_TEMPLATE,
                                                             BertPromptClassifier,
                                                             BertPromptConfig)

SENTENCE_FIELD = "{sentence}"


class PromptError(ValueError):
    """A template or label words that cannot make a prompt-based classifier."""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A template with one ``{sentence}`` field and one label word per class (class order)."""

    template: str = SST2_TEMPLATE
    label_words: Sequence[str] = SST2_LABEL_WORDS

    def __post_init__(self):
        if not isinstance(self.template, str) or self.template.count(SENTENCE_FIELD) != 1:
            raise PromptError(f"the template must contain {SENTENCE_FIELD} exactly once, got "
                              f"{self.template!r}")
        words = tuple(self.label_words)
        if len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words):
            raise PromptError(f"give at least two non-empty label words, got {words!r}")
        if len(set(words)) != len(words):
            raise PromptError(f"label words must be distinct, got {words!r}")
        object.__setattr__(self, "label_words", words)

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    def text(self, sentence: str) -> str:
        """The model's input for ``sentence``."""
        return self.template.replace(SENTENCE_FIELD, sentence).strip()

    def descriptions(self) -> List[str]:
        """One sentence per class: the template without the sentence, completed by the word."""
        stem = self.template.replace(SENTENCE_FIELD, "").strip()
        return [f"{stem} {w}.".strip() for w in self.label_words]

    @classmethod
    def parse(cls, template: Optional[str], label_words: Optional[str]) -> "PromptSpec":
        """From command-line strings; label words comma-separated."""
        words = SST2_LABEL_WORDS if label_words is None else tuple(
            w.strip() for w in label_words.split(","))
        return cls(SST2_TEMPLATE if template is None else template, words)


# --------------------------------------------------------------------------- encoders

# in this process the Auto classes know the head without the saved code (trust_remote_code
# stays unset or False: the local classes are used, the copy in a saved folder is never run)
AutoConfig.register(BertPromptConfig.model_type, BertPromptConfig)
AutoModelForSequenceClassification.register(BertPromptConfig, BertPromptClassifier)


def bert_prompt_classifier(encoder_config: BertConfig, spec: PromptSpec,
                           temperature: float = 20.0) -> BertPromptClassifier:
    """An uninitialised :class:`BertPromptClassifier` with ``encoder_config``'s shape."""
    fields = encoder_config.to_dict()
    # _name_or_path / auto_map: the encoder's folder and code are not this model's (peft would
    # otherwise take the encoder's folder for this model's and read its config.json as a
    # BertPromptConfig: "a model of type 'bert' to instantiate a model of type ...")
    for key in ("model_type", "architectures", "num_labels", "id2label", "label2id",
                "transformers_version", "_name_or_path", "auto_map"):
        fields.pop(key, None)
    cfg = BertPromptConfig(label_words=spec.label_words, template=spec.template,
                           head_temperature=temperature, num_labels=spec.num_labels, **fields)
    return BertPromptClassifier(cfg)


# --------------------------------------------------------------------------- causal LMs

def label_token_ids(tokenizer, spec: PromptSpec) -> List[int]:
    """First token of " <word>" for every label word; they must differ."""
    ids = []
    for w in spec.label_words:
        toks = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise PromptError(f"label word {w!r} tokenises to nothing")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise PromptError(f"label words {spec.label_words!r} start with the same token "
                          f"({ids}); choose words whose first tokens differ")
    return ids


def causal_add_special_tokens(tokenizer) -> bool:
    """Whether a causal prompt may be encoded with the tokenizer's special tokens: not when
    the tokenizer appends a terminator (BERT's [SEP]), which would then be the "next token"
    position instead of the template's last word."""
    ids = tokenizer("a")["input_ids"]
    ends = {tokenizer.sep_token_id, tokenizer.eos_token_id} - {None}
    return not (ids and ids[-1] in ends)


def set_causal_prompt(model, tokenizer, spec: PromptSpec) -> None:
    """Make a causal LM a prompt-based classifier of ``spec`` (config fields only: a saved
    model says how to use it with transformers alone, see docs/saving.md)."""
    model.config.zofo_label_token_ids = label_token_ids(tokenizer, spec)
    model.config.zofo_label_words = list(spec.label_words)
    model.config.zofo_template = spec.template
    model.config.zofo_add_special_tokens = causal_add_special_tokens(tokenizer)
    model.config.num_labels = spec.num_labels


def _config(model):
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "get_base_model"):
        cfg = model.get_base_model().config
    return cfg


def is_causal_prompt(model) -> bool:
    cfg = _config(model)
    return cfg is not None and getattr(cfg, "zofo_label_token_ids", None) is not None


def _output_head(model):
    """The LM head (output embeddings) of a causal LM, plain or wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise PromptError(f"{type(base).__name__} has no linear LM head (output embeddings) "
                          "to score label words with")
    return head


def _label_word_logits(model, input_ids, mask, ids) -> torch.Tensor:
    """(batch, classes): the LM head's logits of the label tokens ``ids`` at each row's last
    real token, computed for those tokens only. Hooks on the LM head hand it an empty
    sequence (so the vocabulary-wide product is never formed, at any position) and put the
    label-word logits of the last positions in its place; the model's own post-processing
    (e.g. Gemma's final logit soft-capping) then applies to them as to the full head's."""
    head = _output_head(model)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    kept = {}

    def keep_last_positions(module, args):
        hidden = args[0]
        # prompt and prefix tuning prepend virtual tokens to the sequence the head sees
        shift = hidden.shape[1] - input_ids.shape[1]
        kept["hidden"] = hidden[rows, mask.long().sum(1) - 1 + shift]
        return (hidden[:, :0],) + tuple(args[1:])

    def label_words_only(module, args, output):
        bias = None if module.bias is None else module.bias[ids]
        return F.linear(kept.pop("hidden"), module.weight[ids], bias).unsqueeze(1)

    pre = head.register_forward_pre_hook(keep_last_positions)
    post = head.register_forward_hook(label_words_only)
    try:
        out = model(input_ids=input_ids, attention_mask=mask)
    finally:
        pre.remove()
        post.remove()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, 0, :]


def classification_logits(model, batch: dict) -> torch.Tensor:
    """(batch, classes) logits of a prompt-based causal LM (label-word logits at the last
    real token; right padding), of a :class:`BertPromptClassifier`, or of any sequence
    classifier, plain or wrapped by peft."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    if is_causal_prompt(model):
        ids = torch.tensor(_config(model).zofo_label_token_ids, device=input_ids.device)
        return _label_word_logits(model, input_ids, mask, ids)
    out = model(input_ids=input_ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out[0]


CONTENT_FREE = "N/A"


@torch.no_grad()
def content_free_logits(model, tokenizer, spec: PromptSpec, add_special_tokens: bool = True,
                        device=None) -> torch.Tensor:
    """(classes,) logits of the template filled with the content-free input "N/A" (Zhao et
    al. 2021, "Calibrate before use"): subtracting them from every input's logits removes the
    prompt's own preference for one label word (the argmax is the same as with the label
    words' log-probabilities, whose per-input normaliser cancels)."""
    enc = tokenizer([spec.text(CONTENT_FREE)], return_tensors="pt",
                    add_special_tokens=add_special_tokens)
    batch = {k: enc[k].to(device) if device is not None else enc[k]
             for k in ("input_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    try:
        return classification_logits(model, batch)[0]
    finally:
        model.train(was_training)
