"""The one registry of training methods.

Each :class:`Method` says what it trains, whether it needs a PEFT adapter, whether it is
zeroth-order, its default settings and how its optimizer is built. ``zofo-train``,
``zofo-bench``, ``ZOFOTrainer`` (``ZOConfig.method``) and the communication benchmark read
it, so a method has one name and one builder everywhere::

    from zofo_kernels.integrations import methods
    opt = methods.build_optimizer("mezo", model, lr=1e-6, eps=1e-3)
    zofo = methods.build_optimizer("bilevel-zofo", peft_model, lr=1e-4,
                                   loss_fn=lambda batch: loss(peft_model, batch))

The settings a builder takes are those of the optimizer it builds
(:class:`~zofo_kernels.core.optim.ZOOptimizer`, :class:`~zofo_kernels.core.optim.ZOFOOptimizer`,
``torch.optim.Adam``), handed through unchanged and checked there once. The method
reference is docs/optimizers.md.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from zofo_kernels.core.optim import ZOFOOptimizer, ZOOptimizer, zo_param_groups


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method.

    ``trains``: what it updates. ``peft``: the model must carry a PEFT adapter (its
    trainable parameters). ``zeroth_order``: built on the fused ZO kernels (data-parallel
    through ``DataParallelZO``; runnable by ``ZOFOTrainer``). ``defaults``: the settings a
    caller gets when it gives none (``lr`` included; the SST-2 study picks them).
    ``data_settings``: names in ``defaults`` that decide how batches are drawn, not how the
    optimizer is built (not handed to the builder). ``build(model, loss_fn, **settings)``
    returns the optimizer."""

    name: str
    summary: str
    trains: str
    peft: bool
    zeroth_order: bool
    defaults: Mapping[str, Any]
    build: Callable[..., Any]
    data_settings: Tuple[str, ...] = ()
    # the classes whose keyword settings ``build`` hands through (ZOFOOptimizer hands its
    # ZO settings on to ZOOptimizer)
    optimizer_classes: Tuple[type, ...] = ()
    # settings of those classes that the builder decides itself (not the caller's)
    fixed_settings: Tuple[str, ...] = ()

    def optimizer_settings(self, **given) -> Dict[str, Any]:
        """``defaults`` overridden by ``given`` (None values do not override), without the
        data settings: the keyword arguments of ``build``."""
        merged = dict(self.defaults)
        merged.update({k: v for k, v in given.items() if v is not None})
        return {k: v for k, v in merged.items() if k not in self.data_settings}

    def setting(self, name: str, given: Any = None) -> Any:
        """One setting: ``given`` unless None, else the default (None if there is none)."""
        return self.defaults.get(name) if given is None else given

    def setting_names(self) -> Tuple[str, ...]:
        """The keyword settings ``build`` accepts (``lr`` and the optimizer's)."""
        names = set(self.defaults) | {"lr"}
        for cls in self.optimizer_classes:
            for fn in (cls.__init__, getattr(cls, "from_peft", None),
                       getattr(cls, "_setup", None)):
                if fn is None:
                    continue
                for p in inspect.signature(fn).parameters.values():
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in (
                            "self", "params", "cls", "peft_model", "loss_fn",
                            "backbone_params", "pairs_spec", "upper_params", "lower_params",
                            "select_adapter"):
                        names.add(p.name)
        return tuple(sorted(names - set(self.fixed_settings)))


def _trainable(model: torch.nn.Module) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False "
                         "everywhere): nothing to train")
    return params


def _build_mezo(model, loss_fn=None, *, lr, weight_decay=0.0, **zo_settings):
    """MeZO: ZO-SGD on every trainable parameter; biases and normalisation weights in a group
    without weight decay."""
    _trainable(model)
    return ZOOptimizer(zo_param_groups(model, weight_decay), lr=lr,
                       weight_decay=weight_decay, **zo_settings)


def _build_mezo_peft(model, loss_fn=None, *, lr, weight_decay=0.0, **zo_settings):
    """ZO-SGD on the PEFT block: the trainable parameters, one group."""
    return ZOOptimizer([{"params": _trainable(model), "weight_decay": weight_decay}], lr=lr,
                       weight_decay=weight_decay, **zo_settings)


def _build_adam(model, loss_fn=None, *, lr, weight_decay=0.0, **adam_settings):
    """Adam on the trainable parameters (all of them, or the PEFT block)."""
    return torch.optim.Adam(_trainable(model), lr=lr, weight_decay=weight_decay,
                            **adam_settings)


def _build_bilevel(model, loss_fn=None, *, lr, **settings):
    """Bilevel-ZOFO on a ``peft.PeftModel``: P is the active adapter, S a copy, the backbone
    theta every other parameter."""
    if loss_fn is None:
        raise ValueError("bilevel-zofo needs loss_fn(batch): its first-order steps evaluate "
                         "the loss themselves")
    settings.setdefault("peft_optimizer", torch.optim.Adam)
    return ZOFOOptimizer.from_peft(model, loss_fn, lr=lr, **settings)


REGISTRY: Dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    REGISTRY[method.name] = method
    return method


register(Method(
    "bilevel-zofo",
    summary="backbone by ZO (fused kernels), PEFT block by first-order Adam, bilevel penalty",
    trains="the backbone (zeroth-order) and the PEFT block (first-order)",
    peft=True, zeroth_order=True, build=_build_bilevel, data_settings=("penalty_batch",),
    optimizer_classes=(ZOFOOptimizer, ZOOptimizer),
    fixed_settings=("include_frozen", "normalize"),  # ZOFOOptimizer sets them from theta_update
    # the SST-2 study's choice (benchmarks/results/study_v2/): the sweep's lr (rms lr 1e-4
    # ended at 0.832 on held-out training examples after 555 outer steps, 1e-3 fell from
    # 0.834 to 0.762); lam 10: the lambda phase found rms stable at 1-1000 (dev 0.825, 0.825,
    # 0.811, 0.819), lam 1 and 10 tied
    defaults=dict(lr=1e-4, eps=1e-3, peft_lr=1e-3, lam=10.0, inner_steps=3,
                  estimator="forward", theta_update="rms", order="official",
                  penalty_batch="fresh")))
register(Method(
    "mezo", summary="all weights by ZO-SGD (fused kernels), MeZO's update",
    trains="all weights", peft=False, zeroth_order=True, build=_build_mezo,
    optimizer_classes=(ZOOptimizer,),
    defaults=dict(lr=1e-5, eps=1e-3, estimator="central")))
register(Method(
    "mezo-lora", summary="the PEFT block (LoRA by default) by ZO-SGD",
    trains="the PEFT block", peft=True, zeroth_order=True, build=_build_mezo_peft,
    optimizer_classes=(ZOOptimizer,),
    # lr: the SST-2 sweep's choice (study_v2: 3e-4 ended at 0.758, 3e-3 collapsed to 0.556)
    defaults=dict(lr=3e-4, eps=1e-2, estimator="central")))
register(Method(
    "fo-lora", summary="the PEFT block (LoRA by default) by Adam",
    trains="the PEFT block", peft=True, zeroth_order=False, build=_build_adam,
    # lr: the SST-2 sweep's choice (study_v2: 3e-4 and 1e-3 both ended at 0.822; 3e-4 best 0.832)
    defaults=dict(lr=3e-4, weight_decay=0.0)))
register(Method(
    "fo-full", summary="all weights by Adam", trains="all weights", peft=False,
    zeroth_order=False, build=_build_adam, defaults=dict(lr=3e-5, weight_decay=0.0)))

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


def build_optimizer(name: str, model: torch.nn.Module, *, loss_fn=None, **settings):
    """The optimizer of method ``name`` for ``model``: the method's defaults overridden by
    ``settings`` (None values keep the default), handed to its builder unchanged."""
    method = get(name)
    return method.build(model, loss_fn, **method.optimizer_settings(**settings))
