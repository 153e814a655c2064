"""MetaZOFOOptimizer: shared backbone, one PEFT pair per task, one ZO update on the sum."""

import pytest
import torch
import torch.nn.functional as F

from helpers import AdapterNet, with_fault
from tolerances import F32_REL, F64_SAME_FORMULA_REL, RMS_STEP_REL
from zofo_kernels.core.optim import MetaZOFOOptimizer

TASKS = ("a", "b", "c")


class MultiNet(AdapterNet):
    """Shared backbone (body, head: 2 classes) and two residual adapters per task."""

    def __init__(self, seed=0):
        super().__init__(2, [f"{t}_{lv}" for t in TASKS for lv in ("upper", "lower")],
                         "a_upper")
        g = torch.Generator().manual_seed(seed)
        self.randomize_(self.parameters(), g, 0.3)
        for t in TASKS:
            self.tie_(f"{t}_lower", f"{t}_upper")


def task_data(task_index, seed, size=16):
    """Task t: binary labels from its own random linear teacher."""
    teacher = torch.randn(6, generator=torch.Generator().manual_seed(100 + task_index))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 6, generator=g)
    return x, (x @ teacher > 0).long()


def make(net, calls=None, **kw):
    specs = {}
    for t in TASKS:
        def select(level, t=t):
            net.active = f"{t}_{level}"

        def loss_fn(batch, t=t):
            if calls is not None:
                calls.append(net.active)
            assert net.active.startswith(t + "_")
            x, y = batch
            return F.cross_entropy(net(x), y)

        specs[t] = dict(upper_params=[net.adapters[f"{t}_upper"].weight],
                        lower_params=[net.adapters[f"{t}_lower"].weight],
                        select_adapter=select, loss_fn=loss_fn)
    args = dict(lr=0.05, eps=1e-3, lam=1.0, inner_steps=2, peft_lr=1e-2, seed=0)
    args.update(kw)
    return MetaZOFOOptimizer(net.backbone(), specs, **args)


def objective(net, task_index, x_up, x_low):
    """f_t at P_t on the task's upper data (what evaluation measures)."""
    t = TASKS[task_index]
    net.active = f"{t}_upper"
    with torch.no_grad():
        return F.cross_entropy(net(x_up[0]), x_up[1]).item()


def test_every_task_improves():
    net = MultiNet()
    opt = make(net, lr=0.01)  # theta_update="rms": each weight moves by about lr per step
    data = {t: (task_data(i, 1), [task_data(i, 2), task_data(i, 3)]) for i, t in enumerate(TASKS)}
    start = [objective(net, i, data[t][0], data[t][1]) for i, t in enumerate(TASKS)]
    for step in range(120):
        sampled = [TASKS[step % 3], TASKS[(step + 1) % 3]]  # two of the three tasks per step
        res = opt.step({t: data[t] for t in sampled})
        assert set(res.tasks) == set(sampled)
    end = [objective(net, i, data[t][0], data[t][1]) for i, t in enumerate(TASKS)]
    print("meta-training, per-task objective:", [f"{s:.3f} -> {e:.3f}" for s, e in zip(start, end)])
    for s, e in zip(start, end):
        assert e < 0.8 * s, (start, end)


def test_one_zo_update_on_the_sum_of_task_objectives():
    """With lr = 0 for theta and an exact (dyadic, Rademacher) perturbation round trip, the
    unperturbed ZO loss (forward estimator) must equal sum_t L_t evaluated afterwards at the
    P_t the step started from."""
    net = MultiNet()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in net.backbone():
            p.copy_(torch.randint(-512, 512, p.shape, generator=g).float() / 1024)
    calls = []
    opt = make(net, calls=calls, lr=0.0, eps=2.0**-6, distribution="rademacher", lam=0.5)
    theta0 = [p.detach().clone() for p in net.backbone()]
    batches = {t: (task_data(i, 10), [task_data(i, 11), task_data(i, 12)])
               for i, t in enumerate(TASKS[:2])}
    p_before = {t: net.adapters[f"{t}_upper"].weight.detach().clone() for t in batches}
    res = opt.step(batches)
    assert all(torch.equal(p, q) for p, q in zip(net.backbone(), theta0))
    total = 0.0
    with torch.no_grad():
        # order="official": the ZO step saw each P_t before its update and S_t after its
        # lower steps (S_t does not change afterwards)
        for t in batches:
            assert not torch.equal(net.adapters[f"{t}_upper"].weight, p_before[t])
            net.adapters[f"{t}_upper"].weight.copy_(p_before[t])
        for t, (ub, lbs) in batches.items():
            net.active = f"{t}_upper"
            f = F.cross_entropy(net(ub[0]), ub[1]).double()
            gp = F.cross_entropy(net(lbs[-1][0]), lbs[-1][1]).double()
            net.active = f"{t}_lower"
            gs = F.cross_entropy(net(lbs[-1][0]), lbs[-1][1]).double()
            total += (f + 0.5 * (gp - gs)).item()
    assert opt.zo.last_step["losses"][0] == pytest.approx(total, rel=F64_SAME_FORMULA_REL)
    assert res.objective == opt.zo.last_step["losses"][0]
    assert len(opt.zo.last_step["losses"]) == 2  # one ZO step (forward: L0 and L+) in all
    # task c was not sampled: its adapters were never selected
    assert not any(c.startswith("c_") for c in calls)
    # per task: 2 lower + 2 upper FO forwards, g(theta, S) at theta, 3 forwards at theta + eps z
    assert opt.forward_count == 2 * (2 + 2 + 1 + 3) == len(calls)
    assert [r.gap for r in res.tasks.values()] == pytest.approx(
        [r.penalty_loss - r.lower_penalty_loss for r in res.tasks.values()], rel=F32_REL)
    assert res.theta_step_rms == 0.0  # lr 0


def test_theta_step_does_not_grow_with_the_number_of_tasks():
    rms = {}
    for n_tasks in (1, 3):
        net = MultiNet()
        opt = make(net, lr=0.01)
        data = {t: (task_data(i, 1), [task_data(i, 2), task_data(i, 3)])
                for i, t in enumerate(TASKS[:n_tasks])}
        rms[n_tasks] = sum(opt.step(data).theta_step_rms for _ in range(5)) / 5
    assert rms[1] == pytest.approx(0.01, rel=RMS_STEP_REL)
    assert rms[3] == pytest.approx(0.01, rel=RMS_STEP_REL)


class MixedMultiNet(MultiNet):
    """MultiNet with the backbone in ``dtype`` on a dyadic grid (exact Rademacher round trip
    with eps = 2**-6) and float32 adapters."""

    def __init__(self, dtype):
        super().__init__()
        self.mix(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fault", ["raise", "nan", "interrupt"])
def test_a_fault_in_a_meta_step_leaves_everything_as_before(dtype, fault):
    import copy

    from zofo_kernels.core.optim import NonFiniteLossError
    expected = {"raise": RuntimeError, "nan": NonFiniteLossError,
                "interrupt": KeyboardInterrupt}[fault]
    for at in range(1, 2 * (2 + 2 + 1 + 3) + 1):
        net = MixedMultiNet(dtype)
        count = {"n": 0, "at": None}
        opt = make(net, lr=0.01, eps=2.0 ** -6, distribution="rademacher")

        for pair in opt.pairs.values():
            pair.loss_fn = with_fault(pair.loss_fn, fault, count)
        data = {t: (task_data(i, 1), [task_data(i, 2), task_data(i, 3)])
                for i, t in enumerate(TASKS[:2])}
        opt.step(data)
        net.to_grid()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        state = copy.deepcopy(opt.state_dict())
        count["n"], count["at"] = 0, at
        with pytest.raises(expected):
            opt.step(data)
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), (fault, at)
        now = opt.state_dict()
        assert now["outer_steps"] == state["outer_steps"] == 1
        assert now["zo"]["zo"] == state["zo"]["zo"] and now["forward_count"] == state[
            "forward_count"]
        for t in state["pairs"]:
            for lv in ("upper", "lower"):
                a, b = state["pairs"][t][lv]["state"], now["pairs"][t][lv]["state"]
                assert a.keys() == b.keys()
                for i in a:
                    assert all(torch.equal(a[i][k], b[i][k]) for k in a[i]), (at, t, lv)
        count["at"] = None
        opt.step(data)  # the next step runs
        assert opt.outer_steps == 2


def test_bad_input():
    net = MultiNet()
    with pytest.raises(ValueError):
        MetaZOFOOptimizer(net.backbone(), {}, lr=0.1)
    with pytest.raises(ValueError):
        MetaZOFOOptimizer(net.backbone(), {"a": {"upper_params": []}}, lr=0.1)
    opt = make(net)
    with pytest.raises(KeyError):
        opt.step({"zzz": (task_data(0, 1), [task_data(0, 2), task_data(0, 3)])})
    with pytest.raises(ValueError):
        opt.step({"a": (task_data(0, 1), [task_data(0, 2)])})  # inner_steps = 2
    with pytest.raises(TypeError, match="list"):  # a tuple (x, y) is one batch, not two
        opt.step({"a": (task_data(0, 1), task_data(0, 2))})


def test_from_peft_meta_lora():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2,
                                                    target_modules=["query", "value"]))

    def loss_fn(batch):
        return pm(input_ids=batch[0], labels=batch[1]).loss

    opt = MetaZOFOOptimizer.from_peft(pm, ["t0", "t1", "t2"], loss_fn, lr=1e-3, inner_steps=1,
                                      peft_lr=1e-2, seed=0)
    assert set(pm.peft_config) == {"default"} | {f"t{i}_{lv}" for i in range(3)
                                                 for lv in ("upper", "lower")}
    names = {id(p): n for n, p in pm.named_parameters()}
    backbone = [names[id(p)] for g in opt.zo.param_groups for p in g["params"]]
    assert not any("lora_" in n or "modules_to_save" in n for n in backbone)

    def data(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 40, (6, 5), generator=g)
        return x, (x[:, 0] % 2)

    before = {i: [p.detach().clone() for p in opt.pairs[f"t{i}"].upper] for i in range(3)}
    theta0 = [p.detach().clone() for g in opt.zo.param_groups for p in g["params"]]
    res = opt.step({"t0": (data(1), [data(2)]), "t2": (data(3), [data(4)])})
    assert set(res.tasks) == {"t0", "t2"}
    changed = {i: any(not torch.equal(p, b) for p, b in zip(opt.pairs[f"t{i}"].upper, before[i]))
               for i in range(3)}
    assert changed == {0: True, 1: False, 2: True}
    assert any(not torch.equal(p, q) for p, q in
               zip([p for g in opt.zo.param_groups for p in g["params"]], theta0))
    pm.train()
    opt.eval_mode("t1")
    assert pm.active_adapter == "t1_upper"
    assert not any(m.training for m in pm.modules())  # eval mode: dropout off
    assert (opt.lam, opt.inner_steps) == (10.0, 1)  # lam: the shared default (ZOFOOptimizer's)
    with pytest.raises(ValueError, match="'t0_upper'"):
        MetaZOFOOptimizer.from_peft(pm, ["t0"], loss_fn, lr=1e-3)  # adapters exist already
    adapters = set(pm.peft_config)
    with pytest.raises(TypeError, match="list of task names"):
        MetaZOFOOptimizer.from_peft(pm, "rte", loss_fn, lr=1e-3)  # not tasks r, t, e
    with pytest.raises(ValueError):  # a bad setting: every adapter added is removed again
        MetaZOFOOptimizer.from_peft(pm, ["u0", "u1"], loss_fn, lr=1e-3, lam=-1.0)
    assert set(pm.peft_config) == adapters
    with pytest.raises(ValueError, match="matches no backbone parameter"):
        MetaZOFOOptimizer.from_peft(pm, ["u0"], loss_fn, lr=1e-3, backbone_regex="nothing")
    assert set(pm.peft_config) == adapters
    # theta restricted by name: only the LayerNorm weights of the backbone are ZO-trained
    sub = MetaZOFOOptimizer.from_peft(pm, ["u0"], loss_fn, lr=1e-2, inner_steps=1, seed=0,
                                      backbone_regex="LayerNorm")
    theta = {names[id(p)] for g in sub.zo.param_groups for p in g["params"]}
    assert theta == {n for n in backbone if "LayerNorm" in n}
