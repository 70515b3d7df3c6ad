"""Two TP ranks in two processes, each running its TP2 shard of a Qwen3-Next GDN layer on its
own pool (tensor_parallel.py): over five steps with slots reused and padded batches, the
shards' outputs together equal the unsharded layer's, and so do their pools. On two GPUs
with NCCL, eagerly and replayed from CUDA graphs; on the CPU with gloo, the reference path
through the same harness."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import tensor_parallel as tp
from gdn_backend.testing import relative_error

TOL = {"out": 8e-3, "pool": 2e-5}


def run_ranks(backend: str, tmp_path) -> dict:
    init = f"file://{os.path.join(tmp_path, 'rendezvous')}"
    mp.spawn(tp.worker, args=(2, backend, init, str(tmp_path)), nprocs=2, join=True)
    return torch.load(os.path.join(tmp_path, "result.pt"))


def assert_equals_the_unsharded_layer(result: dict) -> None:
    want_outs, want_pool = tp.unsharded_steps()
    for step, (got, want) in enumerate(zip(result["outs"], want_outs)):
        assert relative_error(got, want) < TOL["out"], f"step {step}"
        padding = torch.tensor(tp.STEPS[step]) < 0
        assert (got[padding] == 0).all(), f"step {step}: padding rows"
    assert relative_error(result["pool"], want_pool) < TOL["pool"]
    untouched = [s for s in range(tp.NUM_SLOTS) if all(s not in step for step in tp.STEPS)]
    assert torch.equal(result["pool"][untouched], tp.full_layer()["pool"][untouched])
    assert not result["flag_set"].any()


def test_tp2_shards_on_the_cpu_together_equal_the_unsharded_layer(tmp_path):
    result = run_ranks("gloo", tmp_path)
    assert_equals_the_unsharded_layer(result["eager"])


@pytest.mark.multi_gpu
def test_tp2_shards_on_two_gpus_eager_and_graphs_equal_the_unsharded_layer(tmp_path):
    result = run_ranks("nccl", tmp_path)
    for mode in ("eager", "graph"):
        assert_equals_the_unsharded_layer(result[mode])
    assert result["eager"]["devices"].tolist() == [0, 1]  # each rank's pool on its own GPU
