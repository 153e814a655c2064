"""benchmarks/study_v3.py: the ceiling phase runs FO full and FO-LoRA at each size with study
v2's budgets as step counts (read from study v2's committed archive), the theta phase runs
every theta update beside its lr-0 ablation at the size whose ceiling is largest, and the
report reads the gains as fractions of that ceiling. zofo-train itself is stood in for by a
fake process that writes what it writes; the runs' commands are checked flag by flag."""

import importlib.util
import json
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def v3():
    spec = importlib.util.spec_from_file_location("study_v3_under_test",
                                                  ROOT / "benchmarks" / "study_v3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# accuracy the fake zofo-train reports: FO full gains more from data than FO-LoRA, so the
# largest ceiling is at the largest size; theta's std update gains 0.004 over lr 0
def _accuracy(cmd):
    def flag(name, default=None):
        return cmd[cmd.index(name) + 1] if name in cmd else default
    n, method = int(flag("--num-train")), flag("--method")
    if method == "fo-full":
        return 0.80 + n / 1e6
    if method == "fo-lora":
        return 0.80
    return 0.84 + (0.004 if flag("--theta-update") == "std" else 0.0)


class FakeTrain:
    def __init__(self):
        self.commands = {}

    def __call__(self, cmd, log):
        out = Path(cmd[cmd.index("--output") + 1])
        self.commands[out.name] = cmd
        log.write_text("training\n")
        acc = round(_accuracy(cmd), 4)
        steps = int(cmd[cmd.index("--steps") + 1])
        evals = [dict(kind="eval", step=s, wall_time_s=float(s), eval_accuracy=a)
                 for s, a in ((0, 0.7), (steps, acc))]
        if "bilevel-zofo" in cmd:  # theta's RMS step: 1e-4 for 50 steps, then 1e-6
            evals += [dict(kind="bilevel", step=s, theta_step_rms=1e-4 if s <= 50 else 1e-6,
                           projected_grads=[0.5], gap=0.01) for s in range(1, steps + 1)]
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        (out / "summary.json").write_text(json.dumps(dict(
            eval_accuracy=acc, best_eval_accuracy=acc, selected_eval_accuracy=acc,
            initial_eval_accuracy=0.7, steps=steps, forward_count=2 * steps,
            peak_memory_bytes=2**20)))
        return 0


def _faked(v3):
    """(the fake zofo-train, a StudyV3 that launches it and commits nothing)"""
    train = FakeTrain()
    real = v3.StudyV3

    class Faked(real):
        def __init__(self, args):
            super().__init__(args)
            self._launch = train
            self._commit = lambda *a: None
    return train, Faked


def test_ceiling_then_theta_at_the_largest_ceiling(v3, tmp_path, monkeypatch):
    if not (ROOT.parent / "shared" / "data" / "sst2" / "train.tsv").is_file():
        pytest.skip("SST-2 is absent")  # the phases check their data before launching
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "study_v3"
    train, faked = _faked(v3)
    monkeypatch.setattr(v3, "StudyV3", faked)

    # the theta phase refuses to guess the size before any ceiling pair has finished
    with pytest.raises(SystemExit, match="needs a finished ceiling pair"):
        v3.main(["--phase", "theta", "--output", str(out)])
    assert train.commands == {}

    assert v3.main(["--phase", "ceiling", "--output", str(out)]) == 0
    steps = {row: v3.v2_steps(row) for row in ("fo-full", "fo-lora", "bilevel-zofo")}
    # study v2's 25-minute budgets as counted in its archive (mean over its seeds)
    assert steps == {"fo-full": 1955, "fo-lora": 3467, "bilevel-zofo": 525}
    chosen = json.loads((ROOT / "benchmarks/results/study_v2/chosen_hyperparameters.json")
                        .read_text())
    assert sorted(train.commands) == sorted(f"ceiling{n}_{row}_seed0" for n in (8000, 67349)
                                            for row in ("fo-full", "fo-lora"))
    for name, cmd in train.commands.items():
        n, row = name[len("ceiling"):].split("_")[:2]
        text = " ".join(cmd)
        assert f"--method {row} " in text and f"--num-train {n} " in text
        assert f"--steps {steps[row]} " in text and f"--lr {chosen[row]['lr']}" in text
        assert "--select-max 1000" in text and "--eval " in text and "--holdout" not in text
    md = (out / "study.md").read_text()
    # one evaluation after step 0: final, best and late mean agree
    assert ("| 67,349 | 0.867, 0.867, 0.867 | 0.800, 0.800, 0.800 | +0.067, +0.067, +0.067 | "
            "1955 | 3467 |") in md
    assert "the rule the theta phase's size follows): +0.067 at 67,349 examples" in md
    assert (out / "ceiling.png").read_bytes()[:4] == b"\x89PNG"
    # study v2's Bilevel-ZOFO minus lr 0 at 8,000 examples, read against this ceiling
    with zipfile.ZipFile(ROOT / "benchmarks/results/study_v2/runs.zip") as z:
        on, off = (json.loads(z.read(f"data8000_{r}_seed0/summary.json"))["eval_accuracy"]
                   for r in ("bilevel-zofo", "bilevel-zofo-zo0"))
    assert (f"Bilevel-ZOFO minus its lr-0 ablation {on - off:+.3f}, "
            f"{(on - off) / 0.008:+.2f} of this ceiling.") in md

    before = set(train.commands)
    assert v3.main(["--phase", "theta", "--output", str(out)]) == 0
    theta = {n: train.commands[n] for n in set(train.commands) - before}
    assert sorted(theta) == sorted(f"theta67349_{r}_seed0" for r in ("rms", "std", "sparse",
                                                                       "zo0"))
    for name, cmd in theta.items():
        text = " ".join(cmd) + " "
        assert "--method bilevel-zofo " in text and "--num-train 67349 " in text
        assert "--steps 525 " in text and "--lam 10.0 " in text
    assert "--theta-update std --n-directions 2 " in " ".join(theta["theta67349_std_seed0"]) + " "
    assert "--sparse-fraction 0.2 " in " ".join(theta["theta67349_sparse_seed0"]) + " "
    assert "--lr 0.0 " in " ".join(theta["theta67349_zo0_seed0"]) + " "
    assert "--lr 0.0001 " in " ".join(theta["theta67349_rms_seed0"]) + " "
    md = (out / "study.md").read_text()
    # std's gain over lr 0 and as a fraction of the ceiling at that size: 0.004 / 0.067
    assert ("| std | 1 | 0.844 | 0.844 | 0.844 | 1050 | +0.004, +0.004 | +0.06, +0.06 | "
            "1.0e-04 / 1.0e-06 |") in md
    assert ("| rms | 1 | 0.840 | 0.840 | 0.840 | 1050 | +0.000, +0.000 | +0.00, +0.00 | "
            "1.0e-04 / 1.0e-06 |") in md
    assert (out / "theta_diagnostics.png").read_bytes()[:4] == b"\x89PNG"

    # a re-run launches nothing: every run is in the archive
    count = len(train.commands)
    v3.main(["--phase", "theta", "--output", str(out)])
    v3.main(["--phase", "ceiling", "--output", str(out)])
    assert len(train.commands) == count


class FakeGemmaTrain:
    """Stands in for subprocess.run of gemma_first_reading.Reading: writes a finished run into
    --output. FZOO's pilot ends highest at lr 3e-4; a dev run climbs linearly with the forward
    passes to 0.80 + lr-dependent end, so the forwards to a target are predictable."""

    def __init__(self):
        self.commands = {}

    def __call__(self, cmd, cwd=None, stdout=None, stderr=None, env=None):
        out = Path(cmd[cmd.index("--output") + 1])
        self.commands[out.name] = cmd
        steps = int(cmd[cmd.index("--steps") + 1])
        every = int(cmd[cmd.index("--eval-every-steps") + 1])
        per_step = 5 if "--normalize" in cmd else 2
        lr = float(cmd[cmd.index("--lr") + 1])
        end = {1e-4: 0.70, 3e-4: 0.80, 1e-3: 0.60}.get(lr, 0.90)
        evals = [dict(kind="eval", step=s, forward_count=s * per_step,
                      eval_accuracy=round(0.66 + (end - 0.66) * s / steps, 4))
                 for s in [*range(0, steps, every), steps]]
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        (out / "summary.json").write_text(json.dumps(dict(
            eval_accuracy=evals[-1]["eval_accuracy"], best_eval_accuracy=evals[-1]["eval_accuracy"],
            steps=evals[-1]["step"], forward_count=evals[-1]["forward_count"],
            hyperparameters={"lr": lr})))
        return type("Done", (), {"returncode": 0})()


def test_gemma_mezo_rows_at_plain_mezos_forwards(v3, tmp_path, monkeypatch):
    if not (ROOT.parent / "shared" / "data" / "sst2" / "train.tsv").is_file():
        pytest.skip("SST-2 is absent")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fake = FakeGemmaTrain()
    monkeypatch.setattr(v3.first, "subprocess", type("P", (), {"run": staticmethod(fake),
                                                               "STDOUT": -2}))
    out = tmp_path / "study_v3"
    assert v3.main(["--phase", "gemma-mezo", "--output", str(out)]) == 0
    first = v3.StudyV3.first_reading()
    plain = first.summary("reading_mezo")
    sparse_lr = first.pilot_best("pilot_mezo-sparse", (1e-6, 5e-6), "sparse")
    assert sorted(fake.commands) == ["gemma_mezo-fzoo", "gemma_mezo-sparse",
                                     "pilot_mezo-fzoo_lr0.0001", "pilot_mezo-fzoo_lr0.0003",
                                     "pilot_mezo-fzoo_lr0.001"]
    texts = {n: " ".join(c) + " " for n, c in fake.commands.items()}
    for lr in ("0.0001", "0.0003", "0.001"):
        t = texts[f"pilot_mezo-fzoo_lr{lr}"]
        # the first reading's pilot budget in forwards (150 MeZO steps = 300), held-out data
        assert "--steps 60 " in t and "--holdout 300 " in t and f"--lr {lr} " in t
    for t in texts.values():
        assert "--model gemma3-270m --method mezo " in t and "--distribution rademacher " in t
    fzoo = "--estimator forward --n-directions 4 --normalize std "
    assert all(fzoo in t for n, t in texts.items() if "fzoo" in n)
    # plain MeZO's forward count, as steps of each row; FZOO at the pilot's best lr
    assert f"--steps {plain['forward_count'] // 2} " in texts["gemma_mezo-sparse"]
    assert f"--sparse-fraction 0.2 --lr {sparse_lr:g} " in texts["gemma_mezo-sparse"]
    assert f"--steps {plain['forward_count'] // 5} " in texts["gemma_mezo-fzoo"]
    assert "--lr 0.0003 " in texts["gemma_mezo-fzoo"] and "--eval " in texts["gemma_mezo-fzoo"]
    md = (out / "study.md").read_text()
    assert "lr 0.0003: 0.800 (best 0.800)" in md
    # the fake sparse run climbs linearly to 0.90 and passes plain MeZO's final; FZOO's
    # ends at 0.80, below it
    row = next(line for line in md.splitlines() if line.startswith("| mezo-sparse |"))
    assert "| 0.900 | 0.900 |" in row and "not reached" not in row
    assert "not reached" in next(line for line in md.splitlines()
                                  if line.startswith("| mezo-fzoo |"))  # ends at 0.80
    assert (out / "gemma_mezo.png").read_bytes()[:4] == b"\x89PNG"


def test_late_mean_averages_the_last_third_of_the_budget(v3, tmp_path):
    """The late mean: every evaluation at or after two thirds of the run's last step (never
    step 0), averaged."""
    import argparse
    study = v3.StudyV3(argparse.Namespace(output=tmp_path / "s"))
    evals = [dict(kind="eval", step=s, eval_accuracy=a)
             for s, a in ((0, 0.5), (30, 0.6), (59, 0.65), (60, 0.7), (90, 0.9))]
    study.archive.add({"r/summary.json": b"{}", "r/metrics.jsonl": "".join(
        json.dumps(e) + "\n" for e in evals).encode()})
    assert study.late_mean("r") == pytest.approx((0.7 + 0.9) / 2)
