"""Nothing writes into the checkout unless asked: the commands, benchmark scripts and the
example, run with their default outputs from a temporary folder (tiny sizes), write under
that folder, and the checkout's ``git status`` (ignored files included) is as before."""

import json
import runpy
import shutil
import subprocess
import sys

import pytest

from docblocks import REPO, Objects, _threads_kept, write_sst2_like

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                                reason="not a git checkout")


def checkout_state():
    """Every path git reports as changed, untracked or ignored (bytecode caches aside)."""
    out = subprocess.run(["git", "status", "--porcelain=v1", "--ignored",
                          "--untracked-files=all", "--", ".", ":(exclude).venv*"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines()
            if "__pycache__/" not in line and ".pytest_cache/" not in line}


def _script(rel):
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        return runpy.run_path(str(REPO / rel), run_name="zofo_outputs_check")
    finally:
        sys.dont_write_bytecode = saved


def _ok(rc):
    assert rc in (0, None), rc


class _Run:
    workdir = None


def test_default_outputs_go_under_the_current_folder(tmp_path, monkeypatch, one_thread):
    data = write_sst2_like(tmp_path / "shared" / "data" / "sst2")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    before = checkout_state()

    with _threads_kept():
        # the kernel benchmark: ./zofo-bench-results/kernels_cpu.csv, then its plot beside it
        kernels = _script("benchmarks/bench_kernels.py")
        _ok(kernels["main"](["--device", "cpu", "--sizes", "1000", "--repeats", "1",
                             "--warmup", "0", "--dtypes", "fp32", "--dists", "rademacher"]))
        csv = work / "zofo-bench-results" / "kernels_cpu.csv"
        assert csv.is_file()
        _ok(_script("benchmarks/plot_kernels.py")["main"]([str(csv.relative_to(work))]))
        assert csv.with_suffix(".png").is_file()

        # zofo-bench: ./zofo-bench-results/ (also what the README's main job writes)
        from zofo_kernels.apps import bench
        _ok(bench.main(["--model", "tiny-bert", "--methods", "forward", "mezo", "--repeats",
                        "1", "--warmup", "0", "--batch-size", "2", "--seq-len", "8",
                        "--no-memory", "--no-progress", "--tag", "t"]))
        assert (work / "zofo-bench-results" / "bench_t.md").is_file()

        # zofo-train: --output is required; a relative one is under the current folder
        from zofo_kernels.apps import train
        _ok(train.main(["--model", "tiny-bert", "--method", "mezo", "--train",
                        str(data / "train.tsv"), "--eval", str(data / "dev.tsv"),
                        "--num-train", "16", "--steps", "1", "--batch-size", "4",
                        "--max-length", "16", "--output", "runs/mezo", "--no-progress"]))
        assert json.loads((work / "runs" / "mezo" / "summary.json").read_text())["steps"] == 1

        # the example script: --output-dir relative to the current folder, nothing else
        run = _Run()
        run.workdir = work
        model_dir = Objects(run).tiny_model_folder()
        example = _script("examples/run_text_classification.py")
        _ok(example["main"](["--method", "mezo", "--model", str(model_dir), "--data-dir",
                             str(data), "--output-dir", "runs/example", "--max-steps", "1",
                             "--batch-size", "4", "--max-train-samples", "8",
                             "--max-eval-samples", "4", "--threads", "1"]))
        assert (work / "runs" / "example" / "eval_results.json").is_file()

    # the communication benchmark writes only the CSV it is asked for
    comm = _script("benchmarks/bench_comm.py")
    assert comm["parse_args"]([]).csv is None

    after = checkout_state()
    assert after == before, ("written into the checkout: "
                             f"{sorted(after - before)}; gone: {sorted(before - after)}")
