"""Data-parallel and sharded zeroth-order training on ``torch.distributed``.

A ZO step needs no gradient all-reduce: every rank evaluates the perturbed losses on its own
micro-batch, the ranks average those few scalars, and every rank applies the same fused update
regenerated from the shared step seed. Parameters therefore stay bit-identical across ranks
without ever being communicated. This module provides:

* :func:`setup_from_env` -- initialise the process group from the ``torchrun`` environment
  (gloo on CPU, NCCL on GPU) with a collective timeout, or return a single-process context;
* :func:`broadcast_seed` -- one base seed for all ranks (the step seeds derive from it);
* :class:`DataParallelZO` -- wraps a :class:`~zofo_kernels.core.optim.ZOOptimizer`: all-reduces
  the step's losses, broadcasts the initial parameters, checks periodically that parameters
  are still bit-identical (raising :class:`DivergenceError` otherwise), counts the bytes it
  communicates, and reshards FSDP2 modules so that perturbations of the local shards are seen;
* :func:`allreduce_gradients` -- one flattened all-reduce of the first-order (PEFT) gradients;
* :class:`CommStats` -- byte and call counters per kind of collective.

Sharded parameters (FSDP2 ``fully_shard``, DTensor placement ``Shard(0)``) are perturbed and
updated shard by shard: :func:`zofo_kernels.core.optim.layout.zo_layout` maps each local shard to its
global offset in the noise contract, so the sharded run equals the unsharded one. Sparse
perturbation (``sparse_fraction``) is refused with sharded parameters: its magnitude
threshold is decided per tensor, and a shard would decide its own.

Every collective issued here runs under the process group's timeout; a failure (another rank
died, or stopped answering) raises :class:`RankFailureError` naming the operation and the step,
so a broken job stops with a clear message instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

from zofo_kernels.core import contract

ENV_TIMEOUT = "ZOFO_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


class RankFailureError(RuntimeError):
    """A collective failed: another rank exited, crashed or did not answer in time."""


class DivergenceError(RuntimeError):
    """Parameters that must be bit-identical on every rank are not."""


# --------------------------------------------------------------------------- set-up

@dataclasses.dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device and process group.

    ``group`` is None for the default group; ``initialized_here`` tells :func:`shutdown`
    whether this module created the process group (and so should destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: Optional[object] = None
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _timeout_from_env(timeout_s: Optional[float]) -> float:
    if timeout_s is None:
        raw = os.environ.get(ENV_TIMEOUT)
        if raw is None:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds, got {raw!r}") from None
    timeout_s = float(timeout_s)
    if not timeout_s > 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    return timeout_s


def setup_from_env(backend: Optional[str] = None, timeout_s: Optional[float] = None,
                   device: Optional[torch.device] = None) -> DistContext:
    """Initialise ``torch.distributed`` from the environment ``torchrun`` sets.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and a
    single-process context is returned, so one script runs both ways. ``backend`` defaults to
    NCCL when CUDA is available, else gloo. ``timeout_s`` (default: environment variable
    ``ZOFO_DIST_TIMEOUT``, else 300 s) bounds every collective: a rank that dies or hangs makes
    the others fail with :class:`RankFailureError` instead of waiting forever. With CUDA the
    device is ``cuda:LOCAL_RANK`` (and becomes the current device).
    """
    timeout_s = _timeout_from_env(timeout_s)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        be = dist.get_backend()
        dev = device or (torch.device("cuda", local) if be == "nccl" else torch.device("cpu"))
        return DistContext(rank, world, local, torch.device(dev), be, timeout_s, None, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = device or (torch.device("cuda", 0) if torch.cuda.is_available() else
                         torch.device("cpu"))
        return DistContext(0, 1, 0, torch.device(dev), None, timeout_s, None, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if device is None:
        device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    timeout = datetime.timedelta(seconds=timeout_s)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart > 0:
        # After a torchrun restart the rendezvous store can still hold the previous attempt's
        # gloo/NCCL addresses under the same keys, and the new workers would try to connect
        # to dead ports. A per-attempt key prefix keeps the attempts apart. (Restarts only
        # happen under torchrun, whose launcher process hosts the store at MASTER_PORT.)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              world, is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"zofo/attempt_{restart}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistContext(rank, world, local, device, backend, timeout_s, None, True)


def shutdown(context: Optional[DistContext] = None) -> None:
    """Barrier, then destroy the process group (if :func:`setup_from_env` created it).

    The barrier matters with gloo: a rank that tears its connections down while the other is
    still in a collective can abort the other process."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if context is not None and not context.initialized_here:
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- counters

@dataclasses.dataclass
class CommStats:
    """Payload bytes and calls per kind of collective (what this process contributes).

    Kinds used here: ``"loss"`` (ZO step losses), ``"grad"`` (first-order gradients),
    ``"check"`` (divergence checksums), ``"setup"`` (seed and parameter broadcasts)."""

    bytes: Dict[str, int] = dataclasses.field(default_factory=dict)
    calls: Dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def total_bytes(self, kinds: Optional[Iterable[str]] = None) -> int:
        keys = self.bytes.keys() if kinds is None else kinds
        return sum(self.bytes.get(k, 0) for k in keys)

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def as_dict(self) -> Dict[str, Dict[str, int]]:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _collective(what: str, context: DistContext, fn: Callable[[], object]):
    try:
        return fn()
    except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with terse messages
        raise RankFailureError(
            f"rank {context.rank}/{context.world_size}: {what} failed -- another rank exited, "
            f"crashed or did not answer within the {context.timeout_s:g} s collective timeout "
            f"({type(exc).__name__}: {exc})") from exc


def _comm_tensor(t: torch.Tensor, context: DistContext) -> torch.Tensor:
    """NCCL needs device tensors; gloo works on CPU tensors."""
    if context.backend == "nccl":
        return t.to(context.device)
    return t.cpu()


def allreduce_mean(tensor: torch.Tensor, context: DistContext, stats: Optional[CommStats] = None,
                   kind: str = "loss", what: str = "all-reduce") -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all ranks (a new tensor, same device/dtype).

    Summed then divided by the world size (gloo has no AVG reduction); every rank performs
    the same float operations in the same order, so every rank gets the same bits."""
    if not context.distributed:
        return tensor.clone()
    buf = _comm_tensor(tensor.detach().clone(), context)
    _collective(what, context, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM,
                                                       group=context.group))
    if stats is not None:
        stats.add(kind, _nbytes(buf))
    buf = buf / context.world_size
    return buf.to(device=tensor.device, dtype=tensor.dtype)


def broadcast_seed(seed: Optional[int] = None, context: Optional[DistContext] = None,
                   stats: Optional[CommStats] = None) -> int:
    """A base seed every rank agrees on: rank 0's ``seed`` (or, if None, one drawn from
    ``os.urandom`` on rank 0), broadcast to all ranks. Single process: the seed itself."""
    context = context or setup_from_env()
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") & (contract.SEED_LIMIT - 1)
    seed = int(seed)
    if not 0 <= seed < contract.SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not context.distributed:
        return seed
    buf = _comm_tensor(torch.tensor([seed], dtype=torch.int64), context)
    _collective("broadcast of the base seed", context,
                lambda: dist.broadcast(buf, src=0, group=context.group))
    if stats is not None:
        stats.add("setup", _nbytes(buf))
    return int(buf.item())


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _replicated(t: torch.Tensor) -> bool:
    """True for a tensor every rank holds in full (plain tensors, fully replicated DTensors)."""
    if not _is_dtensor(t):
        return True
    return all(p.is_replicate() for p in t.placements)


def broadcast_parameters(tensors: Sequence[torch.Tensor], context: DistContext,
                         stats: Optional[CommStats] = None) -> None:
    """Copy rank 0's values of ``tensors`` to every rank (in place), one flattened broadcast
    per dtype. Sharded DTensors are skipped: each rank owns its shard."""
    if not context.distributed:
        return
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() == 0 or not _replicated(t):
            continue
        local = t.to_local() if _is_dtensor(t) else t
        by_dtype.setdefault(local.dtype, []).append(local)
    with torch.no_grad():
        for dtype, ts in by_dtype.items():
            flat = _comm_tensor(torch.cat([x.detach().reshape(-1) for x in ts]), context)
            _collective("broadcast of the initial parameters", context,
                        lambda: dist.broadcast(flat, src=0, group=context.group))
            if stats is not None:
                stats.add("setup", _nbytes(flat))
            pos = 0
            for x in ts:
                n = x.numel()
                x.copy_(flat[pos:pos + n].view_as(x))
                pos += n


def agree_on_max(value: float, context: DistContext) -> float:
    """The maximum of ``value`` over all ranks (e.g. elapsed training time, so that every rank
    stops a time-budgeted run at the same step)."""
    if not context.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=context.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=context.group)
    return float(t.item())


def allreduce_gradients(params: Iterable[torch.Tensor], context: DistContext,
                        stats: Optional[CommStats] = None, kind: str = "grad") -> int:
    """Average ``.grad`` of ``params`` over ranks in place: one flattened all-reduce per
    (device, dtype). Parameters without a gradient on this rank contribute zeros, so every
    rank issues the same collectives. Returns the number of payload bytes all-reduced."""
    if not context.distributed:
        return 0
    plist = [p for p in params if p.requires_grad]
    if not plist:
        return 0
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for p in plist:
        groups.setdefault((p.dtype, str(p.device)), []).append(p)
    total = 0
    with torch.no_grad():
        for _, ps in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            parts = [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                     for p in ps]
            flat = _comm_tensor(torch.cat(parts), context)
            _collective("all-reduce of first-order gradients", context,
                        lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=context.group))
            total += _nbytes(flat)
            if stats is not None:
                stats.add(kind, _nbytes(flat))
            flat = flat / context.world_size
            pos = 0
            for p in ps:
                n = p.numel()
                g = flat[pos:pos + n].view_as(p).to(device=p.device, dtype=p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                pos += n
    return total


# --------------------------------------------------------------------------- checksums

_BITS_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
              torch.bfloat16: torch.int16, torch.float16: torch.int16}
_CHECK_CHUNK = 1 << 20


def tensor_checksum(t: torch.Tensor) -> int:
    """Sum of the raw bit patterns of ``t``'s elements as a wrapping 64-bit integer.

    Any change of any bit of a single element changes the sum; it reads the tensor once, in
    chunks of 2**20 elements so the temporaries stay small."""
    t = t.detach()
    if _is_dtensor(t):
        t = t.to_local()
    if t.numel() == 0:
        return 0
    view = _BITS_VIEW.get(t.dtype)
    flat = t.reshape(-1)
    if view is None:
        flat = flat.to(torch.float64)
        view = torch.int64
    bits = flat.view(view)
    total = 0
    for a in range(0, bits.numel(), _CHECK_CHUNK):
        total += int(bits[a:a + _CHECK_CHUNK].sum(dtype=torch.int64))
    return ((total + (1 << 63)) % (1 << 64)) - (1 << 63)


def check_replicas(named_tensors: Sequence[tuple], context: DistContext,
                   stats: Optional[CommStats] = None, step: Optional[int] = None) -> None:
    """Raise :class:`DivergenceError` on every rank unless all ranks hold bit-identical
    ``named_tensors`` (``(name, tensor)`` pairs, same order everywhere). Sharded DTensors are
    skipped (each rank owns a different shard). Costs one read of the weights and one
    all-gather of one 64-bit integer per tensor."""
    if not context.distributed:
        return
    checked = [(n, t) for n, t in named_tensors if _replicated(t)]
    sums = torch.tensor([tensor_checksum(t) for _, t in checked] + [len(checked)],
                        dtype=torch.int64)
    buf = _comm_tensor(sums, context)
    gathered = [torch.empty_like(buf) for _ in range(context.world_size)]
    _collective("all-gather of parameter checksums", context,
                lambda: dist.all_gather(gathered, buf, group=context.group))
    if stats is not None:
        stats.add("check", _nbytes(buf) * context.world_size)
    table = torch.stack([g.cpu() for g in gathered])
    if not bool((table[:, -1] == table[0, -1]).all()):
        raise DivergenceError(
            f"ranks check different numbers of parameters ({table[:, -1].tolist()}): the models "
            "are not the same on every rank")
    bad = (table != table[0:1]).any(dim=0).nonzero().reshape(-1).tolist()
    if bad:
        names = [checked[i][0] for i in bad[:5]]
        ranks = sorted({r for r in range(context.world_size) for i in bad
                        if table[r, i] != table[0, i]})
        when = f" after step {step}" if step is not None else ""
        raise DivergenceError(
            f"parameters diverged across ranks{when}: {len(bad)} tensor(s) differ from rank 0 "
            f"on rank(s) {ranks}, first: {names}. Data-parallel ZO keeps replicas identical "
            "only if every rank uses the same base seed, the same hyperparameters and the same "
            "backend, and nothing else modifies the weights on one rank only")


# --------------------------------------------------------------------------- the wrapper

def _fsdp_modules(model: Optional[torch.nn.Module]) -> List[torch.nn.Module]:
    if model is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _refuse_sparse_sharding(zo, fsdp_modules) -> None:
    """Sparse perturbation decides its mask from a threshold on each whole tensor; a sharded
    tensor (FSDP2) would get one threshold per shard, so it is refused (replicas are fine:
    every rank computes the same thresholds from the same weights)."""
    if zo.lowrank is not None and fsdp_modules:
        raise ValueError("lowrank is not supported with FSDP2 (fully_shard): U and V would be "
                         "drawn for each rank's shard of a matrix, so the run would depend on "
                         "the sharding; use plain data parallelism or lowrank=None")
    if zo.lowrank is not None:
        from zofo_kernels.core.optim.lowrank import refuse_sharded as refuse_lowrank_sharded
        refuse_lowrank_sharded(zo.param_groups)
    if zo.sparse_fraction is None:
        return
    if fsdp_modules:
        raise ValueError("sparse_fraction is not supported with FSDP2 (fully_shard): the "
                         "magnitude threshold of each tensor would be computed per shard, so "
                         "the run would depend on the sharding; use plain data parallelism "
                         "or sparse_fraction=None")
    from zofo_kernels.core.optim.sparse import refuse_sharded
    refuse_sharded(zo.param_groups)


class DataParallelZO:
    """Data-parallel (and FSDP2-sharded) driver around a ``ZOOptimizer`` or ``ZOFOOptimizer``.

    ::

        ctx = setup_from_env()
        opt = ZOOptimizer(model.parameters(), lr=1e-6, seed=1234)
        dp = DataParallelZO(opt, model=model, context=ctx)
        for batch in my_shard_of_the_data:
            dp.step(lambda: loss_fn(model, batch))      # mean loss over all ranks
        shutdown(ctx)

    At construction: all ranks agree on the ZO base seed (rank 0's wins), rank 0's parameters
    are broadcast (so differently initialised heads cannot make replicas differ), and the ZO
    optimizer's ``loss_reduce`` is set to an all-reduce mean of the step's losses. Each ZO step
    then costs one all-reduce of ``2q`` (central) or ``q + 1`` (forward) float64 scalars.
    Every ``check_every`` calls of :meth:`step` (0 disables) a checksum of every replicated
    parameter is compared across ranks and :class:`DivergenceError` is raised on divergence.

    Bilevel-ZOFO (a :class:`~zofo_kernels.core.optim.BilevelOptimizer`: ``ZOFOOptimizer`` or
    ``MetaZOFOOptimizer``): the backbone
    step is handled as above; the first-order optimizers of the PEFT copies P and S get a
    step pre-hook that averages their gradients across ranks (one flattened all-reduce per
    FO step, like DDP without buckets), so P and S stay identical too. :meth:`step` forwards
    its arguments to the optimizer's ``step`` (``step(upper_batch, lower_batches)``); direct
    calls of ``lower_step``/``upper_step`` are synchronised the same way.

    With ``model`` sharded by FSDP2 (``fully_shard``), each rank perturbs and updates only its
    local shards (their global offsets come from :func:`zofo_kernels.core.optim.layout.zo_layout`);
    the modules are resharded around every loss evaluation of a ZO step (the optimizer's
    ``loss_hook``), because FSDP2 keeps
    the root module's parameters gathered after a forward, and a perturbation written to the
    shards would otherwise not reach the next forward.

    ``fo_params``: further first-order parameters trained alongside (their gradients are
    averaged by :meth:`allreduce_fo_gradients`; they are broadcast and checked like the rest).
    """

    def __init__(self, optimizer, model: Optional[torch.nn.Module] = None,
                 context: Optional[DistContext] = None, check_every: int = 100,
                 sync_initial_parameters: bool = True,
                 fo_params: Optional[Iterable[torch.Tensor]] = None):
        from zofo_kernels.core.optim import BilevelOptimizer, ZOOptimizer
        if isinstance(optimizer, BilevelOptimizer):
            if optimizer.theta_update == "adam":
                raise ValueError("theta_update='adam' (the authors' materialised update) is not "
                                 "supported data-parallel: use theta_update='rms'")
            zo, fo_opts = optimizer.zo, optimizer.first_order_optimizers()
        elif isinstance(optimizer, ZOOptimizer):
            zo, fo_opts = optimizer, []
        else:
            raise TypeError("DataParallelZO wraps a zofo_kernels.core.optim.ZOOptimizer or a "
                            f"Bilevel-ZOFO optimizer, got {type(optimizer).__name__}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an integer >= 0, got {check_every!r}")
        if zo.loss_reduce is not None or zo.loss_hook is not None:
            raise ValueError("the optimizer already has a loss_reduce or loss_hook; "
                             "DataParallelZO installs its own there")
        self.context = context or setup_from_env()
        if fo_opts and self.context.distributed and getattr(optimizer, "nonfinite",
                                                            "raise") == "skip":
            raise ValueError(
                "nonfinite='skip' cannot be used data-parallel with first-order PEFT steps: a "
                "rank that skips a step on its own non-finite loss would leave its peers' "
                "gradient all-reduce unmatched; use nonfinite='raise'")
        self.optimizer, self.zo, self.model = optimizer, zo, model
        self.check_every = check_every
        self.stats = CommStats()
        self.fo_params = list(fo_params) if fo_params is not None else []
        for o in fo_opts:
            self.fo_params.extend(p for g in o.param_groups for p in g["params"])
        self._fsdp = _fsdp_modules(model)
        _refuse_sparse_sharding(zo, self._fsdp)
        self.steps = 0  # calls of step/run_step (the divergence check's clock; saved)
        self._last_step_bytes = 0
        zo.base_seed = broadcast_seed(zo.base_seed, self.context, self.stats)
        if sync_initial_parameters:
            self._reshard()  # FSDP2 root parameters may still be gathered from a forward
            broadcast_parameters(self._replicated_tensors(), self.context, self.stats)
        zo.loss_reduce = self._reduce_losses
        if self._fsdp:
            zo.loss_hook = self._resharded_loss
        if self.context.distributed:
            for o in fo_opts:
                o.register_step_pre_hook(self._fo_pre_step)

    # -- internals ------------------------------------------------------------------------
    def _replicated_tensors(self) -> List[torch.Tensor]:
        seen, out = set(), []
        sources = []
        if self.model is not None:
            sources.append(self.model.parameters())
            sources.append(self.model.buffers())
        sources.append(p for g in self.zo.param_groups for p in g["params"])
        sources.append(iter(self.fo_params))
        for src in sources:
            for t in src:
                if id(t) not in seen and t.is_floating_point():
                    seen.add(id(t))
                    out.append(t)
        return out

    def _named_for_check(self) -> List[tuple]:
        named = list(self.model.named_parameters()) if self.model is not None else []
        known = {id(p) for _, p in named}
        extra = [p for g in self.zo.param_groups for p in g["params"]] + self.fo_params
        for i, p in enumerate(extra):
            if id(p) not in known:
                known.add(id(p))
                named.append((f"optimizer_param_{i}", p))
        return named

    def _reduce_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return allreduce_mean(losses, self.context, self.stats, kind="loss",
                              what=f"all-reduce of the losses of ZO step {self.zo.step_count}")

    def _fo_pre_step(self, opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        allreduce_gradients(params, self.context, self.stats, kind="grad")
        return None

    def _reshard(self) -> None:
        for m in self._fsdp:
            m.reshard()

    def _resharded_loss(self, closure):
        """One loss evaluation of a ZO step with the FSDP2 modules resharded before and
        after: FSDP2 keeps the root's parameters gathered after a forward, and the
        perturbation written to the shards must reach the next forward."""
        self._reshard()
        try:
            return closure()
        finally:
            self._reshard()

    # -- public ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.context.rank

    @property
    def world_size(self) -> int:
        return self.context.world_size

    @property
    def last_step_bytes(self) -> int:
        """Payload bytes all-reduced during the last :meth:`step` (losses and first-order
        gradients; checksums and set-up broadcasts are counted apart in :attr:`stats`)."""
        return self._last_step_bytes

    def step(self, *args, **kwargs):
        """One optimizer step. ``ZOOptimizer``: ``step(closure)``, ``closure()`` returning
        this rank's mean loss on its micro-batch; returns the loss averaged over ranks.
        ``ZOFOOptimizer``: ``step(upper_batch, lower_batches)`` with this rank's batches."""
        if self.optimizer is self.zo:
            closure = args[0] if args else kwargs.get("closure")
            if closure is None or not callable(closure):
                raise ValueError("DataParallelZO.step needs a closure that returns the loss")
        return self.run_step(lambda: self.optimizer.step(*args, **kwargs))

    def run_step(self, fn: Callable[[], object]):
        """Run ``fn()`` -- any call that makes one step of the wrapped optimizer, e.g.
        ``lambda: zofo.upper_step(b_f, b_g)`` -- counting its bytes and running the periodic
        divergence check like :meth:`step`. Returns what ``fn`` returns."""
        before = self.stats.total_bytes(("loss", "grad"))
        self._reshard()
        result = fn()
        self._last_step_bytes = self.stats.total_bytes(("loss", "grad")) - before
        self.steps += 1
        if self.check_every and self.steps % self.check_every == 0:
            self.check_replicas()
        return result

    def check_replicas(self) -> None:
        """Compare checksums of all replicated parameters across ranks now; raises
        :class:`DivergenceError` (on every rank) if any differs."""
        check_replicas(self._named_for_check(), self.context, self.stats,
                       step=self.zo.step_count)

    def allreduce_fo_gradients(self, params: Optional[Iterable[torch.Tensor]] = None) -> int:
        """Average the gradients of ``params`` (default: ``fo_params``) over ranks; returns
        the payload bytes all-reduced."""
        return allreduce_gradients(self.fo_params if params is None else params, self.context,
                                   self.stats, kind="grad")

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
