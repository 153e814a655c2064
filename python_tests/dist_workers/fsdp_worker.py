"""ZO on a model sharded with FSDP2 (fully_shard, gloo, CPU): each rank perturbs and updates
only its local shards, with their global offsets in the noise contract. Checked against the
unsharded model trained in one process. Writes ``<out>/rank<r>.json``.

Shapes are chosen so that shards are uneven (3 rows over 2 ranks) and empty (1 row over 2
ranks: rank 1 holds nothing of token_type_embeddings).

Run: torchrun --nproc_per_node=2 fsdp_worker.py <out_dir>
"""

import copy
import json
import os
import sys

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from transformers import BertConfig, BertForSequenceClassification

from zofo_kernels.core.distributed import DataParallelZO, setup_from_env, shutdown
from zofo_kernels.core.optim import ZOOptimizer, zo_layout

STEPS = 3
BATCH = 6


def make_model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=61, hidden_size=30, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=17, type_vocab_size=1,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    model.eval()
    return model


def shard(model, mesh):
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root keeps embeddings, pooler and classifier
    return model


def data():
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, 61, (BATCH, 9), generator=g),
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def full(p):
    return p.full_tensor() if isinstance(p, DTensor) else p


def run(ctx, mesh, split, distribution):
    """Sharded run (each rank its half of the batch if ``split``, else the whole batch)
    and the unsharded single-process run on the whole batch."""
    ref = make_model()
    model = shard(copy.deepcopy(ref), mesh)
    opt = ZOOptimizer(model.parameters(), lr=5e-3, eps=1e-3, seed=2024, weight_decay=0.01,
                      distribution=distribution)
    dp = DataParallelZO(opt, model=model, context=ctx, check_every=1)
    ref_opt = ZOOptimizer(ref.parameters(), lr=5e-3, eps=1e-3, seed=2024, weight_decay=0.01,
                          distribution=distribution)
    lo, hi = (ctx.rank * BATCH // 2, (ctx.rank + 1) * BATCH // 2) if split else (0, BATCH)
    losses, ref_losses = [], []
    with torch.no_grad():
        for ids, labels in data():
            # a forward outside the step leaves FSDP2's root parameters gathered: the step
            # must still see its own perturbations
            model(input_ids=ids[:2])
            losses.append(dp.step(lambda: model(input_ids=ids[lo:hi],
                                                labels=labels[lo:hi]).loss))
            ref_losses.append(ref_opt.step(lambda: ref(input_ids=ids, labels=labels).loss))
    out = {"losses": losses, "ref_losses": ref_losses, "loss_bytes": dp.stats.bytes["loss"]}
    with torch.no_grad():
        pairs = [(n, full(p), q) for (n, p), q in zip(model.named_parameters(),
                                                       ref.parameters())]
        out["bit_identical"] = all(torch.equal(a, b) for _, a, b in pairs)
        out["max_diff"] = max(float((a - b).abs().max()) for _, a, b in pairs)
        out["max_change"] = max(float((b - q).abs().max()) for (_, _, b), q in
                                zip(pairs, make_model().parameters()))
    return out, model


def main():
    out_dir = sys.argv[1]
    ctx = setup_from_env(timeout_s=60)
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    result = {"rank": ctx.rank}
    result["same_batch"], model = run(ctx, mesh, split=False, distribution="gaussian")
    result["same_batch_rademacher"], _ = run(ctx, mesh, split=False, distribution="rademacher")
    result["split_batch"], _ = run(ctx, mesh, split=True, distribution="gaussian")

    # the layout of the sharded model: local shard sizes and offsets of a few parameters
    model.reshard()  # the root's parameters are the DTensor shards again
    params = dict(model.named_parameters())
    layout = zo_layout([{"params": list(params.values())}])[0]
    offsets = dict(zip(params, layout))
    result["shards"] = {
        name: {"placements": str(params[name].placements),
               "global_shape": list(params[name].shape),
               "local_shape": list(offsets[name][0].shape), "offset": offsets[name][1]}
        for name in ("bert.embeddings.token_type_embeddings.weight", "classifier.weight",
                     "classifier.bias", "bert.encoder.layer.0.intermediate.dense.weight")}
    pos, starts = 0, {}
    for name, p in params.items():
        starts[name] = pos
        pos += p.numel()
    result["param_starts"] = {k: starts[k] for k in result["shards"]}
    # a column-sharded tensor is not one contiguous index range: refused with a clear error
    bad = distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])
    try:
        zo_layout([{"params": [bad]}])
        result["shard1_error"] = None
    except ValueError as exc:
        result["shard1_error"] = str(exc)
    with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown(ctx)


if __name__ == "__main__":
    main()
