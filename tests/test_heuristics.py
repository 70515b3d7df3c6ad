"""The tile choice: every SM busy at small batches, more bytes per thread at large ones."""

import pytest

from gdn_backend.kernels.heuristics import LARGE, NUM_SMS, SMALL, TILES, TINY, choose_tile, tiles_for


@pytest.mark.parametrize("batch, heads, tile", [
    (1, 4, TINY), (4, 4, TINY), (32, 4, SMALL), (256, 4, LARGE),   # TP8
    (1, 32, TINY), (4, 32, SMALL), (16, 32, LARGE), (256, 32, LARGE),  # TP1
])
def test_tile_for_qwen3_next_shapes(batch, heads, tile):
    assert choose_tile(batch, heads, 128) == tile


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 17, 33, 100, 1000])
@pytest.mark.parametrize("heads", [4, 8, 32])
def test_chosen_tile_fills_the_gpu_or_is_the_finest(batch, heads):
    tile = choose_tile(batch, heads, 128)
    ctas = batch * heads * (128 // tile.rows_per_cta)
    assert ctas >= 4 * NUM_SMS or tile == TINY


@pytest.mark.parametrize("heads", [4, 8, 32])
def test_larger_batches_never_get_finer_tiles(heads):
    order = {t: i for i, t in enumerate(TILES)}
    chosen = [order[choose_tile(b, heads, 128)] for b in range(1, 513)]
    assert chosen == sorted(chosen, reverse=True)


def test_warmup_compiles_every_tile_the_heuristic_can_choose():
    assert set(tiles_for(4, 128)) == {LARGE, SMALL, TINY}
    assert set(tiles_for(32, 128)) == {choose_tile(b, 32, 128) for b in range(1, 4097)}
