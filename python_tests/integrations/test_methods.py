"""The method registry and the interfaces its callers use: one name and one builder per
method for zofo-train, zofo-bench, ZOFOTrainer and the communication benchmark."""

import pytest
import torch

from zofo_kernels.apps import bench, measure, models, train
from zofo_kernels.integrations import hf_trainer, methods
from zofo_kernels.core.optim import ZOFOOptimizer, ZOOptimizer


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return models.build_random("tiny-bert", seed=0)


def _batch(n=3):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 200, (n, 6), generator=g),
            "attention_mask": torch.ones(n, 6, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1][:n])}


def test_every_caller_reads_the_registry():
    assert methods.names() == ("bilevel-zofo", "mezo", "mezo-lora", "fo-lora", "fo-full")
    assert train.METHODS == methods.names()
    assert hf_trainer.METHODS == methods.names(zeroth_order=True) == (
        "bilevel-zofo", "mezo", "mezo-lora")
    parser = train.build_parser()
    choices = next(a.choices for a in parser._actions if a.dest == "method")
    assert tuple(choices) == methods.names()
    # zofo-bench's rows are registry methods (with fixed settings) or its two baselines
    for row, (name, _) in bench.ROWS.items():
        assert name is None and row in ("forward", "mezo-ref") or name in methods.names()
    assert "mezo" in parser.epilog and methods.get("mezo").summary in parser.epilog


@pytest.mark.parametrize("name,cls", [("mezo", ZOOptimizer), ("mezo-lora", ZOOptimizer),
                                      ("fo-lora", torch.optim.Adam),
                                      ("fo-full", torch.optim.Adam),
                                      ("bilevel-zofo", ZOFOOptimizer)])
def test_build_optimizer_applies_the_defaults_and_the_given_settings(tiny, name, cls):
    method = methods.get(name)
    model = models.add_peft(tiny, "lora") if method.peft else tiny
    loss_fn = (lambda b: models.classification_loss(model, b)) if name == "bilevel-zofo" \
        else None
    opt = methods.build_optimizer(name, model, loss_fn=loss_fn, lr=None)
    assert isinstance(opt, cls)
    lr_of = (lambda o: o.zo.param_groups[0]["lr"]) if cls is ZOFOOptimizer else (
        lambda o: o.param_groups[0]["lr"])
    # None keeps the default
    assert lr_of(opt) == pytest.approx(method.defaults["lr"])
    if method.zeroth_order:
        zo = opt.zo if cls is ZOFOOptimizer else opt
        assert zo.eps == pytest.approx(method.defaults["eps"])
        assert zo.estimator == method.defaults["estimator"]
        fresh = models.build_random("tiny-bert", seed=0)
        fresh = models.add_peft(fresh, "lora") if method.peft else fresh
        other = methods.build_optimizer(
            name, fresh, lr=0.5, eps=0.25, seed=7,
            loss_fn=(lambda b: models.classification_loss(fresh, b)) if loss_fn else None)
        other_zo = other.zo if cls is ZOFOOptimizer else other
        assert other_zo.eps == 0.25 and other_zo.base_seed == 7
    if cls is ZOFOOptimizer:
        assert opt.lam == method.defaults["lam"] and opt.inner_steps == method.defaults[
            "inner_steps"]
        assert opt.theta_update == "rms" and opt.order == "official"


def test_bad_names_and_settings_are_refused_clearly(tiny):
    with pytest.raises(ValueError, match="'zofo' is now called 'bilevel-zofo'"):
        methods.get("zofo")
    with pytest.raises(ValueError, match="unknown method 'adam'; expected one of bilevel-zofo"):
        methods.get("adam")
    with pytest.raises(ValueError, match="needs loss_fn"):
        methods.build_optimizer("bilevel-zofo", models.add_peft(tiny, "lora"), lr=1e-3)
    with pytest.raises(TypeError, match="lam"):
        methods.build_optimizer("mezo", tiny, lr=1e-3, lam=1.0)  # the optimizer refuses it
    names = methods.get("bilevel-zofo").setting_names()
    assert {"lam", "peft_lr", "theta_update", "eps", "seed", "n_directions"} <= set(names)
    assert "include_frozen" not in names and "normalize" not in names
    assert "penalty_batch" in names  # a data setting: not handed to the optimizer
    assert "penalty_batch" not in methods.get("bilevel-zofo").optimizer_settings()


def test_zoconfig_hands_settings_through_and_refuses_what_the_method_does_not_take():
    cfg = hf_trainer.ZOConfig("bilevel-zofo", lam=3.0)
    assert cfg.lam == 3.0 and cfg.peft_lr == methods.get("bilevel-zofo").defaults["peft_lr"]
    assert "lam=3.0" in repr(cfg)
    with pytest.raises(TypeError, match="lam is not a setting of method 'mezo'"):
        hf_trainer.ZOConfig("mezo", lam=1.0)
    with pytest.raises(ValueError, match="TrainingArguments.learning_rate"):
        hf_trainer.ZOConfig("mezo", lr=1e-3)
    with pytest.raises(ValueError, match="'zofo' is now called 'bilevel-zofo'"):
        hf_trainer.ZOConfig("zofo")
    with pytest.raises(ValueError, match="'fo-lora' is first-order: train it with the plain "
                                         "transformers.Trainer"):
        hf_trainer.ZOConfig("fo-lora")
    with pytest.raises(AttributeError):
        hf_trainer.ZOConfig("mezo").lam


def test_loss_hook_wraps_every_loss_evaluation_and_the_base_seed_can_be_set(tiny):
    opt = methods.build_optimizer("mezo", tiny, lr=1e-6, n_directions=2, seed=3)
    calls = []

    def hook(closure):
        calls.append("before")
        loss = closure()
        calls.append("after")
        return loss
    opt.loss_hook = hook
    batch = _batch()
    counted = measure.CountedLoss(models.classification_loss)
    with torch.no_grad():
        opt.step(lambda: counted(tiny, batch))
    assert counted.calls == 4 and calls == ["before", "after"] * 4  # central, q = 2
    assert counted.seconds > 0
    opt.base_seed = 11
    assert opt.base_seed == 11 and opt.state_dict()["zo"]["base_seed"] == 11
    with pytest.raises(ValueError, match="seed"):
        opt.base_seed = -1
    assert opt.base_seed == 11


def test_peak_memory_helpers_read_this_process():
    rss = measure.rss_bytes()
    assert rss > 0 and measure.peak_rss_bytes() >= rss
    measure.reset_peak_rss()
    rss = measure.rss_bytes()  # read after the reset: the new peak covers it
    assert measure.peak_rss_bytes() >= rss > 0
    assert measure.peak_memory_bytes(torch.device("cpu")) > 0
    assert measure.peak_memory_kind(torch.device("cpu")) == "peak RSS"
