"""ZOOptimizer: the step against its formula, safety, resume, torch.optim conventions."""

import copy
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from tolerances import (BF16_ROUND_TRIP_ATOL, F32_REL, F32_UPDATE, F32_WEIGHT_ROUNDING_ATOL,
                        F64_DIFFERENCE_QUOTIENT_REL, F64_SAME_FORMULA_REL,
                        UPDATE_RMS_SAMPLE_REL)
from zofo_kernels.core import contract
from zofo_kernels import noise, perturb_
from zofo_kernels.core.optim import NonFiniteLossError, ZOOptimizer, step_seed, zo_param_groups


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, x, y


def loss_of(model, params, x, y):
    out = functional_call(model, params, (x,))
    return torch.nn.functional.cross_entropy(out, y)


def groups_of(model):
    return [
        {"params": [model.fc1.weight, model.fc2.weight], "lr": 0.05, "weight_decay": 0.1},
        {"params": [model.fc1.bias, model.norm.weight, model.norm.bias, model.fc2.bias],
         "lr": 0.02, "weight_decay": 0.0},
    ]


def expected_step(model, groups, x, y, seed, eps, q, estimator, distribution):
    """The ZO-SGD step written out with materialised noise (independent of the kernels).

    The weights go through the same sequence of float32 operations as the documented fused
    sweeps (restore of direction k-1, rounded, then perturbation of direction k, rounded), so
    the losses are reproduced exactly and the update to float32 accuracy."""
    names = {id(p): n for n, p in model.named_parameters()}
    ws, zs, hyper, offset = {}, {}, {}, 0
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            zs[n] = [noise(seed, offset, p.numel(), distribution, k).view(p.shape)
                     for k in range(q)]
            ws[n] = p.detach().clone()
            hyper[n] = (g["lr"], g["weight_decay"])
            offset += p.numel()
    e32 = torch.tensor(eps, dtype=torch.float32)

    def move(scale, k):
        for n in ws:
            ws[n] = ws[n] + zs[n][k] * scale

    def loss():
        return loss_of(model, ws, x, y).item()

    losses, grads = [], []
    with torch.no_grad():
        if estimator == "central":
            for k in range(q):
                if k > 0:
                    move(e32, k - 1)
                move(e32, k)
                lp = loss()
                move(-2 * e32, k)
                lm = loss()
                losses += [lp, lm]
                grads.append((lp - lm) / (2 * eps))
            move(e32, q - 1)
        else:
            l0 = loss()
            losses.append(l0)
            for k in range(q):
                if k > 0:
                    move(-e32, k - 1)
                move(e32, k)
                lp = loss()
                losses.append(lp)
                grads.append((lp - l0) / eps)
            move(-e32, q - 1)
    new = {}
    for n, w in ws.items():
        lr, wd = hyper[n]
        d = sum(grads[k] / q * zs[n][k].double() for k in range(q)) + wd * w.double()
        new[n] = w.double() - lr * d
    return losses, grads, new


@pytest.mark.parametrize("estimator", ["central", "forward"])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_step_matches_formula(estimator, q, distribution):
    model, x, y = make_problem()
    groups = groups_of(model)
    opt = ZOOptimizer(groups, lr=0.0, eps=1e-3, estimator=estimator, n_directions=q,
                      distribution=distribution, seed=1234)
    seed = opt.next_seed()
    losses, grads, new = expected_step(model, groups, x, y, seed, 1e-3, q, estimator,
                                       distribution)
    ret = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    st = opt.last_step
    assert st["seed"] == seed and st["step"] == 0 and not st["skipped"]
    assert len(st["projected_grads"]) == q
    assert st["losses"] == losses  # same float32 weights, same forward: bit-identical
    np.testing.assert_allclose(st["projected_grads"], grads, rtol=F64_SAME_FORMULA_REL)
    expect_ret = sum(losses) / len(losses) if estimator == "central" else losses[0]
    assert ret == pytest.approx(expect_ret, rel=F32_REL)
    for n, p in model.named_parameters():
        assert p.grad is None
        torch.testing.assert_close(p.detach().double(), new[n], **F32_UPDATE)
    # the update actually moved the weights (not a vacuous comparison)
    moved = max((new[n] - w.double()).abs().max().item()
                for n, w in make_problem()[0].named_parameters())
    assert moved > 1e-4


def test_step_seed_is_documented_philox_and_no_global_rng():
    base = 987654321
    for t in (0, 1, 2**32 + 5):
        w = contract.philox4x32(t & 0xFFFFFFFF, t >> 32, 0, 0x5EED5EED, base)
        assert step_seed(base, t) == ((int(w[1]) << 32) | int(w[0])) & (2**63 - 1)
    model, x, y = make_problem()
    opt = ZOOptimizer(model.parameters(), lr=0.01, seed=base)
    before = torch.get_rng_state()
    seeds = []
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        seeds.append(opt.last_step["seed"])
    assert torch.equal(before, torch.get_rng_state())
    assert seeds == [step_seed(base, t) for t in range(3)] and len(set(seeds)) == 3
    a = ZOOptimizer(model.parameters(), lr=0.01)
    b = ZOOptimizer(model.parameters(), lr=0.01)
    assert a.base_seed != b.base_seed
    assert a.state_dict()["zo"]["base_seed"] == a.base_seed


def test_closure_runs_without_grad_and_counts():
    model, x, y = make_problem()
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return torch.nn.functional.cross_entropy(model(x), y)

    for est, q, calls in (("central", 2, 4), ("forward", 3, 4)):
        seen.clear()
        ZOOptimizer(model.parameters(), lr=0.01, estimator=est, n_directions=q,
                    seed=0).step(closure)
        assert seen == [False] * calls
    assert all(p.grad is None for p in model.parameters())


def test_training_reduces_loss():
    model, x, y = make_problem(3)
    opt = ZOOptimizer(zo_param_groups(model, 0.0), lr=0.05, eps=1e-3, seed=5)
    with torch.no_grad():
        start = torch.nn.functional.cross_entropy(model(x), y).item()
    for _ in range(150):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    with torch.no_grad():
        end = torch.nn.functional.cross_entropy(model(x), y).item()
    assert end < 0.7 * start


# --------------------------------------------------------------------------- safety

def dyadic_model():
    """fp32 weights that are multiples of 2**-10 with |w| < 4: with eps a power of two, every
    w +/- eps*z (Rademacher) is exact, so a perturb/restore round trip is bit-exact."""
    model, x, y = make_problem()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2048, 2048, p.shape, generator=g).float() / 1024)
    return model, x, y


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_exception_restores_bit_identical_rademacher(exc, fail_at):
    model, x, y = dyadic_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = ZOOptimizer(model.parameters(), lr=0.1, eps=2.0**-5, distribution="rademacher",
                      n_directions=2, seed=3)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_at:
            # the weights really are perturbed at this point
            assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
            raise exc("stop")
        return torch.nn.functional.cross_entropy(model(x), y)

    with pytest.raises(exc):
        opt.step(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert opt.step_count == 0  # the step did not complete


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_exception_restores_like_perturb_round_trip_gaussian(dtype, estimator):
    model, x, y = make_problem()
    model.to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    eps = 1e-2
    opt = ZOOptimizer(model.parameters(), lr=0.1, eps=eps, estimator=estimator, seed=11)
    seed = opt.next_seed()
    fail_at = 2  # central: during L- (after +eps then -2eps); forward: during L+ (+eps)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_at:
            raise Boom()
        return torch.nn.functional.cross_entropy(model(x.to(dtype)), y).float()

    with pytest.raises(Boom):
        opt.step(closure)
    expect = [b.clone() for b in before]
    scales = [eps, -2 * eps, eps] if estimator == "central" else [eps, -eps]
    for s in scales:
        perturb_(expect, seed, s, "gaussian", 0)
    for p, e, b in zip(model.parameters(), expect, before):
        assert torch.equal(p.detach(), e)
        # and the round trip is close to the original (exact where it stays in the binade)
        torch.testing.assert_close(p.detach().float(), b.float(), rtol=0,
                                   atol=BF16_ROUND_TRIP_ATOL)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_raise_and_skip(bad):
    model, x, y = dyadic_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(bad) if len(calls) == 2 else torch.nn.functional.cross_entropy(
            model(x), y)

    opt = ZOOptimizer(model.parameters(), lr=0.1, eps=2.0**-5, distribution="rademacher",
                      seed=3, nonfinite="raise")
    with pytest.raises(NonFiniteLossError):
        opt.step(closure)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # nonfinite="raise": nothing happened, the step was not counted (a retry uses its seed)
    assert opt.last_step["skipped"] and opt.step_count == 0
    calls.clear()
    opt = ZOOptimizer(model.parameters(), lr=0.1, eps=2.0**-5, distribution="rademacher",
                      seed=3, nonfinite="skip")
    opt.step(closure)
    assert opt.last_step["skipped"] and opt.step_count == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the next step with a finite loss updates normally
    opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert not opt.last_step["skipped"]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------- resume

def run(model, opt, x, y, n):
    for _ in range(n):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_bit_for_bit(dtype):
    model, x, y = make_problem()
    model.to(dtype)
    xd = x.to(dtype)
    opt = ZOOptimizer(zo_param_groups(model, 0.01), lr=0.02, n_directions=2, seed=42)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        run(model, opt, xd, y, 1)
        sched.step()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sched = sched.state_dict()
    for _ in range(3):
        run(model, opt, xd, y, 1)
        sched.step()
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model2, _, _ = make_problem(7)
    model2.to(dtype)
    model2.load_state_dict(saved_model)
    opt2 = ZOOptimizer(zo_param_groups(model2, 0.01), lr=0.02, n_directions=2, seed=999)
    opt2.load_state_dict(saved_opt)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    sched2.load_state_dict(saved_sched)
    assert opt2.base_seed == 42 and opt2.step_count == 3
    for _ in range(3):
        run(model2, opt2, xd, y, 1)
        sched2.step()
    for k in final:
        assert torch.equal(model2.state_dict()[k], final[k]), k
    assert not torch.equal(final["fc1.weight"], saved_model["fc1.weight"])


def test_lr_scheduler_changes_the_update():
    model, x, y = make_problem()
    opt = ZOOptimizer(model.parameters(), lr=0.1, seed=1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t >= 1 else 1.0)
    run(model, opt, x, y, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    run(model, opt, x, y, 1)
    assert opt.last_step["lr"] == [0.0]
    # lr 0: the fused restore leaves only the perturb/restore rounding (a few ulp at most)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=F32_WEIGHT_ROUNDING_ATOL)


def test_loss_reduce_is_applied():
    model, x, y = make_problem()
    seen = []

    def reduce(t):
        seen.append(t.clone())
        return t * 2.0

    opt = ZOOptimizer(model.parameters(), lr=0.0, n_directions=2, seed=4, loss_reduce=reduce)
    run(model, opt, x, y, 1)
    assert len(seen) == 1 and seen[0].dtype == torch.float64 and seen[0].shape == (4,)
    raw = seen[0].tolist()
    assert opt.last_step["losses"] == pytest.approx([2 * v for v in raw],
                                                 rel=F64_SAME_FORMULA_REL)
    assert opt.last_step["projected_grads"][1] == pytest.approx(
        (2 * raw[2] - 2 * raw[3]) / (2 * 1e-3), rel=F64_DIFFERENCE_QUOTIENT_REL)


# --------------------------------------------------------------------------- conventions

def test_param_groups_and_zo_param_groups():
    model, _, _ = make_problem()
    groups = zo_param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(model.fc1.weight), id(model.fc2.weight)}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 4
    by_name = zo_param_groups(model.named_parameters(), 0.1, no_decay=["fc2"])
    assert {id(p) for p in by_name[1]["params"]} == {id(model.fc2.weight), id(model.fc2.bias)}
    model.fc1.bias.requires_grad_(False)
    assert all(p is not model.fc1.bias for g in zo_param_groups(model, 0.1) for p in g["params"])
    opt = ZOOptimizer(groups, lr=0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.5})
    assert opt.param_groups[-1]["lr"] == 0.5 and opt.param_groups[-1]["weight_decay"] == 0.0


def test_non_contiguous_params_use_logical_row_major_order():
    base = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 5)
    a = torch.nn.Parameter(base.clone())  # contiguous
    b = torch.nn.Parameter(base.t().contiguous().t())  # same values, transposed storage
    assert not b.is_contiguous()
    for p in (a, b):
        opt = ZOOptimizer([p], lr=0.05, seed=8)
        opt.step(lambda: ((x @ p.contiguous()) ** 2).mean())  # same bits for a and b
    assert torch.equal(a.detach(), b.detach())
    assert not torch.equal(a.detach(), base)


@pytest.mark.parametrize("kwargs, err", [
    (dict(lr=-1.0), ValueError), (dict(lr=float("nan")), ValueError), (dict(lr="1"), TypeError),
    (dict(eps=0.0), ValueError), (dict(weight_decay=-0.1), ValueError),
    (dict(distribution="uniform"), ValueError), (dict(estimator="backward"), ValueError),
    (dict(n_directions=0), ValueError), (dict(n_directions=1.5), TypeError),
    (dict(seed=-1), ValueError), (dict(seed=2**63), ValueError),
    (dict(nonfinite="ignore"), ValueError), (dict(loss_reduce=3), TypeError),
    (dict(stochastic_rounding=1), TypeError), (dict(backend="gpu9000"), ValueError),
])
def test_bad_hyperparameters_fail_at_construction(kwargs, err):
    model, _, _ = make_problem()
    args = dict(lr=0.1)
    args.update(kwargs)
    with pytest.raises(err):
        ZOOptimizer(model.parameters(), **args)


def test_bad_params_fail_at_construction():
    with pytest.raises(TypeError):
        ZOOptimizer([torch.zeros(3, dtype=torch.float64, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="optimizer-wide"):
        ZOOptimizer([{"params": [torch.nn.Parameter(torch.zeros(3))], "eps": 0.1}], lr=0.1)
    with pytest.raises(ValueError):
        ZOOptimizer([{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": -2.0}], lr=0.1)
    with pytest.raises(ValueError):
        ZOOptimizer(torch.nn.Linear(2, 2).parameters(), lr=0.1).step()
    with pytest.raises(KeyError):
        ZOOptimizer(torch.nn.Linear(2, 2).parameters(), lr=0.1).load_state_dict(
            torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1).state_dict())


# --------------------------------------------------------------------------- bf16 rounding

def regression(dtype, stochastic_rounding, steps=300):
    """Least squares with weights in [4, 8), where the bf16 spacing is 2**-5. Rademacher
    noise and eps = 2**-3 make every perturbation exact in bf16, so the only difference
    between fp32 and bf16 is how the update is rounded. A step moves a weight by about 1e-3,
    far below half the bf16 spacing (2**-6)."""
    g = torch.Generator().manual_seed(0)
    d = 16
    X = torch.randn(64, d, generator=g)
    w_star = 4.0 + torch.rand(d, generator=g)
    y = X @ w_star
    w = torch.nn.Parameter(torch.full((d,), 4.0, dtype=dtype))
    opt = ZOOptimizer([w], lr=1e-3, eps=2.0**-3, distribution="rademacher", seed=2,
                      stochastic_rounding=stochastic_rounding)

    def loss():
        return ((X @ w.float() - y) ** 2).mean()

    with torch.no_grad():
        start = loss().item()
    for _ in range(steps):
        opt.step(loss)
    with torch.no_grad():
        return start, loss().item()


def test_bf16_stochastic_rounding_makes_progress_round_to_nearest_stalls():
    s32, e32 = regression(torch.float32, True)
    s_sr, e_sr = regression(torch.bfloat16, True)
    s_rn, e_rn = regression(torch.bfloat16, False)
    print(f"bf16 regression, 300 steps: fp32 {s32:.3f} -> {e32:.3f}, bf16+SR -> {e_sr:.3f}, "
          f"bf16 round-to-nearest -> {e_rn:.3f}")
    assert s32 == s_sr == s_rn
    assert e32 < 0.5 * s32                       # fp32 makes progress
    assert (s_sr - e_sr) > 0.8 * (s32 - e32)     # bf16 + stochastic rounding: comparable
    assert (s_rn - e_rn) < 0.05 * (s32 - e32)    # bf16 round-to-nearest: stalls


# --------------------------------------------------------------------------- normalize="rms"

def _run_steps(model, x, y, n, scale=1.0, **kwargs):
    opt = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3, seed=11, **kwargs)
    for _ in range(n):
        opt.step(lambda: scale * torch.nn.functional.cross_entropy(model(x), y))
    return opt


def test_rms_normalisation_makes_the_trajectory_invariant_to_the_loss_scale():
    """Scaling the objective by a power of two scales every projected gradient and the
    running RMS by exactly that factor, so normalised coefficients and weights are
    bit-identical; plain ZO-SGD's trajectory changes."""
    runs = {}
    for normalize in ("rms", "none"):
        for scale in (1.0, 1024.0):
            model, x, y = make_problem(3)
            _run_steps(model, x, y, 6, scale, normalize=normalize, estimator="forward")
            runs[normalize, scale] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs["rms", 1.0], runs["rms", 1024.0]))
    assert not all(torch.equal(a, b) for a, b in zip(runs["none", 1.0], runs["none", 1024.0]))


def test_rms_coefficients_follow_the_bias_corrected_running_mean():
    model, x, y = make_problem(4)
    beta = 0.9
    opt = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3, seed=5, normalize="rms",
                      rms_beta=beta, n_directions=2, estimator="central")
    v = 0.0
    for t in range(1, 5):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        g = opt.last_step["projected_grads"]
        v = beta * v + (1 - beta) * (g[0] ** 2 + g[1] ** 2) / 2
        rms = math.sqrt(v / (1 - beta ** t))
        assert opt.last_step["grad_rms"] == pytest.approx(rms, rel=F64_SAME_FORMULA_REL)
        assert opt.last_step["update_coefficients"] == pytest.approx(
            [g[0] / 2 / rms, g[1] / 2 / rms], rel=F64_SAME_FORMULA_REL)
    # first step: |c| = 1/q per direction pair in RMS, so the weights move by about lr
    state = opt.state_dict()["zo"]
    assert state["sq_count"] == 4 and state["sq_avg"] == pytest.approx(
        v, rel=F64_SAME_FORMULA_REL)


def test_rms_state_resumes_bit_for_bit():
    model, x, y = make_problem(5)
    opt = _run_steps(model, x, y, 3, normalize="rms")
    saved = copy.deepcopy(opt.state_dict())
    snap = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    after = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), snap):
            p.copy_(s)
    opt2 = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3, seed=999, normalize="rms")
    opt2.load_state_dict(saved)
    for _ in range(3):
        opt2.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))


def test_update_rms_matches_the_measured_change_per_weight():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(200_000) * 0.02)
    target = torch.randn(200_000) * 0.02
    opt = ZOOptimizer([w], lr=1e-3, eps=1e-3, seed=1, estimator="forward")
    before = w.detach().clone()
    opt.step(lambda: ((w - target) ** 2).sum())
    measured = float((w.detach() - before).pow(2).mean().sqrt())
    assert opt.last_step["update_rms"] == pytest.approx(measured, rel=UPDATE_RMS_SAMPLE_REL)
    assert opt.last_step["update_rms"] > 0


def test_initial_loss_skips_the_unperturbed_forward_and_gives_the_same_step():
    results = []
    for given in (False, True):
        model, x, y = make_problem(6)
        opt = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3, seed=2, estimator="forward",
                          n_directions=2)
        calls = []

        def closure():
            calls.append(1)
            return torch.nn.functional.cross_entropy(model(x), y)

        with torch.no_grad():
            l0 = float(torch.nn.functional.cross_entropy(model(x), y))
        opt.step(closure, initial_loss=l0 if given else None)
        results.append(([p.detach().clone() for p in model.parameters()], len(calls)))
    assert results[0][1] == 3 and results[1][1] == 2
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


def test_initial_loss_is_refused_by_the_central_estimator_and_bad_rms_settings():
    model, x, y = make_problem(7)
    opt = ZOOptimizer(model.parameters(), lr=1e-2, estimator="central")
    with pytest.raises(ValueError, match="forward estimator"):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y), initial_loss=1.0)
    with pytest.raises(ValueError, match="normalize"):
        ZOOptimizer(model.parameters(), lr=1e-2, normalize="adam")
    with pytest.raises(ValueError, match="rms_beta"):
        ZOOptimizer(model.parameters(), lr=1e-2, normalize="rms", rms_beta=1.0)


# --------------------------------------------------------------------------- issue 12 regressions

def _bits(t):
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return t.detach().clone().view(view[t.dtype])


def _snapshot(opt, model):
    return ({n: _bits(p) for n, p in model.named_parameters()}, copy.deepcopy(opt.state_dict()),
            copy.deepcopy(opt._zo_state),
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _assert_unchanged(a, b):
    assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3]
    for n in a[0]:
        assert torch.equal(a[0][n], b[0][n]), n


def _three_groups(model):
    return [{"params": [model.fc1.weight, model.fc1.bias], "lr": 2.0 ** -6,
             "weight_decay": 2.0 ** -3},
            {"params": [model.norm.weight, model.norm.bias], "lr": 2.0 ** -5},
            {"params": [model.fc2.weight, model.fc2.bias], "lr": 2.0 ** -7}]


def _dyadic_opt(**kwargs):
    model, x, y = dyadic_model()
    args = dict(lr=0.1, eps=2.0 ** -5, distribution="rademacher", n_directions=2, seed=3)
    args.update(kwargs)
    return model, x, y, ZOOptimizer(_three_groups(model), **args)


@pytest.mark.parametrize("key, value, err", [
    ("lr", float("nan"), ValueError), ("lr", None, TypeError), ("lr", -0.5, ValueError),
    ("lr", 1e39, ValueError), ("weight_decay", float("nan"), ValueError),
    ("weight_decay", None, TypeError), ("weight_decay", 1e39, ValueError)])
def test_bad_group_hyperparameter_set_later_is_refused_before_any_sweep(key, value, err):
    """Item 1: a bad lr / weight decay in the last of three groups, set after construction."""
    model, x, y, opt = _dyadic_opt()
    before = _snapshot(opt, model)
    opt.param_groups[2][key] = value
    calls = []

    def closure():
        calls.append(1)
        return torch.nn.functional.cross_entropy(model(x), y)

    with pytest.raises(err):
        opt.step(closure)
    assert calls == []
    opt.param_groups[2][key] = before[3][2][key]
    _assert_unchanged(before, _snapshot(opt, model))
    opt.step(closure)  # usable afterwards
    assert opt.step_count == 1


def test_sigint_during_the_update_sweep_completes_the_step_then_interrupts(monkeypatch):
    """Item 1: a SIGINT that arrives while group 1 of 3 is updated is held back until the
    update sweep and the step's commit are done; the result equals an uninterrupted step."""
    import signal
    from zofo_kernels.core.optim import zo_functional as zo_module

    # the test sets the handler it needs: a shell's background job (cmd &, nohup) starts
    # Python with SIGINT ignored, and an ignored SIGINT is (rightly) never delivered
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_during_update(monkeypatch, zo_module)
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_during_update(monkeypatch, zo_module):
    import signal
    model, x, y, opt = _dyadic_opt()
    ref_model, _, _, ref = _dyadic_opt()

    def closure_of(m):
        return lambda: torch.nn.functional.cross_entropy(m(x), y)

    ref.step(closure_of(ref_model))
    real = zo_module.zo_update_
    seen = []

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        seen.append(1)
        if len(seen) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(zo_module, "zo_update_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure_of(model))
    assert len(seen) == 3  # every group was updated before the interrupt was delivered
    _assert_unchanged(_snapshot(ref, ref_model), _snapshot(opt, model))


def test_kernel_failure_in_the_update_sweep_restores_exactly_the_groups_not_updated(monkeypatch):
    """Item 1: the update of group 1 (of 3) fails: group 0 keeps its update, groups 1 and 2
    come back bit for bit (they carried the perturbation, not an update), and the step counts
    (its seed was used)."""
    from zofo_kernels.core.optim import zo_functional as zo_module

    model, x, y, opt = _dyadic_opt()
    ref_model, _, _, ref = _dyadic_opt()
    before = _snapshot(opt, model)
    ref.step(lambda: torch.nn.functional.cross_entropy(ref_model(x), y))
    real = zo_module.zo_update_
    seen = []

    def failing(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("kernel failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(zo_module, "zo_update_", failing)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    after = _snapshot(opt, model)
    updated = {"fc1.weight", "fc1.bias"}
    for n, p in model.named_parameters():
        expect = _bits(dict(ref_model.named_parameters())[n]) if n in updated else before[0][n]
        assert torch.equal(after[0][n], expect), n
    assert opt.step_count == 1


@pytest.mark.parametrize("kwargs", [dict(eps=1e39), dict(eps=1e-46), dict(eps=2e38),
                                    dict(lr=1e39), dict(lr=1e-46), dict(weight_decay=1e39),
                                    dict(weight_decay=1e-46)])
def test_scalars_that_do_not_survive_float32_are_refused_at_construction(kwargs):
    """Item 2: 1e39 overflows float32 (2e38: 2*eps does), 1e-46 rounds to 0."""
    model, _, _ = make_problem()
    args = dict(lr=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match="float32|too large"):
        ZOOptimizer(model.parameters(), **args)


def test_projected_gradient_that_overflows_float32_updates_nothing():
    """Item 2: losses +-1e38 with eps 2**-5 give g = 3.2e39 (finite in float64, inf in the
    kernels' float32): refused like a non-finite loss, weights and state as before."""
    model, x, y = dyadic_model()
    opt = ZOOptimizer(model.parameters(), lr=0.1, eps=2.0 ** -5, distribution="rademacher",
                      seed=3)
    before = _snapshot(opt, model)
    values = iter([1e38, -1e38])
    with pytest.raises(NonFiniteLossError, match="overflows float32"):
        opt.step(lambda: next(values))
    _assert_unchanged(before, _snapshot(opt, model))
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_scheduler_lr_that_overflows_or_is_negative_is_refused_at_step_time():
    """Item 2 / 14: a scheduler that sets lr to 1e39 or to a negative value."""
    for factor in (1e40, -1.0):
        model, x, y = dyadic_model()
        opt = ZOOptimizer(model.parameters(), lr=0.1, eps=2.0 ** -5, distribution="rademacher",
                          seed=3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t == 0 else factor)
        sched.step()
        assert opt.param_groups[0]["lr"] == 0.1 * factor
        before = _snapshot(opt, model)
        with pytest.raises(ValueError, match="lr"):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        _assert_unchanged(before, _snapshot(opt, model))


def test_failed_add_param_group_leaves_the_optimizer_usable():
    """Item 7."""
    model, x, y = dyadic_model()
    opt = ZOOptimizer(model.parameters(), lr=0.1, eps=2.0 ** -5, distribution="rademacher",
                      seed=3)
    before = _snapshot(opt, model)
    bad = [
        ({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]}, TypeError),
        ({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": float("nan")}, ValueError),
        ({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e39}, ValueError),
        ({"params": [model.fc1.weight]}, ValueError),  # already in group 0
        ({"params": [torch.nn.Parameter(torch.zeros(3))], "eps": 0.1}, ValueError),
    ]
    for group, err in bad:
        with pytest.raises(err):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1
    _assert_unchanged(before, _snapshot(opt, model))
    opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert opt.step_count == 1 and not opt.last_step["skipped"]


def _saved(**kwargs):
    model, x, y = dyadic_model()
    args = dict(lr=0.1, eps=2.0 ** -5, distribution="rademacher", n_directions=2, seed=3,
                normalize="rms")
    args.update(kwargs)
    opt = ZOOptimizer(_three_groups(model), **args)
    opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("setting, value", [
    ("eps", 2.0 ** -4), ("distribution", "gaussian"), ("estimator", "forward"),
    ("n_directions", 1), ("normalize", "none"), ("rms_beta", 0.9),
    ("stochastic_rounding", False)])
def test_load_state_dict_refuses_a_differently_configured_optimizer(setting, value):
    """Item 8: a state dict saved with another eps/distribution/... is refused, nothing
    loaded; the optimizer then steps exactly as one that never saw it."""
    saved = _saved(**{setting: value})
    model, x, y = dyadic_model()
    kwargs = dict(lr=0.1, eps=2.0 ** -5, distribution="rademacher", n_directions=2, seed=3,
                  normalize="rms")
    opt = ZOOptimizer(_three_groups(model), **kwargs)
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match=setting):
        opt.load_state_dict(saved)
    _assert_unchanged(before, _snapshot(opt, model))
    # the same settings resume
    opt.load_state_dict(_saved())
    assert opt.step_count == 1


@pytest.mark.parametrize("key, value, err", [
    ("step", -1, ValueError), ("step", 1.5, TypeError), ("step", 2.0, TypeError),
    ("step", True, TypeError), ("sq_count", -1, ValueError), ("sq_count", 0.5, TypeError),
    ("base_seed", -3, ValueError), ("base_seed", 2 ** 63, ValueError),
    ("sq_avg", float("nan"), ValueError), ("sq_avg", -1.0, ValueError),
    ("step", 2 ** 64, ValueError), ("sq_count", 0, ValueError)])
def test_load_state_dict_refuses_bad_counters(key, value, err):
    """Item 8: negative, fractional, out-of-range or inconsistent counters (sq_count 0 with the
    saved sq_avg > 0; a step counter >= 2**64, from which no seed can be derived)."""
    saved = _saved()
    saved["zo"][key] = value
    model, x, y = dyadic_model()
    opt = ZOOptimizer(_three_groups(model), lr=0.1, eps=2.0 ** -5, distribution="rademacher",
                      n_directions=2, seed=3, normalize="rms")
    before = _snapshot(opt, model)
    with pytest.raises(err):
        opt.load_state_dict(saved)
    _assert_unchanged(before, _snapshot(opt, model))


def test_load_state_dict_is_all_or_nothing():
    """Item 8: a valid "zo" part with a bad param group (NaN lr) or a wrong parameter layout
    loads nothing; neither the counters nor any group's lr change."""
    model, x, y = dyadic_model()
    opt = ZOOptimizer(_three_groups(model), lr=0.1, eps=2.0 ** -5, distribution="rademacher",
                      n_directions=2, seed=3, normalize="rms")
    before = _snapshot(opt, model)
    saved = _saved()
    saved["param_groups"][2]["lr"] = float("nan")
    saved["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)
    _assert_unchanged(before, _snapshot(opt, model))
    saved = _saved()
    saved["zo"]["param_numels"][0][0] += 1
    with pytest.raises(ValueError, match="param_numels"):
        opt.load_state_dict(saved)
    _assert_unchanged(before, _snapshot(opt, model))
    saved = _saved()
    saved["state"] = {0: {"momentum_buffer": torch.zeros(3)}}
    with pytest.raises(ValueError, match="per-parameter state"):
        opt.load_state_dict(saved)
    _assert_unchanged(before, _snapshot(opt, model))


def test_frozen_parameters_are_skipped_unless_include_frozen():
    """Item 14: requires_grad=False parameters stay bit-identical (as with torch optimizers),
    the others get exactly the noise they get when nothing is frozen; include_frozen=True
    trains them; an optimizer with only frozen parameters refuses to step."""
    runs = {}
    for frozen, include in ((False, False), (True, False), (True, True)):
        model, x, y = dyadic_model()
        if frozen:
            model.fc1.bias.requires_grad_(False)
        before = {n: _bits(p) for n, p in model.named_parameters()}
        opt = ZOOptimizer(model.parameters(), lr=0.1, eps=2.0 ** -5,
                          distribution="rademacher", seed=3, include_frozen=include)
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        runs[frozen, include] = ({n: _bits(p) for n, p in model.named_parameters()}, before)
    after, before = runs[True, False]
    assert torch.equal(after["fc1.bias"], before["fc1.bias"])
    assert not torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert not torch.equal(runs[True, True][0]["fc1.bias"], before["fc1.bias"])
    assert all(torch.equal(runs[False, False][0][n], runs[True, True][0][n]) for n in after)
    model, x, y = dyadic_model()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = ZOOptimizer(model.parameters(), lr=0.1, seed=3)
    with pytest.raises(ValueError, match="include_frozen"):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert opt.step_count == 0


# --------------------------------------------------------------------------- forgotten eval()

class WithDropout(torch.nn.Module):
    """Tiny with dropout: a module (nn.Dropout) or, as OPT and others write it, a call of
    F.dropout(x, p, training=self.training) in the forward."""

    def __init__(self, p=0.1, functional=False):
        super().__init__()
        self.tiny, self.p, self.functional = Tiny(), p, functional
        self.drop = torch.nn.Dropout(p)

    def forward(self, x):
        h = self.tiny.fc1(x)
        if self.functional:
            h = torch.nn.functional.dropout(h, p=self.p, training=self.training)
        else:
            h = self.drop(h)
        return self.tiny.fc2(torch.tanh(self.tiny.norm(h)))


def _steps_warnings(model, steps=2, **kw):
    """The ActiveDropoutWarnings of ``steps`` steps of a fresh ZOOptimizer on ``model``."""
    import warnings

    from zofo_kernels.core.optim.dropout_check import ActiveDropoutWarning
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt = ZOOptimizer(model.parameters(), lr=1e-3, seed=0, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert opt.step_count == steps and opt.dropout_checked
    return [w for w in caught if issubclass(w.category, ActiveDropoutWarning)]


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_a_loss_with_active_dropout_warns_once_at_the_first_step(functional, estimator):
    """A forgotten model.eval(): every loss evaluation draws a new dropout mask, so the
    loss differences are noise. The first step says so, once, naming the fix."""
    caught = _steps_warnings(WithDropout(functional=functional).train(), steps=3,
                             estimator=estimator)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "dropout" in message and "p = 0.1" in message and "model.eval()" in message
    assert "noise" in message


@pytest.mark.parametrize("model", [WithDropout().eval(), WithDropout(functional=True).eval(),
                                   WithDropout(p=0.0).train(), Tiny().train()],
                         ids=["eval", "eval-functional", "p=0", "no-dropout"])
def test_no_dropout_warning_in_eval_mode_or_without_active_dropout(model):
    assert _steps_warnings(model) == []


def test_the_dropout_check_does_not_change_the_step():
    """The watched first evaluation computes exactly what an unwatched one does."""
    runs = []
    for watched in (True, False):
        model, x, y = make_problem(3)
        opt = ZOOptimizer(model.parameters(), lr=0.05, seed=5)
        opt.dropout_checked = not watched
        loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        runs.append((loss, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_a_first_step_that_raises_is_checked_again_at_the_next():
    model = WithDropout().train()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    opt = ZOOptimizer(model.parameters(), lr=1e-3, seed=0)

    def failing():
        raise RuntimeError("data loader broke")
    with pytest.raises(RuntimeError):
        opt.step(failing)
    assert not opt.dropout_checked
    from zofo_kernels.core.optim.dropout_check import ActiveDropoutWarning
    with pytest.warns(ActiveDropoutWarning):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert opt.dropout_checked
