"""Low-rank directions through the registry, ZOConfig and zofo-train (--lowrank,
--lowrank-period): the settings reach the optimizer of the zeroth-order methods and are refused,
by name, where they mean nothing or cannot hold. The step itself is tested in
python_tests/core/test_lowrank_optimizer.py; the helpers are the sparse CLI tests'."""

import json

import pytest

from test_sparse_cli import _argv, _trained, needs_tokenizer
from zofo_kernels.apps import models, train
from zofo_kernels.integrations import methods


@needs_tokenizer
def test_mezo_runs_low_rank_and_a_resume_cannot_change_the_rank(tmp_path):
    out = tmp_path / "mezo"
    summary, zo, _ = _trained(train.parse(_argv(
        tmp_path, "mezo", out, "--steps", "1", "--lowrank", "2", "--lowrank-period", "3")))
    assert (zo.lowrank, zo.lowrank_period) == (2, 3)
    assert zo.last_step["lowrank"] == 2 and zo.last_step["factor_floats"] > 0
    saved = json.loads((out / "summary.json").read_text())["hyperparameters"]
    assert (saved["lowrank"], saved["lowrank_period"]) == (2, 3)
    assert summary["hyperparameters"]["lowrank"] == 2
    with pytest.raises(SystemExit, match="--lowrank"):
        train.parse(["--resume", str(out), "--steps", "2", "--lowrank", "4"])


@pytest.mark.parametrize("extra,pattern", [
    (("--lowrank", "0"), "--lowrank .*must be an integer >= 1"),
    (("--lowrank", "2", "--lowrank-period", "0"), "--lowrank-period .*must be an integer >= 1"),
    (("--lowrank-period", "4"), "--lowrank-period needs --lowrank"),
    (("--lowrank", "2", "--sparse-fraction", "0.2"), "cannot be combined"),
])
def test_bad_combinations_are_refused_by_the_command_line(tmp_path, extra, pattern):
    with pytest.raises(SystemExit, match=pattern):
        train.parse(_argv(tmp_path, "mezo", tmp_path / "bad", "--steps", "1", *extra))


def test_first_order_methods_refuse_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--lowrank is a setting of the zeroth-order"):
        train.parse(_argv(tmp_path, "fo-lora", tmp_path / "fo", "--steps", "1",
                          "--lowrank", "2"))


def test_the_registry_and_zoconfig_hand_the_rank_to_the_optimizer():
    pytest.importorskip("transformers")
    from zofo_kernels.integrations.hf_trainer import ZOConfig
    model = models.build_random("tiny-bert", seed=0)
    opt = methods.build_optimizer("mezo", model, lr=1e-3, lowrank=2, lowrank_period=7)
    assert (opt.lowrank, opt.lowrank_period) == (2, 7)
    assert ZOConfig(method="mezo", lowrank=2).lowrank == 2
    assert ZOConfig(method="bilevel-zofo").lowrank is None
    for name in methods.names(zeroth_order=True):
        assert methods.get(name).resolve().lowrank is None
