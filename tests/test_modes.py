"""Per-token slots and ragged rows (SPEC.md's modes): the op on the CPU (its reference path)
against SPEC.md's float64 loop, and the error flag on malformed rows."""

import pytest
import torch

import gdn_backend
from gdn_backend.testing import make_problem, per_token_slots, ragged_rows, relative_error
from spec_loop import spec_decode_float64

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}


def dense(B, T, state_dtype=torch.float32, seed=0, **kwargs):
    return make_problem(B, T, 2, 4, 32, 16, num_slots=B * (T + 2) + 4, num_padding=1,
                        state_dtype=state_dtype, packed_qkv=False, seed=seed, **kwargs)


def assert_pool(pool, want, before, named):
    """The named slots hold what was wanted, each to its tolerance; no other slot changed."""
    for slot in named.unique().tolist():
        assert relative_error(pool[slot], want[slot]) < TOL[pool.dtype], f"slot {slot}"
    kept = torch.ones(pool.shape[0], dtype=torch.bool)
    kept[named.long()] = False
    assert torch.equal(pool[kept], before[kept])


def flag_after(fn):
    gdn_backend.clear_error_flag("cpu")
    fn()
    return gdn_backend.read_error_flag("cpu", clear=True)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_per_token_slots_read_the_accepted_slot_and_write_every_token(state_dtype, T):
    problem = dense(6, T, state_dtype, seed=T)
    table, accepted = per_token_slots(problem, seed=T, padded_writes=min(T - 1, 2))
    want_out, _, steps = spec_decode_float64(problem)
    before = problem.state_pool.clone()
    out = gdn_backend.gated_delta_rule_decode(*problem.args[:-1], table,
                                              num_accepted_tokens=accepted)
    assert relative_error(out, want_out) < TOL[torch.bfloat16]
    want = before.clone()
    for n, states in steps.items():
        for t in range(T):
            if table[n, t] >= 0:
                want[table[n, t]] = states[t].to(state_dtype)
    assert_pool(problem.state_pool, want, before, table[table >= 0])


def test_a_row_whose_read_slot_is_padding_is_skipped_whole():
    problem = dense(4, 3, seed=1)
    table, accepted = per_token_slots(problem, seed=1, padded_writes=0)
    pad = int((problem.state_indices == -1).nonzero()[0])
    assert table[pad, accepted[pad] - 1] == -1 and (table[pad] >= 0).sum() == 2
    before = problem.state_pool.clone()
    out = gdn_backend.gated_delta_rule_decode(*problem.args[:-1], table,
                                              num_accepted_tokens=accepted)
    assert (out[pad] == 0).all()
    for slot in table[pad][table[pad] >= 0]:
        assert torch.equal(problem.state_pool[slot], before[slot])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ragged_rows_run_each_requests_own_tokens(state_dtype):
    T, lengths = 4, [4, 1, 0, 3, 2, 4]
    problem = dense(len(lengths), T, state_dtype, seed=2)
    rows = ragged_rows(problem, lengths)
    want_out, _, steps = spec_decode_float64(problem)
    before = problem.state_pool.clone()
    out = torch.full(rows["v"].shape, float("nan"), dtype=rows["v"].dtype)
    gdn_backend.gated_delta_rule_decode(
        rows["q"], rows["k"], rows["v"], rows["a"], rows["b"], *problem.args[5:], out=out,
        cu_seqlens=rows["cu_seqlens"], max_tokens=T)
    cu = rows["cu_seqlens"].tolist()
    want = before.clone()
    for n, length in enumerate(lengths):
        got = out[0, cu[n]:cu[n + 1]]
        slot = int(problem.state_indices[n])
        if slot < 0:
            assert (got == 0).all()
            continue
        assert relative_error(got, want_out[n, :length]) < TOL[torch.bfloat16]
        if length:
            want[slot] = steps[n][length - 1].to(state_dtype)
    assert out[0, cu[-1]:].isnan().all()  # tokens of no request are left alone
    named = problem.state_indices[(problem.state_indices >= 0) & (torch.tensor(lengths) > 0)]
    assert_pool(problem.state_pool, want, before, named)


def test_ragged_verify_writes_each_rows_intermediate_states_and_leaves_the_pool():
    T, lengths = 3, [3, 2, 1, 3, 0]
    problem = dense(len(lengths), T, seed=3)
    rows = ragged_rows(problem, lengths)
    _, _, steps = spec_decode_float64(problem)
    inter = torch.full((8, T, 4, 16, 32), float("nan"))
    inter_rows = torch.tensor([6, 0, 3, 1, 2], dtype=torch.int32)
    before = problem.state_pool.clone()
    gdn_backend.gated_delta_rule_decode(
        rows["q"], rows["k"], rows["v"], rows["a"], rows["b"], *problem.args[5:],
        cu_seqlens=rows["cu_seqlens"], intermediate_states=inter,
        intermediate_indices=inter_rows, update_state=False)
    assert torch.equal(problem.state_pool, before)
    for n, length in enumerate(lengths):
        row = int(inter_rows[n])
        if n in steps:
            assert relative_error(inter[row, :length], steps[n][:length]) < TOL[torch.float32]
        untouched = inter[row] if n not in steps else inter[row, length:]
        assert untouched.isnan().all()


def test_ragged_rows_with_per_token_slots_as_vllm_verifies():
    T, lengths = 4, [4, 2, 3, 1]
    problem = dense(len(lengths), T, seed=4)
    table, accepted = per_token_slots(problem, seed=4)
    rows = ragged_rows(problem, lengths)
    _, _, steps = spec_decode_float64(problem)
    before = problem.state_pool.clone()
    gdn_backend.gated_delta_rule_decode(
        rows["q"], rows["k"], rows["v"], rows["a"], rows["b"], *problem.args[5:-1], table,
        num_accepted_tokens=accepted, cu_seqlens=rows["cu_seqlens"])
    want, named = before.clone(), []
    for n, states in steps.items():
        for t in range(lengths[n]):
            if table[n, t] >= 0:
                want[table[n, t]] = states[t]
                named.append(int(table[n, t]))
    assert_pool(problem.state_pool, want, before, torch.tensor(named))


@pytest.mark.parametrize("accepted_value", [0, 4])
def test_num_accepted_outside_1_to_T_skips_the_row_and_sets_the_flag(accepted_value):
    problem = dense(3, 3, seed=5)
    table, accepted = per_token_slots(problem, seed=5, padded_writes=0)
    bad = int((problem.state_indices >= 0).nonzero()[0])
    accepted[bad] = accepted_value
    before = problem.state_pool.clone()
    out = torch.full(problem.v.shape, float("nan"), dtype=problem.v.dtype)
    assert flag_after(lambda: gdn_backend.gated_delta_rule_decode(
        *problem.args[:-1], table, num_accepted_tokens=accepted, out=out))
    assert (out[bad] == 0).all()
    for slot in table[bad]:
        assert torch.equal(problem.state_pool[slot], before[slot])


def test_a_write_slot_past_the_pool_is_skipped_and_sets_the_flag():
    problem = dense(3, 2, seed=6)
    table, accepted = per_token_slots(problem, seed=6, padded_writes=0)
    n = int((problem.state_indices >= 0).nonzero()[0])
    t = 1 - (int(accepted[n]) - 1)
    table[n, t] = problem.state_pool.shape[0] + 7
    assert flag_after(lambda: gdn_backend.gated_delta_rule_decode(
        *problem.args[:-1], table, num_accepted_tokens=accepted))


def test_a_ragged_row_longer_than_T_is_skipped_and_sets_the_flag():
    T, lengths = 2, [2, 2, 2]
    problem = dense(3, T, seed=7)
    rows = ragged_rows(problem, lengths, trailing=3)
    rows["cu_seqlens"][2] = 5  # row 1 has 3 tokens, row 2 none
    before = problem.state_pool.clone()
    out = torch.full(rows["v"].shape, float("nan"), dtype=rows["v"].dtype)
    assert flag_after(lambda: gdn_backend.gated_delta_rule_decode(
        rows["q"], rows["k"], rows["v"], rows["a"], rows["b"], *problem.args[5:], out=out,
        cu_seqlens=rows["cu_seqlens"], max_tokens=T))
    assert out[0, 2:5].isnan().all()  # the malformed row writes nothing, its output included
    slot = int(problem.state_indices[1])
    if slot >= 0:
        assert torch.equal(problem.state_pool[slot], before[slot])
