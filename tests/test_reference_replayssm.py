"""SGLang's ReplaySSM decode (the ring mode's reference) against the classic decode: over
many steps, with natural and forced flushes, slots reused and padding, a ring step gives the
classic step's output, and a flushed checkpoint is the classic state."""

import pytest
import torch

import gdn_backend
from gdn_backend.reference_replayssm import replayssm_decode_reference
from gdn_backend.testing import RingPool, relative_error

H, HV, K, V, L = 2, 4, 32, 16, 4
SCALE = K**-0.5
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}


def small_pool(slots, dtype=torch.float32, seed=0):
    return RingPool(slots, H, HV, K, V, L, state_dtype=dtype, seed=seed)


def reference_step(pool, slot, cursor, flag=None):
    """The reference on one request, called directly: returns its output [1, HV, V]."""
    q, k, v, a, b = (x[:, 0] for x in pool.tokens(1))
    out = torch.full((1, HV, V), float("nan"), dtype=torch.bfloat16)
    replayssm_decode_reference(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                               *pool.rings, torch.tensor([cursor], dtype=torch.int32),
                               torch.tensor([slot], dtype=torch.int32), out, scale=SCALE,
                               error_flag=flag)
    return out, (q, k, v, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_ring_steps_give_the_classic_steps_outputs_and_checkpoints(dtype):
    pool = small_pool(12, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    for step in range(3 * L + 2):
        slots = (torch.randperm(11, generator=gen)[:5] + 1).tolist() + [-1]
        force = [int(torch.rand(1, generator=gen) < 0.15) for _ in slots]
        ring_out, classic_out = pool.step(slots, force)
        assert relative_error(ring_out, classic_out) < TOL[torch.bfloat16], f"step {step}"
        assert (ring_out[-1] == 0).all()
    flushed = pool.write_pos == 0
    assert flushed.sum() > 1
    assert relative_error(pool.checkpoint[flushed], pool.classic[flushed]) < TOL[dtype]


def test_a_natural_flush_folds_l_minus_1_records_and_the_token_into_the_checkpoint():
    pool = small_pool(3, seed=3)
    before_ring, start = pool.ring_d.clone(), pool.checkpoint[1].clone()
    for _ in range(L - 1):
        pool.step([1])
    assert torch.equal(pool.checkpoint[1], start)  # L - 1 records, no flush yet
    assert not torch.equal(pool.ring_d[1, :, : L - 1], before_ring[1, :, : L - 1])
    pool.step([1])  # write_pos was L - 1: this step flushes
    assert pool.write_pos[1] == 0
    assert relative_error(pool.checkpoint[1], pool.classic[1]) < TOL[torch.float32]
    assert torch.equal(pool.ring_d[1, :, L - 1], before_ring[1, :, L - 1])  # never written


@pytest.mark.parametrize("cursor", [0, 1, L - 2, L - 1])
def test_a_step_ignores_what_the_ring_holds_past_its_cursor(cursor):
    stale, poisoned = small_pool(3, seed=5), small_pool(3, seed=5)
    poisoned.poison_past(torch.tensor([1]), torch.tensor([cursor]))
    want, _ = reference_step(stale, 1, cursor)
    got, _ = reference_step(poisoned, 1, cursor)
    assert torch.equal(got, want)
    assert torch.equal(poisoned.checkpoint, stale.checkpoint)
    written = cursor + 1 if cursor < L - 1 else cursor  # a flush appends no record
    for got_ring, want_ring in zip(poisoned.rings, stale.rings):
        assert torch.equal(got_ring[1, :, :written], want_ring[1, :, :written])


def test_padding_rows_are_zero_and_touch_no_slot():
    pool = small_pool(4, seed=4)
    state = [t.clone() for t in (pool.checkpoint, *pool.rings)]
    ring_out, _ = pool.step([-1, -1])
    assert (ring_out == 0).all()
    for now, then in zip((pool.checkpoint, *pool.rings), state):
        assert torch.equal(now, then)


@pytest.mark.parametrize("index, cursor", [(7, 0), (1, L), (1, -1)],
                         ids=["slot past the pool", "cursor past the ring", "negative cursor"])
def test_a_bad_slot_or_cursor_is_skipped_and_sets_the_flag(index, cursor):
    pool = small_pool(4, seed=5)
    state = [t.clone() for t in (pool.checkpoint, *pool.rings)]
    flag = torch.zeros(1, dtype=torch.int32)
    out, _ = reference_step(pool, index, cursor, flag)
    assert flag.item() == 1 and (out == 0).all()
    for now, then in zip((pool.checkpoint, *pool.rings), state):
        assert torch.equal(now, then)


def test_an_appended_record_is_the_tokens_update_key_and_log_decay():
    pool = small_pool(3, seed=6)
    S0 = pool.checkpoint[2].clone()
    _, (q, k, v, a, b) = reference_step(pool, 2, 0)
    g, beta = gdn_backend.reference.gate_and_beta(a[0], b[0], pool.A_log, pool.dt_bias)
    k_hat = gdn_backend.reference.l2_normalize(k[0].float())
    kn = k_hat.repeat_interleave(HV // H, dim=0)
    d = beta[:, None] * (v[0].float() - g.exp()[:, None] * torch.einsum("hvk,hk->hv", S0, kn))
    assert relative_error(pool.ring_d[2, :, 0], d) < 1e-6
    assert relative_error(pool.ring_k[2, :, 0], k_hat) < 1e-6
    assert relative_error(pool.ring_g[2, :, 0], g) < 1e-6
