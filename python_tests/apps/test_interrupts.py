"""zofo-train cut short: periodic checkpoints, SIGKILL at many moments, a full disk, a graceful
stop on SIGTERM / SIGINT, and --resume ending bit for bit where an uninterrupted run ends.

The kills are real: the run is a forked child (the parent has torch and transformers loaded,
so a child costs no start-up) that dies by SIGKILL at a named moment of the real code path
(``durable.crash_point``, switched on by ``ZOFO_TEST_CRASH``). The tests install the signal
handlers they need, so the suite passes when Python starts with SIGINT ignored.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from zofo_kernels.apps import train
from zofo_kernels.integrations import checkpoint as ckpt_mod
from zofo_kernels.integrations import durable

STEPS = 6


def _data(tmp_path_factory):
    sst2_dir = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                             "..", "..", "shared", "data", "sst2"))
    if not os.path.isdir(sst2_dir):
        pytest.skip(f"SST-2 data folder {sst2_dir} is absent")
    root = tmp_path_factory.mktemp("data")
    for name, n in (("train.tsv", 120), ("dev.tsv", 24)):
        lines = open(os.path.join(sst2_dir, name), encoding="utf-8").read().splitlines()
        (root / name).write_text("\n".join(lines[:n + 1]) + "\n", encoding="utf-8")
    return root


def _argv(data, out, *extra):
    return ["--model", "tiny-bert", "--method", "bilevel-zofo", "--train",
            str(data / "train.tsv"), "--eval", str(data / "dev.tsv"), "--num-train", "36",
            "--batch-size", "4", "--inner-steps", "1", "--steps", str(STEPS), "--eval-every-steps",
            "2", "--log-every", "1", "--checkpoint-every-steps", "2", "--threads", "1",
            "--no-progress", "--output", str(out), *extra]


def _weights(folder):
    model = ckpt_mod.load_trained(folder, with_lower=True).model
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rows(folder):
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    keep = ("kind", "step", "loss", "eval_accuracy", "select_loss", "f", "forward_count")
    return [{k: r.get(k) for k in keep} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data = _data(tmp_path_factory)
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train.main(_argv(data, out)) == 0
    return data, _weights(out), _rows(out)


def _assert_same(out, reference):
    _, weights, rows = reference
    got = _weights(out)
    assert got.keys() == weights.keys()
    for k in weights:
        assert torch.equal(got[k], weights[k]), k
    assert _rows(out) == rows


def _killed_child(argv, spec):
    """Run zofo-train in a forked child with ``ZOFO_TEST_CRASH=spec``; its wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.environ[durable.CRASH_ENV] = spec
            durable.crash_counts.clear()
            torch.set_num_threads(1)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = train.main(argv)
        finally:
            os._exit(code if isinstance(code, int) else 4)
    _, status = os.waitpid(pid, 0)
    return status


def _resume_to_the_end(out, data):
    if (out / ckpt_mod.MANIFEST).exists() or (out / ckpt_mod.MANIFEST).with_name(
            out.name + durable.OLD_TAG).exists():
        return train.main(["--resume", str(out), "--steps", str(STEPS), "--no-progress"])
    # killed before the first checkpoint: nothing to resume, the run starts again
    return train.main(_argv(data, out, "--overwrite"))


KILL_POINTS = [
    "loop:before-step#1",      # before any checkpoint: the run starts again
    "loop:after-step#3",       # during steps, after the checkpoint of step 2
    "loop:before-step#6",
    "save:backbone#2",         # during a save: the parts written into the temporary sibling
    "save:adapters#3",
    "save:resume#3",
    "durable:written#3",       # everything written, no completion record yet
    "durable:sealed#3",        # sealed, not yet swapped in
    "durable:old-moved#2",     # between the two renames
    "durable:swapped#2",       # swapped, the old version not yet removed
    "durable:old-moved#3",     # the final save
    "save:resume#4",
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_any_moment_then_resume_is_bit_identical(reference, tmp_path, point):
    data = reference[0]
    out = tmp_path / "run"
    status = _killed_child(_argv(data, out), point)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)
    # the folder never holds a half-written checkpoint: it is complete, or there is none
    if (out / ckpt_mod.MANIFEST).exists():
        ckpt_mod.read_manifest(out)
    assert _resume_to_the_end(out, data) == 0
    _assert_same(out, reference)
    assert not [p.name for p in out.parent.iterdir() if durable.is_temporary(p.name)]


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    data = reference[0]
    out = tmp_path / "run"
    monkeypatch.setenv(durable.CRASH_ENV, "save:adapters#4=enospc")
    durable.crash_counts.clear()
    with pytest.raises(OSError, match="No space left"):
        train.main(_argv(data, out))
    monkeypatch.delenv(durable.CRASH_ENV)
    manifest = ckpt_mod.read_manifest(out)            # the previous checkpoint, complete
    assert json.loads((out / manifest["run_state"]).read_text())["progress"]["step"] >= 2
    ckpt_mod.load_trained(out)
    assert not [p.name for p in tmp_path.iterdir() if durable.is_temporary(p.name)]
    assert _resume_to_the_end(out, data) == 0
    _assert_same(out, reference)


def _signal_run(reference, tmp_path, monkeypatch, spec):
    data = reference[0]
    out = tmp_path / "run"
    monkeypatch.setenv(durable.CRASH_ENV, spec)
    durable.crash_counts.clear()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(_argv(data, out))
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.delenv(durable.CRASH_ENV)
    return out, stop.value.code


@pytest.mark.parametrize("sig", ["sigterm", "sigint"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_resumes(reference, tmp_path,
                                                                     monkeypatch, capsys, sig):
    out, code = _signal_run(reference, tmp_path, monkeypatch, f"loop:after-step#3={sig}")
    assert code == train.stopping.EXIT_STOPPED
    err = capsys.readouterr().err
    assert f"stopped by {sig.upper()} after step 3" in err and f"--resume {out}" in err
    state = json.loads((out / ckpt_mod.RUN_STATE_FILE).read_text())
    assert state["progress"]["step"] == 3
    assert train.main(["--resume", str(out), "--steps", str(STEPS), "--no-progress"]) == 0
    _assert_same(out, reference)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(reference, tmp_path,
                                                                     monkeypatch, capsys):
    data = reference[0]
    out = tmp_path / "run"
    # the first SIGTERM after step 3; the second while that checkpoint is being written
    monkeypatch.setenv(durable.CRASH_ENV, "loop:after-step#3=sigterm,save:adapters#3=sigterm")
    durable.crash_counts.clear()
    assert train.main(_argv(data, out)) == 130
    monkeypatch.delenv(durable.CRASH_ENV)
    assert "stopping at once" in capsys.readouterr().err
    state = json.loads((out / ckpt_mod.RUN_STATE_FILE).read_text())
    assert state["progress"]["step"] == 2          # the checkpoint before the signals
    assert not [p.name for p in tmp_path.iterdir() if durable.is_temporary(p.name)]
    assert train.main(["--resume", str(out), "--steps", str(STEPS), "--no-progress"]) == 0
    _assert_same(out, reference)


def test_sigterm_to_a_long_run_exits_soon_and_the_folder_resumes(reference, tmp_path):
    """The issue's probe, small: a run with a 300 s budget gets SIGTERM a few steps in; it exits
    within a minute with the stop status, and --resume continues it."""
    data = reference[0]
    out = tmp_path / "run"
    argv = _argv(data, out)
    argv[argv.index("--steps"):argv.index("--steps") + 2] = ["--time-budget", "300"]
    argv[argv.index("--checkpoint-every-steps"):argv.index("--checkpoint-every-steps") + 2] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "zofo_kernels.apps.train", *argv], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = (out / "metrics.jsonl").read_text().count('"train"') if (
            out / "metrics.jsonl").exists() else 0
        if rows >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == train.stopping.EXIT_STOPPED, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    step = json.loads((out / ckpt_mod.RUN_STATE_FILE).read_text())["progress"]["step"]
    assert step >= 2
    assert train.main(["--resume", str(out), "--steps", str(step + 1), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 1


@pytest.mark.skipif(not os.environ.get("ZOFO_DIST_KILL_TEST"),
                    reason="three torchrun jobs (80 s on two cores): run by .ci/run's signal "
                           "stage (ZOFO_DIST_KILL_TEST=1)")
def test_torchrun_two_ranks_killed_then_resumed_is_bit_identical(tmp_path):
    """Two data-parallel ranks SIGKILLed after step 3 (rank 0 wrote the checkpoint of step
    2); the job resumed under torchrun ends where an uninterrupted two-rank job ends."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from dist_workers.launch import torchrun, worker

    rows = ["sentence\tlabel"] + [f"{'good fun' if i % 2 else 'dull mess'} {i}\t{i % 2}"
                                  for i in range(48)]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")

    def job(out, *extra, env=None):
        return torchrun(worker("train_worker.py"), [
            "--model", "tiny-bert", "--method", "mezo", "--train", str(tsv), "--eval", str(tsv),
            "--num-train", "32", "--batch-size", "4", "--max-length", "16", "--steps", "4",
            "--checkpoint-every-steps", "2", "--eval-every-steps", "2", "--no-progress",
            "--output", str(out), *extra], timeout=180, env=env)

    full = job(tmp_path / "full")
    assert full.returncode == 0, full.stdout[-3000:]
    killed = job(tmp_path / "run", env={durable.CRASH_ENV: "loop:after-step#3"})
    assert killed.returncode != 0
    assert json.loads((tmp_path / "run" / ckpt_mod.RUN_STATE_FILE).read_text()
                      )["progress"]["step"] == 2
    resumed = torchrun(worker("train_worker.py"), ["--resume", str(tmp_path / "run"), "--steps",
                                                   "4", "--no-progress"], timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "run")
