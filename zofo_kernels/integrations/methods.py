"""The one registry of training methods.

Each :class:`Method` says what it trains, whether it needs a PEFT adapter, whether it is
zeroth-order, the settings it takes (one frozen dataclass: :class:`ZOSettings`,
:class:`BilevelSettings` or :class:`AdamSettings`), its default values for some of them, and
its recipe: a plain function that builds the optimizer from those settings with explicit
keywords. ``zofo-train``, ``zofo-bench``, ``ZOFOTrainer`` (``ZOConfig.method``) and the
communication benchmark read it, so a method has one name and one recipe everywhere::

    from zofo_kernels.integrations import methods
    opt = methods.build_optimizer("mezo", model, lr=1e-6, eps=1e-3)
    zofo = methods.build_optimizer("bilevel-zofo", peft_model, lr=1e-4,
                                   loss_fn=lambda batch: loss(peft_model, batch))

or, in two steps (what ``zofo-train`` and ``ZOFOTrainer`` do)::

    method = methods.get("mezo")
    settings = method.resolve(lr=1e-6)        # the one merge of the defaults: a ZOSettings
    opt = method.build(model, settings)       # its recipe: methods.mezo(model, settings)

A settings dataclass lists the keyword settings of the optimizer its recipes build, with that
optimizer's own defaults (a test checks that they agree); the values are checked once, by the
optimizer. The method reference is docs/optimizers/.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from zofo_kernels.core.optim import ZOFOOptimizer, ZOOptimizer, bilevel, zo_param_groups


# --------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class AdamSettings:
    """First-order methods: ``torch.optim.Adam`` on the trainable parameters."""
    lr: float
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class ZOStepSettings:
    """What every zeroth-order step takes: :class:`~zofo_kernels.core.optim.ZOOptimizer`'s
    keyword settings (and defaults) that both ZO-SGD and Bilevel-ZOFO's backbone step hand
    to it."""
    lr: float
    eps: float = 1e-3
    weight_decay: float = 0.0
    distribution: str = "gaussian"
    n_directions: int = 1
    seed: Optional[int] = None
    stochastic_rounding: bool = True
    nonfinite: str = "raise"
    loss_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    backend: Optional[str] = None
    rms_beta: float = 0.999
    # None: dense; f in (0, 1]: each step perturbs and updates only the fraction f of each
    # tensor with the smallest magnitudes (Sparse-MeZO style; docs/optimizers/zo-sgd.md)
    sparse_fraction: Optional[float] = None
    # None: dense; r: rank-r directions for every matrix, V redrawn every lowrank_period steps
    # (LOZO style; docs/optimizers/zo-sgd.md)
    lowrank: Optional[int] = None
    lowrank_period: int = 1


@dataclasses.dataclass(frozen=True)
class ZOSettings(ZOStepSettings):
    """ZO-SGD (MeZO, MeZO on a PEFT block): the rest of ``ZOOptimizer``'s settings."""
    estimator: str = "central"
    normalize: str = "none"
    include_frozen: bool = False


@dataclasses.dataclass(frozen=True)
class BilevelSettings(ZOStepSettings):
    """Bilevel-ZOFO: :meth:`ZOFOOptimizer.from_peft <zofo_kernels.core.optim.ZOFOOptimizer.
    from_peft>`'s settings (its defaults, ``lr`` included). ``normalize`` and
    ``include_frozen`` of the ZO step are not among them: ``ZOFOOptimizer`` sets them from
    ``theta_update``. ``penalty_batch`` is no optimizer setting: it says how the caller draws
    B_g, the upper step's D_g batch ("fresh": a batch of its own, as the authors' code does;
    "last": the last lower batch)."""
    lr: float = bilevel.DEFAULT_LR
    estimator: str = "forward"
    lam: float = bilevel.DEFAULT_LAM
    inner_steps: int = bilevel.DEFAULT_INNER_STEPS
    theta_update: str = "rms"
    order: str = "official"
    peft_optimizer: type = torch.optim.Adam
    peft_lr: float = 1e-3
    lower_lr: Optional[float] = None
    peft_optimizer_kwargs: Optional[Mapping[str, Any]] = None
    lower_adapter: Optional[str] = None
    backbone_regex: Optional[str] = None
    penalty_batch: str = "fresh"


# --------------------------------------------------------------------------- recipes

def _trainable(model: torch.nn.Module) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False "
                         "everywhere): nothing to train")
    return params


def zo_sgd(param_groups, s: ZOSettings) -> ZOOptimizer:
    """``ZOOptimizer`` on ``param_groups`` with the settings ``s``."""
    return ZOOptimizer(param_groups, lr=s.lr, eps=s.eps, weight_decay=s.weight_decay,
                       distribution=s.distribution, estimator=s.estimator,
                       n_directions=s.n_directions, seed=s.seed,
                       stochastic_rounding=s.stochastic_rounding, nonfinite=s.nonfinite,
                       loss_reduce=s.loss_reduce, backend=s.backend, normalize=s.normalize,
                       rms_beta=s.rms_beta, include_frozen=s.include_frozen,
                       sparse_fraction=s.sparse_fraction, lowrank=s.lowrank,
                       lowrank_period=s.lowrank_period)


def mezo(model: torch.nn.Module, s: ZOSettings, loss_fn=None) -> ZOOptimizer:
    """MeZO: ZO-SGD on every trainable parameter; biases and normalisation weights in a group
    without weight decay. (``loss_fn``: unused, the step takes a closure.)"""
    _trainable(model)
    return zo_sgd(zo_param_groups(model, s.weight_decay), s)


def mezo_peft(model: torch.nn.Module, s: ZOSettings, loss_fn=None) -> ZOOptimizer:
    """ZO-SGD on the PEFT block: the trainable parameters, one group."""
    return zo_sgd([{"params": _trainable(model), "weight_decay": s.weight_decay}], s)


def adam(model: torch.nn.Module, s: AdamSettings, loss_fn=None) -> torch.optim.Adam:
    """Adam on the trainable parameters (all of them, or the PEFT block)."""
    return torch.optim.Adam(_trainable(model), lr=s.lr, weight_decay=s.weight_decay)


def bilevel_zofo(model, s: BilevelSettings, loss_fn=None) -> ZOFOOptimizer:
    """Bilevel-ZOFO on a ``peft.PeftModel``: P is the active adapter, S a copy, the backbone
    theta every other parameter (or those matching ``backbone_regex``)."""
    if loss_fn is None:
        raise ValueError("bilevel-zofo needs loss_fn(batch): its first-order steps evaluate "
                         "the loss themselves")
    return ZOFOOptimizer.from_peft(
        model, loss_fn, lr=s.lr, lower_adapter=s.lower_adapter,
        backbone_regex=s.backbone_regex, lam=s.lam, inner_steps=s.inner_steps,
        theta_update=s.theta_update, order=s.order, peft_optimizer=s.peft_optimizer,
        peft_lr=s.peft_lr, lower_lr=s.lower_lr, peft_optimizer_kwargs=s.peft_optimizer_kwargs,
        estimator=s.estimator, weight_decay=s.weight_decay, eps=s.eps,
        distribution=s.distribution, n_directions=s.n_directions, seed=s.seed,
        stochastic_rounding=s.stochastic_rounding, nonfinite=s.nonfinite,
        loss_reduce=s.loss_reduce, backend=s.backend, rms_beta=s.rms_beta,
        sparse_fraction=s.sparse_fraction, lowrank=s.lowrank, lowrank_period=s.lowrank_period)


# --------------------------------------------------------------------------- the registry

@dataclasses.dataclass(frozen=True)
class Method:
    """One training method.

    ``trains``: what it updates. ``peft``: the model must carry a PEFT adapter (its
    trainable parameters). ``zeroth_order``: built on the fused ZO kernels (data-parallel
    through ``DataParallelZO``; runnable by ``ZOFOTrainer``). ``settings_type``: the frozen
    dataclass of the settings its recipe takes. ``defaults``: this method's values for some
    of them (``lr`` always; the SST-2 study picks them), over the dataclass's own.
    ``recipe(model, settings, loss_fn)``: the function that builds the optimizer."""

    name: str
    summary: str
    trains: str
    peft: bool
    zeroth_order: bool
    settings_type: type
    defaults: Mapping[str, Any]
    recipe: Callable[..., Any]

    def setting_names(self) -> Tuple[str, ...]:
        """The settings this method takes: the fields of its settings dataclass."""
        return tuple(f.name for f in dataclasses.fields(self.settings_type))

    def resolve(self, **given) -> Any:
        """The run's settings (a frozen ``settings_type``): the dataclass's defaults, then the
        method's, then ``given`` (None keeps the default). The one merge of defaults; a name
        the method does not take raises TypeError."""
        unknown = sorted(set(given) - set(self.setting_names()))
        if unknown:
            raise TypeError(f"{', '.join(unknown)} is not a setting of method {self.name!r}; "
                            f"it takes {', '.join(self.setting_names())}")
        values = dict(self.defaults)
        values.update({k: v for k, v in given.items() if v is not None})
        return self.settings_type(**values)

    def build(self, model: torch.nn.Module, settings, *, loss_fn=None):
        """The optimizer: the recipe on ``model`` with ``settings`` (from :meth:`resolve`)."""
        if not isinstance(settings, self.settings_type):
            raise TypeError(f"method {self.name!r} takes {self.settings_type.__name__} "
                            f"(Method.resolve), got {type(settings).__name__}")
        if self.peft and not (isinstance(getattr(model, "peft_config", None), dict)
                              and hasattr(model, "set_adapter")):
            raise TypeError(f"method {self.name!r} trains a PEFT block, and this "
                            f"{type(model).__name__} has none: wrap it with "
                            "peft.get_peft_model first (or use a method that trains every "
                            "weight)")
        return self.recipe(model, settings, loss_fn)


REGISTRY: Dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    unknown = set(method.defaults) - set(method.setting_names())
    if unknown or "lr" not in method.defaults:
        raise ValueError(f"method {method.name!r}: defaults need lr and take only its "
                         f"settings (not {sorted(unknown)})")
    REGISTRY[method.name] = dataclasses.replace(
        method, defaults=types.MappingProxyType(dict(method.defaults)))
    return REGISTRY[method.name]


register(Method(
    "bilevel-zofo",
    summary="backbone by ZO (fused kernels), PEFT block by first-order Adam, bilevel penalty",
    trains="the backbone (zeroth-order) and the PEFT block (first-order)",
    peft=True, zeroth_order=True, settings_type=BilevelSettings, recipe=bilevel_zofo,
    # the SST-2 study's choice (benchmarks/results/study_v2/): the sweep's lr (rms lr 1e-4
    # ended at 0.832 on held-out training examples after 555 outer steps, 1e-3 fell from
    # 0.834 to 0.762); lam 10: the lambda phase found rms stable at 1-1000 (dev 0.825, 0.825,
    # 0.811, 0.819), lam 1 and 10 tied. ZOFOOptimizer's own defaults are these values
    # (core/optim/bilevel.py DEFAULT_*; a test checks that they agree)
    defaults=dict(lr=1e-4, eps=1e-3, peft_lr=1e-3, lam=10.0, inner_steps=3,
                  estimator="forward", theta_update="rms", order="official",
                  penalty_batch="fresh")))
register(Method(
    "mezo", summary="all weights by ZO-SGD (fused kernels), MeZO's update",
    trains="all weights", peft=False, zeroth_order=True, settings_type=ZOSettings,
    recipe=mezo, defaults=dict(lr=1e-5, eps=1e-3, estimator="central")))
register(Method(
    "mezo-lora", summary="the PEFT block (LoRA by default) by ZO-SGD",
    trains="the PEFT block", peft=True, zeroth_order=True, settings_type=ZOSettings,
    recipe=mezo_peft,
    # lr: the SST-2 sweep's choice (study_v2: 3e-4 ended at 0.758, 3e-3 collapsed to 0.556)
    defaults=dict(lr=3e-4, eps=1e-2, estimator="central")))
register(Method(
    "fo-lora", summary="the PEFT block (LoRA by default) by Adam",
    trains="the PEFT block", peft=True, zeroth_order=False, settings_type=AdamSettings,
    recipe=adam,
    # lr: the SST-2 sweep's choice (study_v2: 3e-4 and 1e-3 both ended at 0.822; 3e-4 best 0.832)
    defaults=dict(lr=3e-4, weight_decay=0.0)))
register(Method(
    "fo-full", summary="all weights by Adam", trains="all weights", peft=False,
    zeroth_order=False, settings_type=AdamSettings, recipe=adam,
    defaults=dict(lr=3e-5, weight_decay=0.0)))

# names of earlier versions, refused with the name to use
RENAMED = {"zofo": "bilevel-zofo", "zo": "mezo"}


def names(*, zeroth_order: Optional[bool] = None, peft: Optional[bool] = None
          ) -> Tuple[str, ...]:
    """Registered method names, in registration order, optionally filtered."""
    return tuple(m.name for m in REGISTRY.values()
                 if (zeroth_order is None or m.zeroth_order == zeroth_order)
                 and (peft is None or m.peft == peft))


def get(name: str, *, among: Optional[Tuple[str, ...]] = None) -> Method:
    """The method called ``name``; a clear error for an unknown or renamed name (``among``:
    the names the caller supports)."""
    allowed = names() if among is None else among
    if name in allowed:
        return REGISTRY[name]
    if name in RENAMED and RENAMED[name] in allowed:
        raise ValueError(f"method {name!r} is now called {RENAMED[name]!r}")
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(allowed)}")


def build_optimizer(name: str, model: torch.nn.Module, *, loss_fn=None, **given):
    """The optimizer of method ``name`` for ``model``, in one call: ``get(name)``, its
    :meth:`~Method.resolve` of ``given`` (None values keep the default), its recipe."""
    method = get(name)
    return method.build(model, method.resolve(**given), loss_fn=loss_fn)
