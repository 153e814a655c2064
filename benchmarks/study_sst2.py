"""The SST-2 study: do Bilevel-ZOFO's claims hold for MiniLM on a CPU? (benchmarks/README.md)

Protocol (MeZO / Bilevel-ZOFO few-shot setting, prompt-based heads):
  * model: MiniLM-L6 (real pretrained weights) with the prompt head of ``zofo-train --head
    prompt`` (initialised from the encoder's embeddings of "It was terrible." / "It was
    great.", part of the backbone), so every method starts from the same zero-shot
    classifier; batch 16, 64 tokens, CPU, one thread per run, ``--parallel`` runs at a time;
  * data: 1,000 examples drawn from ../shared/data/sst2/train.tsv with the run's seed;
    Bilevel-ZOFO splits them 2 : 1 into D_g / D_f; accuracy on dev.tsv;
  * rows: fo-full, fo-lora, mezo, mezo-lora, bilevel-zofo (theta_update="rms", the default),
    bilevel-zofo-adam (the authors' materialised Adam update) and bilevel-zofo-zo0 (the
    chosen Bilevel-ZOFO setting with theta's lr 0: does the backbone's ZO update help?), each
    with the same training wall-clock budget (``--budget-minutes``, evaluation not counted).

Runs: each run writes into a scratch folder outside the study; once it finishes, its files
(summary.json, metrics.jsonl, curves.png, command.txt) are added to the study's one archive,
``<study>/runs.zip`` (``RunArchive``: members ``<run>/<file>``, sorted, fixed times, so the same
runs give the same bytes), and a run the archive holds is skipped, so the study resumes run by
run; ``--commit`` commits the archive after every finished run. The report reads the archive
in place (nothing is unpacked); ``--phase pack`` moves run folders of an older layout
(``<study>/runs/<run>/``) into it.

Phases:
  sweep    every row's grid (``SWEEP``) on seed 0, scored on ``--holdout`` further training
           examples (never dev.tsv) by the final holdout accuracy, so a late collapse loses;
  lambda   the chosen Bilevel-ZOFO setting at lam in {1, 10, 100, 1000} (seed 0, dev), and the
           candidate theta updates side by side: plain ZO-SGD ("sgd") and ZO-SGD on
           L / (1 + lam) ("scaled-sgd") at lam 10 and 1000, their lr matched to the rms run's
           step at lam 10;
  main     every row on ``--seeds``;
  stability the chosen Bilevel-ZOFO setting for STABILITY_STEPS outer steps on the seeds
           other than 0 (seed 0's is the lambda phase's run), judged for collapse;
  defaults zofo-train's Bilevel-ZOFO and FO-LoRA with no hyperparameters given, 15 min each,
           side by side (run it after the defaults are set to the study's choice);
  data     the chosen Bilevel-ZOFO setting and its lr-0 ablation side by side on DATA_NUM_TRAIN
           examples (seed 0): does the ZO step help when the lower level cannot memorise D_g?
  subset   the chosen Bilevel-ZOFO setting with the ZO step on a small subset of the backbone
           (``--backbone-regex SUBSET_REGEX``, lr SUBSET_LR) on ``--seeds``: does the ZO step
           help when it has far fewer coordinates to search?
  report   tables, figures and the verdict (study.md) from whatever runs the archive holds.

  python benchmarks/study_sst2.py --phase all --budget-minutes 25 --seeds 0 1 2 --commit
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zofo_kernels.apps import data as data_mod  # noqa: E402

# the SST-2 copy beside the repository (../shared/data/sst2), the study's default data
SST2_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
from zofo_kernels.apps import plotting  # noqa: E402

# study row -> (zofo-train method, flags every setting of the row has)
ROWS = {
    "fo-full": ("fo-full", {}),
    "fo-lora": ("fo-lora", {}),
    "mezo": ("mezo", {}),
    "mezo-lora": ("mezo-lora", {}),
    "bilevel-zofo": ("bilevel-zofo", {}),
    "bilevel-zofo-adam": ("bilevel-zofo", {"theta_update": "adam"}),
    "bilevel-zofo-zo0": ("bilevel-zofo", {}),
}
# Grids (zofo-train flags) around the papers' values, scaled for a 22.7 M-parameter model.
# Under theta_update="rms" a backbone weight moves by about lr per outer step; MeZO's moves by
# lr * |g|, with |g| of order 10 on this model (measured). A pilot at rms lr 1e-5 and 5e-5
# moved theta by ~1e-6 per weight and step: both runs were identical to three decimals after
# 74 outer steps (the adapter did all the learning), hence the grid at 1e-4 and 1e-3.
BILEVEL_FIXED = dict(eps=1e-3, peft_lr=1e-3, lam=10.0, inner_steps=3)
# dict order is run order: the Bilevel-ZOFO grids first; the two settings of a row run side
# by side (--parallel 2), so a row's selection compares runs made under the same load
SWEEP = {
    "bilevel-zofo": [dict(BILEVEL_FIXED, lr=1e-4), dict(BILEVEL_FIXED, lr=1e-3)],
    "bilevel-zofo-adam": [dict(BILEVEL_FIXED, lr=1e-4), dict(BILEVEL_FIXED, lr=1e-3)],
    "mezo": [dict(lr=1e-5, eps=1e-3), dict(lr=1e-4, eps=1e-3)],
    "mezo-lora": [dict(lr=3e-4, eps=1e-2), dict(lr=3e-3, eps=1e-2)],
    "fo-lora": [dict(lr=3e-4), dict(lr=1e-3)],
    "fo-full": [dict(lr=1e-5), dict(lr=3e-5)],
}
LAMBDAS = (1.0, 10.0, 100.0, 1000.0)
CANDIDATE_LAMBDAS = (10.0, 1000.0)
# a run whose final accuracy is this far below its own best collapsed (the rule)
COLLAPSE = 0.05
# the defaults phase: what a user who gives no hyperparameters gets, against FO-LoRA
DEFAULTS_ROWS = ("bilevel-zofo", "fo-lora")
DEFAULTS_MINUTES = 15.0
# the stability phase: outer steps of the runs that judge collapse at the default lambda
STABILITY_STEPS = 550
# the subset phase. The whole-backbone ZO step added nothing over lr 0 in the main phase: a
# forward-difference estimate along one random direction of d coordinates carries about
# 1/sqrt(d) of the gradient, and 22.6 M coordinates over ~450 outer steps leave that signal
# below the noise. Here theta is the LayerNorm weights, the biases and the prompt head (31 k
# coordinates, 700x fewer). lr is set before any run (no sweep, never read off dev.tsv): under
# theta_update="rms" a coordinate moves by about lr per step, so 1e-3 lets a LayerNorm gain
# (about 1) drift by a few tenths over 450 consistent steps while the random part stays at
# about 1e-3 * sqrt(450) = 0.02.
# the data phase: 8,000 examples (5,333 in D_g: about 4 passes in a 25-minute run, against 32
# on 1,000, where S and P fit D_g by outer steps 200-300 and the ZO step's signal fades)
DATA_NUM_TRAIN = 8000
SUBSET_REGEX = r"LayerNorm|\.bias$|label_head"
SUBSET_LR = 1e-3


def _flags(hp: dict) -> list:
    out = []
    for k, v in hp.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _rel(path: Path) -> str:
    """``path`` relative to the repository when it is next to it (../shared/...)."""
    rel = os.path.relpath(path, ROOT)
    return rel if rel.startswith("..") and rel.count("..") == 1 else str(path)


ARCHIVE = "runs.zip"
# every member's time stamp (the earliest a zip file can hold) and mode: the archive's bytes
# depend on its members' names and contents alone
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_ZIP_MODE = 0o644


class RunArchive:
    """A study's runs in one zip file: member ``<run>/<file>`` for every file a run wrote
    (``summary.json``, ``metrics.jsonl``, ``curves.png``, ``command.txt``), plus any loose file
    kept with the runs (a study's log). Read in place through ``zipfile``; written whole, with
    the members sorted by name, fixed times and modes and one compression level, so the same
    members give the same bytes, and left untouched when a write would not change them.
    Adding a run rewrites the archive into a temporary file that then replaces it, so a reader
    sees either the old or the new archive, never half of one."""

    _locks: Dict[str, threading.Lock] = {}

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = RunArchive._locks.setdefault(str(self.path.resolve()), threading.Lock())

    # -- reading ---------------------------------------------------------------------------
    def names(self) -> list:
        """Every member's name, sorted."""
        if not self.path.is_file():
            return []
        with zipfile.ZipFile(self.path) as zf:
            return sorted(zf.namelist())

    def members(self) -> Dict[str, bytes]:
        if not self.path.is_file():
            return {}
        with zipfile.ZipFile(self.path) as zf:
            return {n: zf.read(n) for n in zf.namelist()}

    def runs(self) -> list:
        """The runs the archive holds (those with a summary.json), sorted."""
        return sorted(n[:-len("/summary.json")] for n in self.names()
                      if n.count("/") == 1 and n.endswith("/summary.json"))

    def __contains__(self, run: str) -> bool:
        return f"{run}/summary.json" in self.names()

    def read(self, member: str) -> Optional[bytes]:
        """A member's bytes, None if the archive does not hold it."""
        if not self.path.is_file():
            return None
        with zipfile.ZipFile(self.path) as zf:
            try:
                return zf.read(member)
            except KeyError:
                return None

    # -- writing ---------------------------------------------------------------------------
    def write(self, members: Dict[str, bytes]) -> bool:
        """Make the archive hold exactly ``members``; False (file untouched) if it already
        does."""
        with self._lock:
            return self._write(members)

    def _write(self, members: Dict[str, bytes]) -> bool:
        if self.path.is_file() and self.members() == members:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
                for name in sorted(members):
                    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                    info.create_system = 3  # unix, whatever the platform
                    info.external_attr = _ZIP_MODE << 16
                    zf.writestr(info, members[name], compress_type=zipfile.ZIP_DEFLATED,
                                compresslevel=9)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the archive is not
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return True

    def add(self, files: Dict[str, bytes]) -> bool:
        """Add (or replace) these members, keeping every other one."""
        with self._lock:
            return self._write(dict(self.members(), **files))

    def add_run(self, run: str, folder: Path) -> bool:
        """Add every file under ``folder`` as ``<run>/<relative path>``."""
        if "/" in run or not run:
            raise ValueError(f"bad run name {run!r}")
        folder = Path(folder)
        files = {f"{run}/{p.relative_to(folder).as_posix()}": p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        if f"{run}/summary.json" not in files:
            raise ValueError(f"{folder} holds no summary.json: not a finished run")
        return self.add(files)


class Study:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.archive = RunArchive(self.out / ARCHIVE)

    # -- running ---------------------------------------------------------------------------
    def run(self, name: str, row: str, hp: dict, seed: int, *, holdout: bool,
            minutes: Optional[float] = None, steps: Optional[int] = None,
            num_train: Optional[int] = None) -> dict:
        """One zofo-train run in its own process, skipped if the archive holds it; once it
        finishes it is recorded (``record``). ``steps``: train for that many steps instead of a
        wall-clock budget (evaluating every steps / evals steps); ``num_train``: another sample
        size than ``--num-train``."""
        a = self.args
        done = self.summary(name)
        if done is not None:
            return done
        method, fixed = ROWS[row]
        scratch = Path(tempfile.mkdtemp(prefix=f"zofo-study-{name}-"))
        rd = scratch / name
        budget = (minutes or (a.sweep_minutes if holdout else a.budget_minutes)) * 60
        where = (["--holdout", str(a.holdout)] if holdout
                 else ["--eval", _rel(a.data / "dev.tsv")])
        if steps is None:
            length = ["--time-budget", str(budget), "--eval-every", str(budget / a.evals)]
        else:
            length = ["--steps", str(steps),
                      "--eval-every-steps", str(max(1, steps // a.evals))]
        # -P: the package comes from --code (a frozen copy) when given, not from the
        # working tree, so editing the tree while a study runs cannot change its runs.
        launcher = [sys.executable, "-P", "-m", "zofo_kernels.apps.train"]
        cmd = [*launcher, "--model", a.model,
               "--method", method, "--train", _rel(a.data / "train.tsv"),
               "--num-train", str(num_train or a.num_train), "--seed", str(seed), "--data-seed", str(seed),
               *length, "--output", str(rd), "--no-save", "--no-progress", "--threads",
               str(a.threads), *where, *_flags(dict(fixed, **hp))]
        log = scratch / f"{name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {row} {hp} seed {seed} "
              f"({f'{budget / 60:g} min' if steps is None else f'{steps} steps'}; log {log})",
              flush=True)
        returncode = self._launch(cmd, log)
        if returncode != 0 or not (rd / "summary.json").is_file():
            text = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"run {name} failed (exit {returncode}; its files are kept in "
                               f"{scratch}):\n{text}")
        (rd / "command.txt").write_text(shlex.join(
            ["zofo-train"] + cmd[len(launcher):]).replace(str(rd), f"runs/{name}") + "\n")
        self.record(name, rd)
        shutil.rmtree(scratch, ignore_errors=True)
        return self.summary(name)

    def _launch(self, cmd: list, log: Path) -> int:
        """Run one zofo-train command, its output into ``log``; the exit status."""
        with open(log, "w") as fh:
            return subprocess.run(cmd, cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1",
                                           PYTHONPATH=str(self.args.code or ROOT))).returncode

    def record(self, name: str, folder: Path) -> None:
        """Add a finished run's folder to the study's archive (and commit the archive with
        ``--commit``): the one way a run enters the study."""
        if self.archive.add_run(name, folder) and getattr(self.args, "commit", False):
            self._commit(self.archive.path, f"study {self.out.name}: run {name}")

    def pack(self) -> list:
        """Move run folders of the older layout (``<study>/runs/<run>/``, each with its
        summary.json) into the archive and delete them; the runs moved."""
        loose = self.out / "runs"
        moved = []
        if loose.is_dir():
            for rd in sorted(p for p in loose.iterdir() if (p / "summary.json").is_file()):
                self.archive.add_run(rd.name, rd)
                shutil.rmtree(rd)
                moved.append(rd.name)
            if not any(loose.iterdir()):
                loose.rmdir()
        return moved

    @staticmethod
    def _commit(path: Path, message: str, attempts: int = 20):
        """git-commit ``path`` alone, retrying while another git command holds the index."""
        for attempt in range(attempts):
            add = subprocess.run(["git", "add", str(path)], cwd=str(ROOT))
            if add.returncode == 0 and subprocess.run(
                    ["git", "commit", "-q", "-m", message, "--", str(path)],
                    cwd=str(ROOT)).returncode == 0:
                return
            time.sleep(3)
        raise RuntimeError(f"could not commit {path} after {attempts} attempts")

    def run_all(self, jobs):
        """jobs: (name, row, hp, seed, holdout[, run()'s keywords]); --parallel at a time."""
        with ThreadPoolExecutor(max_workers=self.args.parallel) as pool:
            return list(pool.map(lambda j: self.run(*j[:4], holdout=j[4],
                                                    **(j[5] if len(j) > 5 else {})),
                                 jobs))

    # -- phases ----------------------------------------------------------------------------
    def sweep(self):
        rows = self.args.rows or list(SWEEP)
        jobs = [(f"sweep_{row}_{i}", row, hp, 0, True)
                for row, grid in SWEEP.items() if row in rows for i, hp in enumerate(grid)]
        self.run_all(jobs)

    def chosen(self) -> dict:
        """Per row, the sweep's best setting by final holdout accuracy (then best)."""
        out = {}
        for row, grid in SWEEP.items():
            scored = []
            for i, hp in enumerate(grid):
                s = self.summary(f"sweep_{row}_{i}")
                if s is not None:
                    scored.append(((s["eval_accuracy"], s["best_eval_accuracy"]), i))
            if len(scored) < len(grid):
                continue
            out[row] = grid[max(scored)[1]]
        if "bilevel-zofo" in out:
            out["bilevel-zofo-zo0"] = dict(out["bilevel-zofo"], lr=0.0)
        return out

    def lambda_phase(self):
        chosen = self.chosen()
        if "bilevel-zofo" not in chosen:
            raise SystemExit("study_sst2: the lambda phase needs the Bilevel-ZOFO sweep first")
        hp = chosen["bilevel-zofo"]
        self.run_all([(f"lambda_rms_{lam:g}", "bilevel-zofo", dict(hp, lam=lam), 0, False)
                      for lam in LAMBDAS])
        g = self.grad_rms("lambda_rms_10")  # the rms run's typical |g| at lam 10
        jobs = []
        for lam in CANDIDATE_LAMBDAS:
            jobs.append((f"lambda_sgd_{lam:g}", "bilevel-zofo",
                         dict(hp, lam=lam, lr=hp["lr"] / g, theta_update="sgd"), 0, False))
            jobs.append((f"lambda_scaled-sgd_{lam:g}", "bilevel-zofo",
                         dict(hp, lam=lam, lr=hp["lr"] * (1 + 10.0) / g,
                              theta_update="scaled-sgd"), 0, False))
        self.run_all(jobs)

    def main_phase(self):
        chosen = self.chosen()
        missing = [r for r in ROWS if r not in chosen]
        if missing:
            raise SystemExit(f"study_sst2: the main phase needs the sweep of {missing} first")
        # Bilevel-ZOFO and its lr-0 ablation first, side by side (same load) on every seed:
        # the pairs that say whether the backbone's ZO step helps, so partial sittings answer
        # that first; then the other rows
        pair = ("bilevel-zofo", "bilevel-zofo-zo0")
        order = [(seed, row) for seed in self.args.seeds for row in pair] + [
            (seed, row) for seed in self.args.seeds for row in ROWS if row not in pair]
        jobs = [(f"main_{row}_seed{seed}", row, chosen[row], seed, False)
                for seed, row in order]
        self.run_all(jobs)

    def defaults_phase(self):
        """zofo-train as a user runs it: Bilevel-ZOFO and FO-LoRA with no hyperparameters
        given (the registry's defaults), side by side in one sitting, DEFAULTS_MINUTES each."""
        self.run_all([(f"defaults_{row}_seed0", row, {}, 0, False,
                       dict(minutes=DEFAULTS_MINUTES)) for row in DEFAULTS_ROWS])

    def stability_runs(self):
        """(seed, run name) of the chosen Bilevel-ZOFO setting judged for collapse over at
        least STABILITY_STEPS outer steps: seed 0's is the lambda phase's run at the default
        lambda, the other seeds get a run of STABILITY_STEPS steps (a 25-minute main-phase
        run makes 450-530 outer steps, depending on the machine's speed)."""
        return [(seed, "lambda_rms_10" if seed == 0 else f"stability_bilevel-zofo_seed{seed}")
                for seed in self.args.seeds]

    def stability_phase(self):
        chosen = self.chosen()["bilevel-zofo"]
        self.run_all([(name, "bilevel-zofo", chosen, seed, False, dict(steps=STABILITY_STEPS))
                      for seed, name in self.stability_runs() if seed != 0])

    def subset_phase(self):
        chosen = self.chosen()
        if "bilevel-zofo" not in chosen:
            raise SystemExit("study_sst2: the subset phase needs the Bilevel-ZOFO sweep first")
        hp = dict(chosen["bilevel-zofo"], lr=SUBSET_LR, backbone_regex=SUBSET_REGEX)
        self.run_all([(f"subset_bilevel-zofo_seed{seed}", "bilevel-zofo", hp, seed, False)
                      for seed in self.args.seeds])

    def data_phase(self):
        chosen = self.chosen()
        if "bilevel-zofo" not in chosen:
            raise SystemExit("study_sst2: the data phase needs the Bilevel-ZOFO sweep first")
        self.run_all([(f"data{DATA_NUM_TRAIN}_{row}_seed0", "bilevel-zofo", chosen[row], 0,
                       False, dict(num_train=DATA_NUM_TRAIN))
                      for row in ("bilevel-zofo", "bilevel-zofo-zo0")])

    # -- reading ---------------------------------------------------------------------------
    def summary(self, name):
        raw = self.archive.read(f"{name}/summary.json")
        return json.loads(raw) if raw is not None else None

    def rows(self, name, kind):
        raw = self.archive.read(f"{name}/metrics.jsonl")
        if raw is None:
            raise KeyError(f"{self.archive.path} holds no {name}/metrics.jsonl")
        return [r for r in map(json.loads, raw.decode().splitlines()) if r["kind"] == kind]

    def grad_rms(self, name) -> float:
        gs = [g for r in self.rows(name, "bilevel") for g in r["projected_grads"]]
        return math.sqrt(sum(g * g for g in gs) / len(gs))

    # -- report ----------------------------------------------------------------------------
    def report(self):
        a = self.args
        md = [f"# SST-2 study `{self.out.name}`", "",
              f"MiniLM-L6 (pretrained) with the prompt head, 1 thread per run, {a.parallel} "
              f"runs at a time on a 2-core machine; {a.num_train} training examples; "
              f"budget {a.budget_minutes:g} min of training per run (sweep "
              f"{a.sweep_minutes:g} min, scored on {a.holdout} held-out training examples).", ""]
        chosen = self.chosen()
        md += self._sweep_table(chosen)
        md += self._lambda_section()
        md += self._stability_section()
        md += self._main_section(chosen)
        md += self._defaults_section()
        md += self._subset_section()
        md += self._data_section()
        (self.out / "study.md").write_text("\n".join(md) + "\n")
        (self.out / "chosen_hyperparameters.json").write_text(json.dumps(chosen, indent=2)
                                                              + "\n")
        print("\n".join(md))

    def _sweep_table(self, chosen):
        lines = ["## Sweep (seed 0, held-out training examples)", "",
                 "| row | setting | final | best | steps | chosen |", "|---|---|---:|---:|---:|:-:|"]
        rows = []
        for row, grid in SWEEP.items():
            for i, hp in enumerate(grid):
                s = self.summary(f"sweep_{row}_{i}")
                if s is None:
                    continue
                pick = "yes" if chosen.get(row) == hp else ""
                lines.append(f"| {row} | {_hp_text(hp)} | {s['eval_accuracy']:.3f} | "
                             f"{s['best_eval_accuracy']:.3f} | {s['steps']} | {pick} |")
                rows.append(dict(row=row, config=i, **hp, final=s["eval_accuracy"],
                                 best=s["best_eval_accuracy"], steps=s["steps"]))
        if rows:
            write_csv(self.out / "sweep.csv", rows)
        return lines + [""]

    def _lambda_section(self):
        names = ([f"lambda_rms_{lam:g}" for lam in LAMBDAS]
                 + [f"lambda_{c}_{lam:g}" for c in ("sgd", "scaled-sgd")
                    for lam in CANDIDATE_LAMBDAS])
        have = [n for n in names if self.summary(n) is not None]
        if not have:
            return []
        lines = ["## Stability in lambda (seed 0, dev)", "",
                 "| theta update | lambda | lr | final | best | selected (D_f) | outer steps | "
                 "collapsed | mean theta step RMS |", "|---|---:|---:|---:|---:|---:|---:|:-:|---:|"]
        rows, diag = [], {}
        for n in have:
            s = self.summary(n)
            hp = s["hyperparameters"]
            b = self.rows(n, "bilevel")
            diag[n] = b
            step_rms = statistics.fmean(r["theta_step_rms"] for r in b) if b else float("nan")
            collapsed = _drop(s) > COLLAPSE
            lines.append(f"| {hp['theta_update']} | {hp['lam']:g} | {hp['lr']:.3g} | "
                         f"{s['eval_accuracy']:.3f} | {s['best_eval_accuracy']:.3f} | "
                         f"{s['selected_eval_accuracy']:.3f} | {s['steps']} | "
                         f"{'**yes**' if collapsed else 'no'} | {step_rms:.2e} |")
            rows.append(dict(run=n, theta_update=hp["theta_update"], lam=hp["lam"], lr=hp["lr"],
                             final=s["eval_accuracy"], best=s["best_eval_accuracy"],
                             selected=s["selected_eval_accuracy"], steps=s["steps"],
                             collapsed=collapsed, mean_theta_step_rms=step_rms))
        write_csv(self.out / "lambda.csv", rows)
        _plot_diagnostics(diag, self.out / "diagnostics.png")
        plotting.plot_study({n: [self.rows(n, "eval")] for n in have}, self.out / "lambda.png",
                            title="Bilevel-ZOFO on SST-2 dev, seed 0: lambda and theta update")
        return lines + ["", "Curves: `lambda.png`; inside the steps (projected gradient, gap "
                        "g_P - g_S, theta's RMS step): `diagnostics.png`.", ""]

    def _stability(self):
        """(seed, run name, summary) of the stability runs that exist."""
        return [(seed, n, self.summary(n)) for seed, n in self.stability_runs()
                if self.summary(n) is not None]

    def _stability_section(self):
        have = self._stability()
        if not have:
            return []
        lines = ["## Stability at the default lambda (dev; seed 0: the lambda phase's run, "
                 f"other seeds: {STABILITY_STEPS} outer steps)", "",
                 "| seed | run | outer steps | final | best | selected (D_f) | drop from best | "
                 "collapsed |", "|---:|---|---:|---:|---:|---:|---:|:-:|"]
        for seed, n, s in have:
            drop = _drop(s)
            lines.append(f"| {seed} | `{n}` | {s['steps']} | {s['eval_accuracy']:.3f} | "
                         f"{s['best_eval_accuracy']:.3f} | {s['selected_eval_accuracy']:.3f} | "
                         f"{drop:.3f} | {'**yes**' if drop > COLLAPSE else 'no'} |")
        return lines + [""]

    def _stability_verdict(self):
        have = self._stability()
        if not have:
            return []
        drops = {seed: _drop(s) for seed, _, s in have}
        worst = max(drops, key=drops.get)
        verdict = "no run collapsed" if drops[worst] <= COLLAPSE else "**collapsed**"
        fewest = min(s["steps"] for _, _, s in have)
        return [f"- **Stable at the default λ (seeds {', '.join(map(str, drops))}, at least "
                f"{fewest} outer steps each)**: {verdict}; the largest drop from a run's best "
                f"to its end is {drops[worst]:.3f} (seed {worst}; collapse = more than "
                f"{COLLAPSE:g})."]

    def _defaults_section(self):
        have = {row: self.summary(f"defaults_{row}_seed0") for row in DEFAULTS_ROWS}
        have = {row: s for row, s in have.items() if s is not None}
        if not have:
            return []
        lines = [f"## zofo-train with its defaults ({DEFAULTS_MINUTES:g} min, seed 0, dev, "
                 "one sitting)", "",
                 "| method | hyperparameters (the registry's defaults) | final | selected (D_f) | "
                 "best | steps |", "|---|---|---:|---:|---:|---:|"]
        for row, s in have.items():
            hp = {k: v for k, v in s["hyperparameters"].items() if v is not None and k in (
                "lr", "eps", "lam", "inner_steps", "peft_lr", "theta_update", "order",
                "penalty_batch")}
            lines.append(f"| {row} | {_hp_text(hp)} | {s['eval_accuracy']:.3f} | "
                         f"{s['selected_eval_accuracy']:.3f} | {s['best_eval_accuracy']:.3f} | "
                         f"{s['steps']} |")
        if len(have) == len(DEFAULTS_ROWS):
            gap = have["bilevel-zofo"]["eval_accuracy"] - have["fo-lora"]["eval_accuracy"]
            lines += ["", f"Bilevel-ZOFO minus FO-LoRA, final dev accuracy: {gap:+.3f}."]
        return lines + [""]

    def _data_section(self):
        have = {row: self.summary(f"data{DATA_NUM_TRAIN}_{row}_seed0")
                for row in ("bilevel-zofo", "bilevel-zofo-zo0")}
        have = {row: s for row, s in have.items() if s is not None}
        if not have:
            return []
        lines = [f"## More data: {DATA_NUM_TRAIN} training examples (seed 0, dev, side by side)",
                 "", "| row | final | selected (D_f) | best | outer steps |",
                 "|---|---:|---:|---:|---:|"]
        for row, s in have.items():
            lines.append(f"| {row} | {s['eval_accuracy']:.3f} | "
                         f"{s['selected_eval_accuracy']:.3f} | {s['best_eval_accuracy']:.3f} | "
                         f"{s['steps']} |")
        if len(have) == 2:
            d = have["bilevel-zofo"]["eval_accuracy"] - have["bilevel-zofo-zo0"]["eval_accuracy"]
            lines += ["", f"Bilevel-ZOFO minus its lr-0 ablation, final dev accuracy: {d:+.3f} "
                          "(one seed: the seed-to-seed sd on 1,000 examples is about 0.007)."]
        return lines + [""]

    def _subset_section(self):
        """The subset phase against the main phase's Bilevel-ZOFO and lr-0 runs, seed by
        seed (the subset runs came in a later sitting: their pairing and load differ)."""
        subset = {sd: self.summary(f"subset_bilevel-zofo_seed{sd}") for sd in self.args.seeds}
        subset = {sd: s for sd, s in subset.items() if s is not None}
        if not subset:
            return []
        lines = [f"## The ZO step on a subset of the backbone (dev; `--backbone-regex "
                 f"'{SUBSET_REGEX}'`, lr {SUBSET_LR:g}, set before any run)", "",
                 "A subset ZO step is cheaper (31 k weights to perturb, not 22.6 M), so the "
                 "subset run makes more outer steps, first-order ones included, in the same "
                 "time; the last column reads every run at the fewest outer steps any of the "
                 "seed's three made.", "",
                 "| seed | theta | final | selected (D_f) | best | outer steps | peak RSS (MiB) "
                 "| at equal steps |",
                 "|---:|---|---:|---:|---:|---:|---:|---:|"]
        cols = {"subset (31 k weights)": "subset_bilevel-zofo_seed{}",
                "whole backbone (22.6 M)": "main_bilevel-zofo_seed{}",
                "none (lr 0)": "main_bilevel-zofo-zo0_seed{}"}
        finals = {c: [] for c in cols}
        at_steps = {c: [] for c in cols}
        for sd in sorted(subset):
            have = {c: self.summary(f.format(sd)) for c, f in cols.items()}
            have = {c: s for c, s in have.items() if s is not None}
            n = min(s["steps"] for s in have.values())
            for c, s in have.items():
                evals = self.rows(cols[c].format(sd), "eval")
                at = max((r for r in evals if r["step"] <= n), key=lambda r: r["step"])
                finals[c].append(s["eval_accuracy"])
                at_steps[c].append(at["eval_accuracy"])
                lines.append(f"| {sd} | {c} | {s['eval_accuracy']:.3f} | "
                             f"{s['selected_eval_accuracy']:.3f} | "
                             f"{s['best_eval_accuracy']:.3f} | {s['steps']} | "
                             f"{s['peak_memory_bytes'] / 2**20:.0f} | "
                             f"{at['eval_accuracy']:.3f} (step {at['step']}) |")
        lines.append("")
        sub, whole, zero = cols  # the three theta columns, in order
        if finals[sub] and len(finals[zero]) == len(finals[sub]):
            def diff(d, a):
                return statistics.fmean(d[a]) - statistics.fmean(d[zero])
            lines += [f"Subset minus lr 0, mean final dev accuracy over {len(finals[sub])} "
                      f"seed(s): {diff(finals, sub):+.3f} (subset {_ms(finals[sub])}, lr 0 "
                      f"{_ms(finals[zero])}); whole backbone minus lr 0: "
                      f"{diff(finals, whole):+.3f}. At equal outer steps: subset minus lr 0 "
                      f"{diff(at_steps, sub):+.3f}, whole backbone minus lr 0 "
                      f"{diff(at_steps, whole):+.3f}.", ""]
        return lines

    def _main_section(self, chosen):
        runs = {row: [(seed, self.summary(f"main_{row}_seed{seed}"))
                      for seed in self.args.seeds] for row in ROWS}
        runs = {row: [(sd, s) for sd, s in v if s is not None] for row, v in runs.items()}
        runs = {row: v for row, v in runs.items() if v}
        if not runs:
            return []
        lines = ["## Equal wall-clock budget, dev accuracy (mean ± sd over seeds)", "",
                 "| row | setting | seeds | final | selected (D_f) | best | steps | forwards | "
                 "peak RSS (MiB) | largest drop from best |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        table, curves = [], {}
        for row, v in runs.items():
            ss = [s for _, s in v]
            curves[row] = [self.rows(f"main_{row}_seed{sd}", "eval") for sd, _ in v]
            lines.append(
                f"| {row} | {_hp_text(chosen.get(row, {}))} | {len(ss)} | "
                f"{_ms([s['eval_accuracy'] for s in ss])} | "
                f"{_ms([s['selected_eval_accuracy'] for s in ss])} | "
                f"{_ms([s['best_eval_accuracy'] for s in ss])} | "
                f"{statistics.fmean(s['steps'] for s in ss):.0f} | "
                f"{statistics.fmean(s['forward_count'] for s in ss):.0f} | "
                f"{statistics.fmean(s['peak_memory_bytes'] for s in ss) / 2**20:.0f} | "
                f"{max(_drop(s) for s in ss):.3f} |")
            for sd, s in v:
                table.append(dict(row=row, seed=sd, **{k: s[k] for k in (
                    "eval_accuracy", "selected_eval_accuracy", "best_eval_accuracy",
                    "initial_eval_accuracy", "steps", "wall_time_s", "forward_count",
                    "backward_count", "peak_memory_bytes")}))
        write_csv(self.out / "runs.csv", table)
        zero = statistics.fmean(s["initial_eval_accuracy"] for v in runs.values()
                                for _, s in v)
        lines += ["", f"Zero-shot dev accuracy (every row starts from it): {zero:.3f}.", ""]
        lines += self._equal_steps(curves) + self._verdict(runs, curves)
        ref = (max(a for _, a in plotting.mean_curve(curves["mezo"], 200))
               if "mezo" in curves else None)
        plotting.plot_study(curves, self.out / "study.png",
                            title="MiniLM-L6 on SST-2 dev, equal wall-clock budget",
                            reference=ref, reference_label="MeZO's best (mean)")
        return lines

    def _equal_steps(self, curves):
        """Accuracy read at the same number of training steps (the fewest any row made)."""
        ends = {row: min(rs[-1]["step"] for rs in runs) for row, runs in curves.items()}
        n = min(ends.values())
        lines = [f"At equal step counts ({n} steps, the fewest any row made; a Bilevel-ZOFO "
                 "step is one outer step):", "", "| row | dev acc at that step |", "|---|---:|"]
        for row, runs in curves.items():
            vals = [max((r for r in rs if r["step"] <= n), key=lambda r: r["step"])
                    ["eval_accuracy"] for rs in runs]
            lines.append(f"| {row} | {_ms(vals)} |")
        return lines + [""]

    def _verdict(self, runs, curves):
        lines = ["## Verdict on the paper's claims", ""]
        final = {row: [s["eval_accuracy"] for _, s in v] for row, v in runs.items()}
        lines += self._stability_verdict()
        if "mezo" in curves and "bilevel-zofo" in curves:
            mezo = plotting.mean_curve(curves["mezo"], 200)
            best = max(a for _, a in mezo)
            t_m = next(t for t, a in mezo if a >= best - 1e-12)
            bz = plotting.mean_curve(curves["bilevel-zofo"], 200)
            t_b = next((t for t, a in bz if a >= best - 1e-12), None)
            if t_b is None:
                lines.append(f"- **Faster to MeZO's best (claim: 2-4x)**: not reached; MeZO's "
                             f"best mean accuracy {best:.3f}, Bilevel-ZOFO's best mean "
                             f"{max(a for _, a in bz):.3f}.")
            else:
                sp = "immediately" if t_b == 0 else f"{t_m / t_b:.1f}x faster"
                lines.append(f"- **Faster to MeZO's best (claim: 2-4x)**: MeZO's best mean "
                             f"accuracy {best:.3f} at {t_m / 60:.1f} min; Bilevel-ZOFO reached "
                             f"it at {t_b / 60:.1f} min ({sp}).")
        for other, claim in (("fo-lora", "above FO-LoRA at equal time"),
                             ("bilevel-zofo-zo0", "the ZO step helps (>= +0.01 over lr 0)")):
            if other in final and "bilevel-zofo" in final:
                d = statistics.fmean(final["bilevel-zofo"]) - statistics.fmean(final[other])
                lines.append(f"- **{claim}**: final dev accuracy Bilevel-ZOFO "
                             f"{_ms(final['bilevel-zofo'])} vs {other} {_ms(final[other])}: "
                             f"difference {d:+.3f}.")
        if "fo-lora" in runs and "bilevel-zofo" in runs:
            mem = {r: statistics.fmean(s["peak_memory_bytes"] for _, s in runs[r])
                   for r in ("fo-lora", "bilevel-zofo")}
            lines.append(f"- **Memory similar to FO-LoRA**: peak RSS Bilevel-ZOFO "
                         f"{mem['bilevel-zofo'] / 2**20:.0f} MiB vs FO-LoRA "
                         f"{mem['fo-lora'] / 2**20:.0f} MiB "
                         f"({mem['bilevel-zofo'] / mem['fo-lora']:.2f}x).")
        return lines + [""]


def _drop(summary) -> float:
    """How far a run ended below its own best dev accuracy (a collapse if > COLLAPSE)."""
    return summary["best_eval_accuracy"] - summary["eval_accuracy"]


def _hp_text(hp):
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def _ms(vals):
    vals = list(vals)
    if len(vals) < 2:
        return f"{vals[0]:.3f}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def write_csv(path: Path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _plot_diagnostics(diag: dict, path: Path) -> None:
    """Per run: |projected gradient|, the gap g_P - g_S and theta's RMS step per outer step
    (running means over 20 steps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(xs, w=20):
        out, acc = [], []
        for x in xs:
            acc.append(x)
            if len(acc) > w:
                acc.pop(0)
            out.append(sum(acc) / len(acc))
        return out

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colors = plotting.method_colors(list(diag))
    for name, rows in diag.items():
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        series = ([abs(r["projected_grads"][0]) for r in rows], [r["gap"] for r in rows],
                  [r["theta_step_rms"] for r in rows])
        for ax, ys in zip(axes, series):
            ax.plot(steps, smooth(ys), color=colors[name], label=name, lw=1.2)
    for ax, title in zip(axes, ("|projected gradient|", "gap g_P - g_S on B_g",
                                "theta's RMS step per weight")):
        ax.set_title(title)
        ax.set_xlabel("outer step")
        ax.set_yscale("log" if title != "gap g_P - g_S on B_g" else "linear")
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--phase", default="all",
                   choices=("sweep", "lambda", "main", "stability", "defaults", "subset",
                            "data", "report", "pack", "all"))
    # 25 min: a Bilevel-ZOFO outer step takes about 2.8 s on one thread with two runs on the
    # machine, and a setting is judged over at least 500 outer steps
    p.add_argument("--budget-minutes", type=float, default=25.0)
    p.add_argument("--sweep-minutes", type=float, default=None,
                   help="budget of a sweep run (default: --budget-minutes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--holdout", type=int, default=500,
                   help="further training examples (disjoint from the sample) the sweep "
                        "scores on")
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--evals", type=int, default=12, help="evaluations per run")
    p.add_argument("--data", type=Path, default=SST2_DEFAULT)
    p.add_argument("--tag", default="v2")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--commit", action="store_true",
                   help="git-commit the run archive after every finished run")
    p.add_argument("--code", type=Path, default=None,
                   help="import zofo_kernels from this copy of the repository instead of "
                        "the working tree (so the tree can change while a study runs)")
    p.add_argument("--rows", nargs="+", default=None, choices=list(SWEEP),
                   help="sweep only these rows (a sitting's share of the sweep)")
    args = p.parse_args(argv)
    args.sweep_minutes = args.sweep_minutes or args.budget_minutes
    for f in ("train.tsv", "dev.tsv") if args.phase not in ("report", "pack") else ():
        if not (args.data / f).is_file():
            raise SystemExit(f"study_sst2: {args.data / f} not found (SST-2 is expected at "
                             "../shared/data/sst2 next to the repository)")
    args.output = args.output or ROOT / "benchmarks" / "results" / f"study_{args.tag}"
    study = Study(args)
    if args.phase == "pack":
        moved = study.pack()
        print(f"study_sst2: {len(moved)} run folder(s) moved into {study.archive.path}")
        return 0
    if any((study.out / "runs").glob("*/summary.json")):
        raise SystemExit(f"study_sst2: {study.out / 'runs'} holds run folders of the older "
                         f"layout: move them into {ARCHIVE} first (--phase pack)")
    phases = (("sweep", "lambda", "main", "stability", "defaults", "subset", "data")
              if args.phase == "all"
              else (args.phase,))
    for phase in phases:
        if phase != "report":
            getattr(study, {"sweep": "sweep", "lambda": "lambda_phase", "main": "main_phase",
                            "stability": "stability_phase", "defaults": "defaults_phase",
                            "subset": "subset_phase", "data": "data_phase"}[phase])()
    study.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
