"""The kernel's per-token slots and ragged rows against the reference, on the GPU."""

import pytest
import torch

import gdn_backend
from gdn_backend.kernels.compile import CACHE
from gdn_backend.reference import gated_delta_rule_decode_reference
from gdn_backend.testing import (copy_strided, make_problem, no_host_sync, per_token_slots,
                                 ragged_rows, relative_error)

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
TP1, TP8 = (16, 32), (2, 4)


def call_args(problem, **changes):
    names = ("q", "k", "v", "a", "b", "A_log", "dt_bias", "state_pool", "state_indices")
    return {**dict(zip(names, problem.args)), **problem.kwargs, **changes}


def assert_kernel_matches_reference(args, **options):
    """Run the op and the reference on copies of the same call; outputs poisoned with NaN.
    Every element both wrote agrees; every element neither wrote is as it was."""
    ref = {k: copy_strided(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ref_options = {k: copy_strided(v) if isinstance(v, torch.Tensor) else v
                   for k, v in options.items()}
    out = torch.full(args["v"].shape, float("nan"), dtype=args["v"].dtype, device="cuda")
    ref_out = out.clone()
    before = args["state_pool"].clone()
    gdn_backend.clear_error_flag("cuda")
    gdn_backend.gated_delta_rule_decode(**args, out=out, **options)
    flag = gdn_backend.read_error_flag("cuda", clear=True)
    ref_flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    gated_delta_rule_decode_reference(**ref, out=ref_out, scale=args["q"].shape[-1] ** -0.5,
                                      error_flag=ref_flag, **ref_options)
    assert flag == bool(ref_flag.item())
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert relative_error(out.nan_to_num(), ref_out.nan_to_num()) < TOL[torch.bfloat16]
    pool, ref_pool = args["state_pool"], ref["state_pool"]
    changed = (ref_pool != before).flatten(1).any(dim=1)
    assert torch.equal(pool[~changed], before[~changed]), "a slot the reference kept changed"
    dtype = pool.dtype
    if changed.any():
        assert relative_error(pool[changed], ref_pool[changed]) < TOL[dtype]
    inter = options.get("intermediate_states")
    if inter is not None:
        ref_inter = ref_options["intermediate_states"]
        assert torch.equal(inter.isnan(), ref_inter.isnan())
        assert relative_error(inter.nan_to_num(), ref_inter.nan_to_num()) < TOL[dtype]
    return flag


# Batch sizes that reach the small (8-row) and the large (32-row) tiles.
BATCHES = {TP8: (3, 40), TP1: (2, 9)}


@pytest.mark.parametrize("heads", [TP1, TP8], ids=["tp1", "tp8"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T", [2, 4])
def test_per_token_slots_match_the_reference(heads, state_dtype, T):
    for i, B in enumerate(BATCHES[heads]):
        problem = make_problem(B, T, *heads, num_slots=B * (T + 1) + 8, num_padding=1,
                               state_dtype=state_dtype, device="cuda", seed=300 + i)
        table, accepted = per_token_slots(problem, seed=i, padded_writes=2)
        assert not assert_kernel_matches_reference(
            call_args(problem, state_indices=table), num_accepted_tokens=accepted)


@pytest.mark.parametrize("heads", [TP1, TP8], ids=["tp1", "tp8"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ragged_rows_match_the_reference(heads, state_dtype):
    T = 4
    for i, B in enumerate(BATCHES[heads]):
        problem = make_problem(B, T, *heads, num_slots=2 * B + 4, num_padding=1,
                               state_dtype=state_dtype, device="cuda", seed=310 + i)
        lengths = [(n * 7 + i) % (T + 1) for n in range(B)]
        rows = ragged_rows(problem, lengths)
        assert not assert_kernel_matches_reference(call_args(problem, **rows), max_tokens=T)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ragged_verify_matches_the_reference_as_sglang_calls_it(state_dtype):
    """SGLang's ragged verify: rows of 1..T tokens, the states to its intermediate buffer
    [rows, D_max, HV, V, K] sliced to T, the pool left alone."""
    B, T = 12, 3
    problem = make_problem(B, T, *TP8, num_slots=20, num_padding=2, state_dtype=state_dtype,
                           device="cuda", seed=320)
    rows = ragged_rows(problem, [1 + n % T for n in range(B)])
    buffer = torch.full((B + 1, 4, 4, 128, 128), float("nan"), dtype=state_dtype, device="cuda")
    inter_rows = torch.randperm(B + 1, device="cuda")[:B].to(torch.int32)
    assert not assert_kernel_matches_reference(
        call_args(problem, **rows), intermediate_states=buffer[:, :T],
        intermediate_indices=inter_rows, update_state=False)
    assert buffer[:, T:].isnan().all()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ragged_per_token_slots_match_the_reference_as_vllm_calls_them(state_dtype):
    """vLLM's MTP verify: a block-table slice of slots (row stride free), int64, slot 0 its
    null block, rows of varying length."""
    B, T = 10, 4
    problem = make_problem(B, T, *TP1, num_slots=B * (T + 1) + 9, num_padding=2, min_valid_slot=1,
                           index_dtype=torch.int64, state_dtype=state_dtype, device="cuda",
                           seed=330)
    problem.state_indices[problem.state_indices < 0] = 0
    table, accepted = per_token_slots(problem, seed=3, padded_writes=3)
    table[table < 0] = 0
    block_table = torch.zeros(B, T + 3, dtype=torch.int64, device="cuda")
    block_table[:, 1:T + 1] = table
    rows = ragged_rows(problem, [T - n % 3 for n in range(B)])
    null_block = problem.state_pool[0].clone()
    assert not assert_kernel_matches_reference(
        call_args(problem, state_indices=block_table[:, 1:T + 1], **rows),
        num_accepted_tokens=accepted)
    assert torch.equal(problem.state_pool[0], null_block)


def test_malformed_rows_set_the_flag_and_touch_nothing():
    B, T = 6, 2
    problem = make_problem(B, T, *TP8, num_slots=3 * B + 4, device="cuda", seed=340)
    table, accepted = per_token_slots(problem, seed=4, padded_writes=0)
    rows = ragged_rows(problem, [T] * B, trailing=4)
    accepted[0] = 0                  # outside 1..T
    table[1, 1 - (int(accepted[1]) - 1)] = 10_000  # a write slot past the pool
    rows["cu_seqlens"][3:] += 1      # row 2 one token too long, row B - 1 past the inputs
    rows["cu_seqlens"][-1] = rows["q"].shape[1] + 1
    assert assert_kernel_matches_reference(call_args(problem, state_indices=table, **rows),
                                           num_accepted_tokens=accepted)


def test_per_token_ragged_decode_in_a_cuda_graph():
    """Captured once, replayed with new accepted counts, row lengths and slots: equal to
    eager, no host sync, nothing compiled after warm-up."""
    B, T = 8, 4
    gdn_backend.warmup(device="cuda", num_heads=2, num_v_heads=4, tokens=(T,),
                       dt_bias_dtype=torch.float32, per_token_slots=True, ragged=True)
    compiled = CACHE.compilations
    problem = make_problem(B, T, *TP8, num_slots=B * (T + 1) + 8, num_padding=1,
                           device="cuda", seed=350)
    table, accepted = per_token_slots(problem, seed=5)
    rows = ragged_rows(problem, [T] * B)
    static = call_args(problem, state_indices=table, **rows)
    out = torch.empty_like(rows["v"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gdn_backend.gated_delta_rule_decode(**static, out=out, num_accepted_tokens=accepted)
    for step in range(3):
        fresh = make_problem(B, T, *TP8, num_slots=B * (T + 1) + 8, num_padding=step % 2,
                             device="cuda", seed=360 + step)
        new_table, new_accepted = per_token_slots(fresh, seed=step)
        new_rows = ragged_rows(fresh, [(n + step) % T + 1 for n in range(B)])
        for name in ("q", "k", "v", "a", "b"):  # fewer tokens now: the rest is no row's
            static[name][:, :new_rows[name].shape[1]].copy_(new_rows[name])
        static["cu_seqlens"].copy_(new_rows["cu_seqlens"])
        table.copy_(new_table)
        accepted.copy_(new_accepted)
        eager_pool = problem.state_pool.clone()
        eager_out = torch.zeros_like(out)
        gdn_backend.gated_delta_rule_decode(**{**static, "state_pool": eager_pool}, out=eager_out,
                                            num_accepted_tokens=accepted)
        out.zero_()
        with no_host_sync():
            graph.replay()
        assert torch.equal(out, eager_out)
        assert torch.equal(problem.state_pool, eager_pool)
    assert CACHE.compilations == compiled
