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


def per_token(p, **changes):
    """The base call with per-token slots [B, T] and num_accepted_tokens, then `changes`."""
    table = p.state_indices[:, None].repeat(1, p.q.shape[1]).contiguous()
    accepted = torch.ones(p.q.shape[0], dtype=torch.int32, device=p.q.device)
    return {**dict(zip(("q", "k", "v", "a", "b", "A_log", "dt_bias", "state_pool"), p.args)),
            "state_indices": table, "num_accepted_tokens": accepted, **changes}


def ragged(p, **changes):
    """The base call as ragged rows (every request all T tokens), then `changes`."""
    B, T = p.q.shape[:2]
    flat = {name: getattr(p, name).flatten(0, 1).unsqueeze(0) for name in "qkvab"}
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=p.q.device)
    return {**flat, "A_log": p.A_log, "dt_bias": p.dt_bias, "state_pool": p.state_pool,
            "state_indices": p.state_indices, "cu_seqlens": cu, "max_tokens": T, **changes}


MODE_CASES = {
    "per-token slots without num_accepted": (
        lambda p: per_token(p, num_accepted_tokens=None), ValueError, "need num_accepted_tokens"),
    "num_accepted with one slot a request": (
        lambda p: {**per_token(p), "state_indices": p.state_indices}, ValueError,
        "goes with per-token state_indices"),
    "num_accepted dtype": (
        lambda p: per_token(p, num_accepted_tokens=torch.ones(4, dtype=torch.int64,
                                                              device=p.q.device)),
        TypeError, "num_accepted_tokens has dtype"),
    "num_accepted shape": (
        lambda p: per_token(p, num_accepted_tokens=torch.ones(3, dtype=torch.int32,
                                                              device=p.q.device)),
        ValueError, "num_accepted_tokens has shape"),
    "per-token slots of another T": (
        lambda p: per_token(p, state_indices=p.state_indices[:, None].repeat(1, 3)),
        ValueError, r"state_indices has shape \(4, 3\)"),
    "per-token slots strided along T": (
        lambda p: per_token(p, state_indices=p.state_indices[:, None].repeat(1, 4)[:, ::2]),
        ValueError, "last dim contiguous"),
    "per-token slots with intermediate states": (
        lambda p: per_token(p, intermediate_states=torch.zeros(4, 2, 4, 128, 128,
                                                               device=p.q.device)),
        ValueError, "do not combine"),
    "per-token slots without updating the state": (
        lambda p: per_token(p, update_state=False), ValueError, "update_state=False"),
    "indices of three dims": (
        lambda p: per_token(p, state_indices=p.state_indices[:, None, None]), ValueError,
        r"must be \[B\]"),
    "cu_seqlens dtype": (
        lambda p: ragged(p, cu_seqlens=torch.arange(0, 9, 2, device=p.q.device)), TypeError,
        "cu_seqlens has dtype"),
    "cu_seqlens empty": (
        lambda p: ragged(p, cu_seqlens=torch.zeros(0, dtype=torch.int32, device=p.q.device)),
        ValueError, "cu_seqlens is empty"),
    "ragged q not flat": (
        lambda p: ragged(p, q=p.q, k=p.k), ValueError, r"must be \[1, N, H, K\]"),
    "ragged v of another length": (
        lambda p: ragged(p, v=p.v.flatten(0, 1)[:5].unsqueeze(0)), ValueError, "v has shape"),
    "ragged a not flat": (
        lambda p: ragged(p, a=p.a), ValueError, "a has shape"),
    "ragged indices of another batch": (
        lambda p: ragged(p, state_indices=p.state_indices[:3]), ValueError,
        "state_indices has shape"),
    "ragged rows without T": (
        lambda p: ragged(p, max_tokens=None), ValueError, "need T"),
    "ragged rows of disagreeing T": (
        lambda p: ragged(p, max_tokens=3, intermediate_states=torch.zeros(
            4, 2, 4, 128, 128, device=p.q.device), update_state=False),
        ValueError, "different T"),
    "max_tokens without ragged rows": (
        lambda p: {**dict(zip(("q", "k", "v", "a", "b", "A_log", "dt_bias", "state_pool",
                               "state_indices"), p.args)), "max_tokens": 2},
        ValueError, "max_tokens was given without cu_seqlens"),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_bad_mode_argument_raises_before_writing(device, case):
    build, error, message = MODE_CASES[case]
    problem = base(device)
    assert_rejected_cleanly(
        problem, lambda: gdn_backend.gated_delta_rule_decode(**build(problem)), error, message)


@pytest.mark.parametrize("build", [per_token, ragged], ids=["per-token slots", "ragged rows"])
def test_well_formed_mode_arguments_are_accepted(build):
    gdn_backend.gated_delta_rule_decode(**build(base("cpu")))
