"""The op as torch sees it: a custom op that mutates the pool, traceable by torch.compile."""

import torch

import gdn_backend
from gdn_backend.testing import make_problem, per_token_slots, ragged_rows

OP = torch.ops.gdn_backend.gated_delta_rule_decode.default


def op_args(problem, out):
    flag = gdn_backend.error_flag(problem.state_pool.device)
    return (*problem.args, out, flag, problem.q.shape[-1] ** -0.5, 0, None, None, True, None,
            None, None)


def test_opcheck_passes(device):
    problem = make_problem(4, 2, 2, 4, num_padding=1, device=device, seed=41)
    out = torch.empty_like(problem.v)
    torch.library.opcheck(OP, op_args(problem, out))


def test_opcheck_passes_with_intermediate_states(device):
    problem = make_problem(3, 2, 2, 4, num_padding=1, device=device, seed=42)
    out = torch.empty_like(problem.v)
    inter = torch.zeros(3, 2, 4, 128, 128, device=device)
    args = list(op_args(problem, out))
    args[-6], args[-4] = inter, False
    torch.library.opcheck(OP, tuple(args))


def test_opcheck_passes_with_ragged_per_token_slots(device):
    problem = make_problem(3, 2, 2, 4, num_slots=12, num_padding=1, device=device, seed=44)
    table, accepted = per_token_slots(problem, seed=44)
    rows = ragged_rows(problem, [2, 1, 2])
    out = torch.empty_like(rows["v"])
    flag = gdn_backend.error_flag(device)
    torch.library.opcheck(OP, (rows["q"], rows["k"], rows["v"], rows["a"], rows["b"],
                               problem.A_log, problem.dt_bias, problem.state_pool, table, out,
                               flag, 128 ** -0.5, 0, None, None, True, accepted,
                               rows["cu_seqlens"], None))


def test_op_schema_declares_exactly_the_mutated_tensors():
    mutated = {arg.name for arg in OP._schema.arguments
               if arg.alias_info is not None and arg.alias_info.is_write}
    assert mutated == {"state_pool", "out", "error_flag", "intermediate_states"}


def test_op_works_inside_torch_compile(device):
    problem = make_problem(5, 2, 2, 4, num_padding=1, device=device, seed=43)
    eager = problem.clone()
    expected = gdn_backend.gated_delta_rule_decode(*eager.args)

    @torch.compile(fullgraph=True)
    def step(*args):
        return gdn_backend.gated_delta_rule_decode(*args) * 2

    got = step(*problem.args)
    assert torch.equal(got, expected * 2)
    assert torch.equal(problem.state_pool, eager.state_pool)
