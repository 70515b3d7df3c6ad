"""Which tile shape serves a call: the kernel's one run-time choice.

A CTA owns `rows_per_cta` rows of one request's head; each thread holds
`rows_per_thread` of them. The rules come from the tile sweep on the H100
(docs/performance.md):

- A batch whose 32-row tiles would not give every SM a CTA is latency-bound:
  8-row tiles spread each head over 16 CTAs.
- Otherwise bytes in flight decide. One token (and two with a bf16 pool, whose
  registers hold half the bytes) leaves room for 4 rows a thread (about 120
  registers, 8 CTAs of 64 threads an SM). More tokens keep more per-token values
  live, and 4 rows a thread would cost occupancy (155 registers at fp32, T=4):
  2 rows a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

# H100: 132 SMs.
NUM_SMS = 132


@dataclass(frozen=True)
class Tile:
    rows_per_cta: int
    rows_per_thread: int


WIDE = Tile(rows_per_cta=32, rows_per_thread=4)    # 64 threads, 4 CTAs per head at V=128
LARGE = Tile(rows_per_cta=32, rows_per_thread=2)   # 128 threads, 4 CTAs per head
TINY = Tile(rows_per_cta=8, rows_per_thread=1)     # 64 threads, 16 CTAs per head
TILES = (WIDE, LARGE, TINY)


def choose_tile(batch: int, num_v_heads: int, head_v_dim: int, tokens: int, state_bytes: int) -> Tile:
    """The tile for `batch` requests of `num_v_heads` heads of `head_v_dim` rows, `tokens`
    tokens each, on a pool of `state_bytes`-byte elements."""
    if batch * num_v_heads * (head_v_dim // LARGE.rows_per_cta) < NUM_SMS:
        return TINY
    if tokens == 1 or (tokens == 2 and state_bytes == 2):
        return WIDE
    return LARGE


def tiles_for(num_v_heads: int, head_v_dim: int, tokens: int, state_bytes: int) -> tuple[Tile, ...]:
    """Every tile `choose_tile` can return for some batch size: what warm-up compiles."""
    return tuple(dict.fromkeys(choose_tile(b, num_v_heads, head_v_dim, tokens, state_bytes)
                               for b in range(1, 4097)))
