"""ZOOptimizer(sparse_fraction=f): sparse perturbation (Sparse-MeZO style) against an oracle
written here from the noise contract and numpy.

The oracle re-derives everything the optimizer does: the magnitude threshold of each tensor by
the documented sampling rule (its own code: the Weyl step, k = ceil(f * m) by integer
arithmetic on the float's exact ratio, numpy's sort), the masks by
``contract.magnitude_mask_words``, z by ``contract.noise``, the float32 arithmetic of the kernels
(docs/kernels.md: every product and sum rounded separately, rn to the storage dtype, stochastic
rounding by ``contract.stochastic_round_bits``) and the central / forward estimators. Losses are
computed by one numpy function from the weights' bits, so equal weights give equal losses and
the comparisons are bit for bit. Rademacher noise is bit-exact on every backend; Gaussian noise
may differ by a few float32 ulp between backends (tolerances.py), so Gaussian steps are
compared through what must hold exactly whatever z is (which elements move).
"""

import copy
import math

import numpy as np
import pytest
import torch

from zo_oracle import (DTYPES, FAULT_ERRORS, SHAPES, Oracle, assert_bitwise, bits, closure_of,
                       faulty_closure, flat, make_loss, make_params, two_groups)
from zofo_kernels.core import contract
from zofo_kernels.core.optim import MetaZOFOOptimizer, ZOFOOptimizer, ZOOptimizer

SAMPLE = 16384
WEYL = 0x9E3779B97F4A7C15  # floor(2**64 / golden ratio)


# --------------------------------------------------------------------------- the oracle

def oracle_threshold(values, fraction):
    """tau of one tensor, by the documented rule."""
    a = np.abs(np.asarray(values, dtype=np.float32).reshape(-1))
    n = a.size
    if fraction == 1.0:
        return np.float32(np.inf)
    if n > SAMPLE:
        p = max(1, n * WEYL // 2 ** 64)
        while math.gcd(p, n) != 1:
            p += 1
        a = a[np.array([(j * p) % n for j in range(SAMPLE)], dtype=np.int64)]
    num, den = float(fraction).as_integer_ratio()
    k = min(max(-(-num * a.size // den), 1), a.size)  # ceil(num * m / den)
    tau = np.sort(a)[k - 1]  # numpy sorts NaN last
    return np.float32(np.inf) if np.isnan(tau) else tau


def sparse_masks(params, fraction):
    """The oracle's masks of a step from ``params``' current weights."""
    return [oracle_mask(w, fraction) for w in flat(params)]


def oracle_mask(values, fraction):
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if fraction is None:
        return np.ones(v.size, dtype=bool)
    words = contract.magnitude_mask_words(v, oracle_threshold(v, fraction))
    return contract.mask_bits(words, 0, v.size)


# --------------------------------------------------------------------------- the step

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator,q", [("central", 1), ("central", 2), ("forward", 2)])
def test_one_step_equals_the_oracle_bit_for_bit(dtype, estimator, q):
    """Rademacher z (bit-exact on every backend): every evaluated point and the final
    weights equal the oracle's, in float32, bfloat16 and float16 storage (16-bit updates
    stochastically rounded), over two groups with their own lr and weight decay."""
    params = make_params(dtype, seed=3)
    groups, hyper = two_groups(params)
    loss = make_loss()
    opt = ZOOptimizer(groups, lr=1.0, eps=2.0 ** -7, seed=11, distribution="rademacher",
                      estimator=estimator, n_directions=q, sparse_fraction=0.3)
    oracle = Oracle(params, hyper, sparse_masks(params, 0.3), opt.next_seed(), "rademacher")
    oracle.step(loss, 2.0 ** -7, q, estimator)
    seen = []
    opt.step(closure_of(params, loss, seen))
    assert len(seen) == len(oracle.seen)
    for k, (got, want) in enumerate(zip(seen, oracle.seen)):
        for i, (g, w) in enumerate(zip(got, want)):
            assert np.array_equal(g.view(np.uint32), w.view(np.uint32)), (k, i)
    assert_bitwise(params, oracle.ws, "after the step")
    total = sum(m.size for m in oracle.masks)
    assert opt.last_step["perturbed_fraction"] == sum(int(m.sum()) for m in oracle.masks) / total
    assert opt.last_step["sparse_fraction"] == 0.3


def test_a_gaussian_step_moves_exactly_the_masked_elements():
    """Gaussian z (a few ulp apart between backends): whatever its last bits, the elements
    outside the step-start mask keep their bits (no perturbation left, no weight decay) and
    every element inside moves (lr * g * z is far above the ulp of the small |w| masked)."""
    params = make_params(torch.float32, seed=5)
    groups, _ = two_groups(params)
    before = [bits(p) for p in params]
    masks = [oracle_mask(w, 0.25) for w in flat(params)]
    opt = ZOOptimizer(groups, lr=1.0, eps=1e-3, seed=2, sparse_fraction=0.25)
    opt.step(closure_of(params, make_loss()))
    for p, b, m in zip(params, before, masks):
        moved = (bits(p) != b).reshape(-1).numpy()
        assert np.array_equal(moved, m)


def test_an_element_pushed_past_tau_within_the_step_is_restored_and_updated():
    """The reason the mask is stored. Element j sits at |w_j| = tau (in the mask: ties are
    in) with the sign of its z_j, so +eps*z_j pushes |w_j| above tau at the first
    evaluation: a threshold applied to the perturbed weights would leave it out of the
    restore and the update. It must follow the step-start mask: the final weights equal the
    oracle's bit for bit and w_j got its update."""
    n = 64
    probe = ZOOptimizer([torch.nn.Parameter(torch.zeros(n))], lr=1.0, seed=21)
    z = contract.rademacher(probe.next_seed(), 0, n)
    mags = (np.arange(n, dtype=np.float32) + 1) / 64  # distinct magnitudes 1/64 .. 1
    w = mags * z  # every element's sign is its z's: +eps*z moves every |w| up
    tau = oracle_threshold(w, 0.25)
    j = int(np.flatnonzero(np.abs(w) == tau)[0])
    p = torch.nn.Parameter(torch.from_numpy(w.copy()))
    opt = ZOOptimizer([p], lr=2.0 ** -4, eps=2.0 ** -5, seed=21, distribution="rademacher",
                      sparse_fraction=0.25)
    oracle = Oracle([p], [(2.0 ** -4, 0.0)], sparse_masks([p], 0.25), opt.next_seed(),
                    "rademacher")
    assert oracle.masks[0][j]
    loss = make_loss(shapes=[(n,)])
    oracle.step(loss, 2.0 ** -5, 1, "central")
    seen = []
    opt.step(closure_of([p], loss, seen))
    assert abs(seen[0][0][j]) > tau  # at the first evaluation w_j lies past tau
    assert_bitwise([p], oracle.ws, "after the step")
    assert p.detach()[j].item() != w[j]  # it moved (its update), and nothing else outside


def test_fraction_one_equals_dense_bit_for_bit():
    """f = 1 takes every element (tau = +inf, whatever the sample): the same trajectory as
    the dense optimizer, 16-bit weights, ties (zeros) and a sampled tensor included."""
    results = []
    for fraction in (None, 1.0):
        params = make_params(torch.bfloat16, seed=7)
        with torch.no_grad():
            params[0][:5] = 0.0  # ties
        groups, _ = two_groups(params)
        opt = ZOOptimizer(groups, lr=1.0, eps=1e-2, seed=4, sparse_fraction=fraction)
        for _ in range(2):
            opt.step(closure_of(params, make_loss()))
        results.append(([bits(p) for p in params], opt.last_step))
    (dense, st_dense), (full, st_full) = results
    assert all(torch.equal(a, b) for a, b in zip(dense, full))
    assert st_full["update_rms"] == st_dense["update_rms"] > 0
    assert st_full["perturbed_fraction"] == st_dense["perturbed_fraction"] == 1.0
    assert (st_dense["sparse_fraction"], st_full["sparse_fraction"]) == (None, 1.0)


def test_ties_at_tau_are_all_in():
    """A tensor of 40 equal magnitudes and 60 larger ones at f = 0.1: tau is the common
    magnitude and all 40 are perturbed (0.4 of the tensor, not 0.1)."""
    w = torch.cat([torch.full((40,), 0.5), torch.full((60,), 2.0)])
    w = w * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    p = torch.nn.Parameter(w.clone())
    opt = ZOOptimizer([p], lr=0.1, eps=1e-3, seed=0, sparse_fraction=0.1)
    opt.step(lambda: (p.double() ** 3).sum())
    assert opt.last_step["perturbed_fraction"] == 0.4
    assert torch.equal(p.detach()[40:], w[40:]) and not torch.equal(p.detach()[:40], w[:40])


def test_perturbed_fraction_and_update_rms_on_a_large_tensor():
    """300,007 iid normal weights: the threshold is the 3,277th smallest of a 16,384-element
    sample, so the fraction of the tensor at or below it is the sample quantile of a random
    sample of the weights' distribution: Beta(k, m - k + 1), mean k/(m+1) (0.2000), standard
    deviation sqrt(f (1-f) / m) = 0.0031 for f = 0.2, m = 16384; 6 sigma = 0.019. The
    measured fraction is also checked exactly against the oracle's mask. update_rms is the
    dense expectation times sqrt(perturbed_fraction): over the ~60,000 moved weights the
    relative standard error of the measured RMS is sqrt(2 / 60000) / 2 = 0.3%, and 0.02 is
    about 7 sigma."""
    n, f = 300_007, 0.2
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, generator=g) * 0.02)
    target = torch.randn(n, generator=g) * 0.02
    mask = oracle_mask(p.detach().numpy(), f)
    before = p.detach().clone()
    opt = ZOOptimizer([p], lr=1e-3, eps=1e-3, seed=1, estimator="forward", sparse_fraction=f)
    opt.step(lambda: ((p - target) ** 2).sum())
    pf = opt.last_step["perturbed_fraction"]
    assert pf == int(mask.sum()) / n
    assert abs(pf - f) < 6 * math.sqrt(f * (1 - f) / SAMPLE)
    measured = float((p.detach() - before).pow(2).mean().sqrt())
    assert opt.last_step["update_rms"] == pytest.approx(measured, rel=0.02)
    dense_rms = 1e-3 * abs(opt.last_step["update_coefficients"][0])  # lr * |c| * sqrt(E z^2)
    assert opt.last_step["update_rms"] == pytest.approx(dense_rms * math.sqrt(pf), rel=1e-12)


def test_the_sample_is_a_weyl_sequence_of_distinct_spread_indices():
    """The documented P: coprime to n and near 0.618 n, so the sample's indices are distinct;
    rows of a (rows, cols) tensor are all visited for a length that divides none of them."""
    from zofo_kernels.core.optim import sparse
    for n in (SAMPLE + 1, 130 * 131, 4096 * 4096, 2 ** 40 + 12345):
        p = sparse.weyl_step(n)
        assert math.gcd(p, n) == 1 and abs(p / n - 0.6180339887) < 1e-3
        idx = sparse.sample_indices(n, torch.device("cpu"), {})
        assert idx.numel() == SAMPLE and torch.unique(idx).numel() == SAMPLE
        assert int(idx.min()) >= 0 and int(idx.max()) < n
    idx = sparse.sample_indices(4096 * 4096, torch.device("cpu"), {})
    assert torch.unique(idx // 4096).numel() > 4000 and torch.unique(idx % 4096).numel() > 4000
    assert sparse.sample_indices(SAMPLE, torch.device("cpu"), {}) is None


def test_nan_weights_are_never_perturbed():
    w = torch.tensor([float("nan"), 0.1, -0.2, 3.0, float("nan")])
    p = torch.nn.Parameter(w.clone())
    opt = ZOOptimizer([p], lr=0.1, eps=1e-3, seed=0, sparse_fraction=1.0, nonfinite="skip")
    opt.step(lambda: torch.nansum(p.double() ** 2))
    assert torch.equal(bits(p)[[0, 4]], bits(w)[[0, 4]])
    assert opt.last_step["perturbed_fraction"] == 0.6


# --------------------------------------------------------------------------- resume, faults

def test_exact_resume_from_a_state_dict():
    """3 steps, save (weights and state dict), a new model and optimizer from them, 3 more:
    bit-identical to 6 uninterrupted steps (the thresholds come from the weights alone)."""
    loss = make_loss()

    def make(params):
        groups, _ = two_groups(params)
        return ZOOptimizer(groups, lr=1e-2, eps=1e-3, seed=8, normalize="rms",
                           sparse_fraction=0.2)

    ref = make_params(torch.float32, seed=9)
    ref_opt = make(ref)
    for _ in range(6):
        ref_opt.step(closure_of(ref, loss))
    first = make_params(torch.float32, seed=9)
    opt = make(first)
    for _ in range(3):
        opt.step(closure_of(first, loss))
    saved_weights = [p.detach().clone() for p in first]
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(w.clone()) for w in saved_weights]
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for _ in range(3):
        opt2.step(closure_of(resumed, loss))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ref, resumed))


@pytest.mark.parametrize("mine,saved", [(None, 0.2), (0.2, None), (0.3, 0.2)])
def test_a_differently_configured_state_dict_is_refused(mine, saved):
    p = torch.nn.Parameter(torch.randn(10))
    sd = ZOOptimizer([p], lr=1e-2, seed=0, sparse_fraction=saved).state_dict()
    opt = ZOOptimizer([p], lr=1e-2, seed=1, sparse_fraction=mine)
    with pytest.raises(ValueError, match="sparse_fraction: saved"):
        opt.load_state_dict(sd)
    assert opt.base_seed == 1  # nothing changed


def test_a_state_dict_from_before_the_setting_counts_as_dense():
    p = torch.nn.Parameter(torch.randn(10))
    sd = ZOOptimizer([p], lr=1e-2, seed=3).state_dict()
    del sd["zo"]["sparse_fraction"]
    ZOOptimizer([p], lr=1e-2, seed=1).load_state_dict(copy.deepcopy(sd))
    with pytest.raises(ValueError, match="sparse_fraction: saved None"):
        ZOOptimizer([p], lr=1e-2, seed=1, sparse_fraction=0.5).load_state_dict(sd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fault,at", [("raise", 1), ("raise", 2), ("raise", 3),
                                      ("interrupt", 2), ("nan", 2), ("nan", 3)])
def test_a_fault_mid_step_restores_every_weight_bit_for_bit(dtype, fault, at):
    """The closure raises, is interrupted or returns NaN at evaluation ``at`` of a q=2
    central step (weights on the 2**-5 grid, eps 2**-5, Rademacher: every perturbed value is
    exact, so the restore with the stored masks gives back the very bits). Afterwards the
    state is as before, and the next step is the oracle's first step bit for bit."""
    params = make_params(dtype, seed=13, grid=True)
    groups, hyper = two_groups(params)
    loss = make_loss()
    opt = ZOOptimizer(groups, lr=1.0, eps=2.0 ** -5, seed=6, distribution="rademacher",
                      n_directions=2, sparse_fraction=0.3)
    oracle = Oracle(params, hyper, sparse_masks(params, 0.3), opt.next_seed(), "rademacher")
    before, state = [bits(p) for p in params], copy.deepcopy(opt.state_dict())
    with pytest.raises(FAULT_ERRORS[fault]):
        opt.step(faulty_closure(params, loss, fault, at))
    assert all(torch.equal(a, bits(p)) for a, p in zip(before, params))
    assert opt.state_dict() == state
    oracle.step(loss, 2.0 ** -5, 2, "central")
    opt.step(closure_of(params, loss))
    assert_bitwise(params, oracle.ws, "the step after the fault")


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("value,error", [(0, ValueError), (0.0, ValueError), (-0.1, ValueError),
                                         (1.5, ValueError), (float("nan"), ValueError),
                                         (float("inf"), ValueError), (True, TypeError),
                                         ("0.2", TypeError)])
def test_bad_fractions_are_refused(value, error):
    with pytest.raises(error, match="sparse_fraction"):
        ZOOptimizer([torch.nn.Parameter(torch.randn(4))], lr=1e-2, sparse_fraction=value)


def test_an_integer_one_is_the_fraction_one():
    opt = ZOOptimizer([torch.nn.Parameter(torch.randn(4))], lr=1e-2, sparse_fraction=1)
    assert opt.sparse_fraction == 1.0 and type(opt.sparse_fraction) is float


def test_dense_steps_report_the_whole_tensor():
    p = torch.nn.Parameter(torch.randn(10))
    opt = ZOOptimizer([p], lr=1e-2, seed=0)
    opt.step(lambda: (p ** 2).sum())
    assert opt.last_step["sparse_fraction"] is None
    assert opt.last_step["perturbed_fraction"] == 1.0


def test_sharded_parameters_are_refused_and_replicated_ones_train():
    """A DTensor with a Shard placement (FSDP2) would get one threshold per shard: refused by
    the step (before any weight is touched) and by DataParallelZO (at construction, also for
    an FSDP2 module); a replicated DTensor is a whole tensor on every rank and trains."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from zofo_kernels.core.distributed import DataParallelZO
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.randn(8, 4)
        sharded = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        opt = ZOOptimizer([sharded], lr=1e-2, seed=0, sparse_fraction=0.5)
        with pytest.raises(ValueError, match="sharded parameters"):
            opt.step(lambda: (sharded.to_local() ** 2).sum())
        assert torch.equal(sharded.to_local(), w)
        with pytest.raises(ValueError, match="sharded parameters"):
            DataParallelZO(ZOOptimizer([sharded], lr=1e-2, seed=0, sparse_fraction=0.5))
        from torch.distributed.fsdp import fully_shard
        model = fully_shard(torch.nn.Linear(4, 4), mesh=mesh)
        with pytest.raises(ValueError, match="FSDP2"):
            DataParallelZO(ZOOptimizer(model.parameters(), lr=1e-2, sparse_fraction=0.5),
                           model=model)
        replicated = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Replicate()]))
        opt = ZOOptimizer([replicated], lr=1e-1, seed=0, sparse_fraction=0.5)
        opt.step(lambda: (replicated.to_local() ** 3).sum())
        assert opt.last_step["perturbed_fraction"] == 0.5
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- Bilevel-ZOFO

def _tiny_bert_lora():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    return peft.get_peft_model(transformers.BertForSequenceClassification(cfg).eval(),
                               peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2,
                                               target_modules=["query", "value"]))


def test_zofo_on_a_peft_lora_model_steps_theta_sparsely():
    """Bilevel-ZOFO on a tiny BERT with a peft LoRA adapter: every step's backbone change lies
    inside the masks of that step's start weights (the oracle's), the reported fraction is
    the oracle's count, theta_step_rms is the ZO step's update_rms, and the adapters (first
    order) still train."""
    pm = _tiny_bert_lora()
    x, y = torch.randint(0, 50, (4, 6)), torch.tensor([0, 1, 1, 0])

    def loss_fn(batch):
        return pm(input_ids=batch[0], labels=batch[1]).loss

    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    opt = ZOFOOptimizer.from_peft(pm, loss_fn, lr=1e-2, inner_steps=1, seed=0,
                                  sparse_fraction=0.1)
    assert opt.zo.sparse_fraction == 0.1
    theta = [p for g in opt.zo.param_groups for p in g["params"]]
    for _ in range(2):
        start = [p.detach().clone() for p in theta]
        masks = [oracle_mask(w, 0.1) for w in flat(theta)]
        res = opt.step((x, y), [(x, y)])
        moved = [(bits(p) != bits(s)).reshape(-1).numpy() for p, s in zip(theta, start)]
        assert all(not (mv & ~m).any() for mv, m in zip(moved, masks))
        assert any(mv.any() for mv in moved)
        total = sum(m.size for m in masks)
        assert opt.zo.last_step["perturbed_fraction"] == sum(int(m.sum()) for m in masks) / total
        assert res.theta_step_rms == opt.zo.last_step["update_rms"] > 0
    assert any(not torch.equal(p, dict(pm.named_parameters())[n]) for n, p in lora_before.items())


def test_zofo_refuses_sparse_theta_with_the_adam_update_and_bad_fractions():
    pm = _tiny_bert_lora()

    def loss_fn(batch):
        return pm(input_ids=batch[0], labels=batch[1]).loss

    with pytest.raises(ValueError, match="sparse_fraction cannot be used with theta_update='adam'"):
        ZOFOOptimizer.from_peft(pm, loss_fn, theta_update="adam", sparse_fraction=0.1)
    with pytest.raises(ValueError, match="sparse_fraction must be in"):
        ZOFOOptimizer.from_peft(pm, loss_fn, sparse_fraction=2.0)
    assert set(pm.peft_config) == {"default"}  # the model is left as given


def test_meta_zofo_hands_the_fraction_to_theta_s_step():
    from helpers import AdapterNet
    net = AdapterNet(3, ("a_upper", "a_lower", "b_upper", "b_lower"), "a_upper")
    g = torch.Generator().manual_seed(0)
    net.randomize_(list(net.parameters()), g, 0.5)

    def task(name):
        def select(level):
            net.active = f"{name}_{level}"

        def loss_fn(batch):
            return torch.nn.functional.cross_entropy(net(batch[0]), batch[1])
        return dict(upper_params=[net.adapters[f"{name}_upper"].weight],
                    lower_params=[net.adapters[f"{name}_lower"].weight],
                    select_adapter=select, loss_fn=loss_fn)

    opt = MetaZOFOOptimizer(net.backbone(), {"a": task("a"), "b": task("b")}, lr=1e-2,
                            inner_steps=1, seed=0, sparse_fraction=0.25)
    start = [p.detach().clone() for p in net.backbone()]
    masks = [oracle_mask(w, 0.25) for w in flat(net.backbone())]
    batch = (torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
    opt.step({"a": (batch, [batch]), "b": (batch, [batch])})
    for p, s, m in zip(net.backbone(), start, masks):
        moved = (bits(p) != bits(s)).reshape(-1).numpy()
        assert not (moved & ~m).any()
    assert opt.zo.last_step["sparse_fraction"] == 0.25
