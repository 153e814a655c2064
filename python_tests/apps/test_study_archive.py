"""benchmarks/results stays small and its committed files stay as committed. The SST-2
study's run archive (benchmarks/study_sst2.py): the committed reports regenerate from the
archives, the archive's bytes depend on its members alone, and a study's runs are appended to
it, run by run, and skipped on a re-run. The kernel benchmark writes under the current folder
unless told otherwise."""

import csv
import importlib.util
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
STUDIES = ("study_v2", "study_7min_1seed", "study_15min_1seed")


@pytest.fixture(scope="module")
def study_mod():
    spec = importlib.util.spec_from_file_location("study_sst2_archive",
                                                  ROOT / "benchmarks" / "study_sst2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the committed studies ---------------------------------------------------------------------
@pytest.mark.parametrize("study", STUDIES)
def test_committed_study_keeps_its_runs_in_one_archive(study_mod, study):
    folder = RESULTS / study
    archive = study_mod.RunArchive(folder / study_mod.ARCHIVE)
    assert archive.path.is_file()
    assert not list(RESULTS.rglob("metrics.jsonl"))  # per-run logs live in the archives
    # no per-run file beside the report: every run folder is in the archive
    assert not (folder / "runs").exists()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == []
    assert not list(folder.glob("*.jsonl"))
    with zipfile.ZipFile(archive.path) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert {i.date_time for i in infos} == {study_mod._ZIP_TIME}
    for run in archive.runs():
        summary = json.loads(archive.read(f"{run}/summary.json"))
        assert "eval_accuracy" in summary, run
        assert archive.read(f"{run}/metrics.jsonl"), run


def test_study_v2_report_regenerates_from_its_archive(study_mod, tmp_path, capsys):
    """``--phase report`` on a copy of the committed archive alone writes the committed
    report and tables, byte for byte (the study's folder name is the report's title)."""
    committed = RESULTS / "study_v2"
    out = tmp_path / "study_v2"
    out.mkdir()
    shutil.copy(committed / study_mod.ARCHIVE, out / study_mod.ARCHIVE)
    assert study_mod.main(["--phase", "report", "--output", str(out)]) == 0
    capsys.readouterr()
    for name in ("study.md", "runs.csv", "sweep.csv", "lambda.csv",
                 "chosen_hyperparameters.json"):
        assert (out / name).read_text() == (committed / name).read_text(), name
    for name in ("study.png", "lambda.png", "diagnostics.png"):
        assert (out / name).stat().st_size > 0, name
    # reading the archive left it as it was
    assert (out / study_mod.ARCHIVE).read_bytes() == (committed / study_mod.ARCHIVE).read_bytes()


def _csv_text(rows):
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


@pytest.mark.parametrize("study", ("study_7min_1seed", "study_15min_1seed"))
def test_version_1_study_tables_regenerate_from_its_archive(study_mod, study):
    """The version-1 studies' report code is gone (the script was rewritten for version 2, see
    benchmarks/README.md), so their study.md stays as written; their tables are rebuilt here
    from the archive the way version 1 wrote them (runs.csv, curves.csv) and must equal the
    committed ones; every sweep.csv row must match its run's summary."""
    folder = RESULTS / study
    archive = study_mod.RunArchive(folder / study_mod.ARCHIVE)
    chosen = json.loads((folder / "chosen_hyperparameters.json").read_text())
    seeds = json.loads((folder / "summary.json").read_text())["seeds"]
    run_rows, curve_rows = [], []
    for seed in seeds:
        for m in chosen:
            name = f"{m}_seed{seed}"
            s = json.loads(archive.read(f"{name}/summary.json"))
            run_rows.append(dict(method=m, seed=seed, **{k: s[k] for k in (
                "eval_accuracy", "best_eval_accuracy", "initial_eval_accuracy", "steps",
                "wall_time_s", "eval_time_s", "forward_count", "backward_count",
                "peak_memory_bytes")}, hyperparameters=json.dumps(chosen[m])))
            evals = [r for r in map(json.loads,
                                    archive.read(f"{name}/metrics.jsonl").decode().splitlines())
                     if r["kind"] == "eval"]
            curve_rows += [dict(method=m, seed=seed, step=r["step"],
                                wall_time_s=r["wall_time_s"], eval_accuracy=r["eval_accuracy"])
                           for r in evals]
    assert _csv_text(run_rows) == (folder / "runs.csv").read_bytes().decode()
    assert _csv_text(curve_rows) == (folder / "curves.csv").read_bytes().decode()
    with open(folder / "sweep.csv", newline="") as fh:
        sweep = list(csv.DictReader(fh))
    assert sweep
    for r in sweep:
        s = json.loads(archive.read(f"sweep_{r['method']}_{r['config']}/summary.json"))
        assert float(r["holdout_final_accuracy"]) == s["eval_accuracy"]
        assert float(r["holdout_best_accuracy"]) == s["best_eval_accuracy"]
        assert int(r["steps"]) == s["steps"]


# -- the archive's bytes -----------------------------------------------------------------------
def test_archive_bytes_depend_on_its_members_alone(study_mod, tmp_path):
    members = {"b_run/summary.json": b'{"eval_accuracy": 0.5}',
               "a_run/metrics.jsonl": b'{"kind": "eval"}\n' * 50,
               "a_run/summary.json": b'{"eval_accuracy": 0.6}'}
    one = study_mod.RunArchive(tmp_path / "one.zip")
    two = study_mod.RunArchive(tmp_path / "two.zip")
    assert one.write(members)
    assert two.write(dict(reversed(list(members.items()))))
    data = one.path.read_bytes()
    assert data == two.path.read_bytes()
    assert one.runs() == ["a_run", "b_run"] and "a_run" in one and "c_run" not in one
    # rewriting an unchanged archive leaves the file as it is
    mtime = one.path.stat().st_mtime_ns
    assert not one.write(one.members())
    assert not one.add({"a_run/summary.json": b'{"eval_accuracy": 0.6}'})
    assert one.path.read_bytes() == data and one.path.stat().st_mtime_ns == mtime
    # and writing its members anew elsewhere gives the same bytes
    three = study_mod.RunArchive(tmp_path / "three.zip")
    assert three.write(one.members()) and three.path.read_bytes() == data
    with pytest.raises(ValueError, match="not a finished run"):
        (tmp_path / "empty").mkdir()
        one.add_run("c_run", tmp_path / "empty")


# -- a tiny fake study -------------------------------------------------------------------------
def _args(study_mod, out, **kw):
    args = dict(output=out, model="minilm", data=out.parent / "data", num_train=20,
                holdout=10, budget_minutes=0.5, sweep_minutes=0.5, evals=2, threads=1,
                parallel=2, code=None, seeds=[0], commit=True, rows=None)
    args.update(kw)
    return study_mod.argparse.Namespace(**args)


class _FakeTrain:
    """Stands in for the zofo-train process: writes what it writes (summary.json,
    metrics.jsonl, curves.png) into the command's --output folder; accuracy from the lr."""

    def __init__(self, fail=()):
        self.launched, self.fail = [], set(fail)

    def __call__(self, cmd, log):
        out = Path(cmd[cmd.index("--output") + 1])
        name = out.name
        self.launched.append(name)
        log.write_text(f"training {name}\n")
        if name in self.fail:
            return 1
        lr = float(cmd[cmd.index("--lr") + 1]) if "--lr" in cmd else 0.0
        acc = round(0.7 + min(lr, 1e-3) * 50, 3)
        evals = [dict(kind="eval", step=s, wall_time_s=float(s), eval_accuracy=a)
                 for s, a in ((0, 0.5), (10, acc))]
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        (out / "curves.png").write_bytes(b"\x89PNG fake")
        (out / "summary.json").write_text(json.dumps(dict(
            eval_accuracy=acc, best_eval_accuracy=acc, selected_eval_accuracy=acc,
            initial_eval_accuracy=0.5, steps=10, wall_time_s=10.0, forward_count=20,
            backward_count=0, peak_memory_bytes=2**20, hyperparameters={"lr": lr})))
        return 0


def test_a_study_appends_its_runs_to_the_archive_and_skips_them_on_a_rerun(
        study_mod, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "study_fake"
    study = study_mod.Study(_args(study_mod, out, rows=["fo-lora", "mezo"]))
    train, commits = _FakeTrain(), []
    study._launch = train
    study._commit = lambda path, message: commits.append((Path(path), message))

    study.sweep()  # two rows of the sweep: four runs
    first = ["sweep_mezo_0", "sweep_mezo_1", "sweep_fo-lora_0", "sweep_fo-lora_1"]
    assert sorted(train.launched) == sorted(first)  # two at a time: in either order
    assert study.archive.runs() == sorted(first)
    # each finished run was added to the archive and the archive committed, nothing else
    assert sorted(commits) == sorted((study.archive.path, f"study study_fake: run {n}")
                                     for n in first)
    assert sorted(p.name for p in out.iterdir()) == [study_mod.ARCHIVE]
    assert list(scratch.iterdir()) == []  # the runs' scratch folders are gone
    members = study.archive.members()
    assert sorted(members) == sorted(f"{n}/{f}" for n in first for f in (
        "command.txt", "curves.png", "metrics.jsonl", "summary.json"))
    cmd = members["sweep_mezo_1/command.txt"].decode()
    assert cmd.startswith("zofo-train --model minilm --method mezo ")
    assert "--output runs/sweep_mezo_1 " in cmd and "--lr 0.0001 " in cmd
    data = study.archive.path.read_bytes()

    # a re-run skips every run the archive holds: nothing launched, archive untouched
    study.sweep()
    assert len(train.launched) == 4 and len(commits) == 4
    assert study.archive.path.read_bytes() == data

    # a later sitting (a fresh Study on the same folder) appends the rest of the sweep
    later = study_mod.Study(_args(study_mod, out))
    later._launch, later._commit = train, study._commit
    later.sweep()
    assert sorted(train.launched[4:]) == sorted(
        f"sweep_{row}_{i}" for row in ("bilevel-zofo", "bilevel-zofo-adam", "mezo-lora",
                                       "fo-full") for i in range(2))
    grown = later.archive.members()
    assert {k: v for k, v in grown.items() if k in members} == members  # earlier runs kept
    assert len(later.archive.runs()) == 12 and len(commits) == 12

    # a run that fails adds nothing and keeps its files for a look; the runs that finished
    # beside it are recorded (pool.map cancels the phase's runs not yet started)
    failing = _FakeTrain(fail={"main_bilevel-zofo_seed0"})
    later._launch = failing
    with pytest.raises(RuntimeError, match="run main_bilevel-zofo_seed0 failed") as err:
        later.main_phase()
    mains = sorted(f"main_{row}_seed0" for row in study_mod.ROWS)
    finished = set(failing.launched) - {"main_bilevel-zofo_seed0"}
    assert "main_bilevel-zofo_seed0" in failing.launched
    assert {n for n in later.archive.runs() if n.startswith("main_")} == finished
    kept = list(scratch.iterdir())
    assert len(kept) == 1 and str(kept[0]) in str(err.value)
    assert (kept[0] / "main_bilevel-zofo_seed0.log").read_text() == \
        "training main_bilevel-zofo_seed0\n"

    # the re-run launches the missing runs alone and completes the phase
    later._launch = train
    later.main_phase()
    assert sorted(train.launched[12:]) == sorted(set(mains) - finished)
    assert "main_bilevel-zofo_seed0" in train.launched[12:]
    assert sorted(n for n in later.archive.runs() if n.startswith("main_")) == mains
    assert len(commits) == 12 + len(mains)

    # the report reads the archive alone
    later.report()
    md = (out / "study.md").read_text()
    assert "| fo-lora | lr=0.0003 | 0.715 | 0.715 | 10 |" in md
    assert "| fo-lora | lr=0.001 | 0.750 | 0.750 | 10 | yes |" in md
    assert "## Equal wall-clock budget" in md
    with open(out / "runs.csv", newline="") as fh:
        assert sorted(r["row"] for r in csv.DictReader(fh)) == sorted(study_mod.ROWS)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []


def test_pack_moves_run_folders_of_the_older_layout_into_the_archive(study_mod, tmp_path,
                                                                     capsys):
    out = tmp_path / "study_old"
    for name in ("sweep_mezo_0", "sweep_mezo_1"):
        rd = out / "runs" / name
        _FakeTrain()(["--output", str(rd), "--lr", "1e-5"], tmp_path / "log")
    assert study_mod.main(["--phase", "pack", "--output", str(out)]) == 0
    assert "2 run folder(s) moved" in capsys.readouterr().out
    assert not (out / "runs").exists()
    archive = study_mod.RunArchive(out / study_mod.ARCHIVE)
    assert archive.runs() == ["sweep_mezo_0", "sweep_mezo_1"]
    # a study folder with loose run folders is refused until they are packed
    _FakeTrain()(["--output", str(out / "runs" / "sweep_mezo_2")], tmp_path / "log")
    with pytest.raises(SystemExit, match="--phase pack"):
        study_mod.main(["--phase", "report", "--output", str(out)])


def test_kernel_benchmark_writes_under_the_current_folder(tmp_path, monkeypatch):
    """Not into the checkout's benchmarks/results (whose kernels_cpu.csv is committed), unless
    --output says so."""
    spec = importlib.util.spec_from_file_location("bench_kernels_output",
                                                  ROOT / "benchmarks" / "bench_kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    monkeypatch.chdir(tmp_path)
    args = bk.parse_args(["--device", "cpu", "--quick"])
    assert args.out == str(Path("zofo-bench-results") / "kernels_cpu.csv")
    assert bk.parse_args(["--device", "cpu", "--output", "benchmarks/results"]).out == \
        str(Path("benchmarks/results") / "kernels_cpu.csv")
    assert bk.parse_args(["--dispatch-vs-native", "--output", "r"]).out == \
        str(Path("r") / "kernels_cpu_dispatch.csv")
    assert bk.parse_args(["--device", "cpu", "--out", "x.csv"]).out == "x.csv"
    bk.write_csv([], args.out)
    assert (tmp_path / "zofo-bench-results" / "kernels_cpu.csv").is_file()
