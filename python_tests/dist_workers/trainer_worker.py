"""ZOFOTrainer under torchrun (2 gloo processes): MeZO and Bilevel-ZOFO on a tiny random BERT.
Rank 0 writes ``<out>/<method>.pt`` (final parameters) and ``<out>/<method>.json``; every rank
writes its parameter checksums.

Run: torchrun --nproc_per_node=2 trainer_worker.py <out_dir>
"""

import json
import os
import sys

import torch

from trainer_common import make_trainer  # same folder
from zofo_kernels.distributed import tensor_checksum


def main():
    out = sys.argv[1]
    results = {}
    for method in ("mezo", "zofo"):
        trainer = make_trainer(os.path.join(out, method), method, per_device=4, accumulation=1)
        assert trainer.zo_dp is not None, "the trainer did not detect the distributed run"
        rank = trainer.zo_context.rank
        trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results[method] = {
            "checksums": [tensor_checksum(p) for p in params.values()],
            "losses": losses,
            "comm": [h.get("comm_bytes_per_step") for h in trainer.state.log_history
                     if "loss" in h],
            "world": trainer.zo_context.world_size,
        }
        if rank == 0:
            torch.save(params, os.path.join(out, f"{method}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    # barrier, then tear the process group down before exiting (gloo can abort otherwise)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
