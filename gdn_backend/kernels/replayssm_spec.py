"""SGLang's ReplaySSM spec ring (--enable-linear-replayssm-spec) in the CuTe DSL, for sm_90+:
the chain verify, the commit's fold and the fold's cursor reset.

Records sit in rings keyed by the request row r (SGLang's req_pool_indices), not by the
slot: d [R, HV, L, V] and k [R, H, L, K] as bf16 high and low parts, g [R, HV, L] float32,
record c at position (cache_base[r] + c) mod L, write_pos[r] records held, is_flush[r] set
once the next window might not fit (reference_replayssm_spec.py has the math).

Verify (`ReplaySSMSpecVerify`): one CTA per (request, value head, row tile), as the decode
kernels. It reads the checkpoint rows, the row's W records and the window's tokens, writes
every token's output and appends the window's records after the W held (those with
W + s < L). No state is written: the commit's fold does that. Per row the window runs in
scalars: with hk_s = S k̂_s and hq_s = S q̂_s for the state S the checkpoint and records
stand for (S0 and the records' factored terms, one 8-lane reduction each),
    S_{s-1} k̂_s = E_s hk_s + Σ_{a<s} F_as d_a (k̂_a·k̂_s),  E_s = e^{G_{s-1}},  F_as = e^{G_{s-1}-G_a}
    d_s = β_s (v_s − α_s S_{s-1} k̂_s),   o_s = α_s S_{s-1} q̂_s + d_s (k̂_s·q̂_s),
the window's dots k̂_a·k̂_s and k̂_a·q̂_s staged in shared memory.

Fold (`ReplaySSMSpecFold`): one CTA per (layer, request, value head, row tile). A row
marked is_flush runs its W' records into its checkpoint rows, S_c = α_c S_{c-1} + d_c k̂_cᵀ;
with the radix cache's track slots, the state after record track_len - 1 goes to the track
slot on the way. `ReplaySSMSpecFinish` then resets the folded rows' cursors, once every
CTA has read them.

Padding (a negative slot) is skipped whole; a slot past the pool, a row past the rings or
a cursor past L sets the error flag and touches nothing. Ring positions wrap with a mask
(L a power of two), as SGLang's do, so any cache_base stays inside its row's ring.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr

from ..validation import MAX_RING
from .decode import BETA, DECAY, KQ, SMEM_SKEW, SMEM_SKEW_EVERY, GatedDeltaRuleDecode
from .heuristics import LANES_PER_ROW
from .replayssm_decode import record_weights

# sWin[X, a, s]: k̂_a·k̂_s (KK), k̂_a·q̂_s (KQW), F_as (FACTOR); sWin[E, 0, s]: E_s.
KK, KQW, FACTOR, E = range(4)
# sRec[X, c, s]: λ_c (κ_c·k̂_s) (RK), λ_c (κ_c·q̂_s) (RQ).
RK, RQ = range(2)


class ReplaySSMSpecVerify(GatedDeltaRuleDecode):
    """Ragged rows of up to `tokens` drafts on SGLang's spec ring of `ring_len` records."""

    def __init__(self, *, ring_len: int, tokens: int, **options):
        assert 1 <= ring_len <= MAX_RING and ring_len & (ring_len - 1) == 0
        super().__init__(tokens=tokens, ragged=True, update_state=False, **options)
        self.L = ring_len
        self.records_per_lane = -(-ring_len // LANES_PER_ROW)
        self.places = self.records_per_lane * LANES_PER_ROW
        self.key_rounds = -(-self.places // self.groups)
        self.pairs = [(a, s) for s in range(tokens) for a in range(s)]

    @cute.jit
    def __call__(self, mQ, mK, mV, mA, mB, mALog, mDtBias, mPool, mIdx, mOut, mFlag, mRingD,
                 mRingDLow, mRingK, mRingKLow, mRingG, mRows, mWritePos, mBase, mIsFlush,
                 mCuSeqlens, scale: Float32, min_valid_slot: Int32, stream):
        grid = [mIdx.shape[0] * self.HV * self.tiles, 1, 1]
        self.kernel(mQ, mK, mV, mA, mB, mALog, mDtBias, mPool, mIdx, mOut, mFlag, mRingD,
                    mRingDLow, mRingK, mRingKLow, mRingG, mRows, mWritePos, mBase, mIsFlush,
                    mCuSeqlens, scale, min_valid_slot).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes(), stream=stream,
            use_pdl=self.use_pdl)

    def smem_bytes(self) -> int:
        T = self.T
        return super().smem_bytes() + (4 * T * T + 2 * self.places * T) * 4 + 64

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
        group = tidx // LANES_PER_ROW
        h = hv // (self.HV // self.H)
        warp, warp_lane = tidx // 32, tidx % 32

        smem = cutlass.utils.SmemAllocator()
        units = self.allocate_units(smem)
        sGate = smem.allocate_tensor(Float32, cute.make_layout((3, T), stride=(T, 1)),
                                     byte_alignment=16)
        sWin = smem.allocate_tensor(Float32, cute.make_layout((4, T, T), stride=(T * T, T, 1)),
                                    byte_alignment=16)
        sRec = smem.allocate_tensor(Float32, cute.make_layout((2, self.places, T),
                                                              stride=(self.places * T, T, 1)),
                                    byte_alignment=16)

        slot, row, req, held, base, valid, zero_out = self.plan(
            mQ, mPool, mIdx, mFlag, mRingD, mRows, mWritePos, mBase, mIsFlush, mCuSeqlens, bid,
            n, hv, tile, tidx, min_valid_slot)
        if valid:
            gS = mPool[slot, hv, None, None]
            raw = self.load_rows(gS, lane, rows)
            v_in = self.load_v(mV, req, hv, rows)
            d_own = self.load_own_records(mRingD, mRingDLow, row, hv, lane, rows, held, base)
            log_decay = self.load_log_decay(mRingG, row, hv, warp_lane, held, base)
            keys = self.load_group_keys(mRingK, mRingKLow, row, h, group, lane, held, base)
            self.stage_inputs(mQ, mK, mA, mB, mALog, mDtBias, units, sGate, req, h, hv, warp,
                              warp_lane, scale)
            cute.arch.barrier()
            total = self.stage_records(keys, log_decay, units, sRec, group, lane, warp_lane,
                                       held)
            self.stage_window(units, sGate, sWin, group, lane, tidx)
            cute.arch.barrier()
            self.run_window(mOut, mRingD, mRingDLow, raw, v_in, d_own, units, sGate, sWin, sRec,
                            total, row, hv, lane, rows, req, held, base)
            if tile == 0:
                self.append_keys(mRingK, mRingKLow, units, row, h, hv, req, tidx, held, base)
                self.append_decays(mRingG, mA, mDtBias, mALog, row, hv, req, tidx, held, base)
        else:
            if zero_out and lane == 0:
                self.zero_outputs(mOut, req, hv, rows)

    @cute.jit
    def plan(self, mQ, mPool, mIdx, mFlag, mRingD, mRows, mWritePos, mBase, mIsFlush,
             mCuSeqlens, bid, n, hv, tile, tidx, min_valid_slot):
        """The launch prologue and request n's part in the verify: (slot, row, req, held,
        base, valid, zero_out). A bad request (slot past the pool, row past the rings, cursor
        past L, malformed tokens) sets the error flag and touches nothing; a padding slot or a
        row waiting for its fold only has its outputs zeroed (zero_out), a padding row always
        (a slot below min_valid_slot is padding whatever its row)."""
        slot = self.begin(mPool, mIdx, None, bid, n, hv, tile, tidx, min_valid_slot)
        row = Int64(mRows[n])
        start = Int32(mCuSeqlens[n])
        length = Int32(mCuSeqlens[n + 1]) - start
        in_pool = slot >= Int64(min_valid_slot) and slot < Int64(mPool.shape[0])
        row_ok = row >= Int64(0) and row < Int64(mRingD.shape[0])
        held = Int32(0)
        base = Int32(0)
        flushing = False
        if in_pool and row_ok:
            held = Int32(mWritePos[row])
            base = Int32(mBase[row])
            flushing = Int32(mIsFlush[row]) != 0
        well_formed = (start >= 0 and length >= 0 and length <= self.T
                       and start + length <= Int32(mQ.shape[1]))
        bad = (slot >= Int64(mPool.shape[0]) or (in_pool and not row_ok)
               or (in_pool and row_ok and (held < 0 or held > self.L)) or not well_formed)
        if bad and tidx == 0:
            mFlag[0] = Int32(1)
        valid = in_pool and row_ok and not bad and not flushing and length >= 1
        zero_out = not valid and well_formed and not (flushing and in_pool and row_ok)
        return slot, row, (n, row, start, length), held, base, valid, zero_out

    @cute.jit
    def load_log_decay(self, mRingG, row, hv, warp_lane, held, base) -> Float32:
        """Lane c's record's log-decay g_c (0 from W on): what `record_weights` takes."""
        log_decay = Float32(0.0)
        if warp_lane < held:
            log_decay = Float32(mRingG[row, hv, (base + warp_lane) & (self.L - 1)])
        return log_decay

    @cute.jit
    def zero_outputs(self, mOut, req, hv, rows):
        for t in cutlass.range_constexpr(self.T):
            if self.has_token(req, t):
                r_, tok = self.token(req, t)
                for r in rows:
                    mOut[r_, tok, hv, r] = mOut.element_type(0.0)

    @cute.jit
    def load_own_records(self, mRingD, mRingDLow, row, hv, lane, rows, held, base):
        """d_c (high + low) of this thread's rows for its records c = lane + 8 i; 0 from W on."""
        d = cute.make_rmem_tensor((len(rows), self.records_per_lane), Float32)
        d.fill(0.0)
        for i in cutlass.range_constexpr(self.records_per_lane):
            c = lane + LANES_PER_ROW * i
            if c < held:
                p = (base + c) & (self.L - 1)
                for r in cutlass.range_constexpr(len(rows)):
                    d[r, i] = Float32(mRingD[row, hv, p, rows[r]]) + Float32(
                        mRingDLow[row, hv, p, rows[r]])
        return d

    @cute.jit
    def load_group_keys(self, mRingK, mRingKLow, row, h, group, lane, held, base) -> list:
        """This lane's columns of its group's records' keys (high + low), c = group + groups i."""
        keys = []
        for i in cutlass.range_constexpr(self.key_rounds):
            c = group + self.groups * i
            high = cute.make_rmem_tensor((self.vec, self.vecs_per_lane), mRingK.element_type)
            low = cute.make_rmem_tensor((self.vec, self.vecs_per_lane), mRingK.element_type)
            high.fill(0.0)
            low.fill(0.0)
            if c < held:
                p = (base + c) & (self.L - 1)
                cute.autovec_copy(self.lane_columns(mRingK[row, h, p, None], lane), high)
                cute.autovec_copy(self.lane_columns(mRingKLow[row, h, p, None], lane), low)
            keys.append((high, low))
        return keys

    @cute.jit
    def stage_records(self, keys, log_decay, units, sRec, group, lane, warp_lane, held):
        """λ_c (κ_c·k̂_s) and λ_c (κ_c·q̂_s) of every record and window token; returns Γ."""
        weight, total = record_weights(log_decay, warp_lane, held)
        whole = [high.load().to(Float32) + low.load().to(Float32) for high, low in keys]
        weights = [cute.arch.shuffle_sync(weight, (group + self.groups * i) % 32)
                   for i in range(self.key_rounds)]
        # A dynamic loop over the tokens: unrolled, the compiler hoists every token's k̂ and
        # q̂ loads ahead of the first (167 registers at T = 4 on 8x1 tiles).
        for i in cutlass.range_constexpr(self.key_rounds):
            c = group + self.groups * i
            for s in cutlass.range(self.T, unroll=1):
                k_hat = self.lane_columns(units[None, 0, s], lane).load()
                q_hat = self.lane_columns(units[None, 1, s], lane).load()
                kk = self.row_sum((whole[i] * k_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
                qk = self.row_sum((whole[i] * q_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
                if c < self.places:
                    sRec[RK, c, s] = weights[i] * kk
                    sRec[RQ, c, s] = weights[i] * qk
        return total

    @cute.jit
    def stage_window(self, units, sGate, sWin, group, lane, tidx):
        """The window's dots k̂_a·k̂_s, k̂_a·q̂_s (a < s), a pair a row group, and its decay
        products E_s, F_as (one thread)."""
        # Pairs p = a T + s, every T x T of them, a row group each in turn (a dynamic loop:
        # unrolled, every pair's loads are hoisted); those with a < s are kept.
        # Every lane of a warp takes part in the row sums (they shuffle across the warp), so
        # groups past the last pair take pair (T-1, T-1) again, which is never kept.
        for i in cutlass.range((self.T * self.T + self.groups - 1) // self.groups, unroll=1):
            p = cutlass.min(group + self.groups * i, Int32(self.T * self.T - 1))
            a, s = p // self.T, p % self.T
            k_a = self.lane_columns(units[None, 0, a], lane).load()
            k_s = self.lane_columns(units[None, 0, s], lane).load()
            q_s = self.lane_columns(units[None, 1, s], lane).load()
            kk = self.row_sum((k_a * k_s).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
            kq = self.row_sum((k_a * q_s).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
            if a < s:
                sWin[KK, a, s] = kk
                sWin[KQW, a, s] = kq
        if tidx == 0:
            e = Float32(1.0)
            for s in cutlass.range_constexpr(self.T):
                sWin[E, 0, s] = e  # e^{G_{s-1}}
                f = Float32(1.0)
                for a in cutlass.range_constexpr(s - 1, -1, -1):
                    sWin[FACTOR, a, s] = f  # e^{G_{s-1} - G_a}
                    f = f * sGate[DECAY, a]
                e = e * sGate[DECAY, s]

    @cute.jit
    def run_window(self, mOut, mRingD, mRingDLow, raw, v_in, d_own, units, sGate, sWin, sRec,
                   total, row, hv, lane, rows, req, held, base):
        """The window on this thread's rows: outputs, and each token's d to the ring."""
        R, T = self.rows_per_thread, self.T
        ring_decay = Float32(cute.math.exp(total))
        d_win = cute.make_rmem_tensor((R, T), Float32)
        # Tokens outer, as the decode kernel runs them: one token's k̂ and q̂ held at a time.
        for s in cutlass.range_constexpr(T):
            if self.has_token(req, s):
                k_hat = self.lane_columns(units[None, 0, s], lane).load()
                q_hat = self.lane_columns(units[None, 1, s], lane).load()
                decay, beta, kq = sGate[DECAY, s], sGate[BETA, s], sGate[KQ, s]
                r_, tok = self.token(req, s)
                for r in cutlass.range_constexpr(R):
                    s0 = raw[None, None, r].load().to(Float32)
                    hk = ring_decay * (s0 * k_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
                    hq = ring_decay * (s0 * q_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
                    for i in cutlass.range_constexpr(self.records_per_lane):
                        c = lane + LANES_PER_ROW * i
                        hk = hk + d_own[r, i] * sRec[RK, c, s]
                        hq = hq + d_own[r, i] * sRec[RQ, c, s]
                    hk, hq = self.row_sum(hk), self.row_sum(hq)
                    sk = sWin[E, 0, s] * hk
                    sq = sWin[E, 0, s] * hq
                    for a in cutlass.range_constexpr(s):
                        sk = sk + sWin[FACTOR, a, s] * d_win[r, a] * sWin[KK, a, s]
                        sq = sq + sWin[FACTOR, a, s] * d_win[r, a] * sWin[KQW, a, s]
                    d = beta * (v_in[r, s] - decay * sk)
                    d_win[r, s] = d
                    mOut[r_, tok, hv, rows[r]] = (decay * sq + d * kq).to(mOut.element_type)
                    if held + s < self.L:
                        p = (base + held + s) & (self.L - 1)
                        high = d.to(mRingD.element_type)
                        mRingD[row, hv, p, rows[r]] = high
                        mRingDLow[row, hv, p, rows[r]] = (d - Float32(high)).to(
                            mRingDLow.element_type)

    @cute.jit
    def append_keys(self, mRingK, mRingKLow, units, row, h, hv, req, tidx, held, base):
        """The window's keys, high and low, once per key head (its first value head's CTA)."""
        chunk = self.K // 32
        if tidx < 32 and hv % (self.HV // self.H) == 0:
            for s in cutlass.range_constexpr(self.T):
                if self.has_token(req, s) and held + s < self.L:
                    p = (base + held + s) & (self.L - 1)
                    key = cute.local_tile(units[None, 0, s], (chunk,), (tidx,)).load()
                    high = cute.make_rmem_tensor((chunk,), mRingK.element_type)
                    high.store(key.to(mRingK.element_type))
                    low = cute.make_rmem_tensor((chunk,), mRingK.element_type)
                    low.store((key - high.load().to(Float32)).to(mRingK.element_type))
                    cute.autovec_copy(high, cute.local_tile(mRingK[row, h, p, None], (chunk,),
                                                            (tidx,)))
                    cute.autovec_copy(low, cute.local_tile(mRingKLow[row, h, p, None],
                                                           (chunk,), (tidx,)))

    @cute.jit
    def append_decays(self, mRingG, mA, mDtBias, mALog, row, hv, req, tidx, held, base):
        """The window's log-decays: thread s writes token s's."""
        if tidx < self.T:
            if self.has_token(req, tidx) and held + tidx < self.L:
                r_, tok = self.token(req, tidx)
                mRingG[row, hv, (base + held + tidx) & (self.L - 1)] = self.log_decay(
                    mA[r_, tok, hv], mDtBias[hv], mALog[hv])


@cute.jit
def fold_plan(track: cutlass.Constexpr, L: cutlass.Constexpr, pool_slots: Int64, ring_rows: Int64,
              mIdx: cute.Tensor, mRows: cute.Tensor, mWritePos: cute.Tensor, mBase: cute.Tensor,
              mIsFlush: cute.Tensor, mAccept: cute.Tensor, mTrack: cute.Tensor,
              mTrackSteps: cute.Tensor, n):
    """Request n's part in a commit, as the fold and the cursor reset both read it: (slot, row,
    held, base, flushing, track slot, records before the snapshot or -1, bad). A bad request
    (slot past the pool, row past the rings, cursor past L, snapshot out of range) is
    skipped by both, so it keeps its records."""
    slot = Int64(mIdx[n])
    row = Int64(mRows[n])
    row_ok = row >= Int64(0) and row < ring_rows
    held = Int32(0)
    base = Int32(0)
    flushing = False
    if slot >= Int64(0) and slot < pool_slots and row_ok:
        held = Int32(mWritePos[row])
        base = Int32(mBase[row])
        flushing = Int32(mIsFlush[row]) != 0
    bad = slot >= pool_slots or (slot >= Int64(0) and not row_ok) or held < 0 or held > L
    track_slot = Int64(-1)
    track_len = Int32(-1)
    if const_expr(track):
        # The radix cache's snapshot: the state after accepted step track_steps[n].
        wanted = slot >= Int64(0) and Int64(mTrack[n]) >= Int64(0) and Int32(mTrackSteps[n]) >= 0
        count = held - Int32(mAccept[n]) + Int32(mTrackSteps[n]) + 1
        bad = bad or (wanted and (Int64(mTrack[n]) >= pool_slots or count < 0 or count > held))
        if wanted:
            track_slot = Int64(mTrack[n])
            track_len = count
    return slot, row, held, base, flushing, track_slot, track_len, bad


class ReplaySSMSpecFold(ReplaySSMSpecVerify):
    """The commit's fold over every layer: [layers, ...] checkpoints and rings.

    track: the call passes the radix cache's track slots and steps ([B] each).
    """

    def __init__(self, *, track: bool, **options):
        super().__init__(tokens=1, **options)
        self.track = track

    def key_layout(self):
        return cute.make_layout(((SMEM_SKEW_EVERY, self.K // SMEM_SKEW_EVERY), self.places),
                                stride=((1, SMEM_SKEW_EVERY + SMEM_SKEW), self.unit_row_words()))

    def smem_bytes(self) -> int:
        return (self.unit_row_words() + 1) * self.places * 4 + 64

    @cute.jit
    def __call__(self, mPool, mIdx, mFlag, mRingD, mRingDLow, mRingK, mRingKLow, mRingG, mRows,
                 mWritePos, mBase, mIsFlush, mAccept, mTrack, mTrackSteps, stream):
        # (tile, head), request, layer: the CTA finds its own from block_idx without dividing
        # by the batch, a runtime value (about 30 instructions of every CTA's prologue).
        grid = [self.HV * self.tiles, mIdx.shape[0], mPool.shape[0]]
        self.kernel(mPool, mIdx, mFlag, mRingD, mRingDLow, mRingK, mRingKLow, mRingG, mRows,
                    mWritePos, mBase, mIsFlush, mAccept, mTrack, mTrackSteps).launch(
            grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes(), stream=stream,
            use_pdl=self.use_pdl)

    @cute.kernel
    def kernel(self, mPool: cute.Tensor, mIdx: cute.Tensor, mFlag: cute.Tensor,
               mRingD: cute.Tensor, mRingDLow: cute.Tensor, mRingK: cute.Tensor,
               mRingKLow: cute.Tensor, mRingG: cute.Tensor, mRows: cute.Tensor,
               mWritePos: cute.Tensor, mBase: cute.Tensor, mIsFlush: cute.Tensor,
               mAccept: cute.Tensor, mTrack: cute.Tensor, mTrackSteps: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        smem = cutlass.utils.SmemAllocator()
        sKeys = smem.allocate_tensor(Float32, self.key_layout(), byte_alignment=16)
        sDecay = smem.allocate_tensor(Float32, cute.make_layout((self.places,)),
                                      byte_alignment=16)
        tile, hv, pool, rings, plan = self.fold_request(
            mPool, mIdx, mFlag, mRingD, mRingDLow, mRingK, mRingKLow, mRingG, mRows, mWritePos,
            mBase, mIsFlush, mAccept, mTrack, mTrackSteps, tidx)
        ring_d, ring_d_low, ring_k, ring_k_low, ring_g = rings
        slot, row, held, base, flushing, track_slot, track_len, bad = plan
        lane, rows = self.thread_rows(tidx, tile)
        group = tidx // LANES_PER_ROW
        h = hv // (self.HV // self.H)
        R = self.rows_per_thread
        if slot >= Int64(0) and not bad and (flushing or track_len >= 0):
            gS = pool[slot, hv, None, None]
            state = cute.make_rmem_tensor((self.vec, self.vecs_per_lane, R), Float32)
            state.store(self.load_rows(gS, lane, rows).load().to(Float32))
            d_own = self.load_own_records(ring_d, ring_d_low, row, hv, lane, rows, held, base)
            keys = self.load_group_keys(ring_k, ring_k_low, row, h, group, lane, held, base)
            if tidx < self.places:
                decay = Float32(0.0)
                if tidx < held:
                    position = (base + tidx) & (self.L - 1)
                    decay = Float32(cute.math.exp(ring_g[row, hv, position]))
                sDecay[tidx] = decay
            for i in cutlass.range_constexpr(self.key_rounds):
                c = group + self.groups * i
                if c < self.places:
                    high, low = keys[i]
                    staged = cute.make_rmem_tensor((self.vec, self.vecs_per_lane), Float32)
                    staged.store(high.load().to(Float32) + low.load().to(Float32))
                    cute.autovec_copy(staged, self.lane_columns(sKeys[None, c], lane))
            cute.arch.barrier()
            if track_len == 0:
                self.store_rows(state, pool[track_slot, hv, None, None], lane, rows)
            first = tidx - lane  # lane 0 of this thread's row group
            for c in cutlass.range(held, unroll=1):
                key = self.lane_columns(sKeys[None, c], lane).load()
                alpha = sDecay[c]
                for r in cutlass.range_constexpr(R):
                    mine = d_own[r, 0]
                    for i in cutlass.range_constexpr(1, self.records_per_lane):
                        if c >= LANES_PER_ROW * i:
                            mine = d_own[r, i]
                    d = cute.arch.shuffle_sync(mine, (first + c % LANES_PER_ROW) % 32)
                    state[None, None, r].store(state[None, None, r].load() * alpha + key * d)
                if c + 1 == track_len:
                    self.store_rows(state, pool[track_slot, hv, None, None], lane, rows)
            if flushing:
                self.store_rows(state, gS, lane, rows)


    @cute.jit
    def fold_request(self, mPool, mIdx, mFlag, mRingD, mRingDLow, mRingK, mRingKLow, mRingG,
                     mRows, mWritePos, mBase, mIsFlush, mAccept, mTrack, mTrackSteps, tidx):
        """The fold's prologue: this CTA's (tile, head), its layer's checkpoints and rings (d,
        d_low, k, k_low, g), and after the wait for the previous kernel, its request's
        `fold_plan`; a bad request sets the error flag (once, from its first CTA)."""
        bid, n, layer = cute.arch.block_idx()
        tile, hv = bid % self.tiles, bid // self.tiles
        pool = mPool[layer, None, None, None, None]
        rings = tuple(ring[layer, None, None, None, None]
                      for ring in (mRingD, mRingDLow, mRingK, mRingKLow)) + (
            mRingG[layer, None, None, None],)
        if const_expr(self.use_pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()
        plan = fold_plan(self.track, self.L, Int64(pool.shape[0]), Int64(rings[0].shape[0]),
                         mIdx, mRows, mWritePos, mBase, mIsFlush, mAccept, mTrack, mTrackSteps, n)
        if plan[-1] and tidx == 0 and hv == 0 and tile == 0 and layer == 0:
            mFlag[0] = Int32(1)
        return tile, hv, pool, rings, plan


class ReplaySSMSpecFinish:
    """After the fold: each folded row's ring starts after its records, empty."""

    threads = 128

    def __init__(self, *, ring_len: int, track: bool):
        assert ring_len & (ring_len - 1) == 0
        self.L = ring_len
        self.track = track

    @cute.jit
    def __call__(self, pool_slots: Int64, mIdx, mRows, mWritePos, mBase, mIsFlush, mAccept,
                 mTrack, mTrackSteps, stream):
        grid = [(mIdx.shape[0] + self.threads - 1) // self.threads, 1, 1]
        self.kernel(pool_slots, mIdx, mRows, mWritePos, mBase, mIsFlush, mAccept, mTrack,
                    mTrackSteps).launch(grid=grid, block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, pool_slots: Int64, mIdx: cute.Tensor, mRows: cute.Tensor,
               mWritePos: cute.Tensor, mBase: cute.Tensor, mIsFlush: cute.Tensor,
               mAccept: cute.Tensor, mTrack: cute.Tensor, mTrackSteps: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        n = bid * self.threads + tidx
        if n < mIdx.shape[0]:
            slot, row, held, base, flushing, _, _, bad = fold_plan(
                self.track, self.L, pool_slots, Int64(mWritePos.shape[0]), mIdx, mRows,
                mWritePos, mBase, mIsFlush, mAccept, mTrack, mTrackSteps, n)
            if slot >= Int64(0) and not bad and flushing:
                mBase[row] = (base + held) & (self.L - 1)
                mWritePos[row] = Int32(0)
                mIsFlush[row] = mIsFlush.element_type(0)
