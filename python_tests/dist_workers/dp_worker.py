"""Data-parallel ZO on a real (tiny, randomly initialised) HF BERT, checked against a
single-process run on the concatenated batch. Writes ``<out>/rank<r>.json``.

Run: torchrun --nproc_per_node=2 dp_worker.py <out_dir>
"""

import copy
import json
import os
import sys

import torch
from transformers import BertConfig, BertForSequenceClassification

from zofo_kernels.core.distributed import (DataParallelZO, DivergenceError, allreduce_gradients,
                                      setup_from_env, shutdown, tensor_checksum)
from zofo_kernels.core.optim import ZOOptimizer

STEPS = 3
BATCH = 8  # global batch; each of the 2 ranks takes 4 rows


def make_model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    model.eval()
    return model


def batches():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (BATCH, 12), generator=g)
        labels = torch.randint(0, 2, (BATCH,), generator=g)
        out.append((ids, labels))
    return out


def loss_of(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def zofo_check(ctx, lo, hi):
    """Bilevel-ZOFO with LoRA on 2 ranks (P and S gradients all-reduced, theta by seed)
    against one process on the whole batches."""
    from peft import LoraConfig, get_peft_model
    from zofo_kernels.core.optim import ZOFOOptimizer

    def build():
        base = make_model()
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                         lora_dropout=0.0, init_lora_weights="gaussian")
        torch.manual_seed(1)
        return get_peft_model(base, cfg)

    g = torch.Generator().manual_seed(21)
    steps = [[(torch.randint(0, 64, (BATCH, 10), generator=g),
               torch.randint(0, 2, (BATCH,), generator=g)) for _ in range(3)] for _ in range(2)]
    runs = {}
    for name, rows in (("dp", slice(lo, hi)), ("ref", slice(0, BATCH))):
        model = build()
        model.eval()

        def loss_fn(batch, model=model):
            ids, labels = batch
            return model(input_ids=ids, labels=labels).loss
        opt = ZOFOOptimizer.from_peft(model, loss_fn, lr=1e-2, eps=1e-3, lam=10.0,
                                      inner_steps=2, peft_lr=0.5, seed=77,
                                      peft_optimizer=torch.optim.SGD)
        driver = DataParallelZO(opt, model=model, context=ctx, check_every=1) \
            if name == "dp" else opt
        step_bytes = []
        for upper, low1, low2 in steps:
            cut = [(b[0][rows], b[1][rows]) for b in (upper, low1, low2)]
            driver.step(cut[0], cut[1:])
            if name == "dp":
                step_bytes.append(driver.last_step_bytes)
        runs[name] = (model, step_bytes,
                      sum(p.numel() for p in opt.upper_params + opt.lower_params))
    # skipping non-finite FO steps per rank would unpair the gradient all-reduces: refused
    model = build()
    opt = ZOFOOptimizer.from_peft(model, lambda b: model(input_ids=b[0], labels=b[1]).loss,
                                  lr=1e-2, nonfinite="skip", seed=77)
    try:
        DataParallelZO(opt, model=model, context=ctx)
        skip_error = None
    except ValueError as exc:
        skip_error = str(exc)
    (m, step_bytes, n_peft), (ref, _, _) = runs["dp"], runs["ref"]
    diff = max(float((p.detach() - q.detach()).abs().max())
               for p, q in zip(m.parameters(), ref.parameters()))
    fresh = dict(build().named_parameters())
    peft_change = max(float((p.detach() - fresh[n].detach()).abs().max())
                      for n, p in m.named_parameters() if "lora_" in n and n in fresh)
    return {"max_diff_vs_single": diff, "step_bytes": step_bytes, "peft_numel": n_peft,
            "peft_change": peft_change, "skip_error": skip_error,
            "checksums": [tensor_checksum(p) for p in m.parameters()]}


def main():
    out_dir = sys.argv[1]
    ctx = setup_from_env(timeout_s=60)
    rank, world = ctx.rank, ctx.world_size
    assert world == 2, world
    result = {"rank": rank}

    model = make_model()
    if rank == 1:  # a head initialised differently on one rank: the wrapper must fix it
        torch.manual_seed(99)
        torch.nn.init.normal_(model.classifier.weight)
    # rank 0 passes a seed, rank 1 none (it would draw its own from os.urandom)
    opt = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3,
                      seed=1234 if rank == 0 else None)
    dp = DataParallelZO(opt, model=model, context=ctx, check_every=1)
    result["base_seed"] = opt.base_seed
    result["setup_bytes"] = dp.stats.bytes.get("setup", 0)

    # the single-process reference starts from the same (broadcast) weights
    ref = copy.deepcopy(model)
    ref_opt = ZOOptimizer(ref.parameters(), lr=1e-2, eps=1e-3, seed=1234)

    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    losses, ref_losses, grads, ref_grads, step_bytes = [], [], [], [], []
    for ids, labels in batches():
        losses.append(dp.step(lambda: loss_of(model, ids[lo:hi], labels[lo:hi])))
        grads.append(opt.last_step["projected_grads"])
        step_bytes.append(dp.last_step_bytes)
        ref_losses.append(ref_opt.step(lambda: loss_of(ref, ids, labels)))
        ref_grads.append(ref_opt.last_step["projected_grads"])
    result.update(losses=losses, ref_losses=ref_losses, grads=grads, ref_grads=ref_grads,
                  step_bytes=step_bytes, loss_bytes=dp.stats.bytes.get("loss", 0),
                  check_calls=dp.stats.calls.get("check", 0))
    diffs = [float((p.detach() - q.detach()).abs().max()) for p, q in zip(model.parameters(), ref.parameters())]
    moved = [float((p.detach() - q.detach()).abs().max()) for p, q in zip(model.parameters(),
                                                         make_model().parameters())]
    result["max_param_diff_vs_single"] = max(diffs)
    result["max_param_change"] = max(moved)
    result["checksums"] = [tensor_checksum(p) for p in model.parameters()]

    # one ulp on one element of one rank: the next check must fail on every rank
    if rank == 1:
        with torch.no_grad():
            w = model.bert.encoder.layer[1].output.dense.weight
            w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))
    try:
        dp.check_replicas()
        result["divergence"] = None
    except DivergenceError as exc:
        result["divergence"] = str(exc)

    # first-order gradients (the PEFT path): averaged half-batch grads == full-batch grad
    head = torch.nn.Linear(12, 3)
    torch.manual_seed(5)
    torch.nn.init.normal_(head.weight)
    x = torch.randn(BATCH, 12, generator=torch.Generator().manual_seed(3))
    head.zero_grad()
    head(x[lo:hi]).pow(2).mean().backward()
    nbytes = allreduce_gradients(head.parameters(), ctx)
    dp_grad = head.weight.grad.clone()
    head.zero_grad()
    head(x).pow(2).mean().backward()
    result["fo_grad_diff"] = float((dp_grad - head.weight.grad).abs().max())
    result["fo_grad_bytes"] = nbytes

    result["zofo"] = zofo_check(ctx, lo, hi)

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown(ctx)


if __name__ == "__main__":
    main()
