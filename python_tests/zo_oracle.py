"""The ZO-SGD step on numpy copies of the weights, written from the noise contract and the
kernels' float32 arithmetic (docs/kernels.md: every product and sum rounded separately, rn to
the storage dtype, stochastic rounding by ``contract.stochastic_round_bits``), and the small
problems the optimizer tests run it on. Shared by the sparse and low-rank optimizer tests;
each gives the oracle its own masks (sparse) or z (low-rank)."""

import numpy as np
import torch

from zofo_kernels.core import contract
from zofo_kernels.core.optim import NonFiniteLossError

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SR_KIND = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# shapes: small tensors and one above the sparse rule's 16384-element sample
SHAPES = [(40, 30), (30,), (7,), (130, 131)]


def rn(x, dtype):
    """float32 values rounded to nearest-even in ``dtype``, back as float32 numpy."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype).float().numpy()


class Oracle:
    """The step on numpy copies of the weights (float32 values of the storage, flat)."""

    def __init__(self, params, hyper, masks, seed, distribution, stochastic_rounding=True):
        """``masks``: one bool array per tensor (the elements the step moves), or None (all)."""
        self.ws = [p.detach().float().reshape(-1).numpy().copy() for p in params]
        self.dtypes = [p.dtype for p in params]
        self.hyper = hyper  # (lr, wd) per tensor
        self.offs = list(np.cumsum([0] + [w.size for w in self.ws])[:-1])
        self.masks = masks or [np.ones(w.size, dtype=bool) for w in self.ws]
        self.seed, self.dist, self.sr = seed, distribution, stochastic_rounding

    def z(self, i, k):
        """z of tensor i in direction k (dense contract noise; subclasses override)."""
        return contract.noise(self.seed, int(self.offs[i]), self.ws[i].size, self.dist, k)

    def sweep(self, scale, k, restore=None):
        for i, w in enumerate(self.ws):
            v = w
            if restore is not None:
                v = rn(v + np.float32(restore[0]) * self.z(i, restore[1]), self.dtypes[i])
            v = rn(v + np.float32(scale) * self.z(i, k), self.dtypes[i])
            self.ws[i] = np.where(self.masks[i], v, w)

    def update(self, coeffs, restore_scale, restore_direction):
        c = np.asarray(coeffs, dtype=np.float32)
        for i, w in enumerate(self.ws):
            lr, wd = (np.float32(x) for x in self.hyper[i])
            v = rn(w + np.float32(restore_scale) * self.z(i, restore_direction), self.dtypes[i])
            d = c[0] * self.z(i, 0)
            for k in range(1, c.size):
                d = d + c[k] * self.z(i, k)
            d = d + wd * v
            u = v - lr * d
            if self.sr and self.dtypes[i] in SR_KIND:
                bits = contract.rounding_words(self.seed, int(self.offs[i]), w.size)
                u = contract.stochastic_round_bits(u, bits, SR_KIND[self.dtypes[i]])
            else:
                u = rn(u, self.dtypes[i])
            self.ws[i] = np.where(self.masks[i], u, w)

    def step(self, loss, eps, q, estimator):
        """One step of plain ZO-SGD (normalize="none"); records the weights of every
        evaluation in ``self.seen``."""
        self.seen, losses = [], []

        def evaluate():
            self.seen.append([w.copy() for w in self.ws])
            losses.append(loss(self.ws))

        if estimator == "central":
            for k in range(q):
                self.sweep(eps, k, None if k == 0 else (eps, k - 1))
                evaluate()
                self.sweep(-2.0 * eps, k)
                evaluate()
            grads = [(losses[2 * k] - losses[2 * k + 1]) / (2.0 * eps) for k in range(q)]
            self.update([g / q for g in grads], eps, q - 1)
        else:
            evaluate()
            for k in range(q):
                self.sweep(eps, k, None if k == 0 else (-eps, k - 1))
                evaluate()
            grads = [(losses[k + 1] - losses[0]) / eps for k in range(q)]
            self.update([g / q for g in grads], -eps, q - 1)
        return losses


def make_params(dtype, seed=0, shapes=SHAPES, grid=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if grid:  # the 2**-5 grid, |w| <= 5: exact under +-2**-5 in every dtype, many ties
            w = torch.randint(-160, 161, shape, generator=g).float() / 32
        else:
            w = torch.randn(shape, generator=g)
        out.append(torch.nn.Parameter(w.to(dtype)))
    return out


def make_loss(shapes=SHAPES, seed=1):
    """L(ws) = sum_i sum_j a_ij (w_ij - t_ij)^2 in float64, on flat float32 arrays."""
    rng = np.random.default_rng(seed)
    coef = [rng.uniform(0.5, 2.0, int(np.prod(s))) for s in shapes]
    target = [rng.normal(0.0, 1.0, int(np.prod(s))) for s in shapes]

    def loss(ws):
        return float(sum(np.dot(a, (w.astype(np.float64) - t) ** 2)
                         for a, w, t in zip(coef, ws, target)))
    return loss


def flat(params):
    return [p.detach().float().reshape(-1).numpy().copy() for p in params]


def closure_of(params, loss, seen=None):
    def closure():
        ws = flat(params)
        if seen is not None:
            seen.append(ws)
        return loss(ws)
    return closure


class InjectedFault(Exception):
    """What a faulty closure raises for the fault "raise"."""


# the error a step must let through after restoring the weights, per injected fault
FAULT_ERRORS = {"raise": InjectedFault, "interrupt": KeyboardInterrupt,
                "nan": NonFiniteLossError}


def faulty_closure(params, loss, fault, at):
    """A closure whose evaluation number ``at`` fails: raises InjectedFault ("raise"),
    KeyboardInterrupt ("interrupt") or returns NaN ("nan"); the others return the loss."""
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        value = loss(flat(params))
        if calls["n"] == at:
            if fault == "raise":
                raise InjectedFault("injected")
            if fault == "interrupt":
                raise KeyboardInterrupt
            return float("nan")
        return value
    return closure


def two_groups(params):
    """Two groups with different lr and weight decay, and their (lr, wd) per tensor."""
    groups = [{"params": params[:2], "lr": 2.0 ** -11, "weight_decay": 2.0 ** -3},
              {"params": params[2:], "lr": 2.0 ** -10, "weight_decay": 0.5}]
    hyper = [(g["lr"], g["weight_decay"]) for g in groups for _ in g["params"]]
    return groups, hyper


def bits(t):
    return t.detach().clone().view(BITS[t.dtype])


def assert_bitwise(params, ws, what):
    for i, (p, w) in enumerate(zip(params, ws)):
        expect = torch.from_numpy(np.asarray(w, dtype=np.float32)).to(p.dtype).reshape(p.shape)
        assert torch.equal(bits(p), bits(expect)), f"{what}: tensor {i} differs"


