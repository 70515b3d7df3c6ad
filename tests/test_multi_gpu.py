"""The op on a device other than the current one, as an engine's worker may hold its tensors
(SGLang and vLLM start one process a GPU, each with torch.cuda.set_device(rank)): right
outputs and pool, the flag on the tensors' device, warm-up per device, graphs on each."""

import pytest
import torch

import gdn_backend
from gdn_backend.kernels.compile import CACHE
from gdn_backend.reference import gated_delta_rule_decode_reference
from gdn_backend.testing import copy_strided, make_problem, relative_error

pytestmark = pytest.mark.multi_gpu


@pytest.mark.parametrize("current, target", [(0, 1), (1, 0)], ids=["on 1 from 0", "on 0 from 1"])
def test_the_op_runs_on_the_tensors_device_whichever_is_current(current, target):
    device = torch.device("cuda", target)
    problem = make_problem(6, 2, 2, 4, num_padding=1, num_out_of_range=1, device=device, seed=500)
    ref = problem.clone()
    gdn_backend.clear_error_flag(device)
    with torch.cuda.device(current):
        out = gdn_backend.gated_delta_rule_decode(*problem.args)
        assert torch.cuda.current_device() == current
    ref_out = torch.empty_like(out)
    gated_delta_rule_decode_reference(*ref.args, ref_out, scale=128 ** -0.5)
    assert out.device == device
    assert relative_error(out, ref_out) < 8e-3
    assert relative_error(problem.state_pool, ref.state_pool) < 2e-5
    assert gdn_backend.read_error_flag(device, clear=True)  # the out-of-range row, on its device
    assert not gdn_backend.read_error_flag(torch.device("cuda", current))


def test_graphs_capture_and_replay_on_each_device_after_its_warmup():
    for index in (0, 1):
        device = torch.device("cuda", index)
        gdn_backend.warmup(device=device, num_heads=2, num_v_heads=4)
        problem = make_problem(4, 1, 2, 4, num_padding=1, device=device, seed=510 + index)
        expected = problem.clone()
        want = gdn_backend.gated_delta_rule_decode(*expected.args)
        before = copy_strided(problem.state_pool)
        compiled = CACHE.compilations
        with torch.cuda.device(index):
            graph = torch.cuda.CUDAGraph()
            out = torch.empty_like(problem.v)
            with torch.cuda.graph(graph):
                gdn_backend.gated_delta_rule_decode(*problem.args, out=out)
            problem.state_pool.copy_(before)
            graph.replay()
            torch.cuda.synchronize()
        assert CACHE.compilations == compiled, f"cuda:{index} compiled inside capture"
        assert torch.equal(out, want) and torch.equal(problem.state_pool, expected.state_pool)
