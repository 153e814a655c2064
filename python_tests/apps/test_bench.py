"""zofo-bench: step split, memory subprocesses, report files, target checks."""

import csv
import json
import math

import pytest

from zofo_kernels.apps import bench


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_bench_end_to_end_on_a_tiny_model(tmp_path):
    assert bench.main(["--model", "tiny-bert", "--batch-size", "2", "--seq-len", "8",
                       "--repeats", "2", "--warmup", "1", "--no-memory",
                       "--output", str(tmp_path), "--tag", "t", "--no-progress"]) == 0
    steps = {r["method"]: r for r in _rows(tmp_path / "steps_t.csv")}
    assert set(steps) == set(bench.METHODS)
    per_step = {m: (int(r["forwards_per_step"]), int(r["backwards_per_step"]))
                for m, r in steps.items()}
    assert per_step == {"forward": (1, 0), "mezo": (2, 0), "mezo-rademacher": (2, 0),
                        "mezo-sparse": (2, 0), "mezo-lowrank": (2, 0),
                        "mezo-fzoo": (bench.FZOO_DIRECTIONS + 1, 0), "mezo-ref": (2, 0),
                        "fo-full": (1, 1), "fo-lora": (1, 1),
                        # K=1 lower step, FO upper step (f and g_P), g_S at theta (f and g_P
                        # reused for L0), forward-difference ZO: 3 forwards per direction
                        "bilevel-zofo": (1 + 2 + 1 + 3, 1 + 2),
                        "bilevel-zofo-adam": (1 + 2 + 1 + 3, 1 + 2)}
    for r in steps.values():
        step, fwd, other = float(r["step_s"]), float(r["forward_s"]), float(r["other_s"])
        assert step > 0 and 0 < fwd <= step * 1.0001
        assert abs(step - fwd - other) < 0.5 * step + 1e-4
        assert int(r["repeats"]) == 2
    assert steps["forward"]["step_over_2fwd"] == ""
    assert float(steps["mezo"]["step_over_2fwd"]) > 0
    assert float(steps["mezo"]["mezo_ref_over_step"]) > 0

    md = (tmp_path / "bench_t.md").read_text()
    assert "| tiny-bert | mezo |" in md
    assert (tmp_path / "steps_t.png").stat().st_size > 1000
    checks = _rows(tmp_path / "checks_t.csv")
    assert {c["check"] for c in checks} >= {"ZO step (Gaussian) / two forward passes",
                                            "MeZO reference step / ZO step (Gaussian)"}


def test_the_authors_update_costs_backbone_sized_buffers(tmp_path):
    """zofo-bench measures the opt-in theta_update='adam': its extra peak over the fused
    Bilevel-ZOFO step is at least 1.5x the weights (grad, exp_avg, exp_avg_sq: 3x expected),
    on MiniLM-L6's shape (22.7 M parameters, 91 MB in float32), in fresh processes."""
    assert bench.main(["--model", "minilm-random", "--batch-size", "2", "--seq-len", "8",
                       "--methods", "bilevel-zofo", "bilevel-zofo-adam", "--repeats", "1",
                       "--warmup", "0", "--memory-steps", "1", "--output", str(tmp_path),
                       "--tag", "a", "--no-progress", "--threads", "1"]) == 0
    mem = {r["method"]: r for r in _rows(tmp_path / "memory_a.csv")}
    weights = int(mem["bilevel-zofo"]["model_bytes"])
    extra = {m: int(mem[m]["extra_peak_bytes"]) for m in ("bilevel-zofo", "bilevel-zofo-adam")}
    print(f"extra peak: fused {extra['bilevel-zofo'] / 2**20:.0f} MiB, authors' Adam "
          f"{extra['bilevel-zofo-adam'] / 2**20:.0f} MiB, weights {weights / 2**20:.0f} MiB")
    assert extra["bilevel-zofo-adam"] - extra["bilevel-zofo"] > 1.5 * weights


def test_memory_subprocesses(tmp_path):
    assert bench.main(["--model", "tiny-bert", "--batch-size", "2", "--seq-len", "8",
                       "--methods", "mezo", "fo-full", "--repeats", "1", "--warmup", "0",
                       "--memory-steps", "1", "--output", str(tmp_path), "--tag", "m",
                       "--no-progress"]) == 0
    mem = {r["method"]: r for r in _rows(tmp_path / "memory_m.csv")}
    assert set(mem) == {"inference", "mezo", "fo-full"}
    model_bytes = int(mem["inference"]["model_bytes"])
    # Adam on every weight keeps a gradient and two moments: at least 2 extra copies.
    assert (int(mem["fo-full"]["extra_peak_bytes"])
            >= int(mem["inference"]["extra_peak_bytes"]) + 2 * model_bytes)
    # a ZO step adds (almost) nothing to inference: far less than one copy of the weights
    assert int(mem["mezo"]["extra_over_inference_bytes"]) < 0.5 * model_bytes
    assert float(mem["inference"]["extra_over_inference_pct_of_model"]) == 0.0
    assert "extra peak" in (tmp_path / "bench_m.md").read_text()
    assert (tmp_path / "memory_m.png").stat().st_size > 1000


def test_checks_apply_the_targets():
    step_rows = [dict(model="m", method="mezo", step_over_2fwd=1.05, mezo_ref_over_step=2.5),
                 dict(model="m", method="mezo-rademacher", step_over_2fwd=1.2,
                      mezo_ref_over_step=1.5)]
    mem_rows = [dict(model="m", method="mezo", extra_over_inference_pct_of_model=0.2,
                     total_peak_bytes=100),
                dict(model="m", method="mezo-sparse", extra_over_inference_pct_of_model=4.5),
                dict(model="m", method="bilevel-zofo", total_peak_bytes=120),
                dict(model="m", method="fo-lora", total_peak_bytes=100)]
    got = {c["check"]: c["passed"] for c in bench.checks(step_rows, mem_rows)}
    assert got == {"ZO step (Gaussian) / two forward passes": True,
                   "MeZO reference step / ZO step (Gaussian)": True,
                   "ZO step (Rademacher) / two forward passes": False,
                   "MeZO reference step / ZO step (Rademacher)": False,
                   "ZO extra peak over inference, % of weights": True,
                   # the bitmap is 3.125% of float32 weights; 4.5% is over the 4.125% target
                   "sparse ZO extra peak over inference, % of weights": False,
                   "Bilevel-ZOFO / FO-LoRA peak (weights + extra)": False}


def test_bad_arguments():
    with pytest.raises(SystemExit, match="unknown model"):
        bench.main(["--model", "gpt-9", "--no-memory"])
    with pytest.raises(SystemExit):
        bench.main(["--methods", "sgd"])


def _study_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "study_sst2.py"
    spec = importlib.util.spec_from_file_location("study_sst2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _curve(points):
    return [dict(wall_time_s=t, eval_accuracy=a) for t, a in points]


def _fake_run(folder, points, hp=None, bilevel=(), memory=100 * 2**20, selected=None):
    """A run folder as zofo-train writes it: summary.json and metrics.jsonl."""
    folder.mkdir(parents=True)
    evals = [dict(kind="eval", step=10 * i, wall_time_s=t, eval_accuracy=a)
             for i, (t, a) in enumerate(points)]
    accs = [a for _, a in points]
    summary = dict(eval_accuracy=accs[-1], best_eval_accuracy=max(accs),
                   selected_eval_accuracy=accs[-1] if selected is None else selected,
                   initial_eval_accuracy=accs[0], steps=evals[-1]["step"],
                   wall_time_s=points[-1][0], forward_count=100, backward_count=0,
                   peak_memory_bytes=memory, hyperparameters=dict(hp or {}))
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = evals + [dict(kind="bilevel", step=i + 1, projected_grads=[g], gap=0.01,
                         theta_step_rms=1e-5) for i, g in enumerate(bilevel)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _record(study, name, points, **kw):
    """A fake run made outside the study, then recorded into its archive as a finished run."""
    folder = study.out.parent / "made" / name
    _fake_run(folder, points, **kw)
    study.record(name, folder)


def test_study_picks_by_final_holdout_accuracy_and_reports_the_verdict(tmp_path):
    study_mod = _study_module()
    args = study_mod.argparse.Namespace(
        output=tmp_path / "study", budget_minutes=1.0, sweep_minutes=1.0, holdout=10,
        num_train=20, parallel=2, seeds=[0, 1], commit=False)
    study = study_mod.Study(args)
    for row, grid in study_mod.SWEEP.items():
        for i, hp in enumerate(grid):
            # setting 0 peaks higher but collapses; setting 1 ends higher: 1 is chosen
            pts = [(0, 0.5), (30, 0.9), (60, 0.55)] if i == 0 else [(0, 0.5), (60, 0.8)]
            _record(study, f"sweep_{row}_{i}", pts, hp=hp)
    chosen = study.chosen()
    assert chosen["fo-lora"] == study_mod.SWEEP["fo-lora"][1]
    assert chosen["bilevel-zofo-zo0"] == dict(study_mod.SWEEP["bilevel-zofo"][1], lr=0.0)
    curves = {"mezo": [(0, 0.5), (100, 0.6), (200, 0.7), (300, 0.7)],
              "bilevel-zofo": [(0, 0.5), (50, 0.72), (300, 0.8)],
              "bilevel-zofo-zo0": [(0, 0.5), (300, 0.78)],
              "fo-lora": [(0, 0.5), (300, 0.85)]}
    for seed in (0, 1):
        for row, pts in curves.items():
            _record(study, f"main_{row}_seed{seed}", pts,
                    memory=(120 if row == "bilevel-zofo" else 100) * 2**20)
    for lam in study_mod.LAMBDAS:
        pts = [(0, 0.5), (30, 0.8), (60, 0.6 if lam == 1000 else 0.79)]
        _record(study, f"lambda_rms_{lam:g}", pts,
                hp=dict(theta_update="rms", lam=lam, lr=1e-5), bilevel=[3.0, -4.0])
    _record(study, "stability_bilevel-zofo_seed1", [(0, 0.5), (30, 0.9), (60, 0.8)])
    n = study_mod.DATA_NUM_TRAIN
    _record(study, f"data{n}_bilevel-zofo_seed0", [(0, 0.5), (300, 0.84)])
    _record(study, f"data{n}_bilevel-zofo-zo0_seed0", [(0, 0.5), (300, 0.83)])
    for seed, end in ((0, 0.81), (1, 0.83)):  # subset mean 0.82 vs lr 0's 0.78: +0.040
        _record(study, f"subset_bilevel-zofo_seed{seed}", [(0, 0.5), (300, end)])
    assert study.grad_rms("lambda_rms_10") == pytest.approx(math.sqrt(12.5))
    study.report()
    md = (study.out / "study.md").read_text()
    # on the mean curve's 200-point grid: MeZO's 0.7 at ~201.5 s, Bilevel-ZOFO's at ~51.3 s
    assert "Bilevel-ZOFO reached it at 0.9 min" in md and "(3.9x faster)" in md
    assert "Bilevel-ZOFO 0.800 ± 0.000 vs fo-lora 0.850 ± 0.000: difference -0.050" in md
    assert "vs bilevel-zofo-zo0 0.780 ± 0.000: difference +0.020" in md
    assert "(1.20x)" in md
    assert "| bilevel-zofo-zo0 | 0.830 | 0.830 | 0.830 | 10 |" in md
    assert "Bilevel-ZOFO minus its lr-0 ablation, final dev accuracy: +0.010" in md
    # subset and lr-0 runs make 10 steps, the whole-backbone run 20 (three evals): at step 10
    # it stands at 0.72 against lr 0's 0.78
    assert ("| 1 | subset (31 k weights) | 0.830 | 0.830 | 0.830 | 10 | 100 | "
            "0.830 (step 10) |") in md
    assert ("Subset minus lr 0, mean final dev accuracy over 2 seed(s): +0.040 (subset "
            "0.820 ± 0.014, lr 0 0.780 ± 0.000); whole backbone minus lr 0: +0.020. At equal "
            "outer steps: subset minus lr 0 +0.040, whole backbone minus lr 0 -0.060.") in md
    # seed 0's stability run is lambda_rms_10 (drop 0.01, 20 steps); seed 1's collapses
    assert "**Stable at the default λ (seeds 0, 1, at least 20 outer steps each)**: " \
           "**collapsed**; the largest drop from a run's best to its end is 0.100 (seed 1;" in md
    assert "| 1 | `stability_bilevel-zofo_seed1` | 20 | 0.800 | 0.900 |" in md
    lam_rows = [l for l in md.splitlines() if l.startswith("| rms |")]
    assert [("**yes**" in l) for l in lam_rows] == [False, False, False, True]
    for f in ("study.png", "lambda.png", "diagnostics.png", "runs.csv", "lambda.csv",
              "sweep.csv"):
        assert (study.out / f).stat().st_size > 0, f
    # the runs live in the study's archive alone: no run folder beside the report
    assert not (study.out / "runs").exists()
    assert len(study.archive.runs()) == 2 * 6 + 2 * 4 + 4 + 1 + 2 + 2


def test_study_figure_is_written(tmp_path):
    from zofo_kernels.apps import plotting
    curves = {"mezo": [_curve([(0, 0.5), (60, 0.55), (120, 0.56)])],
              "bilevel-zofo": [_curve([(0, 0.5), (60, 0.78), (120, 0.51)])]}
    out = tmp_path / "study.png"
    plotting.plot_study(curves, out, title="a long title " * 20, reference=0.56,
                        reference_label="MeZO's best")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


# --------------------------------------------------------------------------- colours, messages

def _capture_figures(monkeypatch):
    from zofo_kernels.apps import plotting
    figs = []
    real_close = plotting.plt.close
    monkeypatch.setattr(plotting.plt, "close", lambda fig=None: figs.append(fig))
    return figs, real_close


def _bar_colors(ax):
    from matplotlib.colors import to_hex
    return [to_hex(p.get_facecolor(), keep_alpha=False) for p in ax.patches]


def test_every_method_has_its_own_colour_in_every_plot(tmp_path, monkeypatch):
    from matplotlib.colors import to_hex

    from zofo_kernels.apps import plotting
    every = list(dict.fromkeys(list(bench.METHODS) + list(bench.MEMORY_METHODS) +
                               ["mezo", "mezo-lora", "fo-lora", "bilevel-zofo", "new-method"]))
    colors = plotting.method_colors(every)
    assert len({to_hex(c) for c in colors.values()}) == len(every), colors
    # a known method keeps its colour whatever else is in the figure
    assert plotting.method_colors(["mezo", "bilevel-zofo"])["mezo"] == colors["mezo"]
    assert plotting.method_colors(["x", "y"], avoid=[colors["mezo"]])["x"] != colors["mezo"]

    figs, real_close = _capture_figures(monkeypatch)
    mem = [dict(model="m", method=m, extra_peak_bytes=2 ** 20 * (i + 1), model_bytes=2 ** 24)
           for i, m in enumerate(bench.MEMORY_METHODS)]
    plotting.plot_memory(mem, tmp_path / "mem.png")
    steps = [dict(model="m", method=m, forward_s=0.01, other_s=0.002) for m in bench.METHODS]
    plotting.plot_bench(steps, tmp_path / "steps.png")
    curves = {m: [[dict(wall_time_s=0, eval_accuracy=0.5), dict(wall_time_s=60,
                                                               eval_accuracy=0.6)]]
              for m in ("mezo", "mezo-lora", "fo-lora", "bilevel-zofo")}
    plotting.plot_study(curves, tmp_path / "study.png")
    mem_fig, steps_fig, study_fig = figs
    got = _bar_colors(mem_fig.axes[0])
    assert len(set(got)) == len(bench.MEMORY_METHODS), got
    got = _bar_colors(steps_fig.axes[0])  # forward parts, then the rest: same colour per method
    n = len(bench.METHODS)
    assert got[:n] == got[n:] and len(set(got[:n])) == n, got
    lines = [to_hex(ln.get_color()) for ln in study_fig.axes[0].get_lines()]
    assert len(set(lines)) == len(curves), lines
    for f in figs:
        real_close(f)


def test_bench_names_absolute_output_folder_and_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--model", "tiny-bert", "--batch-size", "2", "--seq-len", "8",
                       "--methods", "forward", "mezo", "mezo-ref", "--repeats", "1",
                       "--warmup", "0", "--no-memory", "--output", "rel", "--tag", "t",
                       "--no-progress"]) == 0
    out = capsys.readouterr().out
    folder = (tmp_path / "rel").resolve()
    tail = out[out.index("zofo-bench: done"):].splitlines()
    assert f"to {folder}{__import__('os').sep}:" in tail[0], tail
    listed = [ln.strip() for ln in tail[1:] if ln.strip()]
    assert listed and sorted(listed) == sorted(p.name for p in folder.iterdir()), listed
    assert "| tiny-bert | mezo-ref |" in out


def test_kernel_benchmark_dispatch_vs_native_mode(tmp_path, monkeypatch, capsys):
    """The mode's logic, with the generic module standing in for the native build (the real
    run compiles -march=native with CMake)."""
    import importlib.util
    from pathlib import Path

    from zofo_kernels.core.backends.native import loader as _native
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    mod, err = _native.cpu_module("generic")
    assert mod is not None, err
    monkeypatch.setattr(bk, "native_module", lambda build_dir: mod)
    csv_path = tmp_path / "d.csv"
    assert bk.main(["--dispatch-vs-native", "--sizes", "5000", "--dtypes", "bf16",
                    "--repeats", "1", "--warmup", "0", "--out", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "relative to -march=native: geometric mean" in out and "bit-identical" in out
    rows = _rows(csv_path)
    assert {r["backend"] for r in rows} == {f"cpu-{_native.cpu_choice()[0]}", "cpu-native"}
    assert {(r["op"], r["distribution"]) for r in rows} == {
        (o, d) for o in ("perturb", "update") for d in ("rademacher", "gaussian")}
