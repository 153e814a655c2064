"""CI (packaging stage): the installed package's trained models reload bit for bit.

Run from a folder outside the checkout with the installed package's Python:
    python reload_check.py train SST2_DIR WORK    # zofo-train and ZOFOTrainer runs, logits
    python reload_check.py check WORK             # a fresh process: load_trained, compare
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def logits(model, batch):
    from zofo_kernels.integrations.prompting import classification_logits
    with torch.no_grad():
        return classification_logits(model.eval(), batch).clone()


def batch_of(tokenizer):
    enc = tokenizer(["a gorgeous , witty film It was", "one long string of cliches It was"],
                    padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def train(sst2: Path, work: Path) -> None:
    from zofo_kernels.apps import models, train as train_mod
    from zofo_kernels.integrations.hf_trainer import ZOConfig, ZOFOTrainer
    from transformers import TrainingArguments

    if not (sst2 / "train.tsv").is_file():  # no SST-2 next to the checkout: toy rows
        sst2 = work / "toy"
        sst2.mkdir()
        for f, n in (("train.tsv", 64), ("dev.tsv", 32)):
            (sst2 / f).write_text("sentence\tlabel\n" + "".join(
                f"{['a dull mess', 'a joy to watch'][i % 2]} number {i}\t{i % 2}\n"
                for i in range(n)))
        print(f"  (SST-2 not found: toy data in {sst2})")
    tok = models.load_tokenizer("tiny-bert")
    batch = batch_of(tok)
    torch.save(batch, work / "batch.pt")
    trained = {}
    for name, extra in (("bilevel-lora", []), ("bilevel-prompt-tuning", ["--peft", "prompt"])):
        out = work / name
        config = train_mod.parse([
            "--model", "tiny-bert", "--method", "bilevel-zofo", "--train",
            str(sst2 / "train.tsv"), "--eval", str(sst2 / "dev.tsv"), "--eval-max", "32",
            "--num-train", "48", "--steps", "3", "--inner-steps", "2", "--lr", "1e-2",
            "--output", str(out), "--no-progress", "--threads", "1", *extra])
        train_mod.run(config, on_trained=lambda r, n=name: trained.__setitem__(
            n, logits(r.model, batch)))
    # ZOFOTrainer, Bilevel-ZOFO on a LoRA model
    model = models.add_peft(models.load_model("tiny-bert", head="prompt").model, "lora")
    enc = tok([f"{['a dull mess', 'a joy'][i % 2]} number {i}" for i in range(18)],
              truncation=True, max_length=16)
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": i % 2} for i in range(18)]
    from transformers import DataCollatorWithPadding
    targs = TrainingArguments(output_dir=str(work / "trainer"), per_device_train_batch_size=4,
                              learning_rate=1e-2, max_steps=2, gradient_accumulation_steps=2,
                              save_strategy="no", report_to=[], use_cpu=True,
                              disable_tqdm=True, dataloader_num_workers=0)
    trainer = ZOFOTrainer(model=model, args=targs, train_dataset=rows,
                          data_collator=DataCollatorWithPadding(tok),
                          zo_config=ZOConfig(method="bilevel-zofo", seed=1))
    trainer.train()
    trainer.save_model()
    trained["trainer"] = logits(trainer.model, batch)
    torch.save(trained, work / "trained.pt")
    print("  trained:", ", ".join(trained))


def check(work: Path) -> int:
    from zofo_kernels import load_trained
    batch = torch.load(work / "batch.pt")
    trained = torch.load(work / "trained.pt")
    bad = []
    for name, expected in trained.items():
        model, _ = load_trained(work / name)
        same = torch.equal(logits(model, batch), expected)
        print(f"  {name}: reloaded logits bit-identical: {same}")
        if not same:
            bad.append(name)
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(check(Path(sys.argv[2])))
