"""Failure handling of data-parallel ZO on a small MLP (2 ranks).

Modes (argv[2]):
  crash    rank 1 raises inside its loss closure at step 2; the job must fail, not hang.
  hang     rank 1 stops answering at step 2 (sleeps); rank 0's all-reduce must time out
           (ZOFO_DIST_TIMEOUT seconds) with a RankFailureError.
  restart  checkpoint after every step; on the first attempt both ranks die in the middle of
           step 3 (perturbed weights in memory); torchrun restarts the job, which resumes from
           the checkpoint and finishes 6 steps. The result must equal an uninterrupted run bit
           for bit. Writes <out>/restart<rank>.json.
Run: torchrun --nproc_per_node=2 [--max_restarts=1] fault_worker.py <out_dir> <mode>
"""

import json
import os
import sys
import time

import torch

from zofo_kernels.core.distributed import DataParallelZO, setup_from_env, shutdown
from zofo_kernels.core.optim import ZOOptimizer

STEPS = 6


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 10, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def make_closure(model, step, rank, on_call=None):
    x, y = batch(step, rank)

    def closure():
        if on_call is not None:
            on_call()
        return torch.nn.functional.mse_loss(model(x), y)
    return closure


def train(ctx, out_dir, mode):
    model = make_model()
    opt = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3, seed=42)
    dp = DataParallelZO(opt, model=model, context=ctx, check_every=2)
    ckpt = os.path.join(out_dir, "ckpt.pt")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    start = 0
    if mode == "restart" and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        dp.load_state_dict(state["dp"])
        start = state["step"]
    for step in range(start, STEPS):
        hook = None
        if mode == "crash" and step == 2 and ctx.rank == 1:
            def hook():
                raise RuntimeError("injected failure on rank 1 at step 2")
        elif mode == "hang" and step == 2 and ctx.rank == 1:
            def hook():
                time.sleep(600)
        elif mode == "restart" and step == 3 and attempt == 0:
            calls = []

            def hook():  # die after the first loss evaluation: weights are perturbed
                calls.append(1)
                if len(calls) == 2:
                    os._exit(3)
        dp.step(make_closure(model, step, ctx.rank, hook))
        if mode == "restart":
            if ctx.rank == 0:
                tmp = ckpt + ".tmp"
                torch.save({"model": model.state_dict(), "dp": dp.state_dict(),
                            "step": step + 1}, tmp)
                os.replace(tmp, ckpt)
            torch.distributed.barrier()
    return model, start, attempt


def main():
    out_dir, mode = sys.argv[1], sys.argv[2]
    ctx = setup_from_env()
    model, start, attempt = train(ctx, out_dir, mode)
    if mode == "restart":
        # the same job without interruption, in the same processes
        ref, _, _ = train(ctx, out_dir, "plain")
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
        diff = max(float((p.detach() - q.detach()).abs().max())
                   for p, q in zip(model.parameters(), ref.parameters()))
        with open(os.path.join(out_dir, f"restart{ctx.rank}.json"), "w") as f:
            json.dump({"resumed_from": start, "attempt": attempt, "bit_identical": same,
                       "max_diff": diff}, f)
    shutdown(ctx)


if __name__ == "__main__":
    main()
