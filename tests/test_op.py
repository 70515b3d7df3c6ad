"""The op's contract (SPEC.md), on the CPU (reference) and on CUDA (kernel)."""

import pytest
import torch

import gdn_backend
from gdn_backend.testing import make_problem, relative_error
from spec_loop import spec_decode_float64

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def poisoned_out(problem):
    return torch.full(problem.v.shape, float("nan"), dtype=problem.v.dtype, device=problem.v.device)


def decode(problem, **kwargs):
    out = poisoned_out(problem)
    gdn_backend.gated_delta_rule_decode(*problem.args, out=out, **problem.kwargs, **kwargs)
    return out


def valid_mask(problem):
    idx = problem.state_indices.long().cpu()
    lo = problem.kwargs.get("min_valid_slot", 0)
    return (idx >= lo) & (idx < problem.state_pool.shape[0])


def untouched_slots(problem):
    named = set(problem.state_indices[valid_mask(problem).to(problem.state_indices.device)].tolist())
    return [s for s in range(problem.state_pool.shape[0]) if s not in named]


@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_op_matches_spec(device, tokens, state_dtype):
    problem = make_problem(7, tokens, 2, 4, num_padding=1, state_dtype=state_dtype,
                           device=device, seed=tokens)
    before = problem.clone()
    out = decode(problem)
    ref_out, finals, _ = spec_decode_float64(before)
    assert relative_error(out.cpu(), ref_out) < TOL[out.dtype]
    for slot, state in finals.items():
        assert relative_error(problem.state_pool[slot].cpu(), state) < TOL[state_dtype]


def test_padding_rows_are_zero(device):
    problem = make_problem(8, 2, 2, 4, num_padding=3, device=device, seed=21)
    out = decode(problem)
    pad = (problem.state_indices == -1).cpu()
    assert (out.cpu()[pad] == 0).all()
    assert not out.cpu()[~pad].isnan().any()


def test_untouched_slots_are_byte_identical(device):
    problem = make_problem(6, 2, 2, 4, num_slots=20, num_padding=2, num_out_of_range=1,
                           state_dtype=torch.bfloat16, slot_pitch=4 * 128 * 128 + 64,
                           device=device, seed=22)
    before = problem.state_pool.clone()
    raw_before = problem.state_pool.as_strided((20 * (4 * 128 * 128 + 64),), (1,)).clone()
    decode(problem)
    for slot in untouched_slots(problem):
        assert torch.equal(problem.state_pool[slot].view(torch.int16), before[slot].view(torch.int16))
    # The gaps between slots of a strided pool are never written either.
    raw_after = problem.state_pool.as_strided((20 * (4 * 128 * 128 + 64),), (1,))
    gaps = torch.ones_like(raw_after, dtype=torch.bool).view(20, -1)
    gaps[:, : 4 * 128 * 128] = False
    assert torch.equal(raw_after[gaps.flatten()].view(torch.int16), raw_before[gaps.flatten()].view(torch.int16))


def test_out_of_range_index_touches_nothing_and_sets_the_flag(device):
    problem = make_problem(5, 1, 2, 4, num_slots=8, num_out_of_range=2, device=device, seed=23)
    gdn_backend.clear_error_flag(device)
    before = problem.state_pool.clone()
    out = decode(problem)
    oob = (problem.state_indices >= 8).cpu()
    assert gdn_backend.read_error_flag(device, clear=True)
    assert (out.cpu()[oob] == 0).all()
    for slot in untouched_slots(problem):
        assert torch.equal(problem.state_pool[slot], before[slot])
    assert not gdn_backend.read_error_flag(device)


def test_index_check_mode_raises_on_an_out_of_range_index(device, monkeypatch):
    monkeypatch.setenv("GDN_BACKEND_CHECK_INDICES", "1")
    gdn_backend.clear_error_flag(device)
    clean = make_problem(4, 1, 2, 4, num_slots=8, num_padding=1, device=device, seed=29)
    decode(clean)  # no out-of-range index: no error
    bad = make_problem(4, 1, 2, 4, num_slots=8, num_out_of_range=1, device=device, seed=30)
    with pytest.raises(IndexError, match="was skipped"):
        decode(bad)
    assert not gdn_backend.read_error_flag(device)  # the check clears the flag it reports


def test_valid_batch_leaves_the_flag_clear(device):
    problem = make_problem(5, 1, 2, 4, num_padding=2, device=device, seed=24)
    gdn_backend.clear_error_flag(device)
    decode(problem)
    assert not gdn_backend.read_error_flag(device)


def test_null_block_padding_leaves_slot_zero_alone(device):
    problem = make_problem(6, 2, 2, 4, min_valid_slot=1, num_padding=2, device=device, seed=25)
    problem.state_indices[problem.state_indices == -1] = 0
    null_block = problem.state_pool[0].clone()
    before = problem.clone()
    out = decode(problem)
    assert torch.equal(problem.state_pool[0], null_block)
    assert (out.cpu()[(problem.state_indices == 0).cpu()] == 0).all()
    ref_out, _, _ = spec_decode_float64(before, min_valid_slot=1)
    assert relative_error(out.cpu(), ref_out) < TOL[out.dtype]


@pytest.mark.parametrize("with_rows", [False, True])
def test_verify_writes_intermediate_states_and_leaves_the_pool(device, with_rows):
    problem = make_problem(5, 3, 2, 4, num_padding=1, device=device, seed=26)
    before = problem.clone()
    inter = torch.full((7, 3, 4, 128, 128), float("nan"), device=device)
    rows = torch.tensor([6, 0, 3, 2, 5], dtype=torch.int32, device=device) if with_rows else None
    out = decode(problem, intermediate_states=inter, intermediate_indices=rows, update_state=False)
    assert torch.equal(problem.state_pool, before.state_pool)
    ref_out, _, steps = spec_decode_float64(before)
    assert relative_error(out.cpu(), ref_out) < TOL[out.dtype]
    for n, states in steps.items():
        row = n if rows is None else int(rows[n])
        assert relative_error(inter[row].cpu(), states) < TOL[torch.float32]


def test_empty_batch_is_a_no_op(device):
    problem = make_problem(3, 1, 2, 4, device=device, seed=27)
    empty = make_problem(0, 1, 2, 4, num_slots=4, device=device, seed=27)
    empty.state_pool = problem.state_pool
    before = problem.state_pool.clone()
    out = decode(empty)
    assert out.shape == (0, 1, 4, 128)
    assert torch.equal(problem.state_pool, before)


def test_warmup_writes_no_pool(device):
    gdn_backend.warmup(device=device, num_heads=2, num_v_heads=4, tokens=(1, 2))
    assert not gdn_backend.read_error_flag(device)


def test_default_out_is_allocated_and_returned(device):
    problem = make_problem(3, 1, 2, 4, device=device, seed=28)
    out = gdn_backend.gated_delta_rule_decode(*problem.args)
    assert out.shape == problem.v.shape and out.dtype == problem.v.dtype
