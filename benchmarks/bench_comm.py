"""Communication per step: data-parallel ZO against DDP first-order fine-tuning.

Run on N processes (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_comm.py --model minilm

For each method the same model and per-rank batch are used; every method's collectives are
counted at the source:

* ``mezo`` and ``mezo-q4`` (q = 1 and q = 4): :class:`zofo_kernels.core.distributed.DataParallelZO`
  counts the loss all-reduce (and nothing else travels during a step);
* ``bilevel-zofo``: Bilevel-ZOFO with LoRA (r = 8 on query/value + the classification head as
  P and S), ``--inner-steps`` lower steps and a fresh B_g: S/P gradient all-reduces + the
  loss all-reduce;
* ``fo-full``: ``DistributedDataParallel`` full fine-tuning with Adam; a DDP communication
  hook adds up the gradient buckets it all-reduces;
* ``fo-lora``: the same with only the LoRA block trainable (first-order PEFT).

Method names and optimizers come from the registry (:mod:`zofo_kernels.integrations.methods`).

Prints a markdown table (rank 0) and writes nothing unless ``--csv PATH`` asks for one row per
method (a relative PATH is under the current folder):
method, trainable parameters, bytes all-reduced per step, collective calls per step, median
step time. Bytes are payload bytes per rank (what each rank contributes to its all-reduces).
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time

import torch
import torch.distributed as dist

from zofo_kernels.apps.data import random_batch
from zofo_kernels.core.distributed import DataParallelZO, setup_from_env, shutdown
from zofo_kernels.apps.models import add_peft, classification_loss, load_model
from zofo_kernels.integrations import methods


def _batches(args, rank, vocab, pad, n):
    return [random_batch(vocab, args.batch, args.seq, seed=1000 * i + rank, pad_token_id=pad)
            for i in range(n)]


def _timed(fn, steps, warmup):
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn(i)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_mezo(base, batches, ctx, args, q):
    model = copy.deepcopy(base).eval()
    opt = methods.build_optimizer("mezo", model, lr=1e-6, eps=1e-3, n_directions=q, seed=1)
    dp = DataParallelZO(opt, model=model, context=ctx, check_every=0)
    per_step = []

    def step(i):
        b = batches[i % len(batches)]
        before = dp.stats.calls.get("loss", 0)
        dp.step(lambda: classification_loss(model, b))
        per_step.append((dp.last_step_bytes, dp.stats.calls.get("loss", 0) - before))
    t = _timed(step, args.steps, args.warmup)
    return dict(method=f"mezo q={q}", trainable=sum(p.numel() for p in model.parameters()),
                bytes_per_step=per_step[-1][0], calls_per_step=per_step[-1][1], step_s=t)


def bench_bilevel(base, batches, ctx, args):
    model = add_peft(copy.deepcopy(base), "lora", lora_r=8).eval()
    opt = methods.build_optimizer("bilevel-zofo", model, loss_fn=lambda b: classification_loss(
        model, b), lr=1e-6, eps=1e-3, lam=10.0, inner_steps=args.inner_steps, peft_lr=1e-4,
        seed=2)
    dp = DataParallelZO(opt, model=model, context=ctx, check_every=0)
    per_step = []

    def step(i):
        lows = [batches[(i + k) % len(batches)] for k in range(args.inner_steps)]
        before = sum(dp.stats.calls.get(k, 0) for k in ("loss", "grad"))
        dp.step(batches[(i + 7) % len(batches)], lows, batches[(i + 3) % len(batches)])
        per_step.append((dp.last_step_bytes,
                         sum(dp.stats.calls.get(k, 0) for k in ("loss", "grad")) - before))
    t = _timed(step, args.steps, args.warmup)
    # theta (ZO) + P and S (FO); peft's unused original head copy is not trained
    trained = [p for g in opt.zo.param_groups for p in g["params"]]
    trained += opt.upper_params + opt.lower_params
    return dict(method=f"bilevel-zofo inner_steps={args.inner_steps} (LoRA r=8)",
                trainable=sum(p.numel() for p in trained),
                bytes_per_step=per_step[-1][0], calls_per_step=per_step[-1][1], step_s=t)


def bench_ddp(base, batches, ctx, args, method):
    """The registry's first-order method under DistributedDataParallel."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = copy.deepcopy(base)
    if methods.get(method).peft:
        model = add_peft(model, "lora", lora_r=8)
    model.eval()  # no dropout: the same forward as the ZO methods
    ddp = DDP(model)
    counter = {"bytes": 0, "calls": 0}

    def counting_allreduce(state, bucket):
        buf = bucket.buffer()
        counter["bytes"] += buf.numel() * buf.element_size()
        counter["calls"] += 1
        return default_hooks.allreduce_hook(None, bucket)
    ddp.register_comm_hook(None, counting_allreduce)
    opt = methods.build_optimizer(method, ddp, lr=1e-5)
    params = [p for g in opt.param_groups for p in g["params"]]
    per_step = []

    def step(i):
        b = batches[i % len(batches)]
        before = dict(counter)
        opt.zero_grad(set_to_none=True)
        classification_loss(ddp, b).backward()
        opt.step()
        per_step.append((counter["bytes"] - before["bytes"], counter["calls"] - before["calls"]))
    t = _timed(step, args.steps, args.warmup)
    return dict(method=f"{method} (DDP, Adam)", trainable=sum(p.numel() for p in params),
                bytes_per_step=per_step[-1][0], calls_per_step=per_step[-1][1], step_s=t)


# a row: the registry's method name, or a variant of it (mezo-q4: four directions per step)
ROWS = {
    "mezo": lambda base, batches, ctx, args: bench_mezo(base, batches, ctx, args, 1),
    "mezo-q4": lambda base, batches, ctx, args: bench_mezo(base, batches, ctx, args, 4),
    "bilevel-zofo": bench_bilevel,
    "fo-full": lambda base, batches, ctx, args: bench_ddp(base, batches, ctx, args, "fo-full"),
    "fo-lora": lambda base, batches, ctx, args: bench_ddp(base, batches, ctx, args, "fo-lora"),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm",
                    help="minilm, minilm-random, tiny-bert, opt-125m, ... (zofo_kernels.apps.models)")
    ap.add_argument("--batch", type=int, default=8, help="examples per rank")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--inner-steps", type=int, default=2,
                    help="Bilevel-ZOFO: inner_steps, the first-order steps of the lower copy "
                         "S per outer step (default 2)")
    ap.add_argument("--methods", default=",".join(ROWS),
                    help="comma-separated rows: " + ", ".join(ROWS))
    ap.add_argument("--csv", default=None,
                    help="write the rows to this CSV file (rank 0; default: none, nothing is "
                         "written, the table is printed)")
    args = ap.parse_args(argv)
    for m in args.methods.split(","):
        if m not in ROWS:
            ap.error(f"unknown method {m!r}; expected one of {', '.join(ROWS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    ctx = setup_from_env()
    if not ctx.distributed:
        raise SystemExit("run under torchrun with --nproc_per_node >= 2")
    loaded = load_model(args.model, with_tokenizer=True, device=str(ctx.device),
                        head="random")  # a new classification head, as measured so far
    base = loaded.model
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer is not None else None
    batches = [{k: v.to(ctx.device) for k, v in b.items()}
               for b in _batches(args, ctx.rank, base.config.vocab_size, pad, 8)]
    rows = []
    for m in args.methods.split(","):
        rows.append(ROWS[m](base, batches, ctx, args))
    if ctx.is_main:
        ref = next((r["bytes_per_step"] for r in rows if r["method"].startswith("fo-full")), None)
        device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
        print(f"\nmodel {args.model}, {ctx.world_size} ranks ({ctx.backend}, {device}), "
              f"batch {args.batch}/rank x {args.seq} tokens, median of {args.steps} steps\n")
        print("| method | trainable params | bytes all-reduced / step | collectives / step "
              "| vs DDP full FO | step time (s) |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            ratio = f"1 / {ref / r['bytes_per_step']:,.0f}" if ref and r["bytes_per_step"] else "-"
            print(f"| {r['method']} | {r['trainable']:,} | {r['bytes_per_step']:,} | "
                  f"{r['calls_per_step']:g} | {ratio} | {r['step_s']:.3f} |")
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["model", "world_size", "backend", "device",
                                                  *rows[0].keys()])
                w.writeheader()
                for r in rows:
                    w.writerow(dict(model=args.model, world_size=ctx.world_size,
                                    backend=ctx.backend, device=device, **r))
    shutdown(ctx)


if __name__ == "__main__":
    main()
