"""The ReplaySSM decode op's contract, on the CPU (reference) and on CUDA (kernel): over many
steps it gives the classic decode's outputs and, once flushed, its states; padding and bad
rows touch nothing; every bad argument is a clear error before anything is written."""

import pytest
import torch

import gdn_backend
from gdn_backend.testing import RingPool, relative_error

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
OP = torch.ops.gdn_backend.replayssm_decode.default


def snapshot(pool):
    return [t.clone() for t in (pool.checkpoint, *pool.rings)]


def assert_untouched(pool, before):
    for now, then in zip((pool.checkpoint, *pool.rings), before):
        assert torch.equal(now, then)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads, ring_len", [((2, 4), 4), ((16, 32), 16)], ids=["tp8-L4", "tp1-L16"])
def test_ring_steps_give_the_classic_outputs_and_flushed_states(device, state_dtype, heads,
                                                                  ring_len):
    pool = RingPool(10, *heads, ring_len=ring_len, state_dtype=state_dtype, device=device,
                    slot_pitch=heads[1] * 128 * 128 + 64, seed=11)
    gen = torch.Generator().manual_seed(12)
    flushes = 0
    for step in range(2 * ring_len + 3):
        slots = (torch.randperm(9, generator=gen)[:4] + 1).tolist() + [-1]
        force = [int(torch.rand(1, generator=gen) < 0.1) for _ in slots]
        cursor = pool.cursors(torch.tensor(slots, device=device))
        flushes += int(((cursor == ring_len - 1) | torch.tensor(force, device=device).bool())[:-1].sum())
        ring_out, classic_out = pool.step(slots, force)
        assert relative_error(ring_out, classic_out) < TOL[torch.bfloat16], f"step {step}"
        assert (ring_out[-1] == 0).all()
    assert flushes > 2
    flushed = pool.write_pos == 0
    flushed[0] = False  # slot 0 never ran
    assert relative_error(pool.checkpoint[flushed], pool.classic[flushed]) < TOL[state_dtype]


def test_padding_rows_are_zero_and_touch_nothing(device):
    pool = RingPool(4, device=device, seed=13)
    before = snapshot(pool)
    ring_out, _ = pool.step([-1, -1, -3])
    assert (ring_out == 0).all()
    assert_untouched(pool, before)


def test_slot_zero_is_padding_below_min_valid_slot(device):
    pool = RingPool(4, device=device, seed=14)
    before = snapshot(pool)
    q, k, v, a, b = pool.tokens(1)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    out = gdn_backend.replayssm_decode(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                                       *pool.rings, zero, zero, min_valid_slot=1)
    assert (out == 0).all()
    assert_untouched(pool, before)


@pytest.mark.parametrize("slot, cursor", [(4, 0), (1, 16), (1, -1)],
                         ids=["slot past the pool", "cursor past the ring", "negative cursor"])
def test_a_bad_slot_or_cursor_is_skipped_and_sets_the_flag(device, slot, cursor):
    pool = RingPool(4, device=device, seed=15)
    before = snapshot(pool)
    q, k, v, a, b = pool.tokens(2)
    idx = torch.tensor([slot, -1], dtype=torch.int32, device=device)
    cursors = torch.tensor([cursor, 0], dtype=torch.int32, device=device)
    gdn_backend.clear_error_flag(device)
    out = gdn_backend.replayssm_decode(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                                       *pool.rings, cursors, idx)
    assert gdn_backend.read_error_flag(device, clear=True)
    assert (out == 0).all()
    assert_untouched(pool, before)


def test_index_check_mode_raises_on_a_bad_cursor(device, monkeypatch):
    monkeypatch.setenv("GDN_BACKEND_CHECK_INDICES", "1")
    pool = RingPool(4, device=device, seed=16)
    q, k, v, a, b = pool.tokens(1)
    idx = torch.tensor([1], dtype=torch.int32, device=device)
    gdn_backend.clear_error_flag(device)
    gdn_backend.replayssm_decode(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                                 *pool.rings, pool.cursors(idx), idx)  # clean: no error
    with pytest.raises(IndexError, match="was skipped"):
        gdn_backend.replayssm_decode(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                                     *pool.rings, torch.full_like(idx, 16), idx)
    assert not gdn_backend.read_error_flag(device)  # the check clears the flag it reports


def call(pool, B=2, **changes):
    q, k, v, a, b = pool.tokens(B)
    args = dict(q=q, k=k, v=v, a=a, b=b, A_log=pool.A_log, dt_bias=pool.dt_bias,
                state_pool=pool.checkpoint, ring_d=pool.ring_d, ring_k=pool.ring_k,
                ring_g=pool.ring_g, write_pos=torch.zeros(B, dtype=torch.int32),
                state_indices=torch.arange(1, B + 1, dtype=torch.int32))
    args.update(changes)
    return args


BAD = {
    "two tokens": (lambda p: dict(zip("qkvab", (torch.cat([x, x], 1) for x in p.tokens(2)))),
                   ValueError, "one token"),
    "ring_d of other slots": (lambda p: dict(ring_d=p.ring_d[:3]), ValueError, "ring_d has shape"),
    "ring_k of other heads": (lambda p: dict(ring_k=p.ring_k[:, :1]), ValueError, "ring_k has shape"),
    "ring_g of another length": (lambda p: dict(ring_g=p.ring_g[..., :8]), ValueError,
                                 "ring_g has shape"),
    "ring_k dtype": (lambda p: dict(ring_k=p.ring_k.bfloat16()), TypeError, "match ring_d"),
    "ring_g dtype": (lambda p: dict(ring_g=p.ring_g.double()), TypeError, "ring_g has dtype"),
    "ring too long": (lambda p: dict(ring_d=torch.zeros(4, 4, 33, 128)), ValueError, "1..32"),
    "ring slot not dense": (lambda p: dict(ring_d=p.ring_d.transpose(2, 3).contiguous()
                                           .transpose(2, 3)), ValueError, "dense"),
    "write_pos dtype": (lambda p: dict(write_pos=torch.zeros(2, dtype=torch.int64)), TypeError,
                        "write_pos has dtype"),
    "write_pos length": (lambda p: dict(write_pos=torch.zeros(3, dtype=torch.int32)), ValueError,
                         "write_pos has shape"),
    "force_flush dtype": (lambda p: dict(force_flush=torch.zeros(2, dtype=torch.bool)), TypeError,
                          "force_flush has dtype"),
    "per-token slots": (lambda p: dict(state_indices=torch.ones(2, 1, dtype=torch.int32)),
                        ValueError, "num_accepted_tokens"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_argument_is_a_clear_error_and_writes_nothing(case):
    pool = RingPool(4, seed=16)
    before = snapshot(pool)
    change, error, message = BAD[case]
    args = call(pool, **change(pool))
    out = torch.full(args["v"].shape, 7.0, dtype=args["v"].dtype)
    with pytest.raises(error, match=message):
        gdn_backend.replayssm_decode(**args, out=out)
    assert (out == 7).all()
    assert_untouched(pool, before)


def test_opcheck_passes(device):
    pool = RingPool(4, device=device, seed=17)
    q, k, v, a, b = pool.tokens(3)
    idx = torch.tensor([2, -1, 1], dtype=torch.int32, device=device)
    cursor = torch.tensor([3, 0, 15], dtype=torch.int32, device=device)
    force = torch.tensor([1, 0, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(OP, (q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                               *pool.rings, cursor, idx, torch.empty_like(v),
                               gdn_backend.error_flag(device), force, 128 ** -0.5, 0))


def test_op_schema_declares_exactly_the_mutated_tensors():
    mutated = {arg.name for arg in OP._schema.arguments
               if arg.alias_info is not None and arg.alias_info.is_write}
    assert mutated == {"state_pool", "ring_d", "ring_k", "ring_g", "out", "error_flag"}


def test_warmup_runs_on_padding_only_and_writes_nothing():
    before = gdn_backend.error_flag("cpu").clone()
    gdn_backend.warmup_replayssm(device="cpu", num_heads=2, num_v_heads=4, ring_len=4)
    assert torch.equal(gdn_backend.error_flag("cpu"), before)
