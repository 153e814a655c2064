"""Data-parallel ZO on torch.distributed: 2 real gloo processes under torchrun on loopback.

Every multi-process test runs the job under a hard wall-clock limit (the launcher kills the
process group), so a broken collective fails the test instead of hanging the suite.
"""

import json
import os
import time

import pytest
import torch

from dist_workers.launch import torchrun, worker
from zofo_kernels.core.distributed import (CommStats, DataParallelZO, DivergenceError,
                                      allreduce_gradients, broadcast_seed, check_replicas,
                                      setup_from_env, tensor_checksum)
from zofo_kernels.core.optim import ZOOptimizer


def _read(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- single process

@pytest.fixture
def no_torchrun_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def test_single_process_wrapper_is_the_plain_optimizer(no_torchrun_env):
    ctx = setup_from_env()
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))

    a, b = model(), model()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    opt_a = ZOOptimizer(a.parameters(), lr=0.05, seed=9)
    dp = DataParallelZO(ZOOptimizer(b.parameters(), lr=0.05, seed=9), model=b, check_every=1)
    for _ in range(3):
        la = opt_a.step(lambda: a(x).pow(2).mean())
        lb = dp.step(lambda: b(x).pow(2).mean())
        assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert dp.last_step_bytes == 0 and dp.stats.total_bytes() == 0
    assert broadcast_seed(77, ctx) == 77
    assert allreduce_gradients(b.parameters(), ctx) == 0


def test_wrapper_rejects_bad_arguments(no_torchrun_env):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(TypeError, match="ZOOptimizer"):
        DataParallelZO(torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match="check_every"):
        DataParallelZO(ZOOptimizer(p, lr=0.1, seed=1), check_every=-1)
    with pytest.raises(ValueError, match="loss_reduce"):
        DataParallelZO(ZOOptimizer(p, lr=0.1, seed=1, loss_reduce=lambda t: t))
    with pytest.raises(ValueError, match="closure"):
        DataParallelZO(ZOOptimizer(p, lr=0.1, seed=1)).step(None)
    with pytest.raises(ValueError, match="timeout"):
        setup_from_env(timeout_s=0)


def test_setup_requires_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        setup_from_env()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checksum_sees_a_one_ulp_change(dtype):
    t = torch.randn(3000, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = tensor_checksum(t)
    assert tensor_checksum(t.clone()) == before
    t[1234] = torch.nextafter(t[1234], torch.tensor(float("inf"), dtype=dtype))
    assert tensor_checksum(t) != before


def test_comm_stats_counts():
    s = CommStats()
    s.add("loss", 16)
    s.add("loss", 16)
    s.add("grad", 400)
    assert s.total_bytes() == 432 and s.total_bytes(["loss"]) == 32
    assert s.as_dict()["calls"] == {"loss": 2, "grad": 1}
    s.reset()
    assert s.total_bytes() == 0


def test_check_replicas_single_process_is_free(no_torchrun_env):
    ctx = setup_from_env()
    stats = CommStats()
    check_replicas([("w", torch.ones(4))], ctx, stats)
    assert stats.total_bytes() == 0
    assert issubclass(DivergenceError, RuntimeError)


# --------------------------------------------------------------------------- 2 processes

def test_data_parallel_equals_single_process_on_concatenated_batch(tmp_path):
    res = torchrun(worker("dp_worker.py"), [str(tmp_path)], timeout=150)
    assert res.returncode == 0, res.stdout[-4000:]
    r0, r1 = _read(tmp_path / "rank0.json"), _read(tmp_path / "rank1.json")
    # rank 0's seed won; rank 1 had none
    assert r0["base_seed"] == r1["base_seed"] == 1234
    # bit-identical replicas (also checked by the wrapper after every step)
    assert r0["checksums"] == r1["checksums"]
    assert r0["check_calls"] == 3
    # same losses and projected gradients as one process on the 8-row batch
    for r in (r0, r1):
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-6)
        for g, g_ref in zip(r["grads"], r["ref_grads"]):
            assert g == pytest.approx(g_ref, rel=1e-3, abs=1e-4)
        assert r["max_param_change"] > 1e-3  # the run did move the weights
        assert r["max_param_diff_vs_single"] < 1e-5
        # only the 2 losses of a central-difference step travel: 2 float64 = 16 bytes
        assert r["step_bytes"] == [16, 16, 16] and r["loss_bytes"] == 48
        assert r["fo_grad_diff"] < 1e-6 and r["fo_grad_bytes"] == (12 * 3 + 3) * 4
    # Bilevel-ZOFO: P and S gradients averaged (3 FO steps x 1024 floats), 2 losses (forward
    # estimator) per outer step; replicas identical; close to one process on whole batches
    z0, z1 = r0["zofo"], r1["zofo"]
    assert z0["checksums"] == z1["checksums"]
    assert z0["step_bytes"] == [3 * (z0["peft_numel"] // 2) * 4 + 16] * 2
    assert z0["peft_change"] > 1e-3 and z0["max_diff_vs_single"] < 1e-4
    assert "nonfinite='skip'" in z0["skip_error"]
    # a one-ulp change on rank 1 is reported on both ranks, naming the tensor
    for r in (r0, r1):
        assert r["divergence"] is not None
        assert "bert.encoder.layer.1.output.dense.weight" in r["divergence"]
        assert "rank(s) [1]" in r["divergence"]


def test_crashed_rank_fails_the_job_quickly(tmp_path):
    t0 = time.monotonic()
    res = torchrun(worker("fault_worker.py"), [str(tmp_path), "crash"], timeout=120,
                   env={"ZOFO_DIST_TIMEOUT": "30"})
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert "injected failure on rank 1 at step 2" in res.stdout
    assert elapsed < 60, f"the job took {elapsed:.0f} s to fail"


def test_hung_rank_times_out_with_a_clear_error(tmp_path):
    res = torchrun(worker("fault_worker.py"), [str(tmp_path), "hang"], timeout=120,
                   env={"ZOFO_DIST_TIMEOUT": "5"})
    assert res.returncode != 0
    assert "RankFailureError" in res.stdout
    assert "all-reduce of the losses of ZO step 2 failed" in res.stdout
    assert "5 s collective timeout" in res.stdout


def test_restarted_job_resumes_from_checkpoint_exactly(tmp_path):
    res = torchrun(worker("fault_worker.py"), [str(tmp_path), "restart"], timeout=150,
                   max_restarts=1)
    assert res.returncode == 0, res.stdout[-4000:]
    for rank in (0, 1):
        r = _read(tmp_path / f"restart{rank}.json")
        assert r["attempt"] == 1 and r["resumed_from"] == 3
        assert r["bit_identical"], r
    assert os.path.exists(tmp_path / "ckpt.pt")
