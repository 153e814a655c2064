"""Fault injection into ZOOptimizer steps: a loss function that raises, returns NaN or raises
KeyboardInterrupt at every call position of a step, over 1 and 3 param groups, both
estimators, q in {1, 2}, normalize "none" and "rms", float32 / bfloat16 / float16 weights.

Afterwards every optimizer state and counter is bit-identical to before the step and the next
step runs. The weights are bit-identical where the in-place restore is exact by construction
(Rademacher noise, eps = 2**-5 and weights on the 2**-5 grid with |w| <= 5: every perturbed
value is representable in all three dtypes), and within the bound the README states otherwise
(Gaussian noise): n * ulp(|w| + 2*eps*sum_k |z_k|) in the storage dtype, n the number of
+-eps*z terms the step applied (at most 3q central, 2q forward). In the exact case the retried
step also gives bit for bit what a run without the fault gives.
"""

import copy
import itertools

import pytest
import torch

from tolerances import ulp
from zofo_kernels import noise
from zofo_kernels.core.optim import NonFiniteLossError, ZOOptimizer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAULTS = ["raise", "nan", "interrupt"]
SHAPES = [(4, 3), (3,), (2, 2), (5,)]
EPS_EXACT = 2.0 ** -5
EPS_GAUSS = 1e-2


class Boom(Exception):
    pass


def make_params(dtype, distribution, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        if distribution == "rademacher":  # the 2**-5 grid, |w| <= 5
            w = torch.randint(-160, 161, shape, generator=g).float() / 32
        else:
            w = torch.randn(shape, generator=g) * 0.5
        out.append(torch.nn.Parameter(w.to(dtype)))
    return out


def groups_of(params, n_groups):
    if n_groups == 1:
        return [{"params": params, "lr": 2.0 ** -6, "weight_decay": 0.0}]
    return [{"params": params[:2], "lr": 2.0 ** -6, "weight_decay": 2.0 ** -3},
            {"params": params[2:3], "lr": 2.0 ** -5, "weight_decay": 0.0},
            {"params": params[3:], "lr": 2.0 ** -7, "weight_decay": 0.5}]


def loss_fn(params):
    targets = [0.25, -0.5, 1.0, 0.125]
    return sum(((p.float() - t) ** 2).sum() for p, t in zip(params, targets))


def bits(t):
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.detach().clone().view(view[t.dtype])


def snapshot(opt, params):
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return ([bits(p) for p in params], copy.deepcopy(opt.state_dict()),
            copy.deepcopy(opt._zo_state), groups)


def assert_same_state(a, b):
    assert a[1] == b[1], "state_dict changed"
    assert a[2] == b[2], "counters / RMS state changed"
    assert a[3] == b[3], "param group hyperparameters changed"


def assert_same_weights(a, b):
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        assert torch.equal(x, y), f"parameter {i} is not bit-identical"


def n_positions(estimator, q):
    return 2 * q if estimator == "central" else q + 1


def make_opt(params, n_groups, estimator, q, normalize, distribution, nonfinite="raise"):
    return ZOOptimizer(groups_of(params, n_groups), lr=2.0 ** -6,
                       eps=EPS_EXACT if distribution == "rademacher" else EPS_GAUSS,
                       distribution=distribution, estimator=estimator, n_directions=q,
                       normalize=normalize, seed=77, nonfinite=nonfinite)


def warm_up(opt, params):
    """One completed step with lr 0 (the weights stay on their grid; the counter and the RMS
    state move), then the groups' learning rates back."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step(lambda: loss_fn(params))
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    assert opt.step_count == 1


def faulty(params, position, fault, calls):
    def closure():
        calls.append(1)
        if len(calls) == position:
            if fault == "raise":
                raise Boom("loss failed")
            if fault == "interrupt":
                raise KeyboardInterrupt()
            return torch.tensor(float("nan"))
        return loss_fn(params)
    return closure


EXPECTED = {"raise": Boom, "interrupt": KeyboardInterrupt, "nan": NonFiniteLossError}


def run_case(dtype, n_groups, fault, estimator, q, normalize, distribution, position):
    params = make_params(dtype, distribution)
    opt = make_opt(params, n_groups, estimator, q, normalize, distribution)
    warm_up(opt, params)
    before = snapshot(opt, params)
    seed = opt.next_seed()
    calls = []
    with pytest.raises(EXPECTED[fault]):
        opt.step(faulty(params, position, fault, calls))
    assert len(calls) == (position if fault != "nan" else n_positions(estimator, q))
    after = snapshot(opt, params)
    assert_same_state(before, after)
    if distribution == "rademacher":
        assert_same_weights(before, after)
    else:
        n_terms = 3 * q if estimator == "central" else 2 * q
        offset = 0
        for p, w0 in zip(params, before[0]):
            w0 = w0.view(dtype)
            zsum = sum(noise(seed, offset, p.numel(), "gaussian", k).view(p.shape).abs()
                       for k in range(q))
            offset += p.numel()
            bound = n_terms * ulp(w0.double().abs() + 2 * EPS_GAUSS * zsum.double(), dtype)
            err = (p.detach().double() - w0.double()).abs()
            assert bool((err <= bound).all()), (float(err.max()), float(bound.min()))
    # the next step runs, and (exact case) gives what the run without the fault gives
    opt.step(lambda: loss_fn(params))
    assert opt.step_count == 2 and not opt.last_step["skipped"]
    if distribution == "rademacher":
        ref_params = make_params(dtype, distribution)
        ref = make_opt(ref_params, n_groups, estimator, q, normalize, distribution)
        warm_up(ref, ref_params)
        ref.step(lambda: loss_fn(ref_params))
        a, b = snapshot(opt, params), snapshot(ref, ref_params)
        assert_same_state(a, b)
        assert_same_weights(a, b)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("n_groups", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fault_at_every_call_position_leaves_state_and_weights(dtype, n_groups, fault):
    cases = 0
    for estimator, q, normalize, distribution in itertools.product(
            ("central", "forward"), (1, 2), ("none", "rms"), ("rademacher", "gaussian")):
        for position in range(1, n_positions(estimator, q) + 1):
            run_case(dtype, n_groups, fault, estimator, q, normalize, distribution, position)
            cases += 1
    assert cases == 2 * 2 * 11


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_with_skip_counts_the_step_and_changes_nothing_else(dtype):
    for estimator, q, normalize in itertools.product(("central", "forward"), (1, 2),
                                                     ("none", "rms")):
        for position in range(1, n_positions(estimator, q) + 1):
            params = make_params(dtype, "rademacher")
            opt = make_opt(params, 3, estimator, q, normalize, "rademacher", nonfinite="skip")
            warm_up(opt, params)
            before = snapshot(opt, params)
            opt.step(faulty(params, position, "nan", []))
            after = snapshot(opt, params)
            assert opt.last_step["skipped"]
            assert_same_weights(before, after)
            assert after[2] == dict(before[2], step=before[2]["step"] + 1)


def test_bound_used_above_is_not_vacuous():
    """The Gaussian bound is a few ulp: a perturbation left on the weights would break it."""
    dtype = torch.bfloat16
    params = make_params(dtype, "gaussian")
    before = [p.detach().clone() for p in params]
    opt = make_opt(params, 1, "central", 1, "none", "gaussian")
    seed = opt.next_seed()
    from zofo_kernels import perturb_
    perturb_(params, seed, EPS_GAUSS, "gaussian", 0)  # one sweep not undone
    offset, violated = 0, False
    for p, w0 in zip(params, before):
        z = noise(seed, offset, p.numel(), "gaussian", 0).view(p.shape).abs()
        offset += p.numel()
        bound = 3 * ulp(w0.double().abs() + 2 * EPS_GAUSS * z.double(), dtype)
        violated |= bool(((p.detach().double() - w0.double()).abs() > bound).any())
    assert violated
