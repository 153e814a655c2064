"""normalize="std": FZOO's normalised multi-direction step (ZOOptimizer, Bilevel-ZOFO's
theta_update="std", zofo-train --normalize / --theta-update).

FZOO (forward estimator, q >= 2 one-sided directions from one unperturbed loss) moves theta by
-lr / (q sigma) * sum_k (L_k - L_0) z_k, sigma the standard deviation (q - 1 in the
denominator) of the q perturbed losses L_k. The tests compute that coefficient from the losses
the closure returned and check the optimizer's, then run the kernels' step in the oracle of
python_tests/zo_oracle.py with the optimizer's coefficients and compare the weights bit for
bit (Rademacher z).
"""

import math

import numpy as np
import pytest
import torch

from zo_oracle import Oracle, assert_bitwise, bits, closure_of, flat, make_loss, make_params
from zofo_kernels.apps import train
from zofo_kernels.core.optim import MetaZOFOOptimizer, ZOOptimizer

SHAPES = [(12, 10), (30,)]


def fzoo_coefficients(losses):
    """FZOO's coefficients of z_k from the forward estimator's losses [L_0, L_1, ..., L_q]."""
    base, plus = losses[0], np.asarray(losses[1:], dtype=np.float64)
    sigma = plus.std(ddof=1)
    return [(lk - base) / (len(plus) * sigma) for lk in plus]


@pytest.mark.parametrize("q", [2, 4])
def test_a_step_is_fzoo_s_step(q):
    params = make_params(torch.float32, seed=2, shapes=SHAPES)
    loss = make_loss(shapes=SHAPES)
    eps = 2.0 ** -7
    opt = ZOOptimizer(params, lr=2.0 ** -8, eps=eps, seed=4, distribution="rademacher",
                      estimator="forward", n_directions=q, normalize="std")
    oracle = Oracle(params, [(2.0 ** -8, 0.0)] * len(params), None, opt.next_seed(),
                    "rademacher")
    seen = []
    opt.step(closure_of(params, loss, seen))
    st = opt.last_step
    want = fzoo_coefficients(st["losses"])
    assert st["update_coefficients"] == pytest.approx(want, rel=1e-12)
    slopes = np.asarray(st["projected_grads"])
    assert st["grad_rms"] == pytest.approx(slopes.std(ddof=1), rel=1e-12)
    # the evaluated points and the update, by the oracle with these coefficients
    oracle.seen, losses = [], []
    for k in range(-1, q):
        if k >= 0:
            oracle.sweep(eps, k, None if k == 0 else (-eps, k - 1))
        oracle.seen.append([w.copy() for w in oracle.ws])
        losses.append(loss(oracle.ws))
    assert losses == st["losses"]
    oracle.update(st["update_coefficients"], -eps, q - 1)
    assert_bitwise(params, oracle.ws, "after the FZOO step")
    # each weight moves by about lr: |sum_k c_k z_k| has RMS sqrt(sum c_k^2) ~ 1
    assert 0.2 < math.sqrt(sum(c * c for c in want)) < 2.0


def test_a_step_s_size_does_not_depend_on_the_loss_scale():
    """Scaling the loss by 1000 leaves every coefficient (to float64 rounding) unchanged."""
    out = []
    for scale in (1.0, 1000.0):
        params = make_params(torch.float32, seed=3, shapes=SHAPES)
        loss = make_loss(shapes=SHAPES)
        opt = ZOOptimizer(params, lr=1e-3, eps=1e-3, seed=9, distribution="rademacher",
                          estimator="forward", n_directions=3, normalize="std")
        opt.step(lambda: scale * loss(flat(params)))
        out.append(opt.last_step["update_coefficients"])
    assert out[1] == pytest.approx(out[0], rel=1e-6)


def test_equal_slopes_take_no_step():
    params = make_params(torch.float32, seed=5, shapes=SHAPES, grid=True)
    before = [bits(p) for p in params]
    opt = ZOOptimizer(params, lr=1.0, eps=2.0 ** -5, seed=1, distribution="rademacher",
                      estimator="forward", n_directions=3, normalize="std")
    opt.step(lambda: 1.0)
    assert opt.last_step["update_coefficients"] == [0.0, 0.0, 0.0]
    assert all(torch.equal(a, bits(p)) for a, p in zip(before, params))


def test_one_direction_is_refused():
    with pytest.raises(ValueError, match="n_directions >= 2"):
        ZOOptimizer([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, normalize="std")


def test_bilevel_theta_update_std_steps_theta_by_fzoo():
    from helpers import AdapterNet
    net = AdapterNet(3, ("a_upper", "a_lower"), "a_upper")
    g = torch.Generator().manual_seed(0)
    net.randomize_(list(net.parameters()), g, 0.5)

    def select(level):
        net.active = f"a_{level}"

    def loss_fn(batch):
        return torch.nn.functional.cross_entropy(net(batch[0]), batch[1])

    task = dict(upper_params=[net.adapters["a_upper"].weight],
                lower_params=[net.adapters["a_lower"].weight], select_adapter=select,
                loss_fn=loss_fn)
    with pytest.raises(ValueError, match="n_directions >= 2"):
        MetaZOFOOptimizer(net.backbone(), {"a": task}, lr=1e-2, theta_update="std")
    opt = MetaZOFOOptimizer(net.backbone(), {"a": task}, lr=1e-2, inner_steps=1, seed=0,
                            theta_update="std", n_directions=3)
    assert opt.zo.normalize == "std"
    start = [p.detach().clone() for p in net.backbone()]
    batch = (torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
    opt.step({"a": (batch, [batch])})
    st = opt.zo.last_step
    slopes = np.asarray(st["projected_grads"])
    assert st["update_coefficients"] == pytest.approx(list(slopes / 3 / slopes.std(ddof=1)),
                                                      rel=1e-12)
    assert any(not torch.equal(p, s) for p, s in zip(net.backbone(), start))


def test_the_command_line_passes_the_normalisation(tmp_path):
    base = ["--model", "tiny-bert", "--train", "t.tsv", "--eval", "e.tsv", "--steps", "1",
            "--output", str(tmp_path / "o")]
    c = train.parse(base + ["--method", "mezo", "--estimator", "forward", "--n-directions", "4",
                            "--normalize", "std"])
    assert c.settings.normalize == "std" and c.settings.n_directions == 4
    c = train.parse(base + ["--method", "bilevel-zofo", "--theta-update", "std",
                            "--n-directions", "2"])
    assert c.settings.theta_update == "std"
    with pytest.raises(SystemExit, match="--normalize is a setting of mezo and mezo-lora"):
        train.parse(base + ["--method", "bilevel-zofo", "--normalize", "std"])
