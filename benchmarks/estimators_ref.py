"""Reference implementations of candidate zeroth-order gradient estimators, for screening them
on small models before anyone writes fused kernels (benchmarks/estimator_check.py).

Pure torch, with every direction materialised (one full-size tensor per parameter and
direction): clear and checkable, not fast. An estimator looks at one step's batch loss through
a :class:`Problem` and returns an :class:`Estimate` whose ``update`` is its estimate of the
gradient (the step is ``theta <- theta - lr * update``). Every perturbed forward pass sets the
weights to ``start + s * eps * z`` from a copy of the step's starting weights, and the step ends
with the weights restored exactly to that copy.

Samplers (the distribution of a direction z; ``expected(G)`` is E[z <z, G>], the limit of the
averaged update when directional derivatives are exact):

* ``gauss`` / ``rade``: every weight, N(0, 1) or +-1 (MeZO; E[z z^T] = I).
* ``subset``: Gaussian on chosen parameters only (e.g. all but the embedding matrices, whose
  rows for tokens absent from the batch have no gradient).
* ``sparse``: Sparse-MeZO (arXiv 2402.15751): a Gaussian z on the weights of each matrix whose
  magnitude is at most a per-matrix threshold (the ``keep`` quantile of |theta| at the first
  step, fixed afterwards); the mask is recomputed at the start of every step from that step's
  starting weights, so both perturbation sweeps and the update of a step use one mask. Vectors
  (biases, norms) are perturbed whole. E[z <z, G>] = mask * G.
* ``lowrank``: for a matrix W (m x n), z = U V^T / sqrt(r), U (m x r) and V (n x r) Gaussian
  (SubZero-like without the orthogonalisation; E[z z^T] = I); vectors Gaussian. With
  ``period`` it is LOZO's lazy sampling: V is kept for ``period`` consecutive steps, U is fresh
  every step; within one period E[z <z, G>] = G V V^T / r.
* ``adapter-span`` / ``adapter-complement``: LoRA-adapted matrices W (m x n) with a LoRA A
  (r x n, peft's initialisation) whose row space has the orthonormal basis Q (r x n):
  z = sqrt(n / r) Z Q (Z m x r Gaussian, nothing else perturbed), or a Gaussian z everywhere
  whose adapted blocks are projected onto the complement, z - z Q^T Q.

Estimators: :class:`ZOEstimator` (central or forward differences over ``n`` directions, plain
or FZOO-normalised), :class:`TrueGradient` (backprop, the reference whose cosine is 1) and
:class:`AdapterProjection` (the rank-r projection G Q^T Q of the backbone gradient that a LoRA
adapter's own gradient gives for free: for W + s B A, dL/dB = s (dL/dW) A^T, so
G Q^T Q = (dL/dB / s) (A A^T)^-1 A). A :class:`ZOEstimator` with ``known=AdapterProjection``
adds that free part to a ZO estimate on the complement (the hybrid).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

Tensors = List[Optional[torch.Tensor]]  # one entry per parameter; None stands for zeros

LORA_TARGETS = ("query.weight", "value.weight", "q_proj.weight", "v_proj.weight")


# --------------------------------------------------------------------------- seeds

def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a over 64-bit words)."""
    h = 1469598103934665603
    for p in parts:
        h ^= int(p) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


# --------------------------------------------------------------------------- vector algebra

_CHUNK = 1 << 22


def dot1(x: torch.Tensor, y: torch.Tensor) -> float:
    """<x, y> accumulated in float64 (in chunks: no full-size float64 copy)."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.numel() <= _CHUNK:
        return float(torch.dot(x.double(), y.double()))
    return sum(float(torch.dot(x[i:i + _CHUNK].double(), y[i:i + _CHUNK].double()))
               for i in range(0, x.numel(), _CHUNK))


def dot(a: Tensors, b: Tensors, only: Optional[Sequence[bool]] = None) -> float:
    total = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None or (only is not None and not only[i]):
            continue
        total += dot1(x, y)
    return total


def param_dots(a: Tensors, b: Tensors):
    """Per parameter, (<a_i, a_i>, <a_i, b_i>) in float64: group cosines from one pass."""
    aa, ab = [], []
    for x, y in zip(a, b):
        if x is None:
            aa.append(0.0)
            ab.append(0.0)
            continue
        xf, yf = x.reshape(-1), y.reshape(-1)
        s_aa = s_ab = 0.0
        for i in range(0, xf.numel(), _CHUNK):
            xc = xf[i:i + _CHUNK].double()
            s_aa += float(torch.dot(xc, xc))
            s_ab += float(torch.dot(xc, yf[i:i + _CHUNK].double()))
        aa.append(s_aa)
        ab.append(s_ab)
    return aa, ab


def cosine(a: Tensors, b: Tensors, only: Optional[Sequence[bool]] = None) -> float:
    den = math.sqrt(max(dot(a, a, only), 0.0) * max(dot(b, b, only), 0.0))
    return dot(a, b, only) / den if den > 0 else float("nan")


def norm(a: Tensors) -> float:
    return math.sqrt(max(dot(a, a), 0.0))


# --------------------------------------------------------------------------- the problem

@dataclasses.dataclass
class Problem:
    """One step's view: the live weights, the batch loss at them (a forward pass) and, for the
    estimators that use backprop, the gradient at them (a forward and a backward pass)."""
    params: List[torch.nn.Parameter]
    names: List[str]
    loss: Callable[[], float]
    grad: Optional[Callable[[], List[torch.Tensor]]] = None
    start: Optional[List[torch.Tensor]] = None  # the weights at the start of the step

    def begin(self) -> None:
        self.start = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def set_weights(self, direction: Optional[Tensors] = None, scale: float = 0.0) -> None:
        """weights <- start + scale * direction (start where the direction is None)."""
        for i, (p, s) in enumerate(zip(self.params, self.start)):
            p.copy_(s)
            if direction is not None and direction[i] is not None:
                p.add_(direction[i], alpha=scale)

    def loss_at(self, direction: Optional[Tensors], scale: float) -> float:
        self.set_weights(direction, scale)
        with torch.no_grad():
            return float(self.loss())


# --------------------------------------------------------------------------- samplers

class Sampler:
    """The distribution of one direction z (see the module docstring)."""

    def prepare(self, problem: Problem, step: int) -> None:
        """Per-step state, decided from the step's starting weights (``problem.start``)."""

    def sample(self, seed: int, k: int, problem: Problem) -> Tensors:
        raise NotImplementedError

    def expected(self, grad: Sequence[torch.Tensor], problem: Problem) -> Tensors:
        """E[z <z, grad>] for the current step's state."""
        return list(grad)


def _gauss(shape, *parts) -> torch.Tensor:
    return torch.randn(shape, generator=generator(*parts))


class Dense(Sampler):
    """Every weight: N(0, 1) (``gauss``) or +-1 (``rade``)."""

    def __init__(self, dist: str = "gauss"):
        if dist not in ("gauss", "rade"):
            raise ValueError(f"unknown distribution {dist!r}")
        self.dist = dist

    def sample(self, seed, k, problem):
        out = []
        for i, p in enumerate(problem.params):
            if self.dist == "gauss":
                out.append(_gauss(p.shape, seed, k, i))
            else:
                bits = torch.empty(p.shape).bernoulli_(0.5, generator=generator(seed, k, i))
                out.append(bits.mul_(2).sub_(1))
        return out


class Subset(Sampler):
    """Gaussian on the parameters ``keep[i]`` is true for (e.g. all but the embeddings)."""

    def __init__(self, keep: Sequence[bool]):
        if not any(keep):
            raise ValueError("the subset holds no parameter")
        self.keep = list(keep)

    def sample(self, seed, k, problem):
        return [_gauss(p.shape, seed, k, i) if self.keep[i] else None
                for i, p in enumerate(problem.params)]

    def expected(self, grad, problem):
        return [g if keep else None for g, keep in zip(grad, self.keep)]


class Sparse(Sampler):
    """Sparse-MeZO: Gaussian on the small-magnitude weights of each matrix (module docstring)."""

    def __init__(self, keep: float = 0.2):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        self.keep = keep
        self.thresholds: Optional[List[Optional[float]]] = None
        self.masks: List[Optional[torch.Tensor]] = []

    def prepare(self, problem, step):
        if self.thresholds is None:  # once, from the first step's weights
            self.thresholds = []
            for s in problem.start:
                if s.dim() < 2:
                    self.thresholds.append(None)
                    continue
                flat = s.detach().abs().reshape(-1)
                kth = max(1, int(math.ceil(self.keep * flat.numel())))
                self.thresholds.append(float(flat.kthvalue(kth).values))
        self.masks = [None if t is None else (s.abs() <= t)
                      for s, t in zip(problem.start, self.thresholds)]

    def sample(self, seed, k, problem):
        out = []
        for i, p in enumerate(problem.params):
            z = _gauss(p.shape, seed, k, i)
            if self.masks[i] is not None:
                z.mul_(self.masks[i])
            out.append(z)
        return out

    def expected(self, grad, problem):
        return [g if m is None else g * m for g, m in zip(grad, self.masks)]


class LowRank(Sampler):
    """z = U V^T / sqrt(r) per matrix; with ``period``, LOZO's V kept for that many steps."""

    def __init__(self, rank: int = 4, period: Optional[int] = None, base_seed: int = 0):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank, self.period, self.base_seed = rank, period, base_seed
        self.v: Dict[int, torch.Tensor] = {}
        self._period_index: Optional[int] = None

    def prepare(self, problem, step):
        if self.period is None:
            return
        index = step // self.period
        if index != self._period_index:
            self._period_index = index
            self.v = {i: _gauss((p.shape[1], self.rank), self.base_seed, index, i, 1)
                      for i, p in enumerate(problem.params) if p.dim() == 2}

    def _v(self, seed, k, i, n):
        if self.period is not None:
            return self.v[i]
        return _gauss((n, self.rank), seed, k, i, 1)

    def sample(self, seed, k, problem):
        out = []
        for i, p in enumerate(problem.params):
            if p.dim() != 2:
                out.append(_gauss(p.shape, seed, k, i))
                continue
            u = _gauss((p.shape[0], self.rank), seed, k, i, 0)
            out.append(u @ self._v(seed, k, i, p.shape[1]).T / math.sqrt(self.rank))
        return out

    def expected(self, grad, problem):
        if self.period is None:
            return list(grad)
        return [g @ self.v[i] @ self.v[i].T / self.rank if i in self.v else g
                for i, g in enumerate(grad)]


def lora_bases(problem_names: Sequence[str], params: Sequence[torch.Tensor], rank: int,
               seed: int, targets: Sequence[str] = LORA_TARGETS) -> Dict[int, torch.Tensor]:
    """{parameter index: Q (r x n)}, the orthonormal row basis of a LoRA A (r x n) drawn as
    peft initialises it (kaiming-uniform with a = sqrt(5): U(-1/sqrt(n), 1/sqrt(n))) for every
    adapted matrix (names ending in one of ``targets``: the attention query and value)."""
    out = {}
    for i, (name, p) in enumerate(zip(problem_names, params)):
        if p.dim() == 2 and name.endswith(tuple(targets)):
            n = p.shape[1]
            a = (torch.rand((rank, n), generator=generator(seed, i, 7)) * 2 - 1) / math.sqrt(n)
            q, _ = torch.linalg.qr(a.T)  # n x r, orthonormal columns spanning A's rows
            out[i] = q.T.contiguous()
    return out


class AdapterSpan(Sampler):
    """z = sqrt(n/r) Z Q on the adapted matrices only (module docstring)."""

    def __init__(self, bases: Dict[int, torch.Tensor]):
        if not bases:
            raise ValueError("no LoRA-adapted matrices among the parameters")
        self.bases = bases

    def sample(self, seed, k, problem):
        out: Tensors = [None] * len(problem.params)
        for i, q in self.bases.items():
            m, (r, n) = problem.params[i].shape[0], q.shape
            out[i] = _gauss((m, r), seed, k, i) @ q * math.sqrt(n / r)
        return out

    def expected(self, grad, problem):
        out: Tensors = [None] * len(grad)
        for i, q in self.bases.items():
            out[i] = grad[i] @ q.T @ q * (q.shape[1] / q.shape[0])
        return out


class AdapterComplement(Sampler):
    """Gaussian everywhere; adapted blocks projected onto the complement of A's row space."""

    def __init__(self, bases: Dict[int, torch.Tensor]):
        self.bases = bases

    def sample(self, seed, k, problem):
        out = Dense("gauss").sample(seed, k, problem)
        for i, q in self.bases.items():
            out[i] = out[i] - out[i] @ q.T @ q
        return out

    def expected(self, grad, problem):
        out = list(grad)
        for i, q in self.bases.items():
            out[i] = grad[i] - grad[i] @ q.T @ q
        return out


# --------------------------------------------------------------------------- estimates

@dataclasses.dataclass
class Estimate:
    """An estimator's output at one step. For ZO estimators ``update`` is
    ``scale / n * sum_k derivs[k] * directions[k]`` (+ ``known``), where ``derivs`` are the
    finite-difference directional derivatives; :meth:`combine` rebuilds it from other
    derivatives (e.g. the exact ones, <z_k, grad>)."""
    update: Tensors
    forwards: int
    backwards: int
    loss: float
    directions: List[Tensors] = dataclasses.field(default_factory=list)
    derivs: List[float] = dataclasses.field(default_factory=list)
    scale: float = 1.0
    known: Optional[Tensors] = None

    def combine(self, derivs: Sequence[float]) -> Tensors:
        return _combine(self.directions, derivs, self.scale, self.known,
                        len(self.update))


def _combine(directions, derivs, scale, known, size) -> Tensors:
    out: Tensors = [None] * size
    n = len(directions)
    for z, d in zip(directions, derivs):
        for i, zi in enumerate(z):
            if zi is None:
                continue
            term = zi * (scale * d / n)
            out[i] = term if out[i] is None else out[i].add_(term)
    if known is not None:
        for i, kn in enumerate(known):
            if kn is not None:
                out[i] = kn.clone() if out[i] is None else out[i] + kn
    return out


class Estimator:
    name: str = "estimator"
    description: str = ""
    forwards_per_step: int = 0
    backwards_per_step: int = 0

    def estimate(self, problem: Problem, seed: int, step: int) -> Estimate:
        raise NotImplementedError

    def expected(self, grad: Sequence[torch.Tensor], problem: Problem) -> Tensors:
        """The limit of the averaged update (exact derivatives, infinitely many directions)
        at the current step's state."""
        return list(grad)


class TrueGradient(Estimator):
    """Backprop: the reference, whose update is the gradient itself."""

    def __init__(self, name: str = "true-grad"):
        self.name = name
        self.description = "backprop gradient (reference)"
        self.forwards_per_step, self.backwards_per_step = 1, 1

    def estimate(self, problem, seed, step):
        problem.begin()
        grad = problem.grad()
        return Estimate([g.detach().clone() for g in grad], 1, 1, float("nan"))


class AdapterProjection(Estimator):
    """G Q^T Q on the LoRA-adapted matrices (what the adapter's gradient gives), 0 elsewhere."""

    def __init__(self, bases: Dict[int, torch.Tensor], name: str = "adapter-fo"):
        self.bases, self.name = bases, name
        self.description = ("backbone gradient projected on the LoRA A row spaces "
                            "(from the adapter's backward)")
        self.forwards_per_step, self.backwards_per_step = 1, 1

    def project(self, grad: Sequence[torch.Tensor]) -> Tensors:
        out: Tensors = [None] * len(grad)
        for i, q in self.bases.items():
            out[i] = grad[i] @ q.T @ q
        return out

    def estimate(self, problem, seed, step):
        problem.begin()
        return Estimate(self.project(problem.grad()), 1, 1, float("nan"))

    def expected(self, grad, problem):
        return self.project(grad)


class ZOEstimator(Estimator):
    """Central (``central=True``: (L(x+eps z) - L(x-eps z)) / 2eps) or forward ((L(x+eps z) -
    L(x)) / eps, one unperturbed loss for all n directions) differences over ``n`` directions
    of ``sampler``; the update is the mean of d_k z_k.

    ``fzoo=True`` (forward differences only): FZOO's normalised step, update =
    1/(n sigma) * sum_k (L_k - L_0) z_k with sigma the standard deviation (n - 1 in the
    denominator) of the n perturbed losses L_k, i.e. scale = eps / sigma on the mean of d_k z_k.
    ``known``: an AdapterProjection whose free part is added (its backward is counted)."""

    def __init__(self, name: str, sampler: Sampler, n: int = 1, central: bool = True,
                 eps: float = 1e-3, fzoo: bool = False, known: Optional[AdapterProjection] = None,
                 description: str = ""):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if fzoo and (central or n < 2):
            raise ValueError("FZOO uses forward differences over at least 2 directions")
        self.name, self.sampler, self.n, self.central = name, sampler, n, central
        self.eps, self.fzoo, self.known = eps, fzoo, known
        self.description = description
        self.forwards_per_step = (2 * n if central else n + 1) + (1 if known else 0)
        self.backwards_per_step = 1 if known else 0

    def estimate(self, problem, seed, step):
        problem.begin()
        known = self.known.project(problem.grad()) if self.known is not None else None
        self.sampler.prepare(problem, step)
        dirs = [self.sampler.sample(seed, k, problem) for k in range(self.n)]
        eps = self.eps
        base = None if self.central else problem.loss_at(None, 0.0)
        derivs, plus = [], []
        for z in dirs:
            lp = problem.loss_at(z, eps)
            plus.append(lp)
            if self.central:
                lm = problem.loss_at(z, -eps)
                derivs.append((lp - lm) / (2 * eps))
            else:
                derivs.append((lp - base) / eps)
        problem.set_weights()  # restore the step's starting weights exactly
        scale = 1.0
        if self.fzoo:
            sigma = float(torch.tensor(plus, dtype=torch.float64).std())
            scale = eps / sigma if sigma > 0 else 0.0
        update = _combine(dirs, derivs, scale, known, len(problem.params))
        loss = base if base is not None else sum(plus) / len(plus)
        return Estimate(update, self.forwards_per_step, self.backwards_per_step, loss,
                        dirs, derivs, scale, known)

    def expected(self, grad, problem):
        out = self.sampler.expected(grad, problem)
        if self.known is not None:
            kn = self.known.project(grad)
            out = [o if k is None else (k if o is None else o + k) for o, k in zip(out, kn)]
        return out


class LibraryStep(Estimator):
    """The package's own step: one ``zofo_kernels.ZOOptimizer`` step (the fused kernels, the
    library's sparse masks, low-rank factors or FZOO normalisation) at lr 1 from the step's
    start, the update read back as start - after. It checks that the library's estimators
    estimate what their references here do; it has no directions to re-derive, so its exact-
    derivative and limit cosines are not computed."""

    def __init__(self, name: str, description: str = "", **settings):
        self.name, self.description, self.settings = name, description, settings
        q = settings.get("n_directions", 1)
        forward = settings.get("estimator", "central") == "forward"
        self.forwards_per_step, self.backwards_per_step = (q + 1 if forward else 2 * q), 0

    def estimate(self, problem, seed, step):
        from zofo_kernels import ZOOptimizer
        problem.begin()
        opt = ZOOptimizer(problem.params, lr=1.0, seed=seed & 0x7FFFFFFFFFFFFFFF,
                          **self.settings)
        loss = opt.step(problem.loss)
        update = [(s - p.detach()) for s, p in zip(problem.start, problem.params)]
        problem.set_weights()
        return Estimate(update, self.forwards_per_step, 0, loss)

    def expected(self, grad, problem):
        return [None] * len(grad)


@torch.no_grad()
def apply_update(params: Sequence[torch.nn.Parameter], update: Tensors, lr: float) -> None:
    for p, u in zip(params, update):
        if u is not None:
            p.add_(u, alpha=-lr)
