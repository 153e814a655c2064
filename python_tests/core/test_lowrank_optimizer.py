"""ZOOptimizer(lowrank=r, lowrank_period=p): low-rank directions (LOZO style) against the
oracle of python_tests/zo_oracle.py with the low-rank z written here from the contract.

The oracle derives each step's seeds itself (the step seed, and V's key: the seed of the first
step of its period), draws U and V with ``contract.lowrank_factor``, forms z with
``contract.lowrank_z`` for every tensor that ``contract.lowrank_shape`` gives a matrix view,
the dense ``contract.noise`` for the others, and runs the step in the kernels' float32
arithmetic. With Rademacher factors z is exact on every backend, so every evaluated point and
the final weights are compared bit for bit.
"""

import copy

import numpy as np
import pytest
import torch

from zo_oracle import (DTYPES, FAULT_ERRORS, Oracle, assert_bitwise, bits, closure_of,
                       faulty_closure, make_loss, make_params, two_groups)
from zofo_kernels.core import contract
from zofo_kernels.core.optim import ZOFOOptimizer, ZOOptimizer
from zofo_kernels.core.optim.zo_functional import step_seed

# a (12, 10) matrix, a vector, a (3, 4, 5) tensor (viewed as (3, 20)), and a (2, 30) matrix
# too narrow for rank 3 (dense z)
SHAPES = [(12, 10), (30,), (3, 4, 5), (2, 30)]
RANK = 3


class LowRankOracle(Oracle):
    def __init__(self, params, hyper, base_seed, step, rank, period, distribution, q):
        seed = step_seed(base_seed, step)
        super().__init__(params, hyper, None, seed, distribution)
        u_seed, v_seed = contract.lowrank_seeds(
            seed, step_seed(base_seed, period * (step // period)))
        self.shapes = [tuple(p.shape) for p in params]
        self.factors = []
        for shape, o in zip(self.shapes, self.offs):
            mn = contract.lowrank_shape(shape, rank)
            self.factors.append(None if mn is None else [
                (contract.lowrank_factor(u_seed, int(o), mn[0], rank, distribution, k),
                 contract.lowrank_factor(v_seed, int(o), mn[1], rank, distribution, k))
                for k in range(q)])

    def z(self, i, k):
        if self.factors[i] is None:
            return super().z(i, k)
        u, v = self.factors[i][k]
        return contract.lowrank_z(u, v, 0, self.ws[i].size)


def run_and_compare(params, opt, oracle, loss, eps, q, estimator):
    oracle.step(loss, eps, q, estimator)
    seen = []
    opt.step(closure_of(params, loss, seen))
    assert len(seen) == len(oracle.seen)
    for k, (got, want) in enumerate(zip(seen, oracle.seen)):
        for i, (g, w) in enumerate(zip(got, want)):
            assert np.array_equal(g.view(np.uint32), w.view(np.uint32)), (k, i)
    assert_bitwise(params, oracle.ws, f"after step {opt.step_count}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator,q", [("central", 1), ("forward", 2)])
def test_steps_equal_the_oracle_bit_for_bit(dtype, estimator, q):
    """Three steps with period 2 (steps 0 and 1 share V, step 2 draws a new one), two groups
    with their own lr and weight decay, 16-bit storage stochastically rounded."""
    params = make_params(dtype, seed=3, shapes=SHAPES)
    groups, hyper = two_groups(params)
    loss = make_loss(shapes=SHAPES)
    opt = ZOOptimizer(groups, lr=1.0, eps=2.0 ** -7, seed=11, distribution="rademacher",
                      estimator=estimator, n_directions=q, lowrank=RANK, lowrank_period=2)
    for t in range(3):
        oracle = LowRankOracle(params, hyper, 11, t, RANK, 2, "rademacher", q)
        run_and_compare(params, opt, oracle, loss, 2.0 ** -7, q, estimator)
    st = opt.last_step
    assert (st["lowrank"], st["lowrank_period"]) == (RANK, 2)
    # U and V of the (12, 10) and (3, 20) views, q directions
    assert st["factor_floats"] == q * RANK * (12 + 10 + 3 + 20)


def test_a_step_moves_each_matrix_along_a_rank_r_direction():
    """Gaussian z (a few ulp apart between backends, so no bit comparison): the float64
    change of each matrix over one q=1 step has numerical rank r; a vector's is dense."""
    params = make_params(torch.float32, seed=4, shapes=[(40, 30), (30,)])
    before = [p.detach().double().clone() for p in params]
    opt = ZOOptimizer(params, lr=1.0, eps=1e-3, seed=2, lowrank=2)
    opt.step(closure_of(params, make_loss(shapes=[(40, 30), (30,)])))
    d = params[0].detach().double() - before[0]
    s = torch.linalg.svdvals(d)
    assert s[2] < 1e-4 * s[0] and s[1] > 1e-2 * s[0]
    assert bool(((params[1].detach().double() - before[1]) != 0).all())


def test_v_is_kept_for_the_period_and_u_is_not():
    """The directions of consecutive steps (their changes, on a linear loss that gives every
    step the same slope sign) share their column space within a period and not across it."""
    p = torch.nn.Parameter(torch.zeros(20, 16))
    opt = ZOOptimizer([p], lr=1.0, eps=2.0 ** -6, seed=5, distribution="rademacher",
                      lowrank=1, lowrank_period=3)
    target = torch.randn(20, 16)
    rows = []
    for _ in range(4):
        before = p.detach().clone()
        opt.step(lambda: float((p.detach() * target).sum()))
        d = (p.detach() - before).double()
        rows.append(d[d.abs().sum(1).argmax()] / d.abs().max())  # its row direction: +-v
    same = [abs(float(torch.dot(rows[0], r) / (rows[0].norm() * r.norm()))) for r in rows]
    assert same[1] == pytest.approx(1.0) and same[2] == pytest.approx(1.0)
    assert same[3] < 0.9  # step 3 starts a new period


def test_exact_resume_from_a_state_dict():
    loss = make_loss(shapes=SHAPES)

    def make(params):
        groups, _ = two_groups(params)
        return ZOOptimizer(groups, lr=1e-2, eps=1e-3, seed=8, normalize="rms", lowrank=2,
                           lowrank_period=4)

    ref = make_params(torch.float32, seed=9, shapes=SHAPES)
    ref_opt = make(ref)
    for _ in range(6):
        ref_opt.step(closure_of(ref, loss))
    first = make_params(torch.float32, seed=9, shapes=SHAPES)
    opt = make(first)
    for _ in range(3):  # the resume falls inside V's period
        opt.step(closure_of(first, loss))
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for _ in range(3):
        opt2.step(closure_of(resumed, loss))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ref, resumed))


@pytest.mark.parametrize("mine,saved", [(dict(lowrank=2), {}), ({}, dict(lowrank=2)),
                                        (dict(lowrank=2), dict(lowrank=2, lowrank_period=5))])
def test_a_differently_configured_state_dict_is_refused(mine, saved):
    p = torch.nn.Parameter(torch.randn(6, 5))
    sd = ZOOptimizer([p], lr=1e-2, seed=0, **saved).state_dict()
    opt = ZOOptimizer([p], lr=1e-2, seed=1, **mine)
    with pytest.raises(ValueError, match="lowrank"):
        opt.load_state_dict(sd)
    assert opt.base_seed == 1


@pytest.mark.parametrize("fault,at", [("raise", 2), ("interrupt", 3), ("nan", 4)])
def test_a_fault_mid_step_restores_every_weight_bit_for_bit(fault, at):
    """Weights on the 2**-5 grid, eps 2**-7, rank 4 Rademacher factors: z takes values in
    {0, +-1/2, +-1} and every perturbed value is exact in float32, so the restore gives back
    the very bits; the next step is then the oracle's first step."""
    params = make_params(torch.float32, seed=13, shapes=SHAPES, grid=True)
    groups, hyper = two_groups(params)
    loss = make_loss(shapes=SHAPES)
    opt = ZOOptimizer(groups, lr=1.0, eps=2.0 ** -7, seed=6, distribution="rademacher",
                      n_directions=2, lowrank=4)
    before, state = [bits(p) for p in params], copy.deepcopy(opt.state_dict())
    with pytest.raises(FAULT_ERRORS[fault]):
        opt.step(faulty_closure(params, loss, fault, at))
    assert all(torch.equal(a, bits(p)) for a, p in zip(before, params))
    assert opt.state_dict() == state
    oracle = LowRankOracle(params, hyper, 6, 0, 4, 1, "rademacher", 2)
    run_and_compare(params, opt, oracle, loss, 2.0 ** -7, 2, "central")


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(lowrank=0), ValueError, "lowrank"),
    (dict(lowrank=2.5), TypeError, "lowrank"),
    (dict(lowrank=2, lowrank_period=0), ValueError, "lowrank_period"),
    (dict(lowrank=2, sparse_fraction=0.2), ValueError, "cannot be combined"),
])
def test_bad_settings_are_refused(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ZOOptimizer([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-2, **kwargs)


def test_a_large_eps_is_refused_with_the_low_rank_bound():
    """|z| can reach sqrt(r) * Z_MAX**2 (r products of two factor values / sqrt(r)), so an
    eps that is fine for dense Gaussian z overflows at rank 64."""
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    ZOOptimizer(p, lr=1e-2, eps=1e37)
    with pytest.raises(ValueError, match="eps"):
        ZOOptimizer(p, lr=1e-2, eps=1e37, lowrank=64)


def test_zofo_hands_the_rank_to_theta_s_step_and_refuses_the_adam_update():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    pm = peft.get_peft_model(transformers.BertForSequenceClassification(cfg).eval(),
                             peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2,
                                             target_modules=["query", "value"]))
    x, y = torch.randint(0, 50, (4, 6)), torch.tensor([0, 1, 1, 0])

    def loss_fn(batch):
        return pm(input_ids=batch[0], labels=batch[1]).loss

    with pytest.raises(ValueError, match="lowrank cannot be used with theta_update='adam'"):
        ZOFOOptimizer.from_peft(pm, loss_fn, theta_update="adam", lowrank=2)
    opt = ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-2, inner_steps=1, seed=0, lowrank=2)
    theta = dict(pm.named_parameters())
    name = next(n for n, p in theta.items() if p.dim() == 2 and min(p.shape) >= 16
                and "lora_" not in n and p in set(opt.zo.param_groups[0]["params"]))
    before = theta[name].detach().double().clone()
    res = opt.step((x, y), [(x, y)])
    s = torch.linalg.svdvals(theta[name].detach().double() - before)
    assert s[0] > 0 and s[2] < 1e-4 * s[0]  # rank 2
    assert opt.zo.last_step["lowrank"] == 2 and res.theta_step_rms > 0
