"""Which kernel and tile shape serve a call: the op's one run-time choice.

A CTA owns `rows_per_cta` rows of one request's head; each thread holds
`rows_per_thread` of them. The rules come from the tile sweeps on the H100
(docs/perf_log.md, v6) and, for the tensor-core kernel, on the H200 (v9):

- A batch whose 32-row tiles would not give every SM a CTA is latency-bound:
  8-row tiles spread each head over 16 CTAs.
- One token: 4 rows a thread (about 128 registers, 64 threads) keep the most
  bytes in flight. With an fp32 pool, from 256 heads (B x HV) on, 8-row tiles
  measured 2-7% faster: as many bytes in flight, in CTAs small enough to
  balance across SMs.
- Three or four tokens on a bf16 pool: the tensor-core kernel (decode_mma.py),
  whose per-element work is a few MMAs rather than 4 FP operations a token
  (TP1, T = 4: 1.16-1.37x the copy against 1.39-1.54x). In 64-row CTAs of four
  warps, whose staging of the tokens is spread over more warps, once those give
  every SM two CTAs (from 132 heads); in 32-row CTAs below that.
- Every state written to intermediate rows (verify) on a bf16 pool, for requests of at
  most 4 value heads (TP8): the tensor-core kernel in 32-row CTAs up to 128 heads (T = 2
  only past 64), and at T = 2 in 64-row CTAs up to 512 (H200 sweep, session 6, TP8 B =
  16-128: 1.08-1.17x the copy against 1.16-1.32x on 32x2). Elsewhere (TP1 at B = 4-256,
  TP8 T = 3 and 4 from 256 heads) it lost, tied or won by at most 0.03, so it is not
  applied there.
- Several tokens on an fp32 pool, every state written to intermediate rows (verify),
  for requests of at most 4 value heads (TP8) up to 256 heads: 8-row tiles (H200 sweep,
  TP8 B = 16-64, T = 2 and 4: 1.07-1.27x the copy against 1.15-1.50x on 32x2; not
  profiled). Likewise per-token slots at T = 2 (1.16-1.26x against 1.17-1.51x); not at
  T = 4, where 8x1 lost, nor at T = 3 and 8 (not measured). Not measured for more value
  heads a request, so not applied there. Up to 128 heads and 4 tokens the verify of
  rows of equal length takes 4 rows a thread instead (H200 sweep, session 11, TP8 B = 32:
  1.05-1.11x against 1.12-1.26x on 8x1, level at B = 16; ragged rows lost with it, 1.58x
  against 1.22x at T = 4 B = 32).
- Verify on an fp32 pool from 256 heads (from 128 past 4 tokens): the
  intermediate rows as streaming stores (`Tile.streaming_rows`, `STREAMING_ROWS_FROM_HEADS`),
  and the L2 prefetch nearer (decode.py, `STREAMING_PREFETCH_AHEAD_BYTES`). Past 128 heads at
  TP8 and up to 512, at up to 4 tokens: 16-row tiles of one row a thread; at more tokens up
  to 64 heads, rows of equal length: 16-row tiles of 2 rows a thread. Past 4 tokens at
  TP1, past 64 heads and up to 128: 8-row tiles.
- Otherwise, several tokens: 2 rows a thread (about 85 registers, 128 threads).

ReplaySSM decode has rules of its own (`choose_ring_tile`), and so does the spec ring
(`choose_spec_tile`, `choose_spec_verify_tile`, `choose_spec_fold_tile`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# H100 and H200: 132 SMs.
NUM_SMS = 132
FINE_FP32_FROM_HEADS = 256
# Verify on an fp32 pool takes 8-row tiles up to this many heads, for requests of at most
# FINE_VERIFY_MAX_V_HEADS value heads (where it was measured).
FINE_VERIFY_UP_TO_HEADS = 256
FINE_VERIFY_MAX_V_HEADS = 4
# ... except up to this many heads, at most 4 tokens, rows of equal length: 4 rows a thread.
WIDE_VERIFY_UP_TO_HEADS = 128
# Past that bound and up to this many heads, at most 4 tokens: 16-row tiles of one row a
# thread (H200 sweeps, session 11: best or level at every TP8 cell of 256 and 512 heads,
# verify and ragged, plain and streaming rows).
FINE16_VERIFY_UP_TO_HEADS = 512
# Verify on an fp32 pool writes its intermediate rows as streaming stores from this many
# heads on, at up to 4 tokens (H200, session 11, one run each way: TP8 B = 64-128 at T = 2-4
# 0.02-0.06 of the copy lower, TP1 T = 4 B = 8-256 0.02-0.07 lower; T = 8 not measured).
# Below it they lost where the rows fit in L2 (TP1 T = 4 B = 4 on 32 x 2: 1.15x -> 1.44x)
# or changed little.
STREAMING_ROWS_FROM_HEADS = 256
# ... and from this many at more tokens (H200, session 12, TP8 T = 8: B = 32 1.28x -> 1.21x,
# B = 64 1.24x -> 1.17x on 8 x 1; B = 16 1.46x -> 1.50x; session 13, TP1 T = 8 B = 4: 1.49x
# -> 1.30x on 32 x 2, 1.22x -> 1.14x on 8 x 1, level at B = 8 and 16).
STREAMING_ROWS_PAST_4_TOKENS_FROM_HEADS = 128
# Verify of more than 4 tokens on an fp32 pool for requests of more value heads (TP1), past
# the first count of heads and up to the second: 8-row tiles (H200, session 13, T = 8: B = 4
# on streaming rows 1.14x against 1.30x on 32 x 2 and 1.23x on 16 x 1, B = 3 1.24x against
# 1.56x on 32 x 2; but B = 2 1.52x against 1.08x on 32 x 2, ragged 1.50x against 1.09x;
# level from B = 8).
FINE_VERIFY_PAST_4_TOKENS_HEADS = (64, 128)
# Verify of more than 4 tokens on an fp32 pool, rows of equal length, at most 4 value heads a
# request, up to this many heads: 16-row tiles of 2 rows a thread (H200, session 12, TP8 T = 8
# B = 16, two runs: 1.09-1.12x against 1.42-1.46x on 8 x 1).
PAIRS16_VERIFY_UP_TO_HEADS = 64
# Verify on a bf16 pool, for requests of at most FINE_VERIFY_MAX_V_HEADS value heads, takes
# the tensor-core kernel in 32-row CTAs up to this many heads (T = 2 only past the first
# bound), and at T = 2 in 64-row CTAs up to the third.
MMA_VERIFY_HEADS = (64, 128, 512)
# Lanes that share one state row: in decode.py, and in decode_mma.py (a quad of an MMA).
LANES_PER_ROW = 8
MMA_LANES_PER_ROW = 4
MMA_TOKENS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Tile:
    rows_per_cta: int
    rows_per_thread: int
    tensor_cores: bool = False   # decode_mma.py: rows_per_thread even, 8 x that a warp
    # The spec ring's tensor-core kernels: checkpoint rows staged in shared memory by
    # cp.async (True) or loaded into registers (False); None: where the dispatch puts them
    # (`spec_stages_rows`). The other kernels ignore it.
    staged_rows: bool | None = None
    # ReplaySSM decode: a flush rebuilds the state on tensor cores, reading its rows again
    # (True), or in registers from the rows every CTA keeps live (False); None: as the
    # dispatch does (`choose_ring_tile`). The other kernels ignore it.
    flush_mma: bool | None = None
    # Verify on an fp32 pool (decode.py): the intermediate rows as streaming stores (True)
    # or plain ones (False, or None: where a tile is given, as the dispatch does).
    streaming_rows: bool | None = None

    @property
    def threads(self) -> int:
        lanes = MMA_LANES_PER_ROW if self.tensor_cores else LANES_PER_ROW
        return self.rows_per_cta // self.rows_per_thread * lanes


WIDE = Tile(rows_per_cta=32, rows_per_thread=4)    # 64 threads, 4 CTAs per head at V=128
LARGE = Tile(rows_per_cta=32, rows_per_thread=2)   # 128 threads, 4 CTAs per head
TINY = Tile(rows_per_cta=8, rows_per_thread=1)     # 64 threads, 16 CTAs per head
FINE16 = Tile(rows_per_cta=16, rows_per_thread=1)  # 128 threads, 8 CTAs per head
PAIRS16 = Tile(rows_per_cta=16, rows_per_thread=2)  # 64 threads, 8 CTAs per head
MMA = Tile(rows_per_cta=32, rows_per_thread=2, tensor_cores=True)       # 64 threads
MMA_WIDE = Tile(rows_per_cta=64, rows_per_thread=2, tensor_cores=True)  # 128 threads
RING_WIDE = Tile(rows_per_cta=64, rows_per_thread=4)  # 128 threads, 2 CTAs per head
SPEC_WIDE = Tile(rows_per_cta=64, rows_per_thread=2)  # 256 threads, 2 CTAs per head
# The spec ring's verify and fold on tensor cores (replayssm_spec_mma.py): 64 rows in 4 warps
# (2 CTAs a head), 32 rows in 2.
SPEC_MMA = Tile(rows_per_cta=64, rows_per_thread=2, tensor_cores=True)
SPEC_MMA_SMALL = Tile(rows_per_cta=32, rows_per_thread=2, tensor_cores=True)
TILES = (WIDE, LARGE, TINY, FINE16, PAIRS16, MMA, MMA_WIDE)
# ReplaySSM decode: 64-row tiles from this many heads (B x HV).
RING_WIDE_FROM_HEADS = 512


def serves(tile: Tile, tokens: int, state_bytes: int, per_token_slots: bool = False,
           ragged: bool = False) -> bool:
    """Whether `tile`'s kernel can run this call: the tensor-core one takes bf16 pools, T <= 4,
    one slot a request and rows of equal length (with or without intermediate states)."""
    return not tile.tensor_cores or (state_bytes == 2 and tokens in MMA_TOKENS
                                     and not (per_token_slots or ragged))


def latency_bound(heads: int, head_v_dim: int) -> bool:
    """Whether 32-row tiles of these heads would leave SMs without a CTA."""
    return heads * (head_v_dim // LARGE.rows_per_cta) < NUM_SMS


def choose_tile(batch: int, num_v_heads: int, head_v_dim: int, tokens: int, state_bytes: int,
                intermediate: bool = False, per_token_slots: bool = False,
                ragged: bool = False) -> Tile:
    """The tile for `batch` requests of `num_v_heads` heads of `head_v_dim` rows, `tokens`
    tokens each, on a pool of `state_bytes`-byte elements; `intermediate`: every token's
    state is written too; `per_token_slots`, `ragged`: the op's modes of those names."""
    heads = batch * num_v_heads
    fp32 = state_bytes == 4
    if latency_bound(heads, head_v_dim):
        return TINY
    if tokens == 1:
        return TINY if fp32 and heads >= FINE_FP32_FROM_HEADS else WIDE
    every_state = intermediate or (per_token_slots and tokens == 2)
    few_v_heads = num_v_heads <= FINE_VERIFY_MAX_V_HEADS
    # Tile.streaming_rows for an fp32 verify: True, or None (plain stores).
    streaming = fp32 and intermediate and heads >= (
        STREAMING_ROWS_PAST_4_TOKENS_FROM_HEADS if tokens > 4
        else STREAMING_ROWS_FROM_HEADS) or None
    fine_past, fine_up_to = FINE_VERIFY_PAST_4_TOKENS_HEADS
    if (fp32 and intermediate and tokens > 4 and not few_v_heads
            and fine_past < heads <= fine_up_to):
        return replace(TINY, streaming_rows=streaming)
    if (fp32 and intermediate and tokens <= 4 and few_v_heads
            and WIDE_VERIFY_UP_TO_HEADS < heads <= FINE16_VERIFY_UP_TO_HEADS):
        return replace(FINE16, streaming_rows=streaming)
    if fp32 and every_state and heads <= FINE_VERIFY_UP_TO_HEADS and few_v_heads:
        if intermediate and not ragged and tokens <= 4 and heads <= WIDE_VERIFY_UP_TO_HEADS:
            return WIDE
        if intermediate and not ragged and tokens > 4 and heads <= PAIRS16_VERIFY_UP_TO_HEADS:
            return PAIRS16
        return replace(TINY, streaming_rows=streaming)
    if intermediate and few_v_heads and serves(MMA, tokens, state_bytes, per_token_slots, ragged):
        two_from, up_to, wide_up_to = MMA_VERIFY_HEADS
        if heads <= up_to and (tokens > 2 or heads > two_from):
            return MMA
        if tokens == 2 and up_to < heads <= wide_up_to:
            return MMA_WIDE
    if tokens in (3, 4) and not intermediate and serves(MMA, tokens, state_bytes,
                                                        per_token_slots, ragged):
        return MMA_WIDE if heads * (head_v_dim // MMA_WIDE.rows_per_cta) >= 2 * NUM_SMS else MMA
    return replace(LARGE, streaming_rows=streaming)


def tiles_for(num_v_heads: int, head_v_dim: int, tokens: int, state_bytes: int,
              intermediate: bool = False, per_token_slots: bool = False,
              ragged: bool = False) -> tuple[Tile, ...]:
    """Every tile `choose_tile` can return for some batch size: what warm-up compiles."""
    return tuple(dict.fromkeys(choose_tile(b, num_v_heads, head_v_dim, tokens, state_bytes,
                                           intermediate, per_token_slots, ragged)
                               for b in range(1, 4097)))


# ReplaySSM decode flushes on tensor cores from this many heads (batch x HV), where it serves.
# H200 (docs/perf_log.md v18, bf16, one run, time over the classic copy): 64 x 4 at TP1 B = 32
# 1.19 against 1.28 on CUDA cores, B = 256 1.00 against 1.23, TP8 B = 256 1.23 against 1.32;
# but at 512 heads and below the CUDA-core flush won (TP1 B = 16 1.32 against 1.36, TP8
# B = 128 1.38 against 1.43, TP8 B = 32 on 32 x 2 1.39 against 1.87), where the tensor-core
# flush's serial staging (one barrier more, the rows read again) is the kernel's tail.
RING_MMA_FLUSH_FROM_HEADS = 1024


def mma_flush_serves(tile: Tile, bf16_records: bool) -> bool:
    """Whether ReplaySSM decode on `tile` can flush on tensor cores: bf16 records (the MMAs'
    operands as stored), CTAs of whole 16-row blocks, 4 rows a thread at most."""
    return bf16_records and tile.rows_per_cta % 16 == 0 and tile.rows_per_thread <= 4


def ring_serves(tile: Tile, bf16_records: bool) -> bool:
    """Whether `tile` can run a ReplaySSM decode on records of that dtype."""
    return not tile.flush_mma or mma_flush_serves(tile, bf16_records)


def choose_ring_tile(batch: int, num_v_heads: int, head_v_dim: int, bf16_records: bool) -> Tile:
    """The tile for ReplaySSM decode (replayssm_decode.py). Each CTA carries a fixed cost on
    top of its rows (the records' key dots, ~300 instructions a warp: ncu, H200), so larger
    tiles pay where the batch fills the GPU (sweep, docs/performance.md: 64 x 4 best or
    within 0.01 of it from 512 heads on, 32 x 2 best or near it below, down to the
    latency-bound batches that take 8-row tiles as decode does); the flush on tensor cores
    from RING_MMA_FLUSH_FROM_HEADS on."""
    heads = batch * num_v_heads
    if latency_bound(heads, head_v_dim):
        tile = TINY
    else:
        tile = RING_WIDE if heads >= RING_WIDE_FROM_HEADS else LARGE
    return replace(tile, flush_mma=(heads >= RING_MMA_FLUSH_FROM_HEADS
                                    and mma_flush_serves(tile, bf16_records)))


def ring_tiles_for(num_v_heads: int, head_v_dim: int, bf16_records: bool) -> tuple[Tile, ...]:
    """Every tile `choose_ring_tile` can return for some batch size."""
    return tuple(dict.fromkeys(choose_ring_tile(b, num_v_heads, head_v_dim, bf16_records)
                               for b in range(1, 4097)))


def choose_spec_tile(batch: int, num_v_heads: int, head_v_dim: int, state_bytes: int) -> Tile:
    """The tile for the spec ring's verify and fold (replayssm_spec.py), from a sweep
    (docs/performance.md): 32 x 2 on fp32 checkpoints, 64 x 2 on bf16 ones (0.11-0.17 of the
    copy better at B = 256, within 0.02 at B = 16), 8-row tiles where 32-row ones leave SMs
    idle. Smaller tiles lose: each CTA pays the window's and records' staging. Rows a thread
    stay at 2: the verify holds T update vectors a row (126 registers at T = 4)."""
    if latency_bound(batch * num_v_heads, head_v_dim):
        return TINY
    return SPEC_WIDE if state_bytes == 2 else LARGE


def spec_tiles_for(num_v_heads: int, head_v_dim: int, state_bytes: int) -> tuple[Tile, ...]:
    """Every tile `choose_spec_tile` can return for some batch size."""
    return tuple(dict.fromkeys(choose_spec_tile(b, num_v_heads, head_v_dim, state_bytes)
                               for b in range(1, 4097)))


def spec_tensor_cores(head_k_dim: int, head_v_dim: int, bf16_records: bool,
                      tokens: int = 1) -> bool:
    """Whether the spec ring's tensor-core kernels (replayssm_spec_mma.py) take a call: K = 128,
    bf16 records (they are the MMAs' operands as stored), V in 64-row tiles and, for the
    verify, a window of at most four tokens."""
    return (head_k_dim == 128 and bf16_records and tokens in MMA_TOKENS
            and head_v_dim % SPEC_MMA.rows_per_cta == 0)


# Where the spec ring's tensor-core kernels keep a CTA's checkpoint rows: staged in shared
# memory from this many heads (batch x HV) on pools of this element size, in registers below
# it (None: always). H200 (docs/perf_log.md v16, one run, the verify alone): staged, the bf16
# verify took 134.8 µs against 157.0 at TP1 B = 256 and 40.1 against 44.0 at B = 64 (72
# registers, not 96), level at 1024 heads, but 10.3 against 8.4 at TP8 B = 64 (256 heads),
# where fewer CTAs hide less of the cp.async round trip; fp32 checkpoints lost 1.2-10.3 µs
# staged, at every batch. The fold is within 1 µs either way and follows the same rule.
SPEC_STAGED_FROM_HEADS = {2: 1024, 4: None}


def spec_stages_rows(state_bytes: int, heads: int) -> bool:
    """Whether the spec ring's tensor-core kernels stage their checkpoint rows, for `heads`
    (batch x HV) heads of `state_bytes`-byte elements."""
    start = SPEC_STAGED_FROM_HEADS[state_bytes]
    return start is not None and heads >= start


def choose_spec_verify_tile(batch: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                            state_bytes: int, tokens: int, bf16_records: bool) -> Tile:
    """The spec verify's tile. Its tensor-core form in 64-row CTAs wherever it serves, from the
    H200 sweep (docs/perf_log.md v14: TP1 and TP8, B = 16-256, both checkpoint dtypes): the
    verify alone 0.36-0.71 of its time on the best CUDA-core tile, and best or within 1.1 µs
    of the best tensor-core tile in every cell. Batches that leave SMs idle keep 8-row tiles (the
    tensor-core form was not measured there); other calls `choose_spec_tile`'s."""
    heads = batch * num_v_heads
    if (not latency_bound(heads, head_v_dim)
            and spec_tensor_cores(head_k_dim, head_v_dim, bf16_records, tokens)):
        return replace(SPEC_MMA, staged_rows=spec_stages_rows(state_bytes, heads))
    return choose_spec_tile(batch, num_v_heads, head_v_dim, state_bytes)


def choose_spec_fold_tile(batch_layers: int, num_v_heads: int, head_k_dim: int,
                          head_v_dim: int, state_bytes: int, bf16_records: bool) -> Tile:
    """The fold's tile, for batch x layers requests: the tensor-core fold in 64-row CTAs where
    it serves (same sweep, the step less the verify: 0.78-0.93 of the CUDA-core fold's time at
    B = 64-256 on TP1; on TP8 and at B = 16 within 0.6 µs of it or faster), else
    `choose_spec_tile`'s."""
    heads = batch_layers * num_v_heads
    if (not latency_bound(heads, head_v_dim)
            and spec_tensor_cores(head_k_dim, head_v_dim, bf16_records)):
        return replace(SPEC_MMA, staged_rows=spec_stages_rows(state_bytes, heads))
    return choose_spec_tile(batch_layers, num_v_heads, head_v_dim, state_bytes)


def spec_fold_tiles_for(num_v_heads: int, head_k_dim: int, head_v_dim: int, state_bytes: int,
                        bf16_records: bool) -> tuple[Tile, ...]:
    """Every tile `choose_spec_fold_tile` can return for some batch of some layers."""
    return tuple(dict.fromkeys(choose_spec_fold_tile(b, num_v_heads, head_k_dim, head_v_dim,
                                                     state_bytes, bf16_records)
                               for b in range(1, 4097)))


def spec_verify_tiles_for(num_v_heads: int, head_k_dim: int, head_v_dim: int, state_bytes: int,
                          tokens: int, bf16_records: bool) -> tuple[Tile, ...]:
    """Every tile `choose_spec_verify_tile` can return for some batch size."""
    return tuple(dict.fromkeys(
        choose_spec_verify_tile(b, num_v_heads, head_k_dim, head_v_dim, state_bytes, tokens,
                                bf16_records)
        for b in range(1, 4097)))
