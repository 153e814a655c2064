"""The SST-2 study: do Bilevel-ZOFO's claims hold for MiniLM on a CPU?

Protocol (MeZO / Bilevel-ZOFO few-shot setting):
  * model: MiniLM-L6 (real pretrained weights, new 2-way head), batch 16, 64 tokens, CPU;
  * data: ``--num-train`` (1,000) examples drawn from ../shared/data/sst2/train.tsv with the
    run's seed; Bilevel-ZOFO splits them 2 : 1 into lower/upper sets; accuracy on dev.tsv;
  * methods: mezo, mezo-lora, fo-lora, fo-full, bilevel-zofo, each with the same training
    wall-clock budget (``--budget-minutes``, evaluation time not counted), ``--seeds``;
  * hyperparameters: for each method, the best setting of the small grid ``SWEEP`` below,
    chosen by accuracy on a held-out part of the training sample (``--sweep-holdout``
    examples of the seed-0 sample are held out; the rest trains for ``--sweep-minutes``).
    dev.tsv is never used for selection.

Outputs (``--output``, default benchmarks/results/study_<tag>): sweep.csv, runs.csv,
curves.csv, summary.json, study.png, study.md, and each run's metrics.jsonl/summary.json.
The study.md states, in words, whether Bilevel-ZOFO reached MeZO's best accuracy faster
(and by what factor) and whether it ended above FO-LoRA.

Full protocol (hours on two cores):
  python benchmarks/study_sst2.py --budget-minutes 15 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zofo_kernels import data as data_mod  # noqa: E402
from zofo_kernels import plotting  # noqa: E402

METHODS = ("mezo", "mezo-lora", "fo-lora", "fo-full", "bilevel-zofo")

# The sweep grid: a few settings per method around the values the papers use, scaled for a
# 22.7 M-parameter model. Keys are zofo-train flags. Grids have an even length so that with
# --sweep-parallel 2 the two settings running side by side belong to the same method and
# share the machine on equal terms.
SWEEP = {
    "mezo": [dict(lr=3e-5, eps=1e-3), dict(lr=1e-4, eps=1e-3),
             dict(lr=3e-4, eps=1e-3), dict(lr=1e-3, eps=1e-3)],
    "mezo-lora": [dict(lr=1e-3, eps=1e-2), dict(lr=1e-2, eps=1e-2)],
    "fo-lora": [dict(lr=5e-4), dict(lr=2e-3)],
    "fo-full": [dict(lr=2e-5), dict(lr=5e-5)],
    "bilevel-zofo": [dict(lr=1e-5, eps=1e-3, peft_lr=1e-3, lam=10.0, inner_steps=5),
                     dict(lr=1e-4, eps=1e-3, peft_lr=1e-3, lam=10.0, inner_steps=5),
                     dict(lr=1e-5, eps=1e-3, peft_lr=3e-3, lam=10.0, inner_steps=5),
                     dict(lr=1e-4, eps=1e-3, peft_lr=3e-3, lam=10.0, inner_steps=5)],
}


# Final accuracy this far below the run's best is reported as a late drop. In the 15-minute
# study, settled runs moved by at most 0.04 between evaluations (FO runs by under 0.01).
LATE_DROP = 0.05


def _flags(hp: dict) -> list:
    out = []
    for k, v in hp.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def run_one(args, method, hp, seed, budget_s, out: Path, extra, threads=None) -> dict:
    """One zofo-train run in its own process (fresh memory); skipped if already done."""
    summary = out / "summary.json"
    if args.resume and summary.is_file():
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", "zofo_kernels.train", "--model", args.model,
           "--method", method, "--train", _rel(args.data / "train.tsv"),
           "--num-train", str(args.num_train), "--seed", str(seed), "--data-seed", str(seed),
           "--time-budget", str(budget_s), "--output", str(out), "--no-save",
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--threads", str(threads or args.threads), *extra, *_flags(hp)]
    print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed} {hp} ({budget_s:.0f} s)",
          flush=True)
    for attempt in range(2):
        log = open(out.parent / f"{out.name}.log", "w")
        proc = subprocess.run(cmd, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        log.close()
        if proc.returncode >= 0:
            break
        # killed by a signal (e.g. the native module rebuilt under a running process):
        # start this run again from scratch, once
        print(f"  run ended by signal {-proc.returncode}; running it again", flush=True)
    if proc.returncode != 0 or not summary.is_file():
        tail = (out.parent / f"{out.name}.log").read_text()[-1500:]
        raise RuntimeError(f"run {out} failed (exit {proc.returncode}):\n{tail}")
    (out.parent / f"{out.name}.log").unlink()
    return json.loads(summary.read_text())


def _rel(path: Path) -> str:
    """``path`` relative to the repository when it is below its parent folder (so recorded
    commands and summaries read ../shared/data/...), else as given."""
    rel = os.path.relpath(path, ROOT)
    return rel if rel.startswith("..") and rel.count("..") == 1 else str(path)


def eval_rows(run_dir: Path):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def time_to_reach(rows, target: float):
    """Training seconds of the first evaluation at or above ``target`` (None if never)."""
    for r in rows:
        if r["eval_accuracy"] >= target - 1e-12:
            return r["wall_time_s"]
    return None


def analyse(curves: dict, summaries: dict) -> dict:
    """The study's questions on the mean-over-seeds curves (latest evaluation so far)."""
    mean = {m: plotting.mean_curve(runs, points=200) for m, runs in curves.items()}
    out = {"mean_final_accuracy": {}, "mean_best_accuracy": {}}
    for m, runs in summaries.items():
        out["mean_final_accuracy"][m] = sum(s["eval_accuracy"] for s in runs) / len(runs)
        out["mean_best_accuracy"][m] = sum(s["best_eval_accuracy"] for s in runs) / len(runs)
    if "mezo" in mean and "bilevel-zofo" in mean:
        mezo_best = max(a for _, a in mean["mezo"])
        t_mezo = next(t for t, a in mean["mezo"] if a >= mezo_best - 1e-12)
        t_bz = next((t for t, a in mean["bilevel-zofo"] if a >= mezo_best - 1e-12), None)
        out["mezo_best_mean_accuracy"] = mezo_best
        out["mezo_time_to_best_s"] = t_mezo
        out["bilevel_time_to_mezo_best_s"] = t_bz
        out["bilevel_reaches_mezo_best"] = t_bz is not None
        out["speedup_to_mezo_best"] = (t_mezo / t_bz if t_bz else (
            float("inf") if t_bz == 0 else None))
        if t_bz == 0:
            out["speedup_to_mezo_best"] = "at time 0 (before training)"
    if "fo-lora" in summaries and "bilevel-zofo" in summaries:
        b = out["mean_final_accuracy"]["bilevel-zofo"]
        f = out["mean_final_accuracy"]["fo-lora"]
        out["bilevel_final_minus_fo_lora"] = b - f
        out["bilevel_ends_above_fo_lora"] = b > f
    return out


def outcome_words(a: dict, n_seeds: int) -> str:
    lines = []
    if "mezo_best_mean_accuracy" in a:
        best = a["mezo_best_mean_accuracy"]
        if a["mezo_time_to_best_s"] == 0:
            lines.append(f"- MeZO never rose above its initial accuracy ({best:.3f}) within the "
                         "budget, so 'time to MeZO's best accuracy' is zero for every method "
                         "and says nothing about speed.")
        elif a["bilevel_reaches_mezo_best"]:
            sp = a["speedup_to_mezo_best"]
            if isinstance(sp, str):
                speed = "already at the start (its initial accuracy is at least as high)"
            else:
                speed = (f"after {a['bilevel_time_to_mezo_best_s'] / 60:.1f} min of training, "
                         f"against {a['mezo_time_to_best_s'] / 60:.1f} min for MeZO: "
                         f"{sp:.1f}x faster" if sp >= 1 else
                         f"after {a['bilevel_time_to_mezo_best_s'] / 60:.1f} min, later than "
                         f"MeZO ({a['mezo_time_to_best_s'] / 60:.1f} min): {1 / sp:.1f}x slower")
            lines.append(f"- Bilevel-ZOFO reached MeZO's best accuracy ({best:.3f}, mean over "
                         f"{n_seeds} seed(s)) {speed}. The paper claims 2-4x.")
        else:
            lines.append(f"- Bilevel-ZOFO did **not** reach MeZO's best accuracy ({best:.3f}) "
                         "within the budget.")
    # a method whose final accuracy is well below its best got worse late in the run
    # (divergence, not noise between evaluations): say so rather than hide it in a table
    for m, final in a.get("mean_final_accuracy", {}).items():
        best = a["mean_best_accuracy"][m]
        if best - final > LATE_DROP:
            lines.append(f"- {m} ended at {final:.3f}, {best - final:.3f} below its best "
                         f"({best:.3f}): its accuracy fell late in the run.")
    if "bilevel_ends_above_fo_lora" in a:
        b = a["mean_final_accuracy"]["bilevel-zofo"]
        f = a["mean_final_accuracy"]["fo-lora"]
        lines.append(f"- Final dev accuracy: Bilevel-ZOFO {b:.3f} vs FO-LoRA {f:.3f}: Bilevel-ZOFO "
                     f"ends {'above' if b > f else ('level with' if b == f else 'below')} "
                     "FO-LoRA.")
    return "\n".join(lines)


def _write_csv(path: Path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget-minutes", type=float, default=15.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--sweep-minutes", type=float, default=5.0)
    p.add_argument("--sweep-parallel", type=int, default=1,
                   help="sweep settings run at once (each gets threads / this many threads)")
    p.add_argument("--sweep-holdout", type=int, default=200,
                   help="examples of the seed-0 training sample held out for the sweep")
    p.add_argument("--skip-sweep", action="store_true",
                   help="use the first grid point of every method (no selection)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--evals", type=int, default=15, help="evaluations per run (budget / evals)")
    p.add_argument("--data", type=Path, default=data_mod.sst2_dir())
    p.add_argument("--tag", default=None, help="output name (default: from the budget)")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --output")
    args = p.parse_args(argv)
    for f in ("train.tsv", "dev.tsv"):
        if not (args.data / f).is_file():
            raise SystemExit(f"study_sst2: {args.data / f} not found (SST-2 is expected at "
                             "../shared/data/sst2 next to the repository)")
    if args.sweep_parallel < 1:
        raise SystemExit("study_sst2: --sweep-parallel must be at least 1")
    if args.num_train <= args.sweep_holdout:
        raise SystemExit("study_sst2: --sweep-holdout must be smaller than --num-train")
    tag = args.tag or (f"{args.budget_minutes:g}min_{len(args.seeds)}seed")
    out = args.output or ROOT / "benchmarks" / "results" / f"study_{tag}"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    protocol_full = args.budget_minutes >= 15 and len(args.seeds) >= 3
    t0 = time.time()

    # 1. the sweep, on a held-out part of the seed-0 training sample. Settings run
    #    --sweep-parallel at a time, each with threads / sweep-parallel threads: a selection
    #    only compares settings of one method, and those run side by side on equal terms.
    jobs = [] if args.skip_sweep else [(m, i, hp) for m in args.methods
                                       for i, hp in enumerate(SWEEP[m])]
    sweep_threads = max(1, args.threads // args.sweep_parallel)

    def sweep_one(job):
        m, i, hp = job
        rd = out / "runs" / f"sweep_{m}_{i}"
        s = run_one(args, m, hp, 0, args.sweep_minutes * 60, rd,
                    ["--num-train", str(args.num_train - args.sweep_holdout),
                     "--holdout", str(args.sweep_holdout),
                     "--eval-every", str(args.sweep_minutes * 60 / 5)], threads=sweep_threads)
        return dict(method=m, config=i, **hp, holdout_final_accuracy=s["eval_accuracy"],
                    holdout_best_accuracy=s["best_eval_accuracy"], steps=s["steps"],
                    wall_time_s=s["wall_time_s"], threads=sweep_threads)

    with ThreadPoolExecutor(max_workers=args.sweep_parallel) as pool:
        sweep_rows = list(pool.map(sweep_one, jobs))
    if sweep_rows:
        _write_csv(out / "sweep.csv", sweep_rows)
    chosen = {}
    for m in args.methods:
        rows = [r for r in sweep_rows if r["method"] == m]
        best = max(rows, key=lambda r: (r["holdout_final_accuracy"], r["holdout_best_accuracy"]),
                   default=None)
        chosen[m] = SWEEP[m][best["config"] if best else 0]
    (out / "chosen_hyperparameters.json").write_text(json.dumps(chosen, indent=2) + "\n")

    # 2. the equal-budget runs on dev.tsv (round-robin over methods within each seed)
    budget = args.budget_minutes * 60
    curves, summaries, run_rows, curve_rows = {}, {}, [], []
    for seed in args.seeds:
        for m in args.methods:
            rd = out / "runs" / f"{m}_seed{seed}"
            s = run_one(args, m, chosen[m], seed, budget, rd,
                        ["--eval", _rel(args.data / "dev.tsv"),
                         "--eval-every", str(budget / args.evals)])
            rows = eval_rows(rd)
            curves.setdefault(m, []).append(rows)
            summaries.setdefault(m, []).append(s)
            run_rows.append(dict(method=m, seed=seed, **{k: s[k] for k in (
                "eval_accuracy", "best_eval_accuracy", "initial_eval_accuracy", "steps",
                "wall_time_s", "eval_time_s", "forward_count", "backward_count",
                "peak_memory_bytes")}, hyperparameters=json.dumps(chosen[m])))
            curve_rows += [dict(method=m, seed=seed, step=r["step"], wall_time_s=r["wall_time_s"],
                                eval_accuracy=r["eval_accuracy"]) for r in rows]
            _write_csv(out / "runs.csv", run_rows)
            _write_csv(out / "curves.csv", curve_rows)

    # 3. analysis, figure, words
    a = analyse(curves, summaries)
    label = ("full protocol" if protocol_full else
             f"{args.budget_minutes:g}-minute budget, {len(args.seeds)} seed(s) of the 3 the "
             "protocol asks for" if args.budget_minutes >= 15 else
             "SHORTENED run, not the full protocol")
    desc = (f"{label}: {args.budget_minutes:g} min training budget per method, seeds "
            f"{' '.join(map(str, args.seeds))}, {args.num_train} training examples, sweep "
            + ("skipped" if args.skip_sweep else
               f"{args.sweep_minutes:g} min per setting on {args.sweep_holdout} held-out "
               "training examples" + (f", {args.sweep_parallel} settings at a time with "
                                      f"{sweep_threads} thread(s) each"
                                      if args.sweep_parallel > 1 else "")))
    plotting.plot_study(curves, out / "study.png",
                        title=f"MiniLM-L6 on SST-2 dev, equal wall-clock budget\n({desc})",
                        reference=a.get("mezo_best_mean_accuracy"),
                        reference_label="MeZO's best (mean)")
    summary = dict(description=desc, full_protocol=protocol_full,
                   budget_minutes=args.budget_minutes, seeds=args.seeds,
                   num_train=args.num_train, sweep_minutes=None if args.skip_sweep else
                   args.sweep_minutes, sweep_holdout=args.sweep_holdout,
                   chosen_hyperparameters=chosen, analysis=a,
                   # a --resume run only re-analyses finished runs: its own time says nothing
                   study_wall_time_s=None if args.resume else round(time.time() - t0, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = ["| method | hyperparameters | final dev acc | best dev acc | steps | forwards | "
             "backwards |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in args.methods:
        ss = summaries[m]
        n = len(ss)
        table.append(
            f"| {m} | {', '.join(f'{k}={v}' for k, v in chosen[m].items())} | "
            f"{sum(s['eval_accuracy'] for s in ss) / n:.3f} | "
            f"{sum(s['best_eval_accuracy'] for s in ss) / n:.3f} | "
            f"{sum(s['steps'] for s in ss) / n:.0f} | "
            f"{sum(s['forward_count'] for s in ss) / n:.0f} | "
            f"{sum(s['backward_count'] for s in ss) / n:.0f} |")
    shown, skip = [], False
    for word in (argv if argv is not None else sys.argv[1:]):
        if skip:
            skip = False
        elif word in ("--output", "--data"):
            skip = True  # machine-specific locations are not part of the protocol
        elif word != "--resume":
            shown.append(word)
    cmd = "python benchmarks/study_sst2.py " + " ".join(shown)
    md = "\n".join([f"**{desc}.**", "", f"Command: `{cmd.strip()}`", "",
                    f"Initial dev accuracy (new head, before training): "
                    f"{summaries[args.methods[0]][0]['initial_eval_accuracy']:.3f}.", "",
                    *table, "", "Outcome:", "", outcome_words(a, len(args.seeds)), ""])
    (out / "study.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
