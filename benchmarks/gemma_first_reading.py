"""The first SST-2 reading on Gemma 3 270M: does MeZO learn on a causal LM under the prompt
protocol, and where do FO-LoRA and Bilevel-ZOFO land at the same wall-clock budget? FO full
fine-tuning (Adam on every weight) at the same budget gives the ceiling of what training the
backbone can add on top of an adapter: FO full minus FO-LoRA.

One seed, a first reading (the full comparison is the estimator study's). The plan fits about
2 hours of a 2-core CPU machine:
  * model: Gemma 3 270M (``--model gemma3-270m``, float32) with the causal prompt head:
    "<sentence> It was" and the label words " terrible" / " great" read at the last position;
  * data: 1,000 examples drawn from ../shared/data/sst2/train.tsv (seed 0); accuracy on all
    872 sentences of dev.tsv; batch 8, at most 48 tokens (SST-2 sentences are shorter; a batch
    is trimmed to its longest sentence), 2 threads, one run at a time;
  * zero-shot: every run's first evaluation, raw and calibrated by the content-free input;
  * ZO rows use Rademacher directions: on this model a Gaussian MeZO step took 2.4 s against
    0.9 s for a Rademacher one (the Gaussian draw over 268 M weights, three sweeps a step,
    costs more than the two forwards), and the budget must give MeZO >= 1,000 steps;
  * equal budgets as step counts: the ``timing`` phase runs each method for TIMING_STEPS steps
    with the machine to itself; a method's steps in the reading are ``--budget-minutes``
    divided by its measured step time, so a reading run is the same run whatever else the
    machine does meanwhile (its own wall time is reported beside it);
  * MeZO's learning rate is chosen by the ``pilot`` phase: MEZO_LRS for PILOT_STEPS steps,
    scored on --holdout further training examples (never dev.tsv); FO-LoRA and Bilevel-ZOFO
    use zofo-train's defaults (the MiniLM study's choice), as does FO full (Adam, lr 3e-5).

Runs are archived as the SST-2 study's are (``study_sst2.RunArchive``: one runs.zip, a run the
archive holds is skipped, ``--commit`` commits it after every run), so the reading resumes run
by run. ``--phase report`` writes reading.md, reading.csv and reading.png. ``--phase ceiling``
chooses FO full's lr by the same held-out pilot (FO_FULL_LRS) and reruns FO full at it with the
reading's budget, so that FO full - FO-LoRA is read at a tuned lr.

  python benchmarks/gemma_first_reading.py --phase all --commit
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from study_sst2 import SST2_DEFAULT, RunArchive, write_csv  # noqa: E402

MODEL = "gemma3-270m"
METHODS = ("mezo", "fo-lora", "bilevel-zofo", "fo-full")
ZO_METHODS = ("mezo", "bilevel-zofo")
TIMING_STEPS = 8
PILOT_STEPS = 150
MEZO_LRS = (1e-5, 1e-6)  # zofo-train's default, and MeZO's value for OPT
# the sparse pilot (phase "sparse"): MeZO with sparse_fraction 0.2 beside the dense pilot,
# same data, seed and held-out examples; at lr 1e-6 as dense and at 5x (a fifth of the
# weights move, so the same lr moves the model less)
SPARSE_FRACTION = 0.2
SPARSE_LRS = (1e-6, 5e-6)
# the ceiling (phase "ceiling"): FO full's lr by the same held-out pilot (zofo-train's default
# 3e-5 overshot in the reading: best 0.868 at step 108, then 0.808), then FO full at the chosen
# lr with the reading's budget on dev, so FO full - FO-LoRA is read at a tuned lr
FO_FULL_LRS = (3e-5, 1e-5, 3e-6)
FO_FULL_DEFAULT_LR = 3e-5
COMMON = ["--batch-size", "8", "--max-length", "48", "--threads", "2", "--seed", "0",
          "--data-seed", "0", "--num-train", "1000", "--no-save", "--no-progress"]


class Reading:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.archive = RunArchive(self.out / "runs.zip")

    # -- running ---------------------------------------------------------------------------
    def run(self, name: str, method: str, flags: list) -> dict:
        """One zofo-train run in its own process unless the archive holds it; archived (and
        committed with --commit) once it finishes."""
        done = self.summary(name)
        if done is not None:
            return done
        a = self.args
        scratch = Path(tempfile.mkdtemp(prefix=f"zofo-reading-{name}-"))
        rd = scratch / name
        if method in ZO_METHODS:
            flags = ["--distribution", "rademacher", *flags]
        launcher = [sys.executable, "-P", "-m", "zofo_kernels.apps.train"]
        cmd = [*launcher, "--model", MODEL, "--method", method,
               "--train", _rel(a.data / "train.tsv"), *COMMON, *flags, "--output", str(rd)]
        log = scratch / "log.txt"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd[len(launcher):])}",
              flush=True)
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1",
                                         PYTHONPATH=str(a.code or ROOT))).returncode
        if rc != 0 or not (rd / "summary.json").is_file():
            raise RuntimeError(f"run {name} failed (exit {rc}; files kept in {scratch}):\n"
                               + log.read_text()[-2000:])
        (rd / "command.txt").write_text(shlex.join(["zofo-train"] + cmd[len(launcher):])
                                        .replace(str(rd), f"runs/{name}") + "\n")
        if self.archive.add_run(name, rd) and a.commit:
            _commit(self.archive.path, f"gemma first reading: run {name}")
        shutil.rmtree(scratch, ignore_errors=True)
        return self.summary(name)

    def timing(self):
        for m in METHODS:
            self.run(f"timing_{m}", m, ["--steps", str(TIMING_STEPS), "--eval-every-steps",
                                        "1000000", "--eval-max", "16",
                                        "--eval", _rel(self.args.data / "dev.tsv")])

    def step_seconds(self, method: str) -> float:
        s = self.summary(f"timing_{method}")
        if s is None:
            raise SystemExit("gemma_first_reading: run the timing phase first")
        return s["wall_time_s"] / s["steps"]

    def pilot(self):
        every = str(PILOT_STEPS // 3)
        for lr in MEZO_LRS:
            self.run(f"pilot_mezo_lr{lr:g}", "mezo",
                     ["--lr", f"{lr:g}", "--steps", str(PILOT_STEPS), "--eval-every-steps",
                      every, "--holdout", str(self.args.holdout)])

    def sparse(self):
        every = str(PILOT_STEPS // 3)
        for lr in SPARSE_LRS:
            self.run(f"pilot_mezo-sparse_lr{lr:g}", "mezo",
                     ["--sparse-fraction", f"{SPARSE_FRACTION:g}", "--lr", f"{lr:g}", "--steps",
                      str(PILOT_STEPS), "--eval-every-steps", every, "--holdout",
                      str(self.args.holdout)])

    def ceiling(self):
        every = str(PILOT_STEPS // 3)
        for lr in FO_FULL_LRS:
            self.run(f"pilot_fo-full_lr{lr:g}", "fo-full",
                     ["--lr", f"{lr:g}", "--steps", str(PILOT_STEPS), "--eval-every-steps",
                      every, "--holdout", str(self.args.holdout)])
        lr = self.pilot_best("pilot_fo-full", FO_FULL_LRS, "ceiling")
        if lr != FO_FULL_DEFAULT_LR:  # at the default lr the reading's run is the ceiling run
            n = self.steps("fo-full")
            self.run(f"ceiling_fo-full_lr{lr:g}", "fo-full",
                     ["--lr", f"{lr:g}", "--steps", str(n), "--eval-every-steps",
                      str(max(1, n // self.args.evals)), "--eval",
                      _rel(self.args.data / "dev.tsv")])

    def ceiling_run(self):
        """The summary of FO full at the pilot's lr on dev, or None (not run yet)."""
        try:
            lr = self.pilot_best("pilot_fo-full", FO_FULL_LRS, "ceiling")
        except SystemExit:
            return None
        if lr == FO_FULL_DEFAULT_LR:
            return self.summary("reading_fo-full")
        return self.summary(f"ceiling_fo-full_lr{lr:g}")

    def pilot_best(self, prefix: str, lrs, phase: str) -> float:
        """The lr whose pilot run ``{prefix}_lr{X}`` ends highest on the held-out examples
        (ties: the higher best)."""
        scored = []
        for lr in lrs:
            s = self.summary(f"{prefix}_lr{lr:g}")
            if s is None:
                raise SystemExit(f"gemma_first_reading: run the {phase} phase first")
            scored.append(((s["eval_accuracy"], s["best_eval_accuracy"]), lr))
        return max(scored)[1]

    def mezo_lr(self) -> float:
        return self.pilot_best("pilot_mezo", MEZO_LRS, "pilot")

    def steps(self, method: str) -> int:
        return int(self.args.budget_minutes * 60 / self.step_seconds(method))

    def reading(self):
        for m in METHODS:
            n = self.steps(m)
            flags = ["--steps", str(n), "--eval-every-steps", str(max(1, n // self.args.evals)),
                     "--eval", _rel(self.args.data / "dev.tsv")]
            if m == "mezo":
                flags += ["--lr", f"{self.mezo_lr():g}"]
            self.run(f"reading_{m}", m, flags)

    # -- reading the archive ---------------------------------------------------------------
    def summary(self, name):
        raw = self.archive.read(f"{name}/summary.json")
        return json.loads(raw) if raw is not None else None

    def evals(self, name):
        raw = self.archive.read(f"{name}/metrics.jsonl")
        return [r for r in map(json.loads, raw.decode().splitlines()) if r["kind"] == "eval"]

    # -- report ----------------------------------------------------------------------------
    def report(self):
        runs = {m: self.summary(f"reading_{m}") for m in METHODS}
        runs = {m: s for m, s in runs.items() if s is not None}
        if not runs:
            raise SystemExit("gemma_first_reading: no reading run yet")
        first = next(iter(runs.values()))
        raw, cal = first["initial_eval_accuracy"], first["initial_eval_accuracy_calibrated"]
        md = ["# Gemma 3 270M on SST-2: the first reading", "",
              f"One seed; {first['num_train']} training examples; all {first['eval_examples']} "
              f"dev sentences; batch 8, <= 48 tokens, float32, 2 threads; equal budgets of "
              f"{self.args.budget_minutes:g} min of training as step counts from step times "
              "measured with the machine alone (timing phase). ZO rows: Rademacher directions. "
              "Command: `python benchmarks/gemma_first_reading.py --phase all`.", "",
              "| row | steps | forwards | backwards | final | best | vs calibrated zero-shot "
              "| training wall (s) | step time alone (s) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| zero-shot | 0 | | | {raw:.3f} | | | | |",
              f"| zero-shot, calibrated ('N/A') | 0 | | | {cal:.3f} | | 0 | | |"]
        rows = [dict(row="zero-shot", final=raw), dict(row="zero-shot calibrated", final=cal)]
        for m, s in runs.items():
            gain = s["eval_accuracy"] - cal
            md.append(f"| {m} | {s['steps']} | {s['forward_count']} | {s['backward_count']} | "
                      f"{s['eval_accuracy']:.3f} | {s['best_eval_accuracy']:.3f} | "
                      f"{gain:+.3f} | {s['wall_time_s']:.0f} | {self.step_seconds(m):.3f} |")
            rows.append(dict(row=m, steps=s["steps"], forwards=s["forward_count"],
                             backwards=s["backward_count"], final=s["eval_accuracy"],
                             best=s["best_eval_accuracy"], gain_over_calibrated=gain,
                             wall_time_s=s["wall_time_s"], lr=s["hyperparameters"]["lr"]))
        md += ["", "The training wall column is each run's own clock: where other processes "
               "shared the machine it is longer than the budget, which is why the budget is "
               "a step count and the figure's time axis is steps x step time measured alone. "
               "Sittings: " + (self.args.note or "not recorded") + ".", "",
               self._pilot_text(), "", "Curves: `reading.png` (dev accuracy against training "
               "time and against forward passes).", ""]
        md += self._verdicts(runs, cal)
        md += self._ceiling_text(runs)
        (self.out / "reading.md").write_text("\n".join(md) + "\n")
        write_csv(self.out / "reading.csv", rows)
        self._plot(runs, raw, cal)
        print("\n".join(md))

    @staticmethod
    def _verdicts(runs, cal) -> list:
        acc = {m: s["eval_accuracy"] for m, s in runs.items()}
        out = []
        if "mezo" in acc:
            gain = acc["mezo"] - cal
            out.append(f"MeZO learns on this model within the budget (>= 0.05 above calibrated "
                       f"zero-shot): **{'yes' if gain >= 0.05 else 'no'}** ({gain:+.3f}).")
        if "fo-full" in acc and "fo-lora" in acc:
            ceiling = acc["fo-full"] - acc["fo-lora"]
            lr = runs["fo-full"]["hyperparameters"]["lr"]
            out += ["", f"FO full minus FO-LoRA at this budget (the room training the backbone "
                    f"has on top of an adapter): **{ceiling:+.3f}** ({acc['fo-full']:.3f} - "
                    f"{acc['fo-lora']:.3f}; best {runs['fo-full']['best_eval_accuracy']:.3f} "
                    f"against {runs['fo-lora']['best_eval_accuracy']:.3f}). FO full ran at "
                    f"zofo-train's default lr ({lr:g}, chosen on MiniLM), not tuned on this "
                    "model, so this reads a lower bound of the ceiling, not the ceiling."]
            if "bilevel-zofo" in acc and ceiling > 0:
                share = (acc["bilevel-zofo"] - acc["fo-lora"]) / ceiling
                out.append(f"Bilevel-ZOFO minus FO-LoRA, as a fraction of that ceiling: "
                           f"{share:+.2f}.")
        return out

    def _ceiling_text(self, runs) -> list:
        pilot = self._pilot_results("pilot_fo-full", FO_FULL_LRS)
        if not pilot:
            return []
        out = ["", f"FO full's lr by the held-out pilot (phase `ceiling`, {PILOT_STEPS} steps, "
               f"{self.args.holdout} held-out training examples): " + "; ".join(pilot) + "."]
        s = self.ceiling_run()
        if s is not None and "fo-lora" in runs:
            lora = runs["fo-lora"]
            lr = s["hyperparameters"]["lr"]
            out.append(f"FO full at lr {lr:g} with the reading's budget ({s['steps']} steps): "
                       f"{s['eval_accuracy']:.3f} on dev (best {s['best_eval_accuracy']:.3f}); "
                       f"**the ceiling FO full - FO-LoRA = "
                       f"{s['eval_accuracy'] - lora['eval_accuracy']:+.3f}** (best against best "
                       f"{s['best_eval_accuracy'] - lora['best_eval_accuracy']:+.3f}).")
        return out

    def _pilot_results(self, prefix: str, lrs) -> list:
        """'lr X: final (best Y)' of each archived pilot run ``{prefix}_lr{X}``."""
        out = []
        for lr in lrs:
            s = self.summary(f"{prefix}_lr{lr:g}")
            if s is not None:
                out.append(f"lr {lr:g}: {s['eval_accuracy']:.3f} (best "
                           f"{s['best_eval_accuracy']:.3f})")
        return out

    def _pilot_text(self) -> str:
        parts = self._pilot_results("pilot_mezo", MEZO_LRS)
        if not parts:
            return ""
        text = (f"MeZO's lr, chosen by the pilot ({PILOT_STEPS} steps, accuracy on "
                f"{self.args.holdout} held-out training examples): " + "; ".join(parts) + ".")
        sparse = self._pilot_results("pilot_mezo-sparse", SPARSE_LRS)
        if sparse:
            text += (f" The same pilot with sparse perturbation (`--sparse-fraction "
                     f"{SPARSE_FRACTION:g}`, phase `sparse`, not part of the reading): "
                     + "; ".join(sparse) + ".")
        return text

    def _plot(self, runs, raw, cal):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for m in runs:
            ev = self.evals(f"reading_{m}")
            per_step = self.step_seconds(m) / 60  # the budget's clock, not the run's own
            axes[0].plot([r["step"] * per_step for r in ev], [r["eval_accuracy"] for r in ev],
                         marker="o", label=m)
            axes[1].plot([r["forward_count"] for r in ev], [r["eval_accuracy"] for r in ev],
                         marker="o", label=m)
        for ax in axes:
            ax.axhline(raw, color="grey", ls=":", label="zero-shot")
            ax.axhline(cal, color="grey", ls="--", label="zero-shot, calibrated")
            ax.grid(alpha=0.3)
        axes[0].set_xlabel("training time (min): steps x step time measured alone")
        axes[1].set_xlabel("forward passes")
        axes[0].set_ylabel("SST-2 dev accuracy (872)")
        axes[0].legend(fontsize=8)
        fig.suptitle("Gemma 3 270M, prompt head, 1,000 SST-2 examples, one seed")
        fig.tight_layout()
        fig.savefig(self.out / "reading.png", dpi=120)
        plt.close(fig)


def _rel(path: Path) -> str:
    rel = os.path.relpath(path, ROOT)
    return rel if rel.startswith("..") and rel.count("..") == 1 else str(path)


def _commit(path: Path, message: str):
    for _ in range(20):
        if (subprocess.run(["git", "add", str(path)], cwd=str(ROOT)).returncode == 0
                and subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)],
                                   cwd=str(ROOT)).returncode == 0):
            return
        time.sleep(3)
    raise RuntimeError(f"could not commit {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--phase", default="all",
                   choices=("timing", "pilot", "reading", "sparse", "ceiling", "report", "all"))
    p.add_argument("--budget-minutes", type=float, default=17.0,
                   help="training budget of each reading run (17 min: MeZO makes > 1,000 "
                        "steps at ~0.9 s a step)")
    p.add_argument("--evals", type=int, default=6, help="evaluations per reading run")
    p.add_argument("--holdout", type=int, default=300)
    p.add_argument("--note", default=None,
                   help="report: how the runs shared the machine (written into reading.md)")
    p.add_argument("--data", type=Path, default=SST2_DEFAULT)
    p.add_argument("--output", type=Path,
                   default=ROOT / "benchmarks" / "results" / "gemma3-270m" / "first_reading")
    p.add_argument("--commit", action="store_true",
                   help="git-commit the run archive after every finished run")
    p.add_argument("--code", type=Path, default=None,
                   help="import zofo_kernels from this copy of the repository (so the tree "
                        "can change while the reading runs)")
    args = p.parse_args(argv)
    r = Reading(args)
    phases = ("timing", "pilot", "reading") if args.phase == "all" else (args.phase,)
    for phase in phases:
        if phase != "report":
            getattr(r, phase)()
    r.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
