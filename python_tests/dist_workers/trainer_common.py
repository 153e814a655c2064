"""The tiny model, data and trainer shared by the distributed Trainer worker and the
single-process reference run in the test."""

import torch
from transformers import (BertConfig, BertForSequenceClassification, TrainingArguments,
                          default_data_collator)

from zofo_kernels.integrations.hf_trainer import ZOConfig, ZOFOTrainer


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 50, (n, 10), generator=g)
        self.labels = (self.ids[:, 0] > 25).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def make_model(method):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(cfg)
    if method == "bilevel-zofo":
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["query", "value"],
                                                 task_type="SEQ_CLS"))
    return model


def make_trainer(out_dir, method, per_device, accumulation, save_steps=None):
    save = dict(save_strategy="steps", save_steps=save_steps) if save_steps else dict(
        save_strategy="no")
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, max_steps=3,
        logging_steps=1, report_to=[], seed=4, use_cpu=True, **save,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant")
    bilevel = dict(lam=5.0, peft_lr=1e-2) if method == "bilevel-zofo" else {}
    zo = ZOConfig(method=method, eps=1e-3, seed=6, check_every=1, **bilevel)
    upper = Synthetic(12, seed=9) if method == "bilevel-zofo" else None
    return ZOFOTrainer(model=make_model(method), args=args, train_dataset=Synthetic(48, seed=3),
                       data_collator=default_data_collator, zo_config=zo, upper_dataset=upper)
