"""The reference against SPEC.md's formulas in float64, and against the model's own code."""

import pytest
import torch

from gdn_backend.reference import gated_delta_rule_decode_reference
from gdn_backend.testing import make_problem, relative_error
from spec_loop import spec_decode_float64

# Tolerances: the math is float32 (~1e-6 relative); what is compared has been rounded
# once to its storage dtype, which dominates: bf16 keeps 8 bits, fp16 11.
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def run_reference(problem, scale=None, **kwargs):
    B, T, HV, V = problem.v.shape
    out = torch.full((B, T, HV, V), float("nan"), dtype=problem.v.dtype)
    scale = problem.q.shape[-1] ** -0.5 if scale is None else scale
    gated_delta_rule_decode_reference(*problem.args, out, scale=scale, **problem.kwargs, **kwargs)
    return out


def assert_matches_spec(problem, scale=None):
    before = problem.clone()
    out = run_reference(problem, scale=scale)
    ref_out, finals, _ = spec_decode_float64(before, scale=scale, **before.kwargs)
    assert relative_error(out, ref_out) < TOL[out.dtype]
    for slot, state in finals.items():
        assert relative_error(problem.state_pool[slot], state) < TOL[problem.state_pool.dtype]


@pytest.mark.parametrize("tokens", range(1, 9))
@pytest.mark.parametrize("heads", [(1, 1), (2, 4), (2, 8), (4, 4)])
def test_reference_matches_spec_over_tokens_and_gqa(tokens, heads):
    H, HV = heads
    problem = make_problem(6, tokens, H, HV, 32, 16, num_padding=1, seed=tokens * 10 + HV)
    assert_matches_spec(problem)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qkv_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_matches_spec_over_dtypes(state_dtype, qkv_dtype, gate_dtype):
    problem = make_problem(5, 2, 2, 4, 64, 64, state_dtype=state_dtype, qkv_dtype=qkv_dtype,
                           gate_dtype=gate_dtype, param_dtype=torch.bfloat16, num_padding=2,
                           index_dtype=torch.int64, seed=3)
    assert_matches_spec(problem)


def test_reference_matches_spec_with_custom_scale_and_unpacked_qkv():
    problem = make_problem(4, 3, 2, 4, 16, 32, packed_qkv=False, seed=5)
    assert_matches_spec(problem, scale=0.37)


def test_reference_matches_spec_on_a_strided_pool_past_4096_slots():
    problem = make_problem(9, 2, 1, 2, 8, 4, num_slots=5000, slot_pitch=2 * 4 * 8 + 24,
                           num_padding=2, seed=7)
    problem.state_indices[0] = 4999  # the last slot, far past 4096
    problem.state_indices[1] = 4097 if int(problem.state_indices[1]) != 4999 else 4098
    assert_matches_spec(problem)


def test_reference_honours_the_null_block_convention():
    problem = make_problem(6, 1, 2, 4, 16, 16, min_valid_slot=1, num_padding=1, seed=9)
    problem.state_indices[problem.state_indices == -1] = 0
    null_block = problem.state_pool[0].clone()
    assert_matches_spec(problem)
    assert torch.equal(problem.state_pool[0], null_block)


def test_reference_writes_every_intermediate_state():
    problem = make_problem(5, 4, 2, 4, 16, 16, num_padding=1, seed=11)
    before = problem.clone()
    inter = torch.full((5, 4, 4, 16, 16), float("nan"))
    run_reference(problem, intermediate_states=inter, update_state=False)
    _, _, steps = spec_decode_float64(before)
    assert torch.equal(problem.state_pool, before.state_pool)  # verify leaves the pool alone
    for row, states in steps.items():
        assert relative_error(inter[row], states) < TOL[torch.float32]
    pad_row = int((before.state_indices == -1).nonzero()[0])
    assert inter[pad_row].isnan().all()  # padding rows are not written


def hf_recurrent(problem):
    """Transformers' Qwen3-Next recurrent path on the gathered states (its layout is [B, HV, K, V])."""
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        torch_recurrent_gated_delta_rule)
    from gdn_backend.reference import gate_and_beta

    slots = problem.state_indices.long()
    g, beta = gate_and_beta(problem.a, problem.b, problem.A_log, problem.dt_bias)
    initial = problem.state_pool[slots].float().transpose(-1, -2)
    # The model's layer repeats q/k heads for grouped value heads before (older releases)
    # or inside (newer ones) this function; repeating here serves both.
    group = problem.v.shape[2] // problem.q.shape[2]
    q, k = (x.repeat_interleave(group, dim=2) for x in (problem.q, problem.k))
    out, final = torch_recurrent_gated_delta_rule(
        q, k, problem.v, g=g, beta=beta, initial_state=initial,
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out, final.transpose(-1, -2)


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("heads", [(2, 4), (4, 4)])
def test_reference_matches_transformers_qwen3_next(tokens, heads):
    H, HV = heads
    problem = make_problem(4, tokens, H, HV, 64, 32, seed=13 + tokens)
    hf_out, hf_state = hf_recurrent(problem)
    slots = problem.state_indices.long()
    out = run_reference(problem)
    assert relative_error(out, hf_out) < TOL[torch.bfloat16]
    assert relative_error(problem.state_pool[slots], hf_state) < TOL[torch.float32]
