"""Which tile shape serves a call: the kernel's one run-time choice.

A CTA owns `rows_per_cta` rows of one request's head; each thread holds
`rows_per_thread` of them. The rules come from the tile sweeps on the H100
(docs/perf_log.md, v6):

- A batch whose 32-row tiles would not give every SM a CTA is latency-bound:
  8-row tiles spread each head over 16 CTAs.
- One token: 4 rows a thread (about 128 registers, 64 threads) keep the most
  bytes in flight. With an fp32 pool, from 256 heads (B x HV) on, 8-row tiles
  measured 2-7% faster: as many bytes in flight, in CTAs small enough to
  balance across SMs.
- Several tokens: 2 rows a thread (about 85 registers, 128 threads), except
  four tokens on a bf16 pool from 768 heads on, where reading k̂ and q̂ from
  shared memory for every row bounds the step and 4 rows a thread halve those
  reads (up to 10% faster; at three tokens they lose by 1%).
"""

from __future__ import annotations

from dataclasses import dataclass

# H100 and H200: 132 SMs.
NUM_SMS = 132
FINE_FP32_FROM_HEADS = 256
WIDE_BF16_FOUR_TOKENS_FROM_HEADS = 768
# Lanes that share one state row in the kernel (decode.py); a tile's threads follow from it.
LANES_PER_ROW = 8


@dataclass(frozen=True)
class Tile:
    rows_per_cta: int
    rows_per_thread: int

    @property
    def threads(self) -> int:
        return self.rows_per_cta // self.rows_per_thread * LANES_PER_ROW


WIDE = Tile(rows_per_cta=32, rows_per_thread=4)    # 64 threads, 4 CTAs per head at V=128
LARGE = Tile(rows_per_cta=32, rows_per_thread=2)   # 128 threads, 4 CTAs per head
TINY = Tile(rows_per_cta=8, rows_per_thread=1)     # 64 threads, 16 CTAs per head
TILES = (WIDE, LARGE, TINY)


def choose_tile(batch: int, num_v_heads: int, head_v_dim: int, tokens: int, state_bytes: int) -> Tile:
    """The tile for `batch` requests of `num_v_heads` heads of `head_v_dim` rows, `tokens`
    tokens each, on a pool of `state_bytes`-byte elements."""
    heads = batch * num_v_heads
    fp32 = state_bytes == 4
    if heads * (head_v_dim // LARGE.rows_per_cta) < NUM_SMS:
        return TINY
    if tokens == 1:
        return TINY if fp32 and heads >= FINE_FP32_FROM_HEADS else WIDE
    if tokens == 4 and not fp32 and heads >= WIDE_BF16_FOUR_TOKENS_FROM_HEADS:
        return WIDE
    return LARGE


def tiles_for(num_v_heads: int, head_v_dim: int, tokens: int, state_bytes: int) -> tuple[Tile, ...]:
    """Every tile `choose_tile` can return for some batch size: what warm-up compiles."""
    return tuple(dict.fromkeys(choose_tile(b, num_v_heads, head_v_dim, tokens, state_bytes)
                               for b in range(1, 4097)))
