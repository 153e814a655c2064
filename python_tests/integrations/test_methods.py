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
    handed = {}

    def from_peft(model, loss_fn, **kwargs):
        handed.update(kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods.ZOFOOptimizer, "from_peft", from_peft)
        methods.build_optimizer("bilevel-zofo", tiny, loss_fn=len, penalty_batch="last")
    assert handed and "penalty_batch" not in handed
    with pytest.raises(TypeError, match="lam is not a setting of method 'mezo'"):
        methods.get("mezo").resolve(lam=1.0)
    with pytest.raises(TypeError, match="takes ZOSettings"):
        methods.get("mezo").build(tiny, methods.get("fo-full").resolve())


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


def test_each_method_is_a_recipe_on_one_frozen_settings_dataclass():
    """The registry's route: resolve (the one merge of defaults) gives a frozen settings
    dataclass; build hands it to the method's recipe, a plain function of this module."""
    import dataclasses
    recipes = {"bilevel-zofo": methods.bilevel_zofo, "mezo": methods.mezo,
               "mezo-lora": methods.mezo_peft, "fo-lora": methods.adam, "fo-full": methods.adam}
    kinds = {"bilevel-zofo": methods.BilevelSettings, "mezo": methods.ZOSettings,
             "mezo-lora": methods.ZOSettings, "fo-lora": methods.AdamSettings,
             "fo-full": methods.AdamSettings}
    for name in methods.names():
        method = methods.get(name)
        assert method.recipe is recipes[name] and method.settings_type is kinds[name]
        settings = method.resolve(lr=0.5)
        assert type(settings) is kinds[name] and settings.lr == 0.5
        assert method.setting_names() == tuple(
            f.name for f in dataclasses.fields(kinds[name]))
        for key, value in method.defaults.items():
            if key != "lr":
                assert getattr(settings, key) == value  # the method's defaults, applied
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.lr = 1.0
    with pytest.raises(TypeError):
        methods.get("mezo").defaults["lr"] = 1.0  # the registry's defaults are read-only


def test_the_settings_defaults_are_the_optimizers_own(tiny):
    """A recipe names every setting explicitly, so the settings dataclasses repeat the
    optimizers' defaults: a setting nobody gives builds the optimizer a bare call builds."""
    import dataclasses
    import inspect
    sig = inspect.signature(ZOOptimizer.__init__).parameters
    for cls in (methods.ZOSettings, methods.ZOStepSettings):
        for f in dataclasses.fields(cls):
            if f.name != "lr":
                assert sig[f.name].default == f.default, (cls.__name__, f.name)
    assert set(sig) - {"self", "params"} == {f.name for f in dataclasses.fields(
        methods.ZOSettings)}  # every keyword of ZOOptimizer is a ZO-SGD setting

    def built(make):
        model = models.add_peft(models.build_random("tiny-bert", seed=0), "lora")
        return make(model, lambda b: models.classification_loss(model, b))
    bare = built(lambda m, loss: ZOFOOptimizer.from_peft(m, loss, seed=3))
    ours = built(lambda m, loss: methods.bilevel_zofo(
        m, methods.BilevelSettings(seed=3), loss))
    for name in ("lam", "inner_steps", "theta_update", "order"):
        assert getattr(ours, name) == getattr(bare, name), name
    assert ours.zo.param_groups[0]["lr"] == bare.zo.param_groups[0]["lr"]
    for name in ("eps", "estimator", "distribution", "n_directions", "stochastic_rounding",
                 "nonfinite", "normalize", "rms_beta", "include_frozen", "backend"):
        assert getattr(ours.zo, name) == getattr(bare.zo, name), name
    assert ours.adapter_names == bare.adapter_names
    assert _same_state(ours.state_dict(), bare.state_dict())
    bare_adam = torch.optim.Adam(tiny.parameters(), lr=0.1)
    ours_adam = methods.adam(tiny, methods.AdamSettings(lr=0.1))
    assert ours_adam.defaults == bare_adam.defaults


def _same_state(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def test_one_set_of_defaults_for_bilevel_zofo(tmp_path):
    """The registry's measured defaults (the SST-2 study's lr 1e-4, lam 10, inner_steps 3)
    are the settings dataclass's and ZOFOOptimizer's own: zofo-train, ZOConfig, the Python
    API and a bare ZOFOOptimizer(...) agree."""
    import dataclasses
    method = methods.get("bilevel-zofo")
    bare = methods.BilevelSettings()
    for key, value in method.defaults.items():
        assert getattr(bare, key) == value, key
    assert method.resolve() == bare
    assert (bare.lr, bare.lam, bare.inner_steps) == (1e-4, 10.0, 3)
    parser = train.build_parser()
    given = train.parse(["--method", "bilevel-zofo", "--train", "x.tsv", "--eval", "x.tsv",
                         "--steps", "1", "--output", str(tmp_path / "out")]).settings
    assert given == dataclasses.replace(bare, seed=0)  # zofo-train's --seed default: 0
    assert "default 3" in next(a.help for a in parser._actions if a.dest == "inner_steps")
