"""The prompt-based classifier for BERT-style encoders (zofo_kernels' encoder prompt head), as a
self-contained Hugging Face custom architecture.

This file imports only torch and transformers. Saving a :class:`BertPromptClassifier` with
``save_pretrained`` (which ``zofo_kernels.save_trained`` and ``zofo-train`` do) copies this file
into the saved folder and names its classes in ``config.json``'s ``auto_map``, the transformers
convention for a custom architecture, so that the folder loads without zofo_kernels::

    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

The model: the BERT encoder, mean pooling of the token states over the attention mask, L2
normalisation (what a sentence encoder such as MiniLM was trained with) and a linear
``label_head`` whose row c starts as ``head_temperature`` times the normalised embedding of the
description of class c ("<template without the sentence> <label word c>.", e.g. "It was
great."), so that the untrained model already classifies by similarity.
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertPreTrainedModel

# The SST-2 prompt of MeZO (Malladi et al. 2023) and the Bilevel-ZOFO code.
SST2_TEMPLATE = "{sentence} It was"
SST2_LABEL_WORDS = ("terrible", "great")


class BertPromptConfig(BertConfig):
    """A BERT encoder's config plus the prompt head's settings."""

    model_type = "zofo-bert-prompt"

    def __init__(self, label_words: Sequence[str] = SST2_LABEL_WORDS,
                 template: str = SST2_TEMPLATE, head_temperature: float = 20.0, **kwargs):
        super().__init__(**kwargs)
        self.label_words = list(label_words)
        self.template = template
        # (not "temperature": transformers reads that name as a generation setting)
        self.head_temperature = float(head_temperature)


class BertPromptClassifier(BertPreTrainedModel):
    """BERT encoder -> mean pooling -> L2 normalisation -> ``label_head`` (see the module
    docstring). The head is named so that peft does not treat it as a classifier to copy into
    each adapter (``modules_to_save``): it stays in the backbone."""

    config_class = BertPromptConfig

    def __init__(self, config: BertPromptConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.label_head = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def pooled(self, input_ids=None, attention_mask=None, token_type_ids=None,
               inputs_embeds=None) -> torch.Tensor:
        """The normalised mean of the token states over the attention mask."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
        h = out.last_hidden_state
        if attention_mask is None:
            mask = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
        else:
            mask = attention_mask.to(h.dtype)
        mean = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return F.normalize(mean.float(), dim=-1).to(h.dtype)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                inputs_embeds=None, labels=None, **unused):
        logits = self.label_head(self.pooled(input_ids, attention_mask, token_type_ids,
                                             inputs_embeds))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def init_head_from_descriptions(self, tokenizer, spec) -> None:
        """Row c of the head <- temperature * pooled embedding of ``spec.descriptions()[c]``
        (one sentence per class); bias 0."""
        enc = tokenizer(list(spec.descriptions()), padding=True,
                        return_tensors="pt").to(self.device)
        was = self.training
        self.eval()
        emb = self.pooled(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        self.train(was)
        self.label_head.weight.copy_(self.config.head_temperature * emb.float())
        self.label_head.bias.zero_()


# save_pretrained copies this file into the saved folder and writes config.json's auto_map
BertPromptConfig.register_for_auto_class()
BertPromptClassifier.register_for_auto_class("AutoModelForSequenceClassification")
