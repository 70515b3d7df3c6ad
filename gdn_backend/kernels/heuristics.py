"""Which tile shape serves a batch: the kernel's one run-time choice.

A CTA owns `rows_per_cta` rows of one request's head; each thread holds
`rows_per_thread` of them. Large batches have CTAs to spare, so each thread
holds more rows (more bytes in flight per thread, fewer CTAs); small batches are
latency-bound and need every SM busy, so the head is split into more, smaller
CTAs.
"""

from __future__ import annotations

from dataclasses import dataclass

# H100: 132 SMs. A grid of fewer CTAs than this leaves SMs idle.
NUM_SMS = 132


@dataclass(frozen=True)
class Tile:
    rows_per_cta: int
    rows_per_thread: int


LARGE = Tile(rows_per_cta=32, rows_per_thread=2)   # 128 threads, 4 CTAs per head at V=128
SMALL = Tile(rows_per_cta=16, rows_per_thread=1)   # 128 threads, 8 CTAs per head
TINY = Tile(rows_per_cta=8, rows_per_thread=1)     # 64 threads, 16 CTAs per head
TILES = (LARGE, SMALL, TINY)


def choose_tile(batch: int, num_v_heads: int, head_v_dim: int) -> Tile:
    """The tile for `batch` requests of `num_v_heads` heads with `head_v_dim` rows each."""
    heads = batch * num_v_heads
    for tile in TILES:
        if heads * (head_v_dim // tile.rows_per_cta) >= 4 * NUM_SMS:
            return tile
    return TINY


def tiles_for(num_v_heads: int, head_v_dim: int) -> tuple[Tile, ...]:
    """Every tile `choose_tile` can return for some batch size: what warm-up compiles."""
    return tuple(dict.fromkeys(choose_tile(b, num_v_heads, head_v_dim) for b in range(1, 4097)))
