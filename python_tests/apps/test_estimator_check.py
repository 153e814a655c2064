"""benchmarks/estimator_check.py and its reference estimators (benchmarks/estimators_ref.py), on
the tiny random-init BERT with the prompt head and real SST-2 sentences: the quick run writes
its report, and each estimator has the property it claims (true gradient: cosine 1; many
Gaussian directions: a higher cosine; low-rank: rank <= r, LOZO's V shared within a period;
sparse: one mask for both sweeps of a step; FZOO: its definition on a hand-computed toy; the
adapter projection: what a real peft LoRA's gradient gives)."""

import csv
import importlib.util
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes extra threads wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return _load("estimator_check", "estimator_check.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def ref(check):
    return sys.modules["estimators_ref"]


@pytest.fixture(scope="module")
def sst2():
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 data folder {SST2} is absent")
    return SST2


@pytest.fixture(scope="module")
def tiny(sst2):
    """tiny-bert with the prompt head and a batch of 16 real SST-2 sentences."""
    from zofo_kernels.apps import data as data_mod
    from zofo_kernels.apps import models
    from zofo_kernels.integrations.prompting import PromptSpec
    loaded = models.load_model("tiny-bert", head="prompt", seed=0)
    spec = PromptSpec()
    ex = data_mod.sample(data_mod.read_examples(sst2 / "train.tsv"), 16, 3)
    enc = data_mod.Encoded([data_mod.Example(spec.text(e.text), e.label) for e in ex],
                           loaded.tokenizer, 32)
    return loaded, enc.batch(slice(0, 16))


def _harness(check, loaded, batch, keep=lambda name: True):
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if keep(n)]
    h = check.Harness(model, named)
    h.batch = batch
    return h


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- the quick run ----------------------------------------------------------------------------
def test_quick_run_writes_its_report_and_the_true_gradient_has_cosine_one(check, sst2, tmp_path):
    out = tmp_path / "est"
    assert check.main(["--quick", "--data", str(sst2), "--output", str(out)]) == 0
    md = (out / "quick.md").read_text()
    assert md.startswith("# Estimator check: tiny-bert")
    assert f"Command: `python benchmarks/estimator_check.py --quick --data {sst2} --output {out}`" in md
    assert (out / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = {r["estimator"]: r for r in _rows(out / "quick_summary.csv")}
    assert {"true-grad", "gauss-c1", "rade-c1", "gauss-f1", "gauss-c4", "fzoo-4", "sparse-c1",
            "lowrank-c1", "lozo-c1", "adapter-fo", "adapter-span-c1",
            "adapter-hybrid-c1"} <= set(summary)
    true = summary["true-grad"]
    assert abs(float(true["cos_mean"]) - 1) < 1e-5 and float(true["cos_sd"]) < 1e-5
    mezo = summary["gauss-c1"]
    # finite differences at eps 1e-3 track the exact directional derivatives
    assert float(mezo["deriv_corr"]) > 0.9
    assert float(mezo["cos_exact_mean"]) > 0  # one exact direction: cos = |<z,g>|/(|z||g|) > 0
    assert abs(float(mezo["limit_cos"]) - 1) < 1e-6  # unbiased
    assert float(mezo["lr"]) == pytest.approx(1e-5)  # the reference of the matched step sizes
    assert float(summary["sparse-c1"]["limit_cos"]) < 0.99  # sees only the masked weights
    assert 0 < float(summary["adapter-fo"]["limit_cos"]) < 1
    assert abs(float(summary["adapter-hybrid-c1"]["limit_cos"]) - 1) < 1e-6
    # every estimator at the same update norm: lr * mean norm is gauss-c1's
    for r in summary.values():
        assert float(r["lr"]) * float(r["update_norm"]) == pytest.approx(
            1e-5 * float(mezo["update_norm"]), rel=1e-6)
    seeds = _rows(out / "quick_seeds.csv")
    assert len(seeds) == check.QUICK["seeds"] * len(summary)
    curves = _rows(out / "quick_curves.csv")
    for name in summary:
        spent = [int(c["forward_equivalents"]) for c in curves if c["estimator"] == name]
        assert spent[0] == 0 and spent[-1] >= check.QUICK["budget"]
    groups = _rows(out / "quick_groups.csv")
    shares = [float(g["grad_sq_share"]) for g in groups]
    assert abs(sum(shares) - 1) < 1e-6
    assert {g["group"] for g in groups} >= {"embeddings", "attention", "mlp", "norms", "head"}


# -- the estimators' own properties -------------------------------------------------------------
def test_more_gaussian_directions_give_a_higher_cosine(check, ref, tiny):
    loaded, batch = tiny
    h = _harness(check, loaded, batch, keep=lambda n: "layer.1." in n or "label_head" in n)
    grad = h.grad()
    one = ref.ZOEstimator("g1", ref.Dense("gauss"), 1, True, 1e-3)
    many = ref.ZOEstimator("g16", ref.Dense("gauss"), 16, True, 1e-3)
    cos1 = [ref.cosine(one.estimate(h.problem, s, 0).update, grad) for s in range(8)]
    cos16 = [ref.cosine(many.estimate(h.problem, 100 + s, 0).update, grad) for s in range(3)]
    d = sum(p.numel() for p in h.params)
    assert statistics.fmean(cos16) > 2 * statistics.fmean(cos1) > 0
    # the average of many single-direction updates points along the gradient
    total = None
    for s in range(32):
        u = one.estimate(h.problem, 1000 + s, 0).update
        total = u if total is None else [a + b for a, b in zip(total, u)]
    assert ref.cosine(total, grad) > 3 / math.sqrt(d)


def test_low_rank_directions_have_rank_at_most_r_and_lozo_keeps_v(check, ref, tiny):
    loaded, batch = tiny
    h = _harness(check, loaded, batch)
    h.problem.begin()
    fresh = ref.LowRank(rank=2)
    z = fresh.sample(5, 0, h.problem)
    mats = [(zi, p) for zi, p in zip(z, h.params) if p.dim() == 2]
    assert mats and all(int(torch.linalg.matrix_rank(zi)) == 2 for zi, _ in mats)
    vec = [zi for zi, p in zip(z, h.params) if p.dim() == 1]
    assert all(zi.std() > 0.5 for zi in vec if zi.numel() > 16)  # vectors: dense Gaussian
    lozo = ref.LowRank(rank=2, period=4, base_seed=1)
    sampled = {}
    for step in (0, 1, 4):
        lozo.prepare(h.problem, step)
        sampled[step] = lozo.sample(10 + step, 0, h.problem)
    i = next(j for j, p in enumerate(h.params) if p.dim() == 2 and min(p.shape) > 4)
    same_period = torch.cat([sampled[0][i], sampled[1][i]])      # U0 V^T over U1 V^T
    new_period = torch.cat([sampled[0][i], sampled[4][i]])
    assert int(torch.linalg.matrix_rank(same_period)) == 2       # one V: rank <= r
    assert int(torch.linalg.matrix_rank(new_period)) == 4        # a new V at step 4


def test_sparse_mask_is_the_same_in_both_sweeps_and_decided_at_the_step_start(check, ref, tiny):
    loaded, batch = tiny
    h = _harness(check, loaded, batch)
    seen = []
    real_loss = h.problem.loss

    def recording_loss():
        seen.append([p.detach() - s for p, s in zip(h.params, h.problem.start)])
        return real_loss()

    h.problem.loss = recording_loss
    sampler = ref.Sparse(keep=0.25)
    est = ref.ZOEstimator("sparse", sampler, 1, True, 1e-3)
    start_weights = [p.detach().clone() for p in h.params]
    for step in range(2):
        seen.clear()
        out = est.estimate(h.problem, 7 + step, step)
        assert len(seen) == 2  # the + and - sweeps
        for i, p in enumerate(h.params):
            plus, minus = seen[0][i], seen[1][i]
            # the - sweep undoes exactly what the + sweep did (up to float32 rounding)
            assert torch.allclose(plus, -minus, rtol=0, atol=2.5e-7)
            if p.dim() < 2:
                continue
            mask = h.problem.start[i].abs() <= sampler.thresholds[i]
            assert torch.equal(sampler.masks[i], mask)
            assert torch.equal(out.directions[0][i] != 0, mask)
            for delta in (plus, minus):  # both sweeps move the masked weights only, and all
                assert not ((delta != 0) & ~mask).any()
                assert int((delta != 0).sum()) >= 0.99 * int(mask.sum())
            assert not (out.update[i] * ~mask).any()
            if step == 0:
                assert int(mask.sum()) == pytest.approx(0.25 * p.numel(), abs=2)
        # the weights are back at the step's start, then a step moves them: the next step's
        # mask is decided from its own starting weights
        assert all(torch.equal(p.detach(), s) for p, s in zip(h.params, h.problem.start))
        ref.apply_update(h.params, out.update, 1.0)
    h.restore(start_weights)


class _Fixed(object):
    """Directions given by hand (the toy problem's)."""

    def __init__(self, vectors):
        self.vectors = [torch.tensor(v, dtype=torch.float32) for v in vectors]

    def prepare(self, problem, step):
        pass

    def sample(self, seed, k, problem):
        return [self.vectors[k]]

    def expected(self, grad, problem):
        return list(grad)


def test_fzoo_update_is_its_definition_on_a_hand_computed_toy(ref):
    theta = torch.nn.Parameter(torch.zeros(2))
    problem = ref.Problem([theta], ["theta"], lambda: float(3 * theta[0] + theta[1]))
    est = ref.ZOEstimator("fzoo", _Fixed([(1, 1), (1, -1), (-1, 1)]), 3, central=False,
                          eps=0.1, fzoo=True)
    out = est.estimate(problem, 0, 0)
    # L0 = 0; L_k = 0.1 * (3 u1 + u2) = 0.4, 0.2, -0.2; sigma = std(0.4, 0.2, -0.2) (n - 1)
    #   = sqrt(((4/15)^2 + (1/15)^2 + (5/15)^2) / 2) = sqrt(0.0933...) = 0.305505;
    # update = (0.4 (1,1) + 0.2 (1,-1) - 0.2 (-1,1)) / (3 sigma) = (0.8, 0) / 0.916515
    assert out.forwards == 4 and out.backwards == 0
    assert torch.allclose(out.update[0], torch.tensor([0.872872, 0.0]), atol=1e-5)
    assert torch.equal(theta.detach(), torch.zeros(2))  # the estimate restores the weights
    ref.apply_update([theta], out.update, 0.5)
    assert torch.allclose(theta.detach(), torch.tensor([-0.436436, 0.0]), atol=1e-5)
    with pytest.raises(ValueError):
        ref.ZOEstimator("bad", ref.Dense(), 3, central=True, fzoo=True)


def test_adapter_projection_is_what_a_real_lora_gradient_gives(check, ref, tiny):
    from zofo_kernels.apps import models
    loaded, batch = tiny
    model = models.load_model("tiny-bert", head="prompt", seed=0).model.eval()
    peft_model = models.add_peft(model, "lora", lora_r=4, lora_alpha=16)
    layer = peft_model.base_model.model.bert.encoder.layer[0].attention.self.query
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # any B: still exact
    layer.base_layer.weight.requires_grad_(True)
    models.classification_loss(peft_model, batch).backward()
    g_w = layer.base_layer.weight.grad
    a = layer.lora_A["default"].weight.detach()
    g_b = layer.lora_B["default"].weight.grad
    s = layer.scaling["default"]
    assert torch.allclose(g_b, s * g_w @ a.T, atol=1e-6, rtol=1e-4)
    # the free projection: (dL/dB / s) (A A^T)^-1 A = G Q^T Q, Q an orthonormal basis of A's rows
    q = torch.linalg.qr(a.T)[0].T
    proj = ref.AdapterProjection({0: q}).project([g_w])[0]
    from_adapter = (g_b / s) @ torch.linalg.inv(a @ a.T) @ a
    assert torch.allclose(proj, from_adapter, atol=1e-6, rtol=1e-3)
    assert torch.allclose((g_w - proj) @ a.T, torch.zeros_like(g_b), atol=1e-6)
    # the screening tool's bases: q/v matrices only, orthonormal rows
    h = _harness(check, loaded, batch)
    bases = ref.lora_bases(h.names, h.params, 4, 0)
    adapted = sorted(h.names[i] for i in bases)
    assert adapted and all(n.endswith(("query.weight", "value.weight")) for n in adapted)
    assert len(adapted) == 2 * 2  # tiny-bert: 2 layers x (query, value)
    for qb in bases.values():
        assert torch.allclose(qb @ qb.T, torch.eye(4), atol=1e-5)


def test_parameter_groups_by_name(check):
    assert check.group_of("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert check.group_of("bert.encoder.layer.0.attention.output.LayerNorm.weight") == "norms"
    assert check.group_of("bert.encoder.layer.0.attention.output.dense.weight") == "attention"
    assert check.group_of("bert.encoder.layer.0.output.dense.weight") == "mlp"
    assert check.group_of("label_head.weight") == "head"
    assert check.group_of("model.layers.3.self_attn.q_norm.weight") == "norms"
    assert check.group_of("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert check.group_of("model.embed_tokens.weight") == "embeddings"
