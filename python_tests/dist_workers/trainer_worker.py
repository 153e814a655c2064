"""ZOFOTrainer under torchrun (2 gloo processes): MeZO and Bilevel-ZOFO on a tiny random BERT,
each trained for 3 steps and then resumed from its step-2 checkpoint by a second trainer.
Rank 0 writes ``<out>/<method>.pt`` (final parameters) and ``<out>/<method>.json``; every rank
writes its parameter checksums.

Run: torchrun --nproc_per_node=2 trainer_worker.py <out_dir>
"""

import json
import os
import sys

import torch

from trainer_common import make_trainer  # same folder
from zofo_kernels.core.distributed import tensor_checksum


def main():
    out = sys.argv[1]
    results = {}
    for method in ("mezo", "bilevel-zofo"):
        run_dir = os.path.join(out, method)
        trainer = make_trainer(run_dir, method, per_device=4, accumulation=1, save_steps=2)
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
        # a second job in the same processes resumes from the step-2 checkpoint
        resumed = make_trainer(run_dir, method, per_device=4, accumulation=1, save_steps=2)
        resumed.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2"))
        results[method]["resume_bit_identical"] = all(
            torch.equal(params[n], p) for n, p in resumed.model.named_parameters())
        if rank == 0:
            torch.save(params, os.path.join(out, f"{method}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    # barrier, then tear the process group down before exiting (gloo can abort otherwise)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
