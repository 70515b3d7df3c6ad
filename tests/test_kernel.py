"""The CuTe DSL kernel against the reference, on the GPU (skipped without an sm_90+ GPU)."""

import pytest
import torch

import gdn_backend
from gdn_backend.kernels.compile import CACHE
from gdn_backend.bench.tiles import forced_tile
from gdn_backend.kernels.heuristics import Tile, choose_tile, tiles_for
from gdn_backend.reference import gated_delta_rule_decode_reference
from gdn_backend import split_packed_qkv
from gdn_backend.testing import make_problem, no_host_sync, relative_error

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
TP1, TP8 = (16, 32), (2, 4)


def run_both(problem, **kwargs):
    """(kernel out, reference out, the reference's problem after its run); outputs poisoned first."""
    ref = problem.clone()
    out = torch.full(problem.v.shape, float("nan"), dtype=problem.v.dtype, device="cuda")
    ref_out = out.clone()
    gdn_backend.gated_delta_rule_decode(*problem.args, out=out, **problem.kwargs, **kwargs)
    ref_kwargs = {**problem.kwargs, **kwargs}
    ref_kwargs.pop("out", None)
    if "intermediate_states" in kwargs and kwargs["intermediate_states"] is not None:
        ref_kwargs["intermediate_states"] = kwargs["intermediate_states"].clone().fill_(float("nan"))
    gated_delta_rule_decode_reference(*ref.args, ref_out, scale=problem.q.shape[-1] ** -0.5,
                                      **ref_kwargs)
    return out, ref_out, ref, ref_kwargs


def assert_same_as_reference(problem, **kwargs):
    before = problem.state_pool.clone()
    out, ref_out, ref, ref_kwargs = run_both(problem, **kwargs)
    assert relative_error(out, ref_out) < TOL[out.dtype]
    pad = problem.state_indices < problem.kwargs.get("min_valid_slot", 0)
    assert (out[pad] == 0).all()
    named = problem.state_indices[(problem.state_indices >= 0)
                                  & (problem.state_indices < problem.state_pool.shape[0])].long()
    untouched = torch.ones(problem.state_pool.shape[0], dtype=torch.bool, device="cuda")
    untouched[named] = False
    assert torch.equal(problem.state_pool[untouched], before[untouched])
    assert relative_error(problem.state_pool[named], ref.state_pool[named]) < TOL[problem.state_pool.dtype]
    return ref_kwargs


# Batch sizes that reach each tile shape of the heuristic at TP8 and TP1.
BATCHES = {TP8: (5, 20, 40, 200), TP1: (1, 3, 12, 25)}


@pytest.mark.parametrize("heads", [TP1, TP8], ids=["tp1", "tp8"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 8])
def test_every_tile_matches_the_reference(heads, state_dtype, tokens):
    tiles = set()
    for i, B in enumerate(BATCHES[heads]):
        tiles.add(choose_tile(B, heads[1], 128, tokens, state_dtype.itemsize))
        problem = make_problem(B, tokens, *heads, num_padding=min(1, B - 1), num_slots=3 * B + 5,
                               state_dtype=state_dtype, device="cuda", seed=100 + i)
        assert_same_as_reference(problem)
    assert tiles == set(tiles_for(heads[1], 128, tokens, state_dtype.itemsize))


@pytest.mark.parametrize("heads", [TP1, TP8], ids=["tp1", "tp8"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
@pytest.mark.parametrize("rows, rows_per_thread", [(16, 2), (32, 2), (32, 4), (64, 4)])
def test_tensor_core_tiles_match_the_reference(heads, tokens, rows, rows_per_thread):
    problem = make_problem(7, tokens, *heads, num_padding=2, num_slots=30,
                           state_dtype=torch.bfloat16, device="cuda", seed=200 + tokens)
    with forced_tile(Tile(rows, rows_per_thread, tensor_cores=True)):
        assert_same_as_reference(problem)


@pytest.mark.parametrize("qkv_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_dtypes_match_the_reference(qkv_dtype, gate_dtype, index_dtype):
    problem = make_problem(9, 2, *TP8, num_padding=2, qkv_dtype=qkv_dtype, gate_dtype=gate_dtype,
                           param_dtype=torch.bfloat16, index_dtype=index_dtype, device="cuda", seed=7)
    assert_same_as_reference(problem)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("indexed", [False, True])
# TP8 on fp32, T = 4: 8-row tiles, 4 rows a thread, then 16-row tiles streaming the rows;
# T = 8: 16 x 2, then streaming rows on 8 x 1 and on 32 x 2.
@pytest.mark.parametrize("T, B", [(4, 6), (4, 20), (4, 70), (8, 16), (8, 40), (8, 70)])
def test_verify_writes_every_intermediate_state(state_dtype, indexed, T, B):
    problem = make_problem(B, T, *TP8, num_padding=1, state_dtype=state_dtype, device="cuda", seed=8)
    # SGLang's buffer: [rows, D_max, HV, V, K], sliced to the T drafted tokens.
    buffer = torch.full((B + 3, 8, 4, 128, 128), float("nan"), dtype=state_dtype, device="cuda")
    inter = buffer[:, :T]
    rows = torch.randperm(B + 3, device="cuda")[:B].to(torch.int32) if indexed else None
    ref_kwargs = assert_same_as_reference(problem, intermediate_states=inter,
                                          intermediate_indices=rows, update_state=False)
    valid = (problem.state_indices >= 0).nonzero().squeeze(1)
    written = valid if rows is None else rows[valid].long()
    assert relative_error(inter[written], ref_kwargs["intermediate_states"][written]) < TOL[state_dtype]
    assert buffer[:, T:].isnan().all()


@pytest.mark.parametrize("heads", [TP1, TP8], ids=["tp1", "tp8"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
@pytest.mark.parametrize("indexed, update_state", [(False, False), (True, False), (True, True)])
def test_the_tensor_core_kernel_writes_every_intermediate_state(heads, tokens, indexed,
                                                                update_state):
    """Forced at 64 x 2 (the dispatch takes it for TP8 batches only), through the op."""
    B = 7
    problem = make_problem(B, tokens, *heads, num_padding=2, num_slots=30,
                           state_dtype=torch.bfloat16, device="cuda", seed=300 + tokens)
    buffer = torch.full((B + 3, 8, heads[1], 128, 128), float("nan"), dtype=torch.bfloat16,
                        device="cuda")
    inter = buffer[:, :tokens]
    rows = torch.randperm(B + 3, device="cuda")[:B].to(torch.int32) if indexed else None
    with forced_tile(Tile(64, 2, tensor_cores=True)):
        ref_kwargs = assert_same_as_reference(problem, intermediate_states=inter,
                                              intermediate_indices=rows,
                                              update_state=update_state)
    valid = (problem.state_indices >= 0).nonzero().squeeze(1)
    written = valid if rows is None else rows[valid].long()
    assert relative_error(inter[written], ref_kwargs["intermediate_states"][written]) < TOL[torch.bfloat16]
    unwritten = torch.ones(B + 3, dtype=torch.bool, device="cuda")
    unwritten[written] = False
    assert buffer[unwritten].isnan().all() and buffer[:, tokens:].isnan().all()


def test_pool_past_2_to_the_31_elements():
    # TP1 fp32: 2^19 elements a slot, so slot 4096 starts at element 2^31.
    problem = make_problem(4, 1, *TP1, num_slots=4100, device="cuda", seed=9)
    problem.state_indices.copy_(torch.tensor([4099, 4096, 17, 4097], dtype=torch.int32))
    assert_same_as_reference(problem)


@pytest.mark.parametrize("state_dtype, T, tile", [
    (torch.float32, 2, None), (torch.bfloat16, 4, Tile(64, 2, tensor_cores=True))],
    ids=["f32", "bf16-tensor-cores"])
def test_unaligned_views_take_the_scalar_path(state_dtype, T, tile):
    B, (H, HV) = 5, TP8
    row = 2 * H * 128 + HV * 128 + 1
    mixed = torch.randn(B, T, row + 1, device="cuda").to(torch.bfloat16)[..., 1:]  # odd offset
    problem = make_problem(B, T, H, HV, num_padding=1, slot_pitch=HV * 128 * 128 + 1,
                           state_dtype=state_dtype, device="cuda", seed=10)
    problem.q, problem.k, problem.v = split_packed_qkv(mixed[..., :-1], H, HV, 128, 128)
    if tile is None:
        assert_same_as_reference(problem)
    else:
        with forced_tile(tile):
            assert_same_as_reference(problem)


def test_null_block_padding_in_the_kernel():
    problem = make_problem(12, 1, *TP8, min_valid_slot=1, num_padding=3, device="cuda", seed=11)
    problem.state_indices[problem.state_indices == -1] = 0
    null_block = problem.state_pool[0].clone()
    assert_same_as_reference(problem)
    assert torch.equal(problem.state_pool[0], null_block)


def test_unsupported_head_dim_is_a_clear_error():
    problem = make_problem(2, 1, 2, 4, 64, 64, device="cuda", seed=12)
    with pytest.raises(NotImplementedError, match="head_k_dim"):
        gdn_backend.gated_delta_rule_decode(*problem.args)


def test_host_path_does_not_synchronise():
    gdn_backend.warmup(device="cuda", num_heads=2, num_v_heads=4)
    problem = make_problem(8, 1, *TP8, num_padding=1, device="cuda", seed=13)
    out = torch.empty_like(problem.v)
    compiled = CACHE.compilations
    with no_host_sync():
        gdn_backend.gated_delta_rule_decode(*problem.args, out=out)
    assert CACHE.compilations == compiled


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_vanishing_decays_match_the_reference(state_dtype):
    """Decays whose running product underflows (the kernel then folds it into the state)
    and decays of exactly 0 (the state is forgotten) give the reference's answer."""
    problem = make_problem(6, 8, *TP8, state_dtype=state_dtype, param_dtype=torch.float32,
                           gate_dtype=torch.float32, device="cuda", seed=14)
    problem.A_log.zero_()  # g = -softplus(a + dt_bias)
    problem.dt_bias.zero_()
    problem.a[0] = 13.8    # decay ~1e-6 a token: the product passes 1e-20 at the fourth
    problem.a[1, 2] = 200  # decay exactly 0 at token 2
    problem.a[2, ::2] = 30  # decay ~1e-13 every other token
    assert_same_as_reference(problem)


def test_vanishing_decays_on_tensor_cores_match_the_reference():
    problem = make_problem(6, 4, *TP8, state_dtype=torch.bfloat16, param_dtype=torch.float32,
                           gate_dtype=torch.float32, device="cuda", seed=15)
    problem.A_log.zero_()
    problem.dt_bias.zero_()
    problem.a[0] = 13.8
    problem.a[1, 2] = 200
    problem.a[2, ::2] = 30
    with forced_tile(Tile(32, 2, tensor_cores=True)):
        assert_same_as_reference(problem)
