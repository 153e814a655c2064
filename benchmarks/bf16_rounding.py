"""Do MeZO's updates survive on bfloat16 weights? Gemma 3 270M, round-to-nearest against
stochastic rounding, measured against the same steps on float32 weights.

    python benchmarks/bf16_rounding.py --lr 1e-6 --output benchmarks/results/gemma3-270m
    python benchmarks/bf16_rounding.py --lr 1e-8 --output benchmarks/results/gemma3-270m

Three runs of plain ZO-SGD (MeZO's update) from the same weights, seeds and batches: float32
(the reference), bfloat16 with stochastic rounding (the kernels' default for 16-bit weights)
and bfloat16 rounded to nearest. For each bfloat16 run, against the float32 run's total change
d32 = theta_T - theta_0:

* survival: <d16, d32> / |d32|^2, the share of the intended change the weights carry (1 means
  the update arrives in expectation; 0 means it rounds away);
* changed: the fraction of weights that differ from their start at the end.

ZO updates are tiny (lr * g * z, about 1e-6 to 1e-5 here) against bfloat16's spacing near a
typical weight (2^-13 ~ 1.2e-4 at |w| ~ 0.03): rounded to nearest, almost all of them vanish.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from zofo_kernels import ZOOptimizer
from zofo_kernels.apps import data as data_mod
from zofo_kernels.apps import models
from zofo_kernels.integrations.prompting import PromptSpec, classification_logits

SST2_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


def batches(loaded, examples, batch_size: int, max_length: int):
    spec = PromptSpec()
    wrapped = [data_mod.Example(spec.text(e.text), e.label) for e in examples]
    enc = data_mod.Encoded(wrapped, loaded.tokenizer, max_length,
                           add_special_tokens=loaded.add_special_tokens)
    return [enc.batch(slice(i, i + batch_size)) for i in range(0, len(enc), batch_size)]


def run(dtype: str, rounding: bool, args, examples) -> dict:
    loaded = models.load_model("gemma3-270m", dtype=dtype, head="prompt")
    model = loaded.model.eval()
    params = [p for p in model.parameters()]
    start = [p.detach().float().clone() for p in params]
    opt = ZOOptimizer(params, lr=args.lr, eps=args.eps, seed=args.seed,
                      stochastic_rounding=rounding)
    data = batches(loaded, examples, args.batch_size, args.max_length)
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        batch = data[step % len(data)]

        def closure():
            logits = classification_logits(model, batch)
            return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        losses.append(float(opt.step(closure)))
    seconds = time.perf_counter() - t0
    delta = [p.detach().float() - s for p, s in zip(params, start)]
    return dict(dtype=dtype, stochastic_rounding=rounding, delta=delta, losses=losses,
                seconds=seconds)


def compare(ref, other) -> dict:
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(other["delta"],
                                                                    ref["delta"]))
    ref_sq = sum(float((b.double() ** 2).sum()) for b in ref["delta"])
    changed = sum(int((a != 0).sum()) for a in other["delta"])
    total = sum(a.numel() for a in other["delta"])
    return dict(survival=dot / ref_sq, changed_fraction=changed / total,
                change_rms=(sum(float((a.double() ** 2).sum()) for a in other["delta"])
                            / total) ** 0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SST2_DEFAULT)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-6)  # MeZO's OPT learning rate
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("zofo-bench-results"))
    args = p.parse_args(argv)
    examples = data_mod.sample(data_mod.read_examples(args.data / "train.tsv"),
                               args.steps * args.batch_size, args.seed)
    runs = [run("float32", True, args, examples), run("bfloat16", True, args, examples),
            run("bfloat16", False, args, examples)]
    ref = runs[0]
    ref_rms = (sum(float((b.double() ** 2).sum()) for b in ref["delta"])
               / sum(b.numel() for b in ref["delta"])) ** 0.5
    rows = [dict(weights="float32", rounding="-", survival=1.0,
                 changed_fraction=compare(ref, ref)["changed_fraction"], change_rms=ref_rms,
                 seconds=ref["seconds"], final_loss=ref["losses"][-1])]
    for r in runs[1:]:
        rows.append(dict(weights=r["dtype"],
                         rounding="stochastic" if r["stochastic_rounding"] else "nearest",
                         **compare(ref, r), seconds=r["seconds"], final_loss=r["losses"][-1]))
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"bf16_rounding_lr{args.lr:g}"
    with open(args.output / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    command = "python benchmarks/bf16_rounding.py " + " ".join(argv or sys.argv[1:])
    lines = [f"# ZO updates on bfloat16 weights: Gemma 3 270M, {args.steps} MeZO steps "
             f"(lr {args.lr:g}, eps {args.eps:g}, batch {args.batch_size})", "",
             f"Command: `{command.strip()}`", "",
             "| weights | rounding | survival of the float32 run's change | weights changed "
             "| RMS change per weight | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['rounding']} | {r['survival']:.3f} | "
                     f"{r['changed_fraction']:.2%} | {r['change_rms']:.2e} | "
                     f"{r['seconds']:.0f} |")
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"output": str(args.output.resolve())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
