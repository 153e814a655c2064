"""Study v3 on SST-2: is there room for the backbone's ZO step, and do the new estimators use it?

Study v2 (``study_sst2.py``) found Bilevel-ZOFO's ZO step worth nothing over its lr-0
ablation on MiniLM with 1,000 examples, where FO full fine-tuning beats FO-LoRA by only 0.011
(the *ceiling*: the most training the backbone can add on top of an adapter). Study v3 asks
the two questions in order, with study v2's protocol (MiniLM-L6 with the prompt head, batch
16, 64 tokens, one thread per run, two runs at a time, dev.tsv) and its chosen settings:

  ceiling  FO full and FO-LoRA on CEILING_SIZES training examples (seed 0): where is the
           ceiling clearly larger than on 1,000?
  theta    at the size with the largest ceiling (``--theta-size`` to choose another),
           Bilevel-ZOFO with each theta update (THETA_ROWS) beside its lr-0 ablation
           (seed 0; ``--seeds`` for more): each gain over lr 0, as a fraction of the ceiling.
  gemma-pilot  Gemma 3 270M, the first reading's protocol (benchmarks/gemma_first_reading.py:
           1,000 examples, batch 8, 48 tokens, 2 threads, Rademacher directions): FZOO's lr
           by the first reading's held-out pilot at its forward count (FZOO_LRS);
  gemma-mezo   MeZO's estimators at the first reading's MeZO budget in forward passes: sparse
           perturbation (lr by the first reading's sparse pilot) and FZOO (lr by gemma-pilot),
           beside the first reading's plain MeZO run: does either reach plain MeZO's final
           accuracy in at most half its forward passes?
  report   tables, figures and the reading (study.md) from whatever runs the archives hold.

Budgets are step counts, not minutes: each row gets the steps its row made in study v2's
25-minute runs under the same load (two one-thread runs on two cores), read from study v2's
archive (mean over its seeds). So a run's result does not depend on what else the machine
did while it ran, and "equal steps" here is study v2's equal wall-clock budget. Runs are kept
in ``runs.zip`` and skipped on a re-run, exactly as in study v2 (``study_sst2.RunArchive``).

  python benchmarks/study_v3.py --phase ceiling --commit
  python benchmarks/study_v3.py --phase theta --commit
  python benchmarks/study_v3.py --phase gemma-mezo --commit     # runs gemma-pilot first
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gemma_first_reading as first  # noqa: E402  (Gemma's protocol and its runs)
import study_sst2  # noqa: E402  (the run archive, the run launcher, the report helpers)

RESULTS = study_sst2.ROOT / "benchmarks" / "results"
V2 = RESULTS / "study_v2"
# 8,000: study v2's data phase; 67,349: every row of train.tsv
CEILING_SIZES = (8000, 67349)
CEILING_ROWS = ("fo-full", "fo-lora")
# theta's step rules at study v2's chosen Bilevel-ZOFO setting, each set before any run:
#   rms     the default (study v2's row): theta's step shrank ~100x over a run as the loss fell
#   std     FZOO's normalised step on 2 directions: judged on the step's own spread of slopes
#   sparse  Sparse-MeZO: each step perturbs and moves the 20% of each tensor's weights of
#           smallest magnitude (lr unchanged: under a normalised update a moved weight
#           moves by about lr whatever the fraction)
#   zo0     theta's lr 0: the ablation every row is read against
THETA_ROWS = {
    "rms": {},
    "std": {"theta_update": "std", "n_directions": 2},
    "sparse": {"sparse_fraction": 0.2},
    "zo0": {"lr": 0.0},
}
# run order: each candidate beside the ablation first, so a partial sitting answers something
THETA_ORDER = ("std", "zo0", "rms", "sparse")
# every run's model-selection loss reads the first 1,000 examples of D_f: every evaluation
# computes it, and on all of D_f (22,450 examples at 67,349) it would cost more than training
SELECT_MAX = 1000
# Gemma's MeZO rows. FZOO: 4 one-sided Rademacher directions from one unperturbed loss (5
# forwards a step), the step scaled by the spread of the 4 slopes. Its step moves a weight by
# about 0.4 lr whatever the loss's scale; plain MeZO's (lr 1e-6) by lr |g|, with |g| about 140
# at the start on this model (estimators/gemma3-270m.md: update norm / sqrt(d)), i.e. 1.4e-4:
# FZOO's lr matching it is about 3e-4, the pilot brackets it.
FZOO_FLAGS = ["--estimator", "forward", "--n-directions", "4", "--normalize", "std"]
FZOO_FORWARDS_PER_STEP = 5
FZOO_LRS = (1e-4, 3e-4, 1e-3)
GEMMA_FIRST = RESULTS / "gemma3-270m" / "first_reading"


def v2_steps(row: str) -> int:
    """The mean step count of ``row`` over study v2's main-phase seeds (its 25-minute
    budget under the load this study runs with); Bilevel-ZOFO's from v2's data phase, whose
    runs had 8,000 examples like this study's."""
    archive = study_sst2.RunArchive(V2 / study_sst2.ARCHIVE)
    names = ([n for n in archive.runs() if n.startswith(f"main_{row}_seed")] if
             row != "bilevel-zofo" else
             [n for n in archive.runs() if n.startswith("data8000_bilevel-zofo")])
    if not names:
        raise SystemExit(f"study_v3: {archive.path} holds no {row} runs to read a budget from")
    return round(statistics.fmean(json.loads(archive.read(f"{n}/summary.json"))["steps"]
                                  for n in names))


def v2_chosen() -> dict:
    return json.loads((V2 / "chosen_hyperparameters.json").read_text())


class StudyV3(study_sst2.Study):
    # -- phases ----------------------------------------------------------------------------
    def ceiling_phase(self):
        chosen = v2_chosen()
        jobs = [(f"ceiling{n}_{row}_seed0", row, dict(chosen[row], select_max=SELECT_MAX), 0, False,
                 dict(steps=v2_steps(row), num_train=n))
                for n in CEILING_SIZES for row in CEILING_ROWS]
        self.run_all(jobs)

    def ceilings(self) -> dict:
        """Size -> (FO full's summary, FO-LoRA's summary, final-accuracy ceiling), for the
        sizes whose pair has finished."""
        out = {}
        for n in CEILING_SIZES:
            full, lora = (self.summary(f"ceiling{n}_{row}_seed0") for row in CEILING_ROWS)
            if full is not None and lora is not None:
                out[n] = (full, lora, full["eval_accuracy"] - lora["eval_accuracy"])
        return out

    def late_mean(self, name: str) -> float:
        """Mean dev accuracy over the run's evaluations in the last third of its budget: a
        single evaluation swings by up to 0.03 between neighbouring steps (FO full on 67k
        examples: 0.872 at step 1944, 0.838 at 1955), their mean much less."""
        evals = self.rows(name, "eval")
        end = evals[-1]["step"]
        return statistics.fmean(r["eval_accuracy"] for r in evals
                                if r["step"] > 0 and 3 * r["step"] >= 2 * end)

    def theta_size(self) -> int:
        if self.args.theta_size:
            return self.args.theta_size
        ceilings = self.ceilings()
        if not ceilings:
            raise SystemExit("study_v3: the theta phase needs a finished ceiling pair first "
                             "(--phase ceiling) or --theta-size")
        return max(ceilings, key=lambda n: ceilings[n][2])

    @staticmethod
    def theta_name(size: int, rule: str, seed: int) -> str:
        return f"theta{size}_{rule}_seed{seed}"

    def theta_phase(self):
        base = v2_chosen()["bilevel-zofo"]
        steps, n = v2_steps("bilevel-zofo"), self.theta_size()
        self.run_all([(self.theta_name(n, rule, seed), "bilevel-zofo",
                       dict(base, **THETA_ROWS[rule], select_max=SELECT_MAX),
                       seed, False, dict(steps=steps, num_train=n))
                      for seed in self.args.seeds for rule in THETA_ORDER
                      if rule in (self.args.rules or THETA_ORDER)])

    # -- Gemma's MeZO rows -----------------------------------------------------------------
    def gemma(self) -> "first.Reading":
        """A first-reading runner whose archive is this study's ``gemma3-270m/runs.zip``."""
        a = self.args
        return first.Reading(argparse.Namespace(
            output=self.out / "gemma3-270m", data=a.data, code=a.code, commit=a.commit,
            holdout=300, evals=6, budget_minutes=17.0, note=None))

    @staticmethod
    def first_reading() -> "first.Reading":
        """The first reading's own archive (plain MeZO's run, the pilots), read only."""
        return first.Reading(argparse.Namespace(output=GEMMA_FIRST, commit=False))

    def gemma_pilot_phase(self):
        g, steps = self.gemma(), first.PILOT_STEPS * 2 // FZOO_FORWARDS_PER_STEP
        for lr in FZOO_LRS:
            g.run(f"pilot_mezo-fzoo_lr{lr:g}", "mezo",
                  [*FZOO_FLAGS, "--lr", f"{lr:g}", "--steps", str(steps), "--eval-every-steps",
                   str(steps // 3), "--holdout", "300"])

    def gemma_mezo_phase(self):
        self.gemma_pilot_phase()
        g, ref = self.gemma(), self.first_reading()
        forwards = ref.summary("reading_mezo")["forward_count"]
        rows = {"mezo-sparse": (ref.pilot_best("pilot_mezo-sparse", first.SPARSE_LRS, "sparse"),
                                ["--sparse-fraction", f"{first.SPARSE_FRACTION:g}"], 2),
                "mezo-fzoo": (g.pilot_best("pilot_mezo-fzoo", FZOO_LRS, "gemma-pilot"),
                              FZOO_FLAGS, FZOO_FORWARDS_PER_STEP)}
        for row, (lr, flags, per_step) in rows.items():
            n = forwards // per_step
            g.run(f"gemma_{row}", "mezo",
                  [*flags, "--lr", f"{lr:g}", "--steps", str(n), "--eval-every-steps",
                   str(max(1, n // 6)), "--eval", study_sst2._rel(self.args.data / "dev.tsv")])

    # -- report ----------------------------------------------------------------------------
    def report(self):
        md = [f"# SST-2 study `{self.out.name}`", "",
              "MiniLM-L6 (pretrained) with the prompt head, study v2's protocol and chosen "
              "settings; 1 thread per run, 2 runs at a time on a 2-core machine; dev.tsv (872 "
              "sentences). Budgets are the step counts each row made in study v2's 25-minute "
              "runs under that load (mean over its seeds), so results do not depend on the "
              "machine's load while they ran.", ""]
        md += self._ceiling_section() + self._theta_section() + self._gemma_section()
        (self.out / "study.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))

    def _ceiling_section(self):
        ceilings = self.ceilings()
        if not ceilings:
            return []
        v2 = {row: statistics.fmean(
            json.loads(study_sst2.RunArchive(V2 / study_sst2.ARCHIVE).read(
                f"main_{row}_seed{sd}/summary.json"))["eval_accuracy"] for sd in (0, 1, 2))
            for row in CEILING_ROWS}
        lines = ["## The ceiling: FO full minus FO-LoRA at an equal budget (seed 0)", "",
                 "| training examples | FO full: final, best, late mean | FO-LoRA: final, "
                 "best, late mean | ceiling: final, best, late mean | FO full steps | FO-LoRA "
                 "steps |", "|---:|---:|---:|---:|---:|---:|",
                 f"| 1,000 (study v2, 3 seeds) | {v2['fo-full']:.3f} | {v2['fo-lora']:.3f} | "
                 f"{v2['fo-full'] - v2['fo-lora']:+.3f} | | |"]
        curves = {}
        for n, (full, lora, gap) in ceilings.items():
            late = [self.late_mean(f"ceiling{n}_{row}_seed0") for row in CEILING_ROWS]
            lines.append(
                f"| {n:,} | {full['eval_accuracy']:.3f}, {full['best_eval_accuracy']:.3f}, "
                f"{late[0]:.3f} | {lora['eval_accuracy']:.3f}, {lora['best_eval_accuracy']:.3f}"
                f", {late[1]:.3f} | {gap:+.3f}, "
                f"{full['best_eval_accuracy'] - lora['best_eval_accuracy']:+.3f}, "
                f"{late[0] - late[1]:+.3f} | {full['steps']} | {lora['steps']} |")
            curves[f"{n:,} examples"] = {row: self.rows(f"ceiling{n}_{row}_seed0", "eval")
                                         for row in CEILING_ROWS}
        _plot_curves(curves, self.out / "ceiling.png",
                     "MiniLM on SST-2 dev: FO full and FO-LoRA by training-set size", x="budget")
        best = max(ceilings, key=lambda n: ceilings[n][2])
        lines += ["", f"Largest ceiling (final accuracies, the rule the theta phase's size "
                  f"follows): {ceilings[best][2]:+.3f} at {best:,} examples. One seed; a final "
                  "accuracy is one evaluation (study v2's seed-to-seed sd of a final accuracy is "
                  "about 0.01), the late mean is the mean over the evaluations in the last "
                  "third of the budget. Curves: `ceiling.png` (x: the fraction of the equal "
                  "budget)."]
        v2_data = self._v2_data_gain()
        if v2_data is not None and v2_data[0] in ceilings and ceilings[v2_data[0]][2] > 0:
            n, gain = v2_data
            lines += ["", f"Study v2's data phase ({n:,} examples, seed 0, 25 min each): "
                      f"Bilevel-ZOFO minus its lr-0 ablation {gain:+.3f}, "
                      f"{gain / ceilings[n][2]:+.2f} of this ceiling."]
        return lines + [""]

    @staticmethod
    def _v2_data_gain():
        """(size, Bilevel-ZOFO minus lr 0) of study v2's data phase, None if absent."""
        archive = study_sst2.RunArchive(V2 / study_sst2.ARCHIVE)
        n = study_sst2.DATA_NUM_TRAIN
        pair = [archive.read(f"data{n}_{row}_seed0/summary.json")
                for row in ("bilevel-zofo", "bilevel-zofo-zo0")]
        if None in pair:
            return None
        on, off = (json.loads(raw)["eval_accuracy"] for raw in pair)
        return n, on - off

    def _theta_section(self):
        n = self.args.theta_size or (self.theta_size() if self.ceilings() else None)
        if n is None:
            return []
        runs = {rule: [(sd, self.summary(self.theta_name(n, rule, sd))) for sd in self.args.seeds]
                for rule in THETA_ORDER}
        runs = {rule: [(sd, s) for sd, s in v if s is not None] for rule, v in runs.items()}
        runs = {rule: v for rule, v in runs.items() if v}
        if not runs:
            return []
        ceiling = self.ceilings().get(n, (None, None, None))[2]
        zero = {sd: s["eval_accuracy"] for sd, s in runs.get("zo0", [])}
        lines = [f"## Bilevel-ZOFO's theta update beside its lr-0 ablation ({n:,} examples, "
                 f"{v2_steps('bilevel-zofo')} outer steps)", "",
                 "| theta update | seeds | final | best | late mean | forwards | minus lr 0 "
                 "(same seeds): final, late mean | fraction of the ceiling: final, late mean | "
                 "theta's RMS step per weight, first / last 50 outer steps |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        late = {rule: {sd: self.late_mean(self.theta_name(n, rule, sd)) for sd, _ in v}
                for rule, v in runs.items()}
        late_ceiling = (self.late_mean(f"ceiling{n}_fo-full_seed0")
                        - self.late_mean(f"ceiling{n}_fo-lora_seed0")
                        if ceiling is not None else None)
        for rule, v in runs.items():
            finals = [s["eval_accuracy"] for _, s in v]
            paired = [(s["eval_accuracy"] - zero[sd], late[rule][sd] - late["zo0"][sd])
                      for sd, s in v if sd in zero]
            gains = ([statistics.fmean(g[i] for g in paired) for i in (0, 1)]
                     if paired and rule != "zo0" else None)
            frac = ", ".join(f"{g / c:+.2f}" if c else "n/a"
                             for g, c in zip(gains, (ceiling, late_ceiling))) if gains else ""
            steps = [[r["theta_step_rms"] for r in self.rows(self.theta_name(n, rule, sd),
                                                             "bilevel")] for sd, _ in v]
            first, last = (statistics.fmean(x for rs in steps for x in rs[sl])
                           for sl in (slice(0, 50), slice(-50, None)))
            lines.append(
                f"| {rule} | {len(v)} | {study_sst2._ms(finals)} | "
                f"{study_sst2._ms(s['best_eval_accuracy'] for _, s in v)} | "
                f"{study_sst2._ms(late[rule].values())} | "
                f"{statistics.fmean(s['forward_count'] for _, s in v):.0f} | "
                f"{'' if gains is None else f'{gains[0]:+.3f}, {gains[1]:+.3f}'} | {frac} | "
                f"{first:.1e} / {last:.1e} |")
        panels = {f"seed {sd}": {rule: self.rows(self.theta_name(n, rule, sd), "eval")
                                 for rule, v in runs.items() if sd in dict(v)}
                  for sd in self.args.seeds if any(sd in dict(v) for v in runs.values())}
        _plot_curves(panels, self.out / "theta.png",
                     f"Bilevel-ZOFO on SST-2 dev, {n:,} examples: theta's update rule",
                     x="budget")
        study_sst2._plot_diagnostics(
            {f"{rule} seed {sd}": self.rows(self.theta_name(n, rule, sd), "bilevel")
             for rule, v in runs.items() for sd, _ in v}, self.out / "theta_diagnostics.png")
        where = (f"{ceiling:+.3f} (late mean {late_ceiling:+.3f})" if ceiling is not None
                 else "not measured at this size")
        lines += ["", f"The ceiling at this size: {where}. Theta's settings beyond the row's "
                  "own: " + "; ".join(f"{r}: {study_sst2._hp_text(hp) or 'none'}"
                                      for r, hp in THETA_ROWS.items()) +
                  f" (on top of {study_sst2._hp_text(v2_chosen()['bilevel-zofo'])}). "
                  "Curves: `theta.png`; inside the steps (projected gradient, gap g_P - g_S, "
                  "theta's RMS step): `theta_diagnostics.png`.", ""]
        return lines


    def _gemma_section(self):
        if not (self.out / "gemma3-270m" / "runs.zip").is_file():
            return []
        g, ref = self.gemma(), self.first_reading()
        runs = {"mezo (plain)": (ref, "reading_mezo")}
        runs.update({row: (g, f"gemma_{row}") for row in ("mezo-sparse", "mezo-fzoo")})
        runs = {row: (r, name, r.summary(name)) for row, (r, name) in runs.items()}
        runs = {row: v for row, v in runs.items() if v[2] is not None}
        pilot = g._pilot_results("pilot_mezo-fzoo", FZOO_LRS)
        if len(runs) < 2 and not pilot:
            return []
        plain = runs["mezo (plain)"][2]
        target, budget = plain["eval_accuracy"], plain["forward_count"]
        lines = ["## Gemma 3 270M: MeZO's estimators at equal forward passes (seed 0, dev)", "",
                 "The first reading's protocol (1,000 examples, batch 8, <= 48 tokens, 2 "
                 "threads, Rademacher directions); plain MeZO is the first reading's run. A "
                 "FZOO step takes 5 forwards in 1.14x their time and a MeZO step 2 in 1.16x "
                 "(zofo-bench on this model), so equal forwards is equal time to within a few "
                 "per cent.", "",
                 "| row | lr | steps | forwards | final | best | forwards to plain MeZO's final "
                 f"({target:.3f}) | fraction of plain MeZO's {budget} |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        curves = {}
        for row, (r, name, s) in runs.items():
            evals = r.evals(name)
            curves[row] = evals
            hit = next((e["forward_count"] for e in evals if e["eval_accuracy"] >= target
                        and e["step"] > 0), None)
            reach = ("not reached |" if hit is None else f"{hit} | {hit / budget:.2f}")
            lines.append(f"| {row} | {s['hyperparameters']['lr']:g} | {s['steps']} | "
                         f"{s['forward_count']} | {s['eval_accuracy']:.3f} | "
                         f"{s['best_eval_accuracy']:.3f} | {reach} |")
        if pilot:
            lines += ["", f"FZOO's lr by the held-out pilot ({first.PILOT_STEPS * 2} forwards, "
                      "300 held-out training examples, as the first reading's MeZO pilot): "
                      + "; ".join(pilot) + "."]
        if len(curves) > 1:
            _plot_curves({"seed 0": curves}, self.out / "gemma_mezo.png",
                         "Gemma 3 270M on SST-2 dev: MeZO's estimators", x="forwards")
            lines += ["", "Curves: `gemma_mezo.png` (dev accuracy against forward passes)."]
        return lines + [""]


def _plot_curves(panels: dict, path: Path, title: str, x: str) -> None:
    """One panel per entry of ``panels`` (title -> {series: eval rows}): dev accuracy against
    ``x``: "budget" (the step as a fraction of the run's own last step: the fraction of the
    equal budget) or "forwards" (forward passes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 4.2),
                             squeeze=False)
    colors = study_sst2.plotting.method_colors([s for v in panels.values() for s in v])
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, rows in series.items():
            end = max(r["step"] for r in rows) or 1
            xs = [r["step"] / end if x == "budget" else r["forward_count"] for r in rows]
            ax.plot(xs, [r["eval_accuracy"] for r in rows], marker="o", ms=3,
                    color=colors[name], label=name)
        ax.set_title(panel)
        ax.set_xlabel("fraction of the equal budget (steps)" if x == "budget"
                      else "forward passes")
        ax.set_ylabel("dev accuracy (872)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--phase", default="report",
                   choices=("ceiling", "theta", "gemma-pilot", "gemma-mezo", "report"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--theta-size", type=int, default=None,
                   help="training examples of the theta phase (default: the ceiling phase's "
                        "size with the largest ceiling)")
    p.add_argument("--rules", nargs="+", default=None, choices=THETA_ORDER,
                   help="theta phase: run only these theta rules (a sitting's share)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--evals", type=int, default=12, help="evaluations per run")
    p.add_argument("--data", type=Path, default=study_sst2.SST2_DEFAULT)
    p.add_argument("--output", type=Path, default=RESULTS / "study_v3")
    p.add_argument("--commit", action="store_true",
                   help="git-commit the run archive after every finished run")
    p.add_argument("--code", type=Path, default=None,
                   help="import zofo_kernels from this copy of the repository instead of "
                        "the working tree (so the tree can change while a study runs)")
    args = p.parse_args(argv)
    # what study_sst2.Study.run reads and this study fixes: study v2's model and holdout
    args.model, args.holdout, args.num_train = "minilm", 500, 1000
    # study v2's 25-minute budget, which the step counts stand for (every run here has steps)
    args.budget_minutes = args.sweep_minutes = 25.0
    if args.phase != "report":
        for f in ("train.tsv", "dev.tsv"):
            if not (args.data / f).is_file():
                raise SystemExit(f"study_v3: {args.data / f} not found (SST-2 is expected at "
                                 "../shared/data/sst2 next to the repository)")
    study = StudyV3(args)
    if args.phase == "ceiling":
        study.ceiling_phase()
    elif args.phase == "theta":
        study.theta_phase()
    elif args.phase == "gemma-pilot":
        study.gemma_pilot_phase()
    elif args.phase == "gemma-mezo":
        study.gemma_mezo_phase()
    study.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
