"""The tile choice: every SM busy at small batches, bytes in flight at large ones."""

from dataclasses import replace

import pytest

from gdn_backend.kernels.heuristics import (FINE16, LARGE, MMA, MMA_WIDE, NUM_SMS, PAIRS16, TINY,
                                            WIDE, choose_tile, serves, tiles_for)

FP32, BF16 = 4, 2


@pytest.mark.parametrize("batch, heads, tokens, state_bytes, tile", [
    (1, 4, 1, FP32, TINY), (8, 4, 1, BF16, TINY), (16, 4, 1, FP32, WIDE), (64, 4, 1, FP32, TINY),  # TP8
    (256, 4, 1, BF16, WIDE), (16, 4, 4, BF16, MMA), (32, 4, 4, BF16, MMA),
    (33, 4, 4, BF16, MMA_WIDE), (192, 4, 3, BF16, MMA_WIDE),
    (64, 4, 4, FP32, LARGE), (256, 4, 4, FP32, LARGE), (256, 4, 2, BF16, LARGE),
    (1, 32, 1, FP32, TINY), (4, 32, 1, BF16, WIDE), (4, 32, 1, FP32, WIDE),                       # TP1
    (32, 32, 1, FP32, TINY), (64, 32, 2, BF16, LARGE), (64, 32, 2, FP32, LARGE),
    (2, 32, 4, BF16, MMA), (16, 32, 4, BF16, MMA_WIDE), (256, 32, 4, BF16, MMA_WIDE),
    (256, 32, 3, BF16, MMA_WIDE), (256, 32, 4, FP32, LARGE), (256, 32, 8, BF16, LARGE),
    (256, 32, 8, FP32, LARGE),
])
def test_tile_for_qwen3_next_shapes(batch, heads, tokens, state_bytes, tile):
    assert choose_tile(batch, heads, 128, tokens, state_bytes) == tile


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 17, 33, 100, 1000])
@pytest.mark.parametrize("heads", [4, 8, 32])
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_the_finest_tile_wherever_32_row_tiles_leave_sms_idle(batch, heads, tokens):
    if batch * heads * (128 // 32) < NUM_SMS:
        assert choose_tile(batch, heads, 128, tokens, BF16) == TINY
        assert choose_tile(batch, heads, 128, tokens, FP32) == TINY


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 17, 33, 100, 1000])
@pytest.mark.parametrize("heads", [4, 8, 32])
def test_one_token_on_fp32_takes_fine_tiles_below_132_ctas_and_from_256_heads(batch, heads):
    fine = batch * heads * (128 // 32) < NUM_SMS or batch * heads >= 256
    assert (choose_tile(batch, heads, 128, 1, FP32) == TINY) == fine


@pytest.mark.parametrize("tokens", range(1, 9))
@pytest.mark.parametrize("state_bytes", [FP32, BF16])
def test_four_rows_a_thread_for_one_token_on_a_bf16_pool(tokens, state_bytes):
    # 32 requests of 32 heads: 1024 heads, past every small-grid rule.
    assert (choose_tile(32, 32, 128, tokens, state_bytes) == WIDE) == (
        state_bytes == BF16 and tokens == 1)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 17, 33, 100, 1000])
@pytest.mark.parametrize("heads", [4, 8, 32])
@pytest.mark.parametrize("tokens", range(1, 9))
@pytest.mark.parametrize("state_bytes", [FP32, BF16])
def test_tensor_cores_for_three_or_four_tokens_on_a_bf16_pool_past_the_small_grids(
        batch, heads, tokens, state_bytes):
    tile = choose_tile(batch, heads, 128, tokens, state_bytes)
    small_grid = batch * heads * (128 // 32) < NUM_SMS
    assert tile.tensor_cores == (state_bytes == BF16 and tokens in (3, 4) and not small_grid)
    assert serves(tile, tokens, state_bytes)


@pytest.mark.parametrize("batch", [2, 3, 5, 8, 17, 33, 100, 1000])
@pytest.mark.parametrize("heads", [4, 32])
def test_tensor_cores_take_64_row_tiles_once_every_sm_gets_two(batch, heads):
    tile = choose_tile(batch, heads, 128, 4, BF16)
    if tile.tensor_cores:
        assert tile == (MMA_WIDE if batch * heads * (128 // 64) >= 2 * NUM_SMS else MMA)


@pytest.mark.parametrize("tokens", [2, 3, 4])
@pytest.mark.parametrize("batch", [1, 4, 16, 256])
def test_verify_with_many_value_heads_a_request_stays_on_cuda_cores(tokens, batch):
    assert not choose_tile(batch, 32, 128, tokens, BF16, intermediate=True).tensor_cores
    assert not any(t.tensor_cores for t in tiles_for(32, 128, tokens, BF16, intermediate=True))


@pytest.mark.parametrize("batch, tokens, tile", [
    (8, 4, TINY), (16, 2, LARGE), (16, 4, MMA), (32, 2, MMA), (32, 3, MMA), (32, 4, MMA),
    (64, 2, MMA_WIDE), (64, 4, LARGE), (128, 2, MMA_WIDE), (128, 3, LARGE), (256, 2, LARGE)])
def test_verify_on_a_bf16_pool_takes_tensor_cores_for_tp8_batches_where_they_won(batch, tokens,
                                                                                 tile):
    assert choose_tile(batch, 4, 128, tokens, BF16, intermediate=True) == tile


def test_verify_on_an_fp32_pool_and_per_token_slots_never_take_tensor_cores():
    for batch in (16, 32, 64, 128):
        assert not choose_tile(batch, 4, 128, 3, FP32, intermediate=True).tensor_cores
        assert not choose_tile(batch, 4, 128, 2, BF16, per_token_slots=True).tensor_cores


def test_the_tensor_core_kernel_serves_bf16_pools_up_to_four_tokens_in_one_slot_a_request():
    assert serves(MMA, 4, BF16) and serves(MMA_WIDE, 1, BF16)
    assert serves(MMA_WIDE, 2, BF16)
    assert not serves(MMA, 4, FP32)
    assert not serves(MMA, 5, BF16)
    assert not serves(MMA, 2, BF16, per_token_slots=True)
    assert not serves(MMA, 2, BF16, ragged=True)
    assert serves(LARGE, 8, FP32)


@pytest.mark.parametrize("heads", [4, 8, 32])
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_larger_batches_never_get_finer_tiles_on_a_bf16_pool(heads, tokens):
    rows = [choose_tile(b, heads, 128, tokens, BF16).rows_per_cta for b in range(1, 513)]
    assert rows == sorted(rows)


@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("state_bytes", [FP32, BF16])
def test_warmup_compiles_every_tile_the_heuristic_can_choose(tokens, state_bytes):
    for heads in (4, 32):
        chosen = {choose_tile(b, heads, 128, tokens, state_bytes) for b in range(1, 4097)}
        assert set(tiles_for(heads, 128, tokens, state_bytes)) == chosen
        # 8x1 and one 32-row tile, except four tokens on a bf16 pool: 8x1 and the two
        # tensor-core tiles.
        assert TINY in chosen and len(chosen) == (3 if state_bytes == BF16 and tokens == 4 else 2)


@pytest.mark.parametrize("batch", [16, 32, 48, 64, 65, 256])
@pytest.mark.parametrize("tokens", [2, 4, 8])
@pytest.mark.parametrize("ragged", [False, True])
def test_verify_on_fp32_at_tp8_takes_fine_tiles_up_to_256_heads_and_512_at_4_tokens(
        batch, tokens, ragged):
    tile = replace(choose_tile(batch, 4, 128, tokens, FP32, intermediate=True, ragged=ragged),
                   streaming_rows=None)
    assert (tile in (TINY, WIDE, FINE16, PAIRS16)) == (batch * 4 <= (512 if tokens <= 4 else 256))
    assert (tile == FINE16) == (tokens <= 4 and 128 < batch * 4 <= 512)


@pytest.mark.parametrize("batch", [8, 9, 16, 17, 32])
@pytest.mark.parametrize("ragged", [False, True])
def test_verify_of_8_equal_rows_on_fp32_at_tp8_takes_16_row_pairs_up_to_64_heads(batch, ragged):
    tile = choose_tile(batch, 4, 128, 8, FP32, intermediate=True, ragged=ragged)
    latency_bound = batch * 4 * (128 // 32) < NUM_SMS
    assert (tile == PAIRS16) == (not latency_bound and not ragged and batch * 4 <= 64)


@pytest.mark.parametrize("batch", [9, 16, 32, 33, 48])
@pytest.mark.parametrize("tokens", [2, 3, 4, 8])
@pytest.mark.parametrize("ragged", [False, True])
def test_verify_of_equal_rows_on_fp32_at_tp8_takes_four_rows_a_thread_up_to_128_heads(
        batch, tokens, ragged):
    tile = choose_tile(batch, 4, 128, tokens, FP32, intermediate=True, ragged=ragged)
    latency_bound = batch * 4 * (128 // 32) < NUM_SMS
    wide = not latency_bound and not ragged and tokens <= 4 and batch * 4 <= 128
    assert (tile == WIDE) == wide


@pytest.mark.parametrize("batch, heads", [(4, 32), (8, 32), (256, 32), (16, 4), (32, 4),
                                          (64, 4), (128, 4)])
@pytest.mark.parametrize("tokens", [2, 3, 4, 8])
@pytest.mark.parametrize("ragged", [False, True])
def test_verify_on_fp32_streams_its_rows_from_256_heads_and_128_past_4_tokens(
        batch, heads, tokens, ragged):
    tile = choose_tile(batch, heads, 128, tokens, FP32, intermediate=True, ragged=ragged)
    from_heads = 128 if tokens > 4 else 256
    assert bool(tile.streaming_rows) == (batch * heads >= from_heads)


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("ragged", [False, True])
def test_verify_of_8_tokens_on_fp32_at_tp1_takes_fine_tiles_past_64_heads_up_to_128(batch,
                                                                                     ragged):
    tile = choose_tile(batch, 32, 128, 8, FP32, intermediate=True, ragged=ragged)
    # One request (32 heads) is latency-bound: 8-row tiles whatever the mode.
    fine = batch == 1 or 64 < batch * 32 <= 128
    assert (tile.rows_per_cta, tile.rows_per_thread) == ((8, 1) if fine else (32, 2))


@pytest.mark.parametrize("state_bytes, options", [(BF16, {"intermediate": True}),
                                                  (FP32, {}), (FP32, {"per_token_slots": True})])
def test_nothing_but_an_fp32_verify_streams_its_rows(state_bytes, options):
    for batch in (1, 16, 64, 256, 1024):
        for heads in (4, 32):
            tile = choose_tile(batch, heads, 128, 2, state_bytes, **options)
            assert not tile.streaming_rows


@pytest.mark.parametrize("batch", [16, 32, 64, 65])
def test_per_token_slots_on_fp32_at_tp8_take_fine_tiles_at_two_tokens(batch):
    tile = choose_tile(batch, 4, 128, 2, FP32, per_token_slots=True)
    assert (tile == TINY) == (batch * 4 <= 256)


@pytest.mark.parametrize("batch, heads, tokens, state_bytes, options", [
    (32, 4, 4, FP32, {"per_token_slots": True}),     # per-token slots: 8x1 lost at T = 4
    (4, 32, 2, FP32, {"intermediate": True}),        # TP1's 32 value heads: not measured
    (32, 4, 2, FP32, {}),                            # decode
])
def test_the_fine_verify_tile_stays_where_it_was_measured(batch, heads, tokens, state_bytes,
                                                          options):
    assert choose_tile(batch, heads, 128, tokens, state_bytes, **options) == LARGE


@pytest.mark.parametrize("batch, heads, bf16_records, flush_mma", [
    (32, 32, True, True), (256, 32, True, True), (256, 4, True, True), (4096, 4, True, True),
    (16, 32, True, False), (128, 4, True, False), (32, 4, True, False),  # 512 heads and below
    (256, 32, False, False), (4096, 4, False, False),
])
def test_a_replayssm_flush_runs_on_tensor_cores_for_bf16_records_from_1024_heads(
        batch, heads, bf16_records, flush_mma):
    from gdn_backend.kernels.heuristics import choose_ring_tile, ring_serves

    tile = choose_ring_tile(batch, heads, 128, bf16_records)
    assert tile.flush_mma is flush_mma
    assert ring_serves(tile, bf16_records)


def test_a_tensor_core_flush_serves_neither_fp32_records_nor_8_row_tiles():
    from gdn_backend.kernels.heuristics import Tile, ring_serves

    assert not ring_serves(Tile(64, 4, flush_mma=True), bf16_records=False)
    assert not ring_serves(Tile(8, 1, flush_mma=True), bf16_records=True)
    assert not ring_serves(Tile(64, 8, flush_mma=True), bf16_records=True)
    assert ring_serves(Tile(8, 1, flush_mma=False), bf16_records=True)


@pytest.mark.parametrize("bf16_records", [True, False])
def test_replayssm_warmup_compiles_every_tile_and_flush_form_the_dispatch_can_choose(
        bf16_records):
    from gdn_backend.kernels.heuristics import choose_ring_tile, ring_tiles_for

    for heads in (4, 32):
        every = set(ring_tiles_for(heads, 128, bf16_records))
        assert {choose_ring_tile(b, heads, 128, bf16_records) for b in range(1, 4097)} == every
        assert any(t.flush_mma for t in every) is bf16_records


def test_the_spec_ring_takes_64_row_tiles_on_bf16_checkpoints_32_on_fp32_8_when_tiny():
    from gdn_backend.kernels.heuristics import LARGE, SPEC_WIDE, TINY, choose_spec_tile

    assert choose_spec_tile(256, 32, 128, 2) == SPEC_WIDE
    assert choose_spec_tile(256, 32, 128, 4) == LARGE
    assert choose_spec_tile(4, 4, 128, 2) == choose_spec_tile(4, 4, 128, 4) == TINY


def test_the_spec_verify_and_fold_take_64_row_tensor_core_tiles_past_the_small_grids():
    from gdn_backend.kernels.heuristics import (SPEC_MMA, TINY, choose_spec_fold_tile,
                                                choose_spec_verify_tile)

    for batch, heads in ((256, 32), (16, 32), (16, 4), (64, 4)):
        for state_bytes in (2, 4):
            fold = choose_spec_fold_tile(batch, heads, 128, 128, state_bytes, True)
            assert replace(fold, staged_rows=None) == SPEC_MMA
            for tokens in (1, 2, 3, 4):
                verify = choose_spec_verify_tile(batch, heads, 128, 128, state_bytes, tokens, True)
                assert replace(verify, staged_rows=None) == SPEC_MMA
    assert choose_spec_verify_tile(4, 4, 128, 128, 4, 4, True) == TINY
    assert choose_spec_fold_tile(4, 4, 128, 128, 4, True) == TINY


def test_the_spec_rings_bf16_checkpoint_rows_stage_from_1024_heads_and_fp32_never():
    from gdn_backend.kernels.heuristics import choose_spec_fold_tile, choose_spec_verify_tile

    for batch, heads, staged in ((16, 32, False), (32, 32, True), (64, 4, False),
                                 (256, 4, True)):
        assert choose_spec_verify_tile(batch, heads, 128, 128, 2, 4, True).staged_rows is staged
        assert choose_spec_fold_tile(batch, heads, 128, 128, 2, True).staged_rows is staged
        assert not choose_spec_verify_tile(batch, heads, 128, 128, 4, 4, True).staged_rows
        assert not choose_spec_fold_tile(batch, heads, 128, 128, 4, True).staged_rows


@pytest.mark.parametrize("head_k_dim, head_v_dim, bf16_records, tokens", [
    (64, 128, True, 4),     # the MMA kernels' K is 128
    (128, 128, False, 4),   # fp16 records are not bf16 MMA operands
    (128, 96, True, 4),     # V not in 64-row tiles
    (128, 128, True, 8),    # windows past four tokens
])
def test_the_spec_ring_keeps_cuda_cores_where_its_tensor_core_forms_do_not_serve(
        head_k_dim, head_v_dim, bf16_records, tokens):
    from gdn_backend.kernels.heuristics import (choose_spec_fold_tile, choose_spec_tile,
                                                choose_spec_verify_tile)

    for state_bytes in (2, 4):
        cuda_cores = choose_spec_tile(256, 32, head_v_dim, state_bytes)
        assert choose_spec_verify_tile(256, 32, head_k_dim, head_v_dim, state_bytes, tokens,
                                       bf16_records) == cuda_cores
        if tokens <= 4:
            assert choose_spec_fold_tile(256, 32, head_k_dim, head_v_dim, state_bytes,
                                         bf16_records) == cuda_cores
