"""The spec ring's verify (windows of up to four tokens) and fold on tensor cores, K = 128.

Same contracts, prologues, input staging and ring appends as `ReplaySSMSpecVerify` and
`ReplaySSMSpecFold` (replayssm_spec.py); what a warp does with its rows differs.

Verify (`ReplaySSMSpecVerifyMMA`). The state the checkpoint and
the W records stand for, S = e^Γ S0 + Σ_c λ_c d_c κ_cᵀ, is never formed: every row's
projections on the window's vectors x (k̂_s and q̂_s, decode_mma.py's high/low A rows) are

    S x = e^Γ (S0 x) + Σ_c d_c · λ_c (κ_c·x),

three mma.sync products (m16n8k16, bf16 in, float32 accumulate) into one fragment:
1. S0 x: the checkpoint rows as B, as loaded for a bf16 checkpoint, as their bf16 high and
   low parts (two MMAs) for an fp32 one.
2. κ_c·x: the records' keys as B (SGLang's bf16 high and low parts), the K dimension split
   over the CTA's warps and summed in shared memory. Lane (g, c) then holds vector g's
   products with records 2c, 2c + 1, 2c + 8, 2c + 9: weighted by λ_c and split into bf16
   high and low parts, they are exactly its A fragment for
3. Σ_c d_c λ_c (κ_c·x): B the records' d (high and low), k the ring's 16 places.
The Gram matrix of the vectors gives the window's pair products (decode_mma.py). A pass
through shared memory hands each lane its rows' projections, and the window runs on
scalars as decode_mma.py's step 3 does, from S: with p_x = S_{s-1} x for every vector x
still to come, d_s = β_s (v_s − α_s p_{k̂_s}), o_s = α_s p_{q̂_s} + d_s k̂_s·q̂_s, and
p_x = α_s p_x + d_s k̂_s·x. Lane s of a quad writes token s's output and its d_s to the ring.

Fold (`ReplaySSMSpecFoldMMA`): the closed form e^Γ S0 + Σ_c λ_c d_c κ_cᵀ, a rank-W update
as decode_mma.py's step 4 makes it (see the class).

Columns: lane c of a quad holds 8-column groups c, c + 4, c + 8, c + 12 of each of its rows
(a quad reads 64 bytes of a bf16 row, 128 of an fp32 one, at once), as decode_mma.py does;
the records' keys are read in the same order.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, Int64, const_expr
from cutlass.cute.nvgpu import cpasync

from .decode_mma import (DOTS_STRIDE, MAX_TOKENS, MMA_ROWS, VECTOR_STRIDE, VECTORS, bf16_pair,
                         bf16_residual, mma_bf16, pair_products, quad_rows, row_window,
                         stage_split_words)
from .decode import BETA, DECAY
from .heuristics import MMA_LANES_PER_ROW
from .replayssm_decode import record_weights
from .replayssm_spec import ReplaySSMSpecFold, ReplaySSMSpecVerify

# Places of the ring one MMA's K dimension takes.
RECORD_BLOCK = 16
GROUP = 8  # columns of a row a lane holds together
# Staged rows: the pad after each row in shared memory, in bytes, by state dtype size. A
# quarter warp's 16-byte reads take two rows (quads g and g + 1): a bf16 quad reads 64
# contiguous bytes of its row, an fp32 one 16 bytes every 32; the pad puts the second row's
# reads on the banks the first leaves free.
ROW_PAD_BYTES = {2: 64, 4: 16}


def split_words(x0: Float32, x1: Float32, x2: Float32, x3: Float32):
    """Four float32 columns as B words of their bf16 high parts and of their low parts."""
    high = (bf16_pair(x0, x1), bf16_pair(x2, x3))
    low = (bf16_pair(bf16_residual(x0), bf16_residual(x1)),
           bf16_pair(bf16_residual(x2), bf16_residual(x3)))
    return high, low


def staged_row_stride(kernel) -> int:
    """Elements from one staged checkpoint row to the next in shared memory (row and pad)."""
    state_bytes = 16 // kernel.vec
    return kernel.K + ROW_PAD_BYTES[state_bytes] // state_bytes


def stages_rows(kernel) -> bool:
    """Whether the CTA's checkpoint rows go to shared memory by cp.async (else each thread
    loads its groups into registers): the constructor's `staged_rows`, which the dispatch
    chooses (heuristics.spec_stages_rows)."""
    return kernel.staged_rows


def staged_rows_bytes(kernel) -> int:
    """Shared memory the staged rows take (none where rows stay in registers)."""
    if not stages_rows(kernel):
        return 0
    return kernel.rows_per_cta * staged_row_stride(kernel) * (16 // kernel.vec)


def allocate_staged_rows(kernel, smem, dtype):
    """The CTA's checkpoint rows in shared memory: [rows_per_cta, K], each row padded; None
    where rows stay in registers."""
    if not stages_rows(kernel):
        return None
    return smem.allocate_tensor(dtype, cute.make_layout(
        (kernel.rows_per_cta, kernel.K), stride=(staged_row_stride(kernel), 1)),
        byte_alignment=16)


@cute.jit
def load_rows(kernel, gS: cute.Tensor, sState, tile, tidx: Int32, lane: Int32, rows):
    """Start reading the CTA's checkpoint rows: staged (returns None; wait with
    `wait_for_rows` and a barrier), or this thread's groups into registers (returns them)."""
    if const_expr(stages_rows(kernel)):
        stage_rows(kernel, gS, sState, tile, tidx)
        return None
    return load_groups(gS, lane, rows)


@cute.jit
def wait_for_rows(kernel):
    if const_expr(stages_rows(kernel)):
        cute.arch.cp_async_wait_group(0)


@cute.jit
def row_groups(held, sState, local, j: int, lane: Int32) -> cute.Tensor:
    """Lane c's 8-column group 4j + c of each of its rows, (8, rows): from the registers
    `load_rows` returned, or from the staged tile (at rows `local`)."""
    if const_expr(held is None):
        return staged_groups(sState, local, j, lane)
    return held[None, j, None]


@cute.jit
def load_groups(gS: cute.Tensor, lane: Int32, rows) -> cute.Tensor:
    """Lane c's 8-column groups c + 4j of its rows of a [V, K] state: (8, K/32, rows), as
    stored (decode_mma.py's column order)."""
    groups = gS.shape[1] // (GROUP * MMA_LANES_PER_ROW)
    raw = cute.make_rmem_tensor((GROUP, groups, len(rows)), gS.element_type)
    for r in cutlass.range_constexpr(len(rows)):
        for j in cutlass.range_constexpr(groups):
            cute.autovec_copy(cute.local_tile(gS[rows[r], None], (GROUP,),
                                              (j * MMA_LANES_PER_ROW + lane,)), raw[None, j, r])
    return raw


@cute.jit
def stage_rows(kernel, gS: cute.Tensor, sState: cute.Tensor, tile, tidx: Int32):
    """The CTA's checkpoint rows ([V, K] state gS) into shared memory, 16 bytes a thread at a
    time. On a 16-byte aligned pool by cp.async: issued first, they are in flight while the
    records and keys load and hold no registers meanwhile (loaded into registers, the compiler
    issued them after the keys' staging, and they held 32 registers a thread)."""
    chunks = kernel.K // kernel.vec
    atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
                               gS.element_type, num_bits_per_copy=128)
    for i in cutlass.range_constexpr(kernel.rows_per_cta * chunks // kernel.threads):
        task = tidx + kernel.threads * i
        r, chunk = task // chunks, task % chunks
        src = cute.local_tile(gS[tile * kernel.rows_per_cta + r, None], (kernel.vec,), (chunk,))
        dst = cute.local_tile(sState[r, None], (kernel.vec,), (chunk,))
        if const_expr(kernel.prefetch_state):
            cute.copy(atom, src, dst)
        else:
            cute.autovec_copy(src, dst)
    cute.arch.cp_async_commit_group()


@cute.jit
def staged_groups(sState: cute.Tensor, local, j: int, lane: Int32) -> cute.Tensor:
    """Lane c's 8-column group 4j + c of each of its rows (at rows `local` of the staged
    tile): (8, rows), in decode_mma.py's column order."""
    raw = cute.make_rmem_tensor((GROUP, len(local)), sState.element_type)
    for r in cutlass.range_constexpr(len(local)):
        cute.autovec_copy(cute.local_tile(sState[local[r], None], (GROUP,),
                                          (j * MMA_LANES_PER_ROW + lane,)), raw[None, r])
    return raw


class ReplaySSMSpecVerifyMMA(ReplaySSMSpecVerify):
    """A warp owns `rows_per_thread` / 2 blocks of 16 rows of a head; the CTA's staged
    vectors and the records' key products serve all of them."""

    lanes_per_row = MMA_LANES_PER_ROW

    def __init__(self, *, staged_rows: bool = False, **options):
        super().__init__(**options)
        self.staged_rows = staged_rows
        assert 1 <= self.T <= MAX_TOKENS and self.K == 128 and self.rows_per_thread % 2 == 0
        self.warp_rows = MMA_ROWS * self.rows_per_thread // 2
        assert self.rows_per_cta % self.warp_rows == 0
        self.warps = self.rows_per_cta // self.warp_rows
        self.k_blocks = self.K // 16
        assert self.k_blocks % self.warps == 0
        # k-blocks of the records' key products each warp takes.
        self.key_blocks = self.k_blocks // self.warps
        self.record_blocks = -(-self.L // RECORD_BLOCK)

    def thread_rows(self, tidx: Int32, tile):
        return quad_rows(self, tidx, tile)

    def smem_bytes(self) -> int:
        words = (VECTORS * VECTOR_STRIDE + self.warps * self.rows_per_thread * 8 * DOTS_STRIDE
                 + self.warps * 32 * 4 * self.record_blocks + 3 * self.T)
        return words * 4 + staged_rows_bytes(self) + 64

    def allocate_units(self, smem):
        """sVec[:, q, n]: columns 4q..4q+3 of vector n as MMA words (decode_mma.py).
        sDots[:, i, r, w]: warp w's projections of row 8r + i on each vector.
        sKeys[e, lane, b, w]: warp w's part of lane's key products e (records 16b + 2c + e
        for e < 2, 16b + 8 + 2c + e - 2 after)."""
        sVec = smem.allocate_tensor(Int32, cute.make_layout(
            (4, self.K // 4, VECTORS), stride=(1, 4, VECTOR_STRIDE)), byte_alignment=16)
        R = self.rows_per_thread
        sDots = smem.allocate_tensor(Float32, cute.make_layout(
            (VECTORS, 8, R, self.warps),
            stride=(1, DOTS_STRIDE, 8 * DOTS_STRIDE, 8 * DOTS_STRIDE * R)), byte_alignment=16)
        sKeys = smem.allocate_tensor(Float32, cute.make_layout(
            (4, 32, self.record_blocks, self.warps),
            stride=(1, 4, 128, 128 * self.record_blocks)), byte_alignment=16)
        return sVec, sDots, sKeys

    @cute.jit
    def stage_unit_vectors(self, units, sGate: cute.Tensor, t: int, k_unit, q_unit,
                           warp_lane: Int32):
        stage_split_words(units[0], 2 * t, k_unit, warp_lane)
        stage_split_words(units[0], 2 * t + 1, q_unit, warp_lane)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mA: cute.Tensor,
               mB: cute.Tensor, mALog: cute.Tensor, mDtBias: cute.Tensor, mPool: cute.Tensor,
               mIdx: cute.Tensor, mOut: cute.Tensor, mFlag: cute.Tensor, mRingD: cute.Tensor,
               mRingDLow: cute.Tensor, mRingK: cute.Tensor, mRingKLow: cute.Tensor,
               mRingG: cute.Tensor, mRows: cute.Tensor, mWritePos: cute.Tensor,
               mBase: cute.Tensor, mIsFlush: cute.Tensor, mCuSeqlens: cute.Tensor,
               scale: Float32, min_valid_slot: Int32):
        T = self.T
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        tile, hv, n = bid % self.tiles, (bid // self.tiles) % self.HV, bid // (self.tiles * self.HV)
        lane, rows = self.thread_rows(tidx, tile)
        h = hv // (self.HV // self.H)
        warp, warp_lane = tidx // 32, tidx % 32

        smem = cutlass.utils.SmemAllocator()
        units = self.allocate_units(smem)
        sState = allocate_staged_rows(self, smem, mPool.element_type)
        sGate = smem.allocate_tensor(Float32, cute.make_layout((3, T), stride=(T, 1)),
                                     byte_alignment=16)

        slot, row, req, held, base, valid, zero_out = self.plan(
            mQ, mPool, mIdx, mFlag, mRingD, mRows, mWritePos, mBase, mIsFlush, mCuSeqlens, bid,
            n, hv, tile, tidx, min_valid_slot)
        if valid:  # uniform over the CTA, so the barriers are safe
            held_rows = load_rows(self, mPool[slot, hv, None, None], sState, tile, tidx, lane,
                                  rows)
            v_in = self.load_v(mV, req, hv, rows)
            records = self.load_record_words(mRingD, mRingDLow, row, hv, lane, rows, held, base)
            log_decay = self.load_log_decay(mRingG, row, hv, warp_lane, held, base)
            keys = self.load_key_words(mRingK, mRingKLow, row, h, warp, warp_lane, held, base)
            self.stage_inputs(mQ, mK, mA, mB, mALog, mDtBias, units, sGate, req, h, hv, warp,
                              warp_lane, scale)
            wait_for_rows(self)
            cute.arch.barrier()
            self.key_products(units, keys, warp, warp_lane)
            local = [r - tile * self.rows_per_cta for r in rows]
            dots, own_gram = self.projections(units, held_rows, sState, local, lane, warp_lane)
            weight, total = record_weights(log_decay, warp_lane, held)
            cute.arch.barrier()
            a_records = self.record_fragments(units, weight, warp_lane)
            ring_decay = Float32(cute.math.exp(total))
            for r in cutlass.range_constexpr(self.rows_per_thread):
                dots[r] = [ring_decay * x for x in dots[r]]
                for b in cutlass.range_constexpr(self.record_blocks):
                    for part in cutlass.range_constexpr(2):
                        dots[r] = mma_bf16(a_records[b], records[b][part][r], dots[r])
            self.run_window(mOut, mRingD, mRingDLow, units, sGate, dots, own_gram, v_in, row,
                            hv, lane, warp, warp_lane, rows, req, held, base)
            if tile == 0:
                self.append_keys(mRingK, mRingKLow, units, row, h, hv, req, tidx, held, base)
                self.append_decays(mRingG, mA, mDtBias, mALog, row, hv, req, tidx, held, base)
        else:
            if zero_out and lane == 0:
                self.zero_outputs(mOut, req, hv, rows)

    @cute.jit
    def load_record_words(self, mRingD, mRingDLow, row, hv, lane, rows, held, base):
        """Step 3's B: records[b][part][r] = the words (d_2c, d_2c+1), (d_2c+8, d_2c+9) of
        record block b at row r, of the high (part 0) or low part; zero from W on."""
        words = []
        for b in cutlass.range_constexpr(self.record_blocks):
            parts = []
            for ring in (mRingD, mRingDLow):
                per_row = []
                for r in cutlass.range_constexpr(len(rows)):
                    d = cute.make_rmem_tensor((4,), BFloat16)
                    d.fill(0.0)
                    for e in cutlass.range_constexpr(4):
                        c = RECORD_BLOCK * b + 2 * lane + e % 2 + 8 * (e // 2)
                        if c < held:
                            d[e] = ring[row, hv, (base + c) & (self.L - 1), rows[r]]
                    w = cute.recast_tensor(d, Int32)
                    per_row.append((w[0], w[1]))
                parts.append(per_row)
            words.append(parts)
        return words

    @cute.jit
    def load_key_words(self, mRingK, mRingKLow, row, h, warp, warp_lane, held, base):
        """Step 2's B for this warp's k-blocks: keys[b][nt][i] = (high, low) words of record
        16b + 8nt + g, its columns of k-block warp * key_blocks + i; zero from W on."""
        g, c = warp_lane // 4, warp_lane % 4
        keys = []
        for b in cutlass.range_constexpr(self.record_blocks):
            per_tile = []
            for nt in cutlass.range_constexpr(2):
                record = RECORD_BLOCK * b + 8 * nt + g
                p = (base + record) & (self.L - 1)
                per_block = []
                for i in cutlass.range_constexpr(self.key_blocks):
                    kb = warp * self.key_blocks + i
                    q = (kb // 2 * 4 + c) * 2 + kb % 2  # the 4 columns A's lane c holds
                    pair = []
                    for ring in (mRingK, mRingKLow):
                        x = cute.make_rmem_tensor((4,), BFloat16)
                        x.fill(0.0)
                        if record < held:
                            cute.autovec_copy(cute.local_tile(ring[row, h, p, None], (4,), (q,)),
                                              x)
                        w = cute.recast_tensor(x, Int32)
                        pair.append((w[0], w[1]))
                    per_block.append(pair)
                per_tile.append(per_block)
            keys.append(per_tile)
        return keys

    @cute.jit
    def vector_fragment(self, sVec, kb, warp_lane):
        """Vector g's A fragment for k-block kb (high rows g, low rows g + 8; zero past 2T)."""
        g, c = warp_lane // 4, warp_lane % 4
        a = cute.make_rmem_tensor((4,), Int32)
        a.fill(0)
        if g < 2 * self.T:
            cute.autovec_copy(sVec[None, (kb // 2 * 4 + c) * 2 + kb % 2, g], a)
        return [a[x] for x in range(4)]

    @cute.jit
    def key_products(self, units, keys, warp, warp_lane):
        """Step 2 over this warp's k-blocks, to shared memory: vector g times records
        (16b + 8nt + 2c + e), high and low rows summed."""
        sVec, _, sKeys = units
        for b in cutlass.range_constexpr(self.record_blocks):
            for nt in cutlass.range_constexpr(2):
                acc = [Float32(0.0)] * 4
                for i in cutlass.range_constexpr(self.key_blocks):
                    a = self.vector_fragment(sVec, warp * self.key_blocks + i, warp_lane)
                    for part in cutlass.range_constexpr(2):
                        acc = mma_bf16(a, keys[b][nt][i][part], acc)
                for e in cutlass.range_constexpr(2):
                    sKeys[2 * nt + e, warp_lane, b, warp] = acc[e] + acc[e + 2]

    @cute.jit
    def projections(self, units, held_rows, sState, local, lane, warp_lane):
        """Step 1 for each row block (its rows as `row_groups` reads them), and the vectors'
        Gram matrix (decode_mma.py)."""
        sVec = units[0]
        R = self.rows_per_thread
        dots = [[Float32(0.0)] * 4 for _ in range(R)]
        gram = [[Float32(0.0)] * 4 for _ in range(2)]
        for kb in cutlass.range_constexpr(self.k_blocks):
            j, i = kb // 2, kb % 2
            if const_expr(i == 0):
                raw = row_groups(held_rows, sState, local, j, lane)
            a = self.vector_fragment(sVec, kb, warp_lane)
            for r in cutlass.range_constexpr(R):
                if const_expr(raw.element_type == BFloat16):
                    state = cute.recast_tensor(raw, Int32)
                    dots[r] = mma_bf16(a, (state[2 * i, r], state[2 * i + 1, r]), dots[r])
                else:
                    high, low = split_words(*[Float32(raw[4 * i + e, r]) for e in range(4)])
                    dots[r] = mma_bf16(a, high, dots[r])
                    dots[r] = mma_bf16(a, low, dots[r])
            for part in cutlass.range_constexpr(2):
                gram[part] = mma_bf16(a, (a[part], a[part + 2]), gram[part])
        own_gram = [gram[0][e] + gram[0][e + 2] + gram[1][e] + gram[1][e + 2] for e in range(2)]
        return dots, own_gram

    @cute.jit
    def record_fragments(self, units, weight, warp_lane):
        """Step 3's A per record block: vector g's key products summed over the warps,
        weighted by λ, as (high, low) bf16 rows g and g + 8."""
        sKeys = units[2]
        c = warp_lane % 4
        fragments = []
        for b in cutlass.range_constexpr(self.record_blocks):
            y = []
            for x in cutlass.range_constexpr(4):
                total = Float32(0.0)
                for w in cutlass.range_constexpr(self.warps):
                    total = total + sKeys[x, warp_lane, b, w]
                record = RECORD_BLOCK * b + 8 * (x // 2) + 2 * c + x % 2
                y.append(total * cute.arch.shuffle_sync(weight, record % 32))
            fragments.append((bf16_pair(y[0], y[1]),
                              bf16_pair(bf16_residual(y[0]), bf16_residual(y[1])),
                              bf16_pair(y[2], y[3]),
                              bf16_pair(bf16_residual(y[2]), bf16_residual(y[3]))))
        return fragments

    @cute.jit
    def run_window(self, mOut, mRingD, mRingDLow, units, sGate, dots, own_gram, v_in, row, hv,
                   lane, warp, warp_lane, rows, req, held, base):
        """The window on scalars, row by row; lane s writes token s's output and d_s."""
        sDots = units[1]
        T, R = self.T, self.rows_per_thread
        g = warp_lane // 4
        # Lane (g, c) holds vector g times rows 8r + 2c, 8r + 2c + 1 (its high and low A rows
        # summed): through shared memory, each lane gets its own rows.
        for r in cutlass.range_constexpr(R):
            for e in cutlass.range_constexpr(2):
                sDots[g, 2 * lane + e, r, warp] = dots[r][e] + dots[r][e + 2]
        cute.arch.sync_warp()
        kk, kq = pair_products(own_gram, T)
        decay = [sGate[DECAY, t] for t in range(T)]
        beta = [sGate[BETA, t] for t in range(T)]
        o_mine = [Float32(0.0)] * R
        d_mine = [Float32(0.0)] * R
        for r in cutlass.range_constexpr(R):
            o_mine[r], d_mine[r] = row_window(sDots[None, g, r, warp], v_in, r, decay, beta, kk,
                                              kq, None, lane, T)
        if lane < T:
            if self.has_token(req, lane):
                r_, tok = self.token(req, lane)
                for r in cutlass.range_constexpr(R):
                    mOut[r_, tok, hv, rows[r]] = o_mine[r].to(mOut.element_type)
                if held + lane < self.L:
                    p = (base + held + lane) & (self.L - 1)
                    for r in cutlass.range_constexpr(R):
                        high = d_mine[r].to(mRingD.element_type)
                        mRingD[row, hv, p, rows[r]] = high
                        mRingDLow[row, hv, p, rows[r]] = (d_mine[r] - Float32(high)).to(
                            mRingDLow.element_type)

    @cute.jit
    def append_keys(self, mRingK, mRingKLow, units, row, h, hv, req, tidx, held, base):
        """The window's keys once per key head, from the staged words: (high 0-1, high 2-3)
        to the ring, (low 0-1, low 2-3) to its low part."""
        sVec = units[0]
        if tidx < self.K // 4 and hv % (self.HV // self.H) == 0:
            for s in cutlass.range_constexpr(self.T):
                if self.has_token(req, s) and held + s < self.L:
                    p = (base + held + s) & (self.L - 1)
                    words = cute.make_rmem_tensor((4,), Int32)
                    cute.autovec_copy(sVec[None, tidx, 2 * s], words)
                    for ring, first in ((mRingK, 0), (mRingKLow, 1)):
                        part = cute.make_rmem_tensor((2,), Int32)
                        part[0] = words[first]
                        part[1] = words[first + 2]
                        cute.autovec_copy(cute.recast_tensor(part, ring.element_type),
                                          cute.local_tile(ring[row, h, p, None], (4,), (tidx,)))


class ReplaySSMSpecFoldMMA(ReplaySSMSpecFold):
    """The commit's fold on tensor cores, in closed form: a marked row's checkpoint becomes
    S_W = e^Γ S0 + Σ_c λ_c d_c κ_cᵀ, and a snapshot after t records S_t the same over the
    first t (its own weights), both from the checkpoint as loaded. The rank-W update is
    decode_mma.py's step 4 with records for tokens: per 16 rows and 8 columns, two MMAs per
    eight records. Lane c's K places 2c, 2c + 1 hold record 8p + c's (κ high, κ low) and
    places 2c + 8, 2c + 9 record 8p + 4 + c's, against λd high twice in one MMA and λd low
    twice in the other; the two key words of a lane's B operand are distinct and lie side
    by side in shared memory, so they load straight into the register pair the MMA reads
    (the same word twice took a register move or two an MMA). The accumulator lands on the
    lane's own columns, so each new row is e^Γ S0 + D in the registers it was read into."""

    lanes_per_row = MMA_LANES_PER_ROW

    def __init__(self, *, staged_rows: bool = False, **options):
        super().__init__(**options)
        self.staged_rows = staged_rows
        assert self.K == 128 and self.rows_per_thread % 2 == 0
        self.warp_rows = MMA_ROWS * self.rows_per_thread // 2
        assert self.rows_per_cta % self.warp_rows == 0
        # Pairs of k-blocks of the update, eight records each; record_blocks counts the
        # blocks of four (lane c's records 4q + c), as the records' d are loaded.
        self.record_pairs = -(-self.L // 8)
        self.record_blocks = 2 * self.record_pairs

    def thread_rows(self, tidx: Int32, tile):
        return quad_rows(self, tidx, tile)

    def key_words_layout(self):
        """sKeys[e, b, g, j, 4p + c]: record 8p + 4e + c's (κ high, κ low) at the column that
        lane (g, c) supplies to the MMAs of n-tile (j, b), 8 (4j + g / 2) + 2b + g % 2
        (decode_mma.py's step 4): a lane's B operands for its four b of one j and one pair of
        blocks are 8 consecutive words, two 16-byte loads."""
        groups = self.K // (GROUP * MMA_LANES_PER_ROW)
        return cute.make_layout((2, 4, 8, groups, 4 * self.record_pairs),
                                stride=(1, 2, 8, 64, 64 * groups))

    def smem_bytes(self) -> int:
        return 4 * self.record_blocks * self.K * 4 + staged_rows_bytes(self) + 64

    @cute.kernel
    def kernel(self, mPool: cute.Tensor, mIdx: cute.Tensor, mFlag: cute.Tensor,
               mRingD: cute.Tensor, mRingDLow: cute.Tensor, mRingK: cute.Tensor,
               mRingKLow: cute.Tensor, mRingG: cute.Tensor, mRows: cute.Tensor,
               mWritePos: cute.Tensor, mBase: cute.Tensor, mIsFlush: cute.Tensor,
               mAccept: cute.Tensor, mTrack: cute.Tensor, mTrackSteps: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        smem = cutlass.utils.SmemAllocator()
        sKeys = smem.allocate_tensor(Int32, self.key_words_layout(), byte_alignment=16)
        sState = allocate_staged_rows(self, smem, mPool.element_type)
        tile, hv, pool, rings, plan = self.fold_request(
            mPool, mIdx, mFlag, mRingD, mRingDLow, mRingK, mRingKLow, mRingG, mRows, mWritePos,
            mBase, mIsFlush, mAccept, mTrack, mTrackSteps, tidx)
        ring_d, ring_d_low, ring_k, ring_k_low, ring_g = rings
        slot, row, held, base, flushing, track_slot, track_len, bad = plan
        lane, rows = self.thread_rows(tidx, tile)
        h = hv // (self.HV // self.H)
        warp_lane = tidx % 32
        if slot >= Int64(0) and not bad and (flushing or track_len >= 0):
            if const_expr(self.prefetch_state and not stages_rows(self)):
                # Rows read into registers are issued after the key staging's stores, which
                # wait for the keys: from L2, that second trip is short.
                if tidx == 0:
                    self.prefetch_l2(pool, slot, hv, tile, Int32(0))
            gS = pool[slot, hv, None, None]
            held_rows = load_rows(self, gS, sState, tile, tidx, lane, rows)
            d = self.load_fold_records(ring_d, ring_d_low, row, hv, lane, rows, held, base)
            log_decay = self.load_log_decay(ring_g, row, hv, warp_lane, held, base)
            self.stage_key_words(ring_k, ring_k_low, sKeys, row, h, tidx, held, base)
            wait_for_rows(self)
            cute.arch.barrier()
            local = [r - tile * self.rows_per_cta for r in rows]
            if track_len >= 0:
                # The snapshot's weights: the same scan over its first track_len records.
                first = Float32(cutlass.select_(warp_lane < track_len, log_decay, Float32(0.0)))
                weight, total = record_weights(first, warp_lane, track_len)
                self.store_update(held_rows, sState, local, d, weight, total, sKeys,
                                  pool[track_slot, hv, None, None], lane, warp_lane, rows)
            if flushing:
                weight, total = record_weights(log_decay, warp_lane, held)
                self.store_update(held_rows, sState, local, d, weight, total, sKeys, gS, lane,
                                  warp_lane, rows)

    @cute.jit
    def load_fold_records(self, ring_d, ring_d_low, row, hv, lane, rows, held, base):
        """d of lane c's records 4q + c (high + low) at its rows: (record_blocks, rows), zero
        from W on. Each load is predicated on its own and the parts are summed only once all
        are issued, so their DRAM latencies overlap instead of following one another."""
        parts = [cute.make_rmem_tensor((self.record_blocks, len(rows)), ring_d.element_type)
                 for _ in range(2)]
        d_rows = (ring_d[row, hv, None, None], ring_d_low[row, hv, None, None])
        for part in cutlass.range_constexpr(2):
            parts[part].fill(0.0)
            for q in cutlass.range_constexpr(self.record_blocks):
                c = 4 * q + lane
                p = (base + c) & (self.L - 1)
                for r in cutlass.range_constexpr(len(rows)):
                    if c < held:
                        parts[part][q, r] = d_rows[part][p, rows[r]]
        d = cute.make_rmem_tensor((self.record_blocks, len(rows)), Float32)
        d.store(parts[0].load().to(Float32) + parts[1].load().to(Float32))
        return d

    @cute.jit
    def stage_key_words(self, ring_k, ring_k_low, sKeys, row, h, tidx, held, base):
        """Every record place's key words into sKeys (zero from W on: they meet zero weights
        in the MMA, and must not be NaN). A task is one slot's two records at the 8 columns
        8 (4j + q) .. + 7: a 16-byte load of each record's κ high and low parts, then the 8
        consecutive words of each of the two g those columns feed (2q and 2q + 1)."""
        groups = self.K // (GROUP * MMA_LANES_PER_ROW)
        tasks = 4 * self.record_pairs * groups * 4
        # A loop, not unrolled: where a thread takes several tasks (64-thread CTAs), unrolled
        # iterations overlapped and spilled.
        for i in cutlass.range(-(-tasks // self.threads), unroll=1):
            task = tidx + self.threads * i
            if task < tasks:
                # q fastest: a warp's loads cover whole key rows.
                q, j, slot = task % 4, task // 4 % groups, task // (4 * groups)
                parts = cute.make_rmem_tensor((GROUP, 2, 2), BFloat16)  # column, part, record
                parts.fill(0.0)
                for e in cutlass.range_constexpr(2):
                    c = slot // 4 * 8 + 4 * e + slot % 4
                    if c < held:
                        p = (base + c) & (self.L - 1)
                        for part, ring in ((0, ring_k), (1, ring_k_low)):
                            cute.autovec_copy(cute.local_tile(ring[row, h, p, None], (GROUP,),
                                                              (4 * j + q,)),
                                              parts[None, part, e])
                for g2 in cutlass.range_constexpr(2):
                    words = cute.make_rmem_tensor((2, 4), Int32)
                    for e in cutlass.range_constexpr(2):
                        for b in cutlass.range_constexpr(4):
                            pair = cute.make_rmem_tensor((2,), BFloat16)
                            pair[0] = parts[2 * b + g2, 0, e]
                            pair[1] = parts[2 * b + g2, 1, e]
                            words[e, b] = cute.recast_tensor(pair, Int32)[0]
                    cute.autovec_copy(words, sKeys[None, None, 2 * q + g2, j, slot])

    @cute.jit
    def store_update(self, held_rows, sState, local, d, weight, total, sKeys, dst, lane,
                     warp_lane, rows):
        """e^Γ S0 + Σ_c λ_c d_c κ_cᵀ on this thread's rows (S0 as `row_groups` reads it), to
        dst ([V, K])."""
        R = self.rows_per_thread
        g = warp_lane // 4
        decay = Float32(cute.math.exp(total))
        # A per pair of k-blocks p, 16-row block m and part: λ d of rows g + 16m and
        # g + 16m + 8 for record 8p + c, then for record 8p + 4 + c, each twice; bf16 high
        # parts in the first MMA, low parts in the second.
        a = []
        for p in cutlass.range_constexpr(self.record_pairs):
            lam = [cute.arch.shuffle_sync(weight, 4 * (2 * p + e) + lane) for e in range(2)]
            per_block = []
            for m in cutlass.range_constexpr(R // 2):
                y = [lam[e] * d[2 * p + e, 2 * m + i] for e in range(2) for i in range(2)]
                per_block.append((tuple(bf16_pair(x, x) for x in y),
                                  tuple(bf16_pair(bf16_residual(x), bf16_residual(x))
                                        for x in y)))
            a.append(per_block)
        groups = self.K // (GROUP * MMA_LANES_PER_ROW)
        for j in cutlass.range_constexpr(groups):
            keys = []
            for p in cutlass.range_constexpr(self.record_pairs):
                words = cute.make_rmem_tensor((2, 4), Int32)
                cute.autovec_copy(sKeys[None, None, g, j, 4 * p + lane], words)
                keys.append(words)
            raw = row_groups(held_rows, sState, local, j, lane)
            new = cute.make_rmem_tensor((GROUP, R), Float32)
            for b in cutlass.range_constexpr(4):
                for m in cutlass.range_constexpr(R // 2):
                    acc = [Float32(0.0)] * 4
                    for p in cutlass.range_constexpr(self.record_pairs):
                        for part in cutlass.range_constexpr(2):
                            acc = mma_bf16(a[p][m][part], (keys[p][0, b], keys[p][1, b]), acc)
                    for i in cutlass.range_constexpr(2):
                        for e in cutlass.range_constexpr(2):
                            x = 2 * b + e
                            new[x, 2 * m + i] = decay * Float32(raw[x, 2 * m + i]) + acc[2 * i + e]
            out = cute.make_rmem_tensor((GROUP, R), dst.element_type)
            out.store(new.load().to(dst.element_type))
            for r in cutlass.range_constexpr(R):
                cute.autovec_copy(out[None, r], cute.local_tile(
                    dst[rows[r], None], (GROUP,), (j * MMA_LANES_PER_ROW + lane,)))
