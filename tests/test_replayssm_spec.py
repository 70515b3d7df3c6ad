"""The spec-ring ops' contract (SGLang's --enable-linear-replayssm-spec), on the CPU (the
reference a request at a time) and on CUDA (the kernels), against the reference on the
whole batch: the verify's outputs and appended records, the fold's checkpoints, snapshots
and cursors; padding, rows waiting for their fold and bad rows touch nothing; every bad
argument is a clear error before anything is written."""

from dataclasses import replace

import pytest
import torch

import gdn_backend
from gdn_backend.reference_replayssm_spec import (
    replayssm_spec_advance_reference, replayssm_spec_finish_reference,
    replayssm_spec_fold_reference, replayssm_spec_verify_reference)
from gdn_backend.kernels.heuristics import LARGE, SPEC_MMA, SPEC_MMA_SMALL, SPEC_WIDE, TINY, Tile
from gdn_backend.testing import SpecRing, relative_error

OUT_TOL = 8e-3      # bf16 outputs
RECORD_TOL = 1e-4   # a record's high + low parts
STATE_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
HEADS = {"tp8": (2, 4), "tp1": (16, 32)}
T = 4


def verify(ring, window, slots, rows, *, out=None, min_valid_slot=0):
    q, k, v, a, b, cu = window
    return gdn_backend.replayssm_spec_verify(
        q, k, v, a, b, ring.A_log, ring.dt_bias, ring.checkpoint[0], *ring.rings(0), cu,
        slots, rows, *ring.cursors, max_tokens=T, out=out, min_valid_slot=min_valid_slot)


def verify_reference(ring, window, slots, rows):
    """The reference on CPU copies: (ring copy, out [N, HV, V])."""
    ref = ring.to("cpu")
    q, k, v, a, b, cu = (t.cpu() for t in window)
    out = torch.zeros(q.shape[1], ring.HV, ring.V, dtype=torch.bfloat16)
    d, kk, g, d_low, k_low = ref.rings(0)
    replayssm_spec_verify_reference(q[0], k[0], v[0], a[0], b[0], ref.A_log, ref.dt_bias,
                                    ref.checkpoint[0], d, kk, g, d_low, k_low, cu, slots.cpu(),
                                    rows.cpu(), *ref.cursors, out, scale=ring.K ** -0.5)
    return ref, out


def whole(high, low):
    return high.float().cpu() + low.float().cpu()


def assert_rings_match(ring, ref):
    assert relative_error(whole(ring.ring_d, ring.ring_d_low), whole(ref.ring_d, ref.ring_d_low)) < RECORD_TOL
    assert relative_error(whole(ring.ring_k, ring.ring_k_low), whole(ref.ring_k, ref.ring_k_low)) < RECORD_TOL
    assert relative_error(ring.ring_g.cpu(), ref.ring_g) < 1e-6


def indices(values, device="cpu", dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", HEADS)
def test_verify_equals_the_reference(device, heads, state_dtype):
    ring = SpecRing(8, 6, *HEADS[heads], state_dtype=state_dtype, device=device, seed=1)
    # A row that wraps, one near capacity (only two of its window's records fit), an empty one.
    ring.write_pos.copy_(indices([3, 0, 14, 9, 1, 6], device))
    ring.cache_base.copy_(indices([0, 5, 12, 15, 3, 9], device))
    window = ring.window([T, T - 1, T, 1, 2])
    slots, rows = indices([3, -1, 7, 1, 0], device), indices([0, 1, 2, 3, 5], device, torch.int64)
    ref, want = verify_reference(ring, window, slots, rows)
    out = torch.full_like(window[2], float("nan"))
    verify(ring, window, slots, rows, out=out)
    assert relative_error(out[0].cpu(), want) < OUT_TOL
    assert (out[0, T:2 * T - 1] == 0).all()  # the padding row
    assert_rings_match(ring, ref)
    assert torch.equal(ring.checkpoint.cpu(), ref.checkpoint)
    for now, then in zip(ring.cursors, ref.cursors):
        assert torch.equal(now.cpu(), then)


SPEC_MMA_WIDE = Tile(rows_per_cta=128, rows_per_thread=2, tensor_cores=True)
# The tensor-core tiles place their checkpoint rows as named: registers unless staged.
SPEC_MMA_STAGED = replace(SPEC_MMA, staged_rows=True)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tile", [TINY, LARGE, SPEC_WIDE, SPEC_MMA_SMALL, SPEC_MMA, SPEC_MMA_STAGED,
                                  SPEC_MMA_WIDE],
                         ids=["8x1", "32x2", "64x2", "32x2tc", "64x2tc", "64x2tcs", "128x2tc"])
def test_every_spec_tile_equals_the_reference(monkeypatch, tile, state_dtype):
    """Each tile the dispatch may choose, and the tensor-core ones, forced on one batch:
    verify, then the fold."""
    from gdn_backend.kernels import launch

    monkeypatch.setattr(launch, "choose_spec_fold_tile", lambda *shape: tile)
    monkeypatch.setattr(launch, "choose_spec_verify_tile", lambda *shape: tile)
    ring = SpecRing(8, 6, *HEADS["tp1"], layers=2, state_dtype=state_dtype, device="cuda",
                    seed=13)
    ring.write_pos.copy_(indices([3, 0, 14, 9, 1, 6], "cuda"))
    window = ring.window([T, T - 1, T, 1, 2])
    slots, rows = indices([3, -1, 7, 1, 0], "cuda"), indices([0, 1, 2, 3, 5], "cuda")
    ref, want = verify_reference(ring, window, slots, rows)
    out = verify(ring, window, slots, rows)
    assert relative_error(out[0].cpu(), want) < OUT_TOL
    assert_rings_match(ring, ref)
    ring.is_flush.copy_(indices([1, 1, 0, 1, 0, 1], "cuda", torch.int8))
    accept = indices([2, 1, 3, 1, 1], "cuda")
    ref = fold_reference(ring, slots, rows, accept)
    fold(ring, slots, rows, accept)
    assert relative_error(ring.checkpoint.cpu(), ref.checkpoint) < STATE_TOL[state_dtype]
    for now, then in zip(ring.cursors, ref.cursors):
        assert torch.equal(now.cpu(), then)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens,ring_len", [(1, 16), (2, 16), (3, 8), (4, 32)])
@pytest.mark.parametrize("tile", [SPEC_MMA, SPEC_MMA_STAGED], ids=["registers", "staged"])
def test_the_tensor_core_verify_equals_the_reference_at_every_window_and_ring(
        monkeypatch, tile, tokens, ring_len, state_dtype):
    """Windows of 1 to 4 tokens, rings of 8 to 32 (two record blocks), a full ring, rows
    shorter than the window, at TP8 (one key head for two value heads); rows in registers
    and staged."""
    from gdn_backend.kernels import launch

    monkeypatch.setattr(launch, "choose_spec_verify_tile", lambda *shape: tile)
    ring = SpecRing(8, 6, *HEADS["tp8"], ring_len=ring_len, state_dtype=state_dtype,
                    device="cuda", seed=15 + tokens)
    ring.write_pos.copy_(indices([ring_len - 1, 0, ring_len // 2, ring_len, 1, 3], "cuda"))
    lengths = [tokens, max(tokens - 1, 1), tokens, 1, tokens]
    window = ring.window(lengths)
    slots, rows = indices([3, 6, 7, 1, 2], "cuda"), indices([0, 1, 2, 3, 5], "cuda")
    ref, want = verify_reference(ring, window, slots, rows)
    q, k, v, a, b, cu = window
    out = gdn_backend.replayssm_spec_verify(
        q, k, v, a, b, ring.A_log, ring.dt_bias, ring.checkpoint[0], *ring.rings(0), cu, slots,
        rows, *ring.cursors, max_tokens=tokens)
    assert relative_error(out[0].cpu(), want) < OUT_TOL
    assert_rings_match(ring, ref)


def test_a_cache_base_off_the_circle_wraps_as_sglangs_mask_does(device):
    """Ring positions are (cache_base + c) mod L for any cache_base, so a cursor SGLang never
    writes still reads and writes inside its row's ring."""
    ring = SpecRing(4, 3, layers=1, device=device, seed=14)
    ring.write_pos.copy_(indices([5, 2, 7], device))
    ring.cache_base.copy_(indices([-3, 37, 1 << 20], device))
    window = ring.window([T, T, T])
    slots, rows = indices([1, 2, 3], device), indices([0, 1, 2], device)
    ref, want = verify_reference(ring, window, slots, rows)
    out = verify(ring, window, slots, rows)
    assert relative_error(out[0].cpu(), want) < OUT_TOL
    assert_rings_match(ring, ref)
    ring.is_flush.fill_(1)
    ref = fold_reference(ring, slots, rows, indices([1, 1, 1], device))
    fold(ring, slots, rows, indices([1, 1, 1], device))
    assert relative_error(ring.checkpoint.cpu(), ref.checkpoint) < STATE_TOL[torch.float32]
    for now, then in zip(ring.cursors, ref.cursors):
        assert torch.equal(now.cpu(), then)


def test_verify_leaves_rows_waiting_for_their_fold_alone(device):
    ring = SpecRing(4, 3, device=device, seed=2)
    ring.is_flush[1] = 1
    window = ring.window([T, T])
    before = [t.clone() for t in ring.tensors()]
    out = torch.full_like(window[2], 7.0)
    verify(ring, window, indices([2, 3], device), indices([1, 1], device), out=out)
    assert (out == 7.0).all()
    for now, then in zip(ring.tensors(), before):
        assert torch.equal(now, then)


def test_verify_below_min_valid_slot_is_padding(device):
    """Zero output, nothing read or written, and no error even where its row is past the
    rings (padding rows' rows are not looked at)."""
    ring = SpecRing(4, 2, device=device, seed=3)
    window = ring.window([T, T])
    before = [t.clone() for t in ring.tensors()]
    out = torch.full_like(window[2], 7.0)
    gdn_backend.read_error_flag(device, clear=True)
    verify(ring, window, indices([0, 0], device), indices([0, 5], device), out=out,
           min_valid_slot=1)
    assert (out == 0).all()
    assert not gdn_backend.read_error_flag(device)
    for now, then in zip(ring.tensors(), before):
        assert torch.equal(now, then)


def test_verify_bad_rows_set_the_flag_and_touch_nothing(device):
    ring = SpecRing(4, 3, device=device, seed=4)
    ring.write_pos[2] = ring.L + 1
    window = ring.window([T, T, T, T])
    # A slot past the pool, a row past the rings, a cursor past L; then a good request.
    slots, rows = indices([4, 1, 2, 3], device), indices([0, 3, 2, 1], device)
    ref, want = verify_reference(ring, window, indices([-1, -1, -1, 3], device), rows.clamp(max=2))
    gdn_backend.read_error_flag(device, clear=True)
    out = torch.full_like(window[2], 7.0)
    verify(ring, window, slots, rows, out=out)
    assert gdn_backend.read_error_flag(device, clear=True)
    assert (out[0, :3 * T] == 0).all()
    assert relative_error(out[0, 3 * T:].cpu(), want[3 * T:]) < OUT_TOL
    assert_rings_match(ring, ref)


def test_index_check_mode_raises_on_a_bad_row_in_verify_and_fold(device, monkeypatch):
    monkeypatch.setenv("GDN_BACKEND_CHECK_INDICES", "1")
    ring = SpecRing(4, 3, device=device, seed=15)
    ring.is_flush.fill_(1)
    gdn_backend.clear_error_flag(device)
    good, past = indices([1], device), indices([3], device)  # row 3: past the 3 rings
    with pytest.raises(IndexError, match="was skipped"):
        verify(ring, ring.window([T]), good, past)
    fold(ring, good, indices([0], device), good)  # clean: no error
    with pytest.raises(IndexError, match="was skipped"):
        fold(ring, good, past, good)
    assert not gdn_backend.read_error_flag(device)


def fold(ring, slots, rows, accept, track=None, steps=None):
    gdn_backend.replayssm_spec_fold(ring.checkpoint, *ring.rings(None), slots, rows,
                                    *ring.cursors, accept, track_indices=track,
                                    track_steps=steps)


def fold_reference(ring, slots, rows, accept, track=None, steps=None):
    ref = ring.to("cpu")
    cpu = [None if t is None else t.cpu() for t in (slots, rows, accept, track, steps)]
    for layer in range(ref.checkpoint.shape[0]):
        d, k, g, d_low, k_low = ref.rings(layer)
        replayssm_spec_fold_reference(ref.checkpoint[layer], d, k, g, d_low, k_low, cpu[0],
                                      cpu[1], *ref.cursors, cpu[2], track_indices=cpu[3],
                                      track_steps=cpu[4])
    replayssm_spec_finish_reference(*ref.cursors, cpu[0], cpu[1], ring_len=ring.L)
    return ref


@pytest.mark.parametrize("track", [False, True], ids=["fold", "fold+track"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fold_equals_the_reference(device, state_dtype, track):
    check_fold(device, state_dtype, track)


@pytest.mark.gpu
@pytest.mark.parametrize("ring_len", [16, 32])
@pytest.mark.parametrize("track", [False, True], ids=["fold", "fold+track"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tile", [SPEC_MMA_SMALL, SPEC_MMA, SPEC_MMA_STAGED],
                         ids=["32x2tc", "64x2tc", "64x2tcs"])
def test_the_tensor_core_fold_equals_the_reference(monkeypatch, tile, state_dtype, track,
                                                   ring_len):
    from gdn_backend.kernels import launch

    monkeypatch.setattr(launch, "choose_spec_fold_tile", lambda *shape: tile)
    check_fold("cuda", state_dtype, track, ring_len)


def check_fold(device, state_dtype, track, ring_len=16):
    """Rows folding and not, a full ring and one of a single record, a padding slot; with
    `track`, snapshots from flushing and non-flushing rows after all of a row's records, some
    and none, none for two requests. Only the folded and snapshot slots change."""
    ring = SpecRing(10, 6, ring_len=ring_len, layers=2, state_dtype=state_dtype, device=device,
                    seed=5)
    full = ring_len
    ring.write_pos.copy_(indices([3, full, 7, 9, 1, full - 4], device))
    ring.is_flush.copy_(indices([1, 1, 0, 1, 0, 1], device, torch.int8))
    slots, rows = indices([3, -1, 7, 1, 2, 5]), indices([0, 2, 3, 1, 4, 5])
    accept = indices([2, 3, 4, 1, 2, 3])
    tracks = steps = None
    if track:  # after all of a row's records, 6 of 9, none (1 - 2 + 0 + 1)
        tracks, steps = indices([8, -1, 9, 6, 0, 4]), indices([1, 0, 0, 0, 0, -1])
    args = [None if t is None else t.to(device) for t in (slots, rows, accept, tracks, steps)]
    check_fold_against_the_reference(ring, args, state_dtype,
                                     {3, 7, 1, 5} | ({8, 9, 6, 0} if track else set()))


def check_fold_against_the_reference(ring, args, state_dtype, folded):
    """Fold `ring` with `args` (slots, rows, accept[, track, steps]): the checkpoints equal the
    reference's, only the slots in `folded` change (in every layer), the cursors equal."""
    before = ring.checkpoint.cpu().clone()
    ref = fold_reference(ring, *args)
    fold(ring, *args)
    assert relative_error(ring.checkpoint.cpu(), ref.checkpoint) < STATE_TOL[state_dtype]
    changed = (ring.checkpoint.cpu() != before).flatten(2).any(-1).all(0)
    assert changed.nonzero().flatten().tolist() == sorted(folded)
    for now, then in zip(ring.cursors, ref.cursors):
        assert torch.equal(now.cpu(), then)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tile", [TINY, LARGE, SPEC_MMA, SPEC_MMA_STAGED],
                         ids=["8x1", "32x2", "64x2tc", "64x2tcs"])
def test_the_fold_of_a_large_batch_in_two_layers_equals_the_reference(monkeypatch, tile,
                                                                       state_dtype):
    """300 requests in two layers (several waves of CTAs at every tile), padding and rows
    folding or not throughout. Only the folded slots change."""
    from gdn_backend.kernels import launch

    monkeypatch.setattr(launch, "choose_spec_fold_tile", lambda *shape: tile)
    B = 300
    ring = SpecRing(B + 1, B, ring_len=16, layers=2, state_dtype=state_dtype, device="cuda",
                    seed=21)
    gen = torch.Generator().manual_seed(22)
    ring.write_pos.copy_(torch.randint(1, 17, (B,), generator=gen, dtype=torch.int32))
    flush = torch.rand(B, generator=gen) < 0.6
    ring.is_flush.copy_(flush.to(torch.int8))
    slots = (torch.randperm(B, generator=gen) + 1).to(torch.int32)
    slots[::37] = -1
    rows = torch.randperm(B, generator=gen).to(torch.int32)
    accept = torch.randint(1, 5, (B,), generator=gen, dtype=torch.int32)
    folded = slots[(slots >= 0) & flush[rows.long()]].tolist()
    check_fold_against_the_reference(ring, [t.cuda() for t in (slots, rows, accept)],
                                     state_dtype, folded)


def test_fold_bad_requests_set_the_flag_and_keep_their_records(device):
    ring = SpecRing(4, 3, layers=2, device=device, seed=6)
    ring.write_pos.copy_(indices([5, 6, 4], device))
    ring.is_flush.fill_(1)
    before = [t.clone() for t in ring.tensors()]
    gdn_backend.read_error_flag(device, clear=True)
    # A slot past the pool, a row past the rings, a snapshot past the pool.
    fold(ring, indices([4, 1, 2], device), indices([0, 3, 2], device), indices([1, 1, 1], device),
         indices([-1, -1, 9], device), indices([0, 0, 0], device))
    assert gdn_backend.read_error_flag(device, clear=True)
    for now, then in zip(ring.tensors(), before):
        assert torch.equal(now, then)


def test_verify_and_commit_over_many_steps_follow_the_reference(device):
    """SGLang's loop: verify, the cursor advance by the accepted counts, the fold; with
    rows reaching capacity, a padding row and requests moving between slots."""
    ring = SpecRing(8, 4, layers=1, device=device, seed=7)
    ring.write_pos.zero_()
    ref = ring.to("cpu")
    gen = torch.Generator().manual_seed(8)
    folds = 0
    for step in range(14):
        slots = (torch.randperm(7, generator=gen)[:3] + 1).tolist() + [-1]
        rows = [0, 1, 3, 2]
        lengths = [T, T, int(torch.randint(1, T + 1, (1,), generator=gen)), T]
        accept = [int(torch.randint(1, n + 1, (1,), generator=gen)) for n in lengths]
        window = ring.window(lengths)
        s, r, acc = indices(slots, device), indices(rows, device), indices(accept, device)
        out = verify(ring, window, s, r)
        want = torch.zeros(sum(lengths), ring.HV, ring.V, dtype=torch.bfloat16)
        d, k, g, d_low, k_low = ref.rings(0)
        replayssm_spec_verify_reference(
            *(t.cpu()[0] for t in window[:5]), ref.A_log, ref.dt_bias, ref.checkpoint[0], d, k,
            g, d_low, k_low, window[5].cpu(), s.cpu(), r.cpu(), *ref.cursors, want,
            scale=ring.K ** -0.5)
        assert relative_error(out[0].cpu(), want) < OUT_TOL, f"step {step}"
        # SGLang's advance is a Triton kernel: the reference's stands in, on both.
        for state, on in ((ring, device), (ref, "cpu")):
            replayssm_spec_advance_reference(*state.cursors, acc.to(on), r.to(on),
                                             ring_len=ring.L, max_tokens=T,
                                             fold_every_commit=False)
        folds += int(ref.is_flush.sum())
        fold(ring, s, r, acc)
        ref_after = fold_reference(ref, s.cpu(), r.cpu(), acc.cpu())
        ref.__dict__.update(ref_after.__dict__)
        assert relative_error(ring.checkpoint.cpu(), ref.checkpoint) < STATE_TOL[torch.float32]
        for now, then in zip(ring.cursors, ref.cursors):
            assert torch.equal(now.cpu(), then), f"step {step}"
    assert folds >= 3


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [None, SPEC_MMA], ids=["dispatch", "64x2tc"])
def test_verify_replays_in_a_cuda_graph_with_padded_batches(monkeypatch, tile):
    from gdn_backend.kernels import launch

    ring = SpecRing(8, 4, device="cuda", seed=9)
    gdn_backend.warmup_replayssm_spec(device="cuda", num_heads=2, num_v_heads=4, ring_len=16,
                                      max_tokens=T, dt_bias_dtype=torch.float32)
    window = ring.window([T] * 4)
    slots, rows = indices([1, 2, -1, -1], "cuda"), indices([0, 1, 2, 3], "cuda")
    if tile is not None:  # a forced tile is not among warm-up's: an eager call compiles it
        monkeypatch.setattr(launch, "choose_spec_verify_tile", lambda *shape: tile)
        verify(ring.to("cuda"), window, slots, rows)
    out = torch.empty_like(window[2])
    eager = ring.to("cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    snapshot = [t.clone() for t in ring.tensors()]
    with torch.cuda.graph(graph):
        verify(ring, window, slots, rows, out=out)
    for now, then in zip(ring.tensors(), snapshot):
        now.copy_(then)
    for new_slots in ([3, 5, 1, -1], [6, -1, -1, -1]):
        slots.copy_(indices(new_slots, "cuda"))
        graph.replay()
        want = verify(eager, window, slots, rows)
        torch.cuda.synchronize()
        assert torch.equal(out, want)
        for now, then in zip(ring.tensors(), eager.tensors()):
            assert torch.equal(now, then)


BAD_VERIFY = {
    "ring length not a power of two": (
        dict(ring_d=torch.zeros(3, 4, 12, 128).bfloat16()), ValueError, "power of two"),
    "low parts missing": (dict(ring_k_low=None), ValueError, "ring_k_low is None"),
    "cursor dtype": (dict(is_flush=torch.zeros(3, dtype=torch.int32)), TypeError,
                     "is_flush has dtype"),
    "cursor rows": (dict(write_pos=torch.zeros(4, dtype=torch.int32)), ValueError,
                    "write_pos has shape"),
    "ring_g dtype": (dict(ring_g=torch.zeros(3, 4, 16).bfloat16()), TypeError,
                     "ring_g has dtype"),
    "ring_k heads": (dict(ring_k=torch.zeros(3, 1, 16, 128).bfloat16()), ValueError,
                     "ring_k has shape"),
    "rows length": (dict(replay_indices=torch.zeros(3, dtype=torch.int32)), ValueError,
                    "replay_indices has shape"),
    "fp32 records": (dict(ring_d=torch.zeros(3, 4, 16, 128)), TypeError, "ring_d has dtype"),
}


@pytest.mark.parametrize("case", BAD_VERIFY)
def test_a_bad_verify_argument_is_a_clear_error_and_writes_nothing(case):
    change, error, message = BAD_VERIFY[case]
    ring = SpecRing(4, 3, seed=10)
    q, k, v, a, b, cu = ring.window([T, T])
    d, kk, g, d_low, k_low = ring.rings(0)
    args = dict(q=q, k=k, v=v, a=a, b=b, A_log=ring.A_log, dt_bias=ring.dt_bias,
                checkpoint=ring.checkpoint[0], ring_d=d, ring_k=kk, ring_g=g, ring_d_low=d_low,
                ring_k_low=k_low, cu_seqlens=cu, state_indices=indices([1, 2], "cpu"),
                replay_indices=indices([0, 2], "cpu"), write_pos=ring.write_pos,
                cache_base=ring.cache_base, is_flush=ring.is_flush)
    args.update(change)
    before = [t.clone() for t in ring.tensors()]
    with pytest.raises(error, match=message):
        gdn_backend.replayssm_spec_verify(**args, max_tokens=T)
    for now, then in zip(ring.tensors(), before):
        assert torch.equal(now, then)


def test_a_bad_fold_argument_is_a_clear_error_and_writes_nothing():
    ring = SpecRing(4, 3, layers=2, seed=11)
    ring.is_flush.fill_(1)
    before = [t.clone() for t in ring.tensors()]
    two = indices([1, 2], "cpu")
    with pytest.raises(ValueError, match="track_indices and track_steps come together"):
        fold(ring, two, two, two, track=two)
    with pytest.raises(ValueError, match="accept_lens has shape"):
        fold(ring, two, two, indices([1], "cpu"))
    with pytest.raises(ValueError, match="ring_d has shape"):
        gdn_backend.replayssm_spec_fold(ring.checkpoint, ring.ring_d[:1], *ring.rings(None)[1:],
                                        two, two, *ring.cursors, two)
    many = torch.zeros(65536, dtype=torch.int32)
    with pytest.raises(ValueError, match="at most 65535 requests"):
        fold(ring, many, many, many)
    for now, then in zip(ring.tensors(), before):
        assert torch.equal(now, then)


def test_the_ops_pass_torch_librarys_checks():
    ring = SpecRing(4, 3, layers=2, seed=12)
    ring.is_flush[0] = 1
    q, k, v, a, b, cu = ring.window([T, 2])
    two = indices([1, 2], "cpu")
    d, kk, g, d_low, k_low = ring.rings(0)
    flag = torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(torch.ops.gdn_backend.replayssm_spec_verify.default, (
        q, k, v, a, b, ring.A_log, ring.dt_bias, ring.checkpoint[0].clone(), d.clone(),
        kk.clone(), g.clone(), d_low.clone(), k_low.clone(), cu, two, indices([1, 2], "cpu"),
        *ring.cursors, torch.empty_like(v), flag, T, ring.K ** -0.5, 0))
    torch.library.opcheck(torch.ops.gdn_backend.replayssm_spec_fold.default, (
        ring.checkpoint.clone(), *(t.clone() for t in ring.rings(None)), two,
        indices([0, 1], "cpu"), *(t.clone() for t in ring.cursors), two, None, None, flag))
