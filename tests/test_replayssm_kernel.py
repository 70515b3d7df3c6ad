"""The ReplaySSM decode kernel against the reference, step by step, on the GPU: outputs
poisoned before each run, every byte the reference leaves alone left alone, the error flag
as the reference sets it; and inside replayed CUDA graphs with padded batches."""

import pytest
import torch

import gdn_backend
from gdn_backend.kernels.compile import CACHE
from gdn_backend.reference_replayssm import replayssm_decode_reference
from gdn_backend.testing import PAD_SLOT_ID, RingPool, copy_strided, no_host_sync, relative_error

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
TP1, TP8 = (16, 32), (2, 4)
# Batch sizes that reach every ReplaySSM tile: 8, 32 and 64 rows, and (TP1 B = 33, bf16) the
# flush on tensor cores.
BATCHES = {TP8: (3, 40, 130), TP1: (2, 17, 33)}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The elements' bytes, as integers of their width."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_step_matches_the_reference(pool, idx, cursor, force):
    """One kernel step and one reference step on copies of the same checkpoints and rings."""
    q, k, v, a, b = pool.tokens(idx.shape[0])
    tensors = (pool.checkpoint, *pool.rings)
    before = [copy_strided(t) for t in tensors]
    ref = [copy_strided(t) for t in tensors]
    out = torch.full(v.shape, float("nan"), dtype=v.dtype, device="cuda")
    ref_out = out[:, 0].clone()
    gdn_backend.clear_error_flag("cuda")
    gdn_backend.replayssm_decode(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                                 *pool.rings, cursor, idx, force_flush=force, out=out)
    flag = gdn_backend.read_error_flag("cuda", clear=True)
    ref_flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    replayssm_decode_reference(q[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], pool.A_log,
                               pool.dt_bias, *ref, cursor, idx, ref_out, scale=128 ** -0.5,
                               force_flush=force, error_flag=ref_flag)
    assert flag == bool(ref_flag.item())
    assert not out.isnan().any()
    assert relative_error(out[:, 0], ref_out) < TOL[torch.bfloat16]
    assert (out[idx < 0] == 0).all()
    for name, got, want, then in zip(("checkpoints", "ring d", "ring k", "ring g"), tensors, ref,
                                     before):
        # What the reference wrote, by rows (a state row, a record): a written element may
        # round to the bytes it had.
        changed = bits(want) != bits(then)  # by bytes: a NaN place the reference kept is kept
        if name != "ring g":
            changed = changed.any(-1, keepdim=True).expand_as(changed)
        assert torch.equal(bits(got)[~changed], bits(then)[~changed]), \
            f"{name}: a byte the reference kept changed"
        if changed.any():
            tol = TOL[torch.float32] if name == "ring g" else TOL[got.dtype]
            assert relative_error(got[changed], want[changed]) < max(tol, 1e-3), name
    return flag


@pytest.mark.parametrize("heads", [TP1, TP8], ids=["tp1", "tp8"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ring_len", [1, 16, 32])
def test_a_step_matches_the_reference_at_every_cursor(heads, state_dtype, ring_len):
    for i, B in enumerate(BATCHES[heads]):
        P = B + 6
        pool = RingPool(P, *heads, ring_len=ring_len, state_dtype=state_dtype, device="cuda",
                        slot_pitch=heads[1] * 128 * 128 + 256, seed=400 + i)
        gen = torch.Generator().manual_seed(i)
        slots = torch.randperm(P, generator=gen)[:B]
        slots[0] = PAD_SLOT_ID
        cursor = torch.randint(0, ring_len, (B,), generator=gen)
        cursor[1] = ring_len - 1  # a natural flush
        force = (torch.rand(B, generator=gen) < 0.2).to(torch.int32)
        idx = slots.to(torch.int32).cuda()
        assert not assert_step_matches_the_reference(pool, idx, cursor.to(torch.int32).cuda(),
                                                     force.cuda())
        assert not assert_step_matches_the_reference(pool, idx, cursor.to(torch.int32).cuda(),
                                                     None)


@pytest.mark.parametrize("heads", [TP1, TP8], ids=["tp1", "tp8"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_a_step_ignores_what_the_ring_holds_past_its_cursor(heads, state_dtype):
    """NaN in every ring place from each request's cursor on: the records are read at indices
    clamped into the filled part and masked, so none of it reaches an output or a state."""
    for i, B in enumerate(BATCHES[heads]):
        P = B + 6
        pool = RingPool(P, *heads, state_dtype=state_dtype, device="cuda",
                        slot_pitch=heads[1] * 128 * 128 + 256, seed=450 + i)
        gen = torch.Generator().manual_seed(450 + i)
        slots = torch.randperm(P, generator=gen)[:B]
        slots[0] = PAD_SLOT_ID
        cursor = torch.randint(0, pool.L, (B,), generator=gen)
        cursor[-1] = 0  # an empty ring
        cursor[1] = pool.L - 1  # a natural flush
        force = (torch.rand(B, generator=gen) < 0.2).to(torch.int32)
        pool.poison_past(slots, cursor)
        assert not assert_step_matches_the_reference(pool, slots.to(torch.int32).cuda(),
                                                     cursor.to(torch.int32).cuda(), force.cuda())


BF16, F32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("tile, state_dtype, ring_dtype, ring_len", [
    ("64x4m", BF16, BF16, 16), ("32x2m", BF16, BF16, 16), ("32x4m", BF16, BF16, 16),
    ("128x4m", BF16, BF16, 16), ("64x4m", BF16, BF16, 1), ("64x4m", BF16, BF16, 32),
    ("32x2m", BF16, BF16, 32), ("64x4m", F32, BF16, 16),
    ("64x4c", BF16, BF16, 16), ("64x4c", F32, F32, 16), ("32x2c", F32, F32, 32),
])
def test_either_flush_form_matches_the_reference(tile, state_dtype, ring_dtype, ring_len):
    """The flush on tensor cores (bf16 rings; 16-row blocks a warp, K padded to 16 places) and
    on CUDA cores, forced on a batch where half the rows flush (naturally or forced)."""
    from gdn_backend.bench.tiles import forced_tile, parse_tile

    B, P = 24, 30
    pool = RingPool(P, *TP1, ring_len=ring_len, state_dtype=state_dtype, ring_dtype=ring_dtype,
                    device="cuda", slot_pitch=TP1[1] * 128 * 128 + 256, seed=440)
    gen = torch.Generator().manual_seed(441)
    idx = torch.randperm(P, generator=gen)[:B].to(torch.int32)
    idx[0] = PAD_SLOT_ID
    cursor = torch.randint(0, ring_len, (B,), generator=gen).to(torch.int32)
    cursor[::4] = ring_len - 1
    force = (torch.arange(B) % 4 == 1).to(torch.int32)
    with forced_tile(parse_tile(tile)):
        assert not assert_step_matches_the_reference(pool, idx.cuda(), cursor.cuda(),
                                                     force.cuda())


@pytest.mark.parametrize("slot, cursor", [(10 ** 6, 0), (3, 16), (3, -2)],
                         ids=["slot past the pool", "cursor past the ring", "negative cursor"])
def test_a_bad_row_is_skipped_and_sets_the_flag(slot, cursor):
    pool = RingPool(6, *TP8, device="cuda", seed=410)
    idx = torch.tensor([1, slot, PAD_SLOT_ID], dtype=torch.int32, device="cuda")
    cursors = torch.tensor([5, cursor, 0], dtype=torch.int32, device="cuda")
    assert assert_step_matches_the_reference(pool, idx, cursors, None)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_many_steps_give_the_classic_kernels_outputs_and_states(state_dtype):
    pool = RingPool(24, *TP1, state_dtype=state_dtype, device="cuda", seed=420)
    gen = torch.Generator().manual_seed(421)
    flushes = 0
    for step in range(40):
        live = (torch.randperm(23, generator=gen)[:12] + 1).tolist()
        force = [int(torch.rand(1, generator=gen) < 0.05) for _ in range(13)]
        cursor = pool.cursors(torch.tensor(live, device="cuda"))
        flushes += int((cursor == pool.L - 1).sum()) + sum(force[:12])
        ring_out, classic_out = pool.step(live + [PAD_SLOT_ID], force)
        assert relative_error(ring_out, classic_out) < TOL[torch.bfloat16], f"step {step}"
    assert flushes > 8
    every = list(range(1, 24))
    pool.step(every, [1] * len(every))  # a forced flush of every slot
    assert relative_error(pool.checkpoint[1:], pool.classic[1:]) < TOL[state_dtype]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_replayed_graphs_with_padded_batches_match_eager_steps(state_dtype):
    """SGLang's CUDA-graph decode: static slots, cursors and force flags refreshed in place
    before each replay, live rows fewer than the captured batch, padded with -1."""
    H, HV = TP8
    gdn_backend.warmup_replayssm(device="cuda", num_heads=H, num_v_heads=HV,
                                 state_dtype=state_dtype)
    bs, P = 8, 24
    pool = RingPool(P, H, HV, state_dtype=state_dtype, device="cuda", seed=430)
    eager = RingPool(P, H, HV, state_dtype=state_dtype, device="cuda", seed=430)
    q, k, v, a, b = pool.tokens(bs)
    idx = torch.full((bs,), PAD_SLOT_ID, dtype=torch.int32, device="cuda")
    cursor = torch.zeros(bs, dtype=torch.int32, device="cuda")
    force = torch.zeros(bs, dtype=torch.int32, device="cuda")
    out = torch.empty_like(v)
    compiled = CACHE.compilations
    graph = torch.cuda.CUDAGraph()
    with no_host_sync(), torch.cuda.graph(graph):
        gdn_backend.replayssm_decode(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                                     *pool.rings, cursor, idx, force_flush=force, out=out)
    assert CACHE.compilations == compiled
    gen = torch.Generator().manual_seed(431)
    for step in range(24):
        live = int(torch.randint(1, bs + 1, (1,), generator=gen))
        slots = (torch.randperm(P - 1, generator=gen)[:live] + 1).tolist()
        slots += [PAD_SLOT_ID] * (bs - live)
        step_idx = torch.tensor(slots, dtype=torch.int32, device="cuda")
        step_force = (torch.rand(bs, generator=gen) < 0.1).to(torch.int32).cuda()
        tokens = eager.tokens(bs)
        for static, fresh in zip((q, k, v, a, b), tokens):
            static.copy_(fresh)
        idx.copy_(step_idx)
        cursor.copy_(pool.cursors(step_idx))
        force.copy_(step_force)
        out.fill_(float("nan"))
        graph.replay()
        want = torch.full_like(v, float("nan"))
        eager_cursor = eager.cursors(step_idx)
        gdn_backend.replayssm_decode(*tokens, eager.A_log, eager.dt_bias, eager.checkpoint,
                                     *eager.rings, eager_cursor, step_idx,
                                     force_flush=step_force, out=want)
        pool.advance(step_idx, cursor, force)
        eager.advance(step_idx, eager_cursor, step_force)
        assert torch.equal(out, want), f"step {step}"
        assert (out[live:] == 0).all()
    for replayed, eager_t in zip((pool.checkpoint, *pool.rings), (eager.checkpoint, *eager.rings)):
        assert torch.equal(replayed, eager_t)
