"""Every bad input SPEC.md names raises before anything is written."""

import pytest
import torch

import gdn_backend
from gdn_backend.testing import make_problem


def base(device):
    return make_problem(4, 2, 2, 4, num_padding=1, device=device, seed=31)


def replace(**changes):
    """A case: build the call's arguments, then overwrite some of them."""
    def apply(p):
        kwargs = dict(zip(("q", "k", "v", "a", "b", "A_log", "dt_bias", "state_pool",
                           "state_indices"), p.args))
        for key, fn in changes.items():
            kwargs[key] = fn(p)
        return kwargs
    return apply


CASES = {
    "q dtype": (replace(q=lambda p: p.q.double()), TypeError, "q has dtype torch.float64"),
    "k dtype differs": (replace(k=lambda p: p.k.half()), TypeError, "k has dtype torch.float16"),
    "q rank": (replace(q=lambda p: p.q[:, 0]), ValueError, "q has shape"),
    "k shape": (replace(k=lambda p: p.k[:, :, :1]), ValueError, "k has shape"),
    "v batch": (replace(v=lambda p: p.v[:2]), ValueError, "v has shape"),
    "too many tokens": (
        replace(q=lambda p: p.q.repeat(1, 5, 1, 1), k=lambda p: p.k.repeat(1, 5, 1, 1),
                v=lambda p: p.v.repeat(1, 5, 1, 1), a=lambda p: p.a.repeat(1, 5, 1),
                b=lambda p: p.b.repeat(1, 5, 1)),
        ValueError, "T must be in 1..8"),
    "HV not a multiple of H": (
        replace(q=lambda p: p.q.repeat(1, 1, 3, 1)[:, :, :3], k=lambda p: p.k.repeat(1, 1, 3, 1)[:, :, :3]),
        ValueError, "multiple of H"),
    "a shape": (replace(a=lambda p: p.a[:, :, :2]), ValueError, "a has shape"),
    "b dtype": (replace(b=lambda p: p.b.to(torch.int32)), TypeError, "b has dtype"),
    "b dtype differs from a": (replace(b=lambda p: p.b.float()), TypeError, "must match a's dtype"),
    "A_log dtype": (replace(A_log=lambda p: p.A_log.half()), TypeError, "A_log has dtype"),
    "dt_bias shape": (replace(dt_bias=lambda p: p.dt_bias[:2]), ValueError, "dt_bias has shape"),
    "pool dtype": (replace(state_pool=lambda p: p.state_pool.half()), TypeError, "state_pool has dtype"),
    "pool shape": (replace(state_pool=lambda p: p.state_pool[:, :2]), ValueError, "state_pool has shape"),
    "pool not K-last": (replace(state_pool=lambda p: p.state_pool.transpose(-1, -2)), ValueError,
                        "each slot must be dense"),
    "overlapping slots": (replace(state_pool=lambda p: p.state_pool.as_strided(
        p.state_pool.shape, (128, 128 * 128, 128, 1))), ValueError, "slots do not overlap"),
    "index dtype": (replace(state_indices=lambda p: p.state_indices.float()), TypeError,
                    "state_indices has dtype"),
    "index shape": (replace(state_indices=lambda p: p.state_indices[:3]), ValueError,
                    "state_indices has shape"),
    "index stride": (replace(state_indices=lambda p: p.state_indices.repeat(2)[::2]), ValueError,
                     "state_indices has stride"),
    "q head dim strided": (replace(q=lambda p: p.q.repeat(1, 1, 1, 2)[..., ::2]), ValueError,
                           "its last dim must be contiguous"),
    "a on another device": (replace(a=lambda p: p.a.to("meta")), ValueError, "a is on meta"),
}

KWARG_CASES = {
    "out dtype": (lambda p: {"out": torch.zeros(p.v.shape, device=p.v.device)}, TypeError, "out has dtype"),
    "out shape": (lambda p: {"out": torch.zeros_like(p.v[:, :1])}, ValueError, "out has shape"),
    "intermediate dtype": (
        lambda p: {"intermediate_states": torch.zeros(4, 2, 4, 128, 128, dtype=torch.bfloat16,
                                                      device=p.v.device)},
        TypeError, "intermediate_states has dtype"),
    "intermediate too short": (
        lambda p: {"intermediate_states": torch.zeros(3, 2, 4, 128, 128, device=p.v.device)},
        ValueError, "needs at least B rows"),
    "intermediate rows without states": (
        lambda p: {"intermediate_indices": p.state_indices}, ValueError, "without intermediate_states"),
    "negative min_valid_slot": (lambda p: {"min_valid_slot": -1}, ValueError, "min_valid_slot is -1"),
    "nan scale": (lambda p: {"scale": float("nan")}, ValueError, "scale is nan"),
}


def assert_rejected_cleanly(problem, call, error, message):
    pool_before = problem.state_pool.clone()
    with pytest.raises(error, match=message):
        call()
    assert torch.equal(problem.state_pool, pool_before)


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_raises_before_writing(device, case):
    build, error, message = CASES[case]
    problem = base(device)
    out = torch.full(problem.v.shape, 7.0, dtype=problem.v.dtype, device=device)
    kwargs = build(problem)
    assert_rejected_cleanly(problem, lambda: gdn_backend.gated_delta_rule_decode(**kwargs, out=out),
                            error, message)
    assert (out == 7.0).all()


@pytest.mark.parametrize("case", KWARG_CASES)
def test_bad_option_raises_before_writing(device, case):
    build, error, message = KWARG_CASES[case]
    problem = base(device)
    assert_rejected_cleanly(
        problem, lambda: gdn_backend.gated_delta_rule_decode(*problem.args, **build(problem)),
        error, message)
