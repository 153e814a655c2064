"""ZO on an FSDP2-sharded model (fully_shard, 2 gloo processes on CPU): each rank perturbs
and updates only its local shards, at their global offsets in the noise contract, and the
result equals the unsharded single-process run."""

import json

import pytest

from dist_workers.launch import torchrun, worker


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    res = torchrun(worker("fsdp_worker.py"), [str(out)], timeout=200)
    assert res.returncode == 0, res.stdout[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("run", ["same_batch", "same_batch_rademacher"])
def test_sharded_run_is_bit_identical_to_unsharded(fsdp_results, run):
    # every rank sees the whole batch: the sharded forward computes exactly what the unsharded
    # model computes, so the losses and every updated shard must match bit for bit
    for r in fsdp_results:
        res = r[run]
        assert res["losses"] == res["ref_losses"]
        assert res["bit_identical"], res["max_diff"]
        assert res["max_change"] > 1e-3
        assert res["loss_bytes"] == 3 * 16


def test_sharded_data_parallel_matches_concatenated_batch(fsdp_results):
    for r in fsdp_results:
        res = r["split_batch"]
        assert res["losses"] == pytest.approx(res["ref_losses"], rel=1e-6)
        assert res["max_diff"] < 1e-5 < res["max_change"]


def test_local_shards_use_their_global_offsets(fsdp_results):
    r0, r1 = fsdp_results
    for name, start in r0["param_starts"].items():
        s0, s1 = r0["shards"][name], r1["shards"][name]
        assert s0["placements"] == "(Shard(dim=0),)"
        rows = s0["global_shape"][0]
        row_numel = 1
        for n in s0["global_shape"][1:]:
            row_numel *= n
        first = -(-rows // 2)  # torch.chunk: rank 0 takes ceil(rows / 2)
        assert s0["local_shape"][0] == first and s1["local_shape"][0] == rows - first
        assert s0["offset"] == start
        if rows - first > 0:
            assert s1["offset"] == start + first * row_numel
    # uneven (3 rows -> 2 + 1) and empty (1 row -> 1 + 0) shards are both exercised
    assert r1["shards"]["classifier.weight"]["local_shape"] == [1, 30]
    assert r1["shards"]["bert.embeddings.token_type_embeddings.weight"]["local_shape"] == [0, 30]


def test_column_sharding_is_refused(fsdp_results):
    for r in fsdp_results:
        assert r["shard1_error"] is not None and "Shard(0)" in r["shard1_error"]
