"""ReplaySSM decode (SGLang's --enable-linear-replayssm) in the CuTe DSL, for sm_90+.

The pool holds a checkpoint S0 for each slot and the slot's ring the m update records
since (reference_replayssm.py has the math and the layouts). A step reads S0 and the m
records, runs its token and appends its record at position m, writing no state; when the
ring is full (m = L - 1) or the step is forced to, it writes the state after its token to
the checkpoint instead and appends nothing. The state is read every step and written once
in L steps.

The CTA layout, the state loads and the staging of the token's inputs are
GatedDeltaRuleDecode's, at T = 1. The records enter the token's two matrix-vector
products in factored form,
    S k̂ = A (S0 k̂) + Σ_j W_j d_j (k_j·k̂),   A = Π_j α_j,   W_j = Π_{i>j} α_i,
so a step costs two dot products of K per record, not a rebuild of S; only a flush
rebuilds S before writing it: m rank-1 updates of each row in registers, or, with bf16
records, a matrix product per 16 rows on tensor cores (S0 scaled plus the rows' W_j d_j
times the records' keys).

Work split: each row group of 8 lanes takes every `groups`-th record, reads its key in
the lanes' columns and computes W_j (k_j·k̂) and W_j (k_j·q̂) into shared memory with the
8-lane reduction a state row takes; lane l of a row's group holds d_j of that row for the
records j = l, l + 8, ..., so the records' terms join the row sums that S0's terms
already take.

Padding, out-of-range slots and cursors outside 0 .. L - 1 are decided here as in the
classic kernel: zero output, nothing read or written, the error flag for the last two.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr

from ..validation import MAX_RING
from .decode import BETA, DECAY, KQ, SMEM_SKEW, SMEM_SKEW_EVERY, GatedDeltaRuleDecode
from .decode_mma import MMA_ROWS, bf16_pair, mma_bf16
from .heuristics import LANES_PER_ROW
# Rows of the per-record scalars in shared memory.
WEIGHT, KEY_K, KEY_Q = range(3)


@cute.jit
def record_weights(log_decay: Float32, warp_lane: Int32, held: Int32):
    """(W_j, Γ) of a ring whose record j's log-decay g_j lane j of the warp holds (0 from
    `held` on): W_j = exp(Σ_{i>j} g_i), the decay after record j, by a suffix scan over the
    warp, and Γ = Σ_j g_j, the whole ring's, on every lane."""
    suffix = log_decay
    for step in cutlass.range_constexpr(5):
        offset = 1 << step
        later = cute.arch.shuffle_sync_down(suffix, offset=offset)
        if warp_lane + offset < 32:
            suffix = suffix + later
    total = cute.arch.shuffle_sync(suffix, 0)
    weight = Float32(0.0)
    if warp_lane < held:
        weight = Float32(cute.math.exp(suffix - log_decay))
    return weight, total


class ReplaySSMDecode(GatedDeltaRuleDecode):
    """GatedDeltaRuleDecode's tile at T = 1, on a checkpoint and its ring of L records.

    ring_len: L, records a slot's ring holds (1 .. 32). force_flush: the call passes a
    per-request flag that forces the flush (SGLang's radix-cache track boundaries).
    flush_mma: a flush rebuilds the state on tensor cores (bf16 rings, 16-row blocks),
    reading its rows again in the MMA's layout, rather than in registers from the rows every
    CTA keeps live from its first load (heuristics.choose_ring_tile says where).
    """

    def __init__(self, *, ring_len: int, force_flush: bool, flush_mma: bool = False,
                 tokens: int = 1, **options):
        assert tokens == 1 and 1 <= ring_len <= MAX_RING
        super().__init__(tokens=1, **options)
        assert not (self.intermediate or self.per_token_slots or self.ragged)
        self.L = ring_len
        self.force_flush = force_flush
        self.flush_mma = flush_mma
        # Records each lane of a row's group holds, and the record places that covers.
        self.records_per_lane = -(-ring_len // LANES_PER_ROW)
        self.places = self.records_per_lane * LANES_PER_ROW
        # Rounds in which the row groups take a record each, to cover every place.
        self.key_rounds = -(-self.places // self.groups)
        if flush_mma:
            # 16-row blocks, each to one warp or more (4 rows a thread at most).
            assert self.rows_per_cta % MMA_ROWS == 0 and self.rows_per_thread <= 4
            # The MMAs' K: the record places in steps of 16, as words of bf16 pairs.
            self.k_steps = -(-ring_len // 16)
            self.pair_words = 8 * self.k_steps

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,          # [B, 1, H, K]
        mK: cute.Tensor,          # [B, 1, H, K]
        mV: cute.Tensor,          # [B, 1, HV, V]
        mA: cute.Tensor,          # [B, 1, HV]
        mB: cute.Tensor,          # [B, 1, HV]
        mALog: cute.Tensor,       # [HV]
        mDtBias: cute.Tensor,     # [HV]
        mPool: cute.Tensor,       # [P, HV, V, K] checkpoints
        mIdx: cute.Tensor,        # [B]
        mOut: cute.Tensor,        # [B, 1, HV, V]
        mFlag: cute.Tensor,       # [1] int32
        mRingD: cute.Tensor,      # [P, HV, L, V]
        mRingK: cute.Tensor,      # [P, H, L, K]
        mRingG: cute.Tensor,      # [P, HV, L] float32
        mCursor: cute.Tensor,     # [B] int32: records in request n's ring
        mForce: cute.Tensor,      # [B] int32, or None
        scale: Float32,
        min_valid_slot: Int32,
        stream,
    ):
        # The tensor-core flush's operands are the records as stored.
        assert not self.flush_mma or mRingK.element_type == cutlass.BFloat16
        grid = [mIdx.shape[0] * self.HV * self.tiles, 1, 1]
        self.kernel(
            mQ, mK, mV, mA, mB, mALog, mDtBias, mPool, mIdx, mOut, mFlag, mRingD, mRingK,
            mRingG, mCursor, mForce, scale, min_valid_slot,
        ).launch(grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes(), stream=stream,
                 use_pdl=self.use_pdl)

    def key_layout(self):
        """(K, places): the records' keys in float32, skewed like the staged k̂ and q̂."""
        return cute.make_layout(((SMEM_SKEW_EVERY, self.K // SMEM_SKEW_EVERY), self.places),
                                stride=((1, SMEM_SKEW_EVERY + SMEM_SKEW), self.unit_row_words()))

    def coef_layout(self):
        """(rows, words): the flush's A operand, row r's W_j d_j as bf16 pairs (j, j + 1).
        4 words of padding a row: a fragment's 8 rows x 4 words reach 32 banks."""
        return cute.make_layout((self.rows_per_cta, self.pair_words),
                                stride=(self.pair_words + 4, 1))

    def key_pair_layout(self):
        """(words, K): the flush's B operand, the keys of records (2w, 2w + 1) as bf16 pairs,
        a row of words per pair. 8 words of padding: a fragment's 4 rows x 8 columns reach
        32 banks."""
        return cute.make_layout((self.pair_words, self.K), stride=(self.K + 8, 1))

    def smem_bytes(self) -> int:
        if self.flush_mma:
            flush = (cute.cosize(self.coef_layout()) + cute.cosize(self.key_pair_layout())
                     + self.rows_per_cta) * 4
        else:
            flush = self.unit_row_words() * self.places * 4
        return super().smem_bytes() + 3 * self.places * 4 + flush + 64

    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mA: cute.Tensor, mB: cute.Tensor,
        mALog: cute.Tensor, mDtBias: cute.Tensor, mPool: cute.Tensor, mIdx: cute.Tensor,
        mOut: cute.Tensor, mFlag: cute.Tensor, mRingD: cute.Tensor, mRingK: cute.Tensor,
        mRingG: cute.Tensor, mCursor: cute.Tensor, mForce: cute.Tensor, scale: Float32,
        min_valid_slot: Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        tile, hv, n = bid % self.tiles, (bid // self.tiles) % self.HV, bid // (self.tiles * self.HV)
        lane, rows = self.thread_rows(tidx, tile)
        h = hv // (self.HV // self.H)
        warp, warp_lane = tidx // 32, tidx % 32

        smem = cutlass.utils.SmemAllocator()
        units = self.allocate_units(smem)
        sGate = smem.allocate_tensor(Float32, cute.make_layout((3, 1), stride=(1, 1)),
                                     byte_alignment=16)
        # The flush's staging: the records' keys in float32 (rebuilt in registers), or the
        # MMAs' operands and the rows' u (on tensor cores).
        if const_expr(self.flush_mma):
            sKeys = (smem.allocate_tensor(Int32, self.coef_layout(), byte_alignment=16),
                     smem.allocate_tensor(Int32, self.key_pair_layout(), byte_alignment=16),
                     smem.allocate_tensor(Float32, cute.make_layout(self.rows_per_cta),
                                          byte_alignment=16))
        else:
            sKeys = smem.allocate_tensor(Float32, self.key_layout(), byte_alignment=16)
        # sRec[:, j]: record j's W_j, W_j (k_j·k̂) and W_j (k_j·q̂); zero past the cursor.
        sRec = smem.allocate_tensor(Float32, cute.make_layout((3, self.places),
                                                              stride=(self.places, 1)),
                                    byte_alignment=16)

        # The cursor's and the later tile's slot's reads beside the slot's, so that the
        # loads below wait for one round trip of indices, not three.
        slot = self.begin(mPool, mIdx, None, bid, n, hv, tile, tidx, min_valid_slot,
                          prefetch_later=False)
        cursor = Int32(mCursor[n])
        later_slot = self.later_slot(mIdx, None, bid)
        in_pool = slot >= Int64(min_valid_slot) and slot < Int64(mPool.shape[0])
        bad_cursor = cursor < 0 or cursor >= Int32(self.L)
        valid = in_pool and not bad_cursor
        if (slot >= Int64(mPool.shape[0]) or (in_pool and bad_cursor)) and tidx == 0:
            mFlag[0] = Int32(1)
        flush = cursor == Int32(self.L - 1)
        if const_expr(self.force_flush):
            flush = flush or Int32(mForce[n]) != 0
        req = (n, Int64(n), Int32(0), Int32(1))

        # Its index arrives with the two the branch below waits for.
        self.prefetch_later(mPool, mIdx, later_slot, bid, tidx, min_valid_slot)
        if valid:  # uniform over the CTA, so the barriers are safe
            # 1. Every global read first, none of them waited for before the last is issued:
            #    the checkpoint, v, the ring's d of this thread's rows, its decays, its row
            #    group's records' keys, then the token's inputs. The records are read at
            #    indices clamped into the filled part of the ring and masked where used, so
            #    that no branch stands between the loads (each one a wait for the loads
            #    before it).
            gS = mPool[slot, hv, None, None]
            raw = self.load_rows(gS, lane, rows)
            v_in = self.load_v(mV, req, hv, rows)
            last = cutlass.max(cursor - 1, Int32(0))
            d_raw = self.load_own_records(mRingD, slot, hv, lane, rows, last)
            g_raw = mRingG[slot, hv, cutlass.min(warp_lane, last)]
            keys = self.load_group_keys(mRingK, slot, h, tidx // LANES_PER_ROW, lane, last)
            # 2. The token's k̂, q̂ and gates in shared memory.
            self.stage_inputs(mQ, mK, mA, mB, mALog, mDtBias, units, sGate, req, h, hv, warp,
                              warp_lane, scale)
            cute.arch.barrier()
            log_decay = Float32(cutlass.select_(warp_lane < cursor, Float32(g_raw), Float32(0.0)))
            total = self.stage_records(keys, log_decay, units, sKeys, sRec,
                                       tidx // LANES_PER_ROW, lane, warp_lane, cursor, flush)
            d_own = self.widen_own_records(d_raw, lane, cursor)
            if not flush:
                self.append_key_and_decay(mRingK, mRingG, mA, mDtBias, mALog, units, slot, h,
                                          hv, tile, n, tidx, cursor)
            cute.arch.barrier()
            # 3. The token, then the checkpoint or the record.
            self.run_token(mOut, mRingD, gS, raw, v_in, d_own, units, sGate, sKeys, sRec,
                           total, slot, hv, n, tidx, lane, rows, cursor, flush)
        else:
            if lane == 0:
                for r in rows:
                    mOut[n, 0, hv, r] = mOut.element_type(0.0)

    @cute.jit
    def prefetch_later(self, mPool: cute.Tensor, mIdx: cute.Tensor, later_slot: Int64,
                       bid: Int32, tidx: Int32, min_valid_slot: Int32):
        """The CTA's share of the L2 prefetch ahead (its first thread's), from the index read
        in the prologue."""
        if const_expr(self.prefetch_ahead > 0):
            later, later_n = self.later_cta(bid)
            if tidx == 0 and later_n < mIdx.shape[0]:
                self.prefetch_tile_of(mPool, later_slot, later, min_valid_slot)

    @cute.jit
    def load_own_records(self, mRingD: cute.Tensor, slot: Int64, hv, lane: Int32, rows,
                         last: Int32) -> cute.Tensor:
        """d_j of this thread's rows for its records j = lane + 8 i, as stored, read at
        min(j, last): `widen_own_records` masks the places past the cursor."""
        d = cute.make_rmem_tensor((len(rows), self.records_per_lane), mRingD.element_type)
        for i in cutlass.range_constexpr(self.records_per_lane):
            j = cutlass.min(lane + LANES_PER_ROW * i, last)
            for r in cutlass.range_constexpr(len(rows)):
                d[r, i] = mRingD[slot, hv, j, rows[r]]
        return d

    @cute.jit
    def widen_own_records(self, d_raw: cute.Tensor, lane: Int32, cursor: Int32) -> cute.Tensor:
        """`load_own_records`' d in float32, 0 from the cursor on (whatever the ring holds there)."""
        d = cute.make_rmem_tensor(d_raw.shape, Float32)
        for i in cutlass.range_constexpr(self.records_per_lane):
            live = lane + LANES_PER_ROW * i < cursor
            for r in cutlass.range_constexpr(d_raw.shape[0]):
                d[r, i] = Float32(cutlass.select_(live, Float32(d_raw[r, i]), Float32(0.0)))
        return d

    @cute.jit
    def load_group_keys(self, mRingK: cute.Tensor, slot: Int64, h, group: Int32, lane: Int32,
                        last: Int32) -> list:
        """This lane's columns of the keys of its row group's records j = group + groups i, as
        stored, read at min(j, last): `stage_records` masks the places past the cursor."""
        keys = []
        for i in cutlass.range_constexpr(self.key_rounds):
            j = cutlass.min(group + self.groups * i, last)
            frag = cute.make_rmem_tensor((self.vec, self.vecs_per_lane), mRingK.element_type)
            cute.autovec_copy(self.lane_columns(mRingK[slot, h, j, None], lane), frag)
            keys.append(frag)
        return keys

    @cute.jit
    def stage_records(self, keys: list, log_decay: Float32, units: cute.Tensor,
                      sKeys: cute.Tensor, sRec: cute.Tensor, group: Int32, lane: Int32,
                      warp_lane: Int32, cursor: Int32, flush) -> Float32:
        """Each row group's records' W_j, W_j (k_j·k̂), W_j (k_j·q̂) (and, to flush, their keys)
        into shared memory, zero from the cursor on; returns Σ_j g_j, the ring's total
        log-decay.

        Lane j of every warp holds g_j (0 from the cursor on): a suffix scan over the warp
        gives Σ_{i>j} g_i. A record's dots take the 8-lane row reduction, as a state row's do.
        """
        weight, total = record_weights(log_decay, warp_lane, cursor)

        k_hat = self.lane_columns(units[None, 0, 0], lane).load()
        q_hat = self.lane_columns(units[None, 1, 0], lane).load()
        for i in cutlass.range_constexpr(self.key_rounds):
            j = group + self.groups * i
            # Past the cursor the key read was record `last`'s, or (empty ring) whatever
            # place 0 holds: zero, so that no stale value reaches a sum or the flush.
            key = cute.where(cute.full_like(keys[i].load(), j < cursor, cutlass.Boolean),
                             keys[i].load().to(Float32), Float32(0.0))
            w = cute.arch.shuffle_sync(weight, j % 32)
            kk = self.row_sum((key * k_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
            qk = self.row_sum((key * q_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
            if j < self.places:
                # Every lane of the group holds the sums: no branch, one store wins.
                sRec[WEIGHT, j] = w
                sRec[KEY_K, j] = w * kk
                sRec[KEY_Q, j] = w * qk
                if const_expr(not self.flush_mma):
                    if flush:
                        staged = cute.make_rmem_tensor((self.vec, self.vecs_per_lane), Float32)
                        staged.store(key)
                        cute.autovec_copy(staged, self.lane_columns(sKeys[None, j], lane))
            if const_expr(self.flush_mma):
                if flush:
                    self.stage_key_pairs(key, sKeys[1], j, group, lane)
        if const_expr(self.flush_mma and self.places // 2 < self.pair_words):
            if flush:  # the MMAs' places past the ring's: zero keys
                pad = (self.pair_words - self.places // 2) * self.K
                tidx = group * LANES_PER_ROW + lane
                for i in cutlass.range_constexpr(-(-pad // self.threads)):
                    word = tidx + self.threads * i
                    if word < pad:
                        sKeys[1][self.places // 2 + word // self.K, word % self.K] = Int32(0)
        return total

    @cute.jit
    def stage_key_pairs(self, key, sPairs: cute.Tensor, j, group: Int32, lane: Int32):
        """Record j's key and record j + 1's (the next row group's: every group takes the
        record after the one before it) as bf16 pairs, this lane's columns of row j // 2 of
        the flush's B operand, written by the even group."""
        mine = cute.make_rmem_tensor((self.vec, self.vecs_per_lane), Float32)
        mine.store(key)
        words = cute.make_rmem_tensor((self.vec, self.vecs_per_lane), Int32)
        for v in cutlass.range_constexpr(self.vecs_per_lane):
            for e in cutlass.range_constexpr(self.vec):
                after = cute.arch.shuffle_sync_bfly(mine[e, v], offset=LANES_PER_ROW)
                words[e, v] = bf16_pair(mine[e, v], after)
        if group % 2 == 0 and j < self.places:
            cute.autovec_copy(words, self.lane_columns(sPairs[j // 2, None], lane))

    @cute.jit
    def append_key_and_decay(self, mRingK: cute.Tensor, mRingG: cute.Tensor, mA: cute.Tensor,
                             mDtBias: cute.Tensor, mALog: cute.Tensor, units: cute.Tensor,
                             slot: Int64, h, hv, tile, n, tidx: Int32, cursor: Int32):
        """The token's record at the cursor: its key (once per key head, by the head's first
        value head's first tile) and its log-decay (by each value head's first tile)."""
        if tile == 0:
            if tidx < 32 and hv % (self.HV // self.H) == 0:
                chunk = self.K // 32
                key = cute.make_rmem_tensor((chunk,), mRingK.element_type)
                key.store(cute.local_tile(units[None, 0, 0], (chunk,), (tidx,)).load().to(
                    mRingK.element_type))
                cute.autovec_copy(key, cute.local_tile(mRingK[slot, h, cursor, None], (chunk,),
                                                       (tidx,)))
            if tidx == 0:
                mRingG[slot, hv, cursor] = self.log_decay(mA[n, 0, hv], mDtBias[hv], mALog[hv])

    @cute.jit
    def run_token(self, mOut: cute.Tensor, mRingD: cute.Tensor, gS: cute.Tensor,
                  raw: cute.Tensor, v_in: cute.Tensor, d_own: cute.Tensor, units: cute.Tensor,
                  sGate: cute.Tensor, sKeys: cute.Tensor, sRec: cute.Tensor, total: Float32,
                  slot: Int64, hv, n, tidx: Int32, lane: Int32, rows, cursor: Int32, flush):
        """The token on this thread's rows: output, then the state after it to the
        checkpoint (flush) or its d to the ring at the cursor."""
        R = self.rows_per_thread
        ring_decay = Float32(cute.math.exp(total))
        k_hat = self.lane_columns(units[None, 0, 0], lane).load()
        q_hat = self.lane_columns(units[None, 1, 0], lane).load()
        decay, beta = sGate[DECAY, 0], sGate[BETA, 0]
        u = cute.make_rmem_tensor((R,), Float32)
        for r in cutlass.range_constexpr(R):
            # The checkpoint as loaded, widened row by row: only a flush keeps it in float32.
            s = raw[None, None, r].load().to(Float32)
            sk = ring_decay * (s * k_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
            sq = ring_decay * (s * q_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
            for i in cutlass.range_constexpr(self.records_per_lane):
                j = lane + LANES_PER_ROW * i
                sk = sk + d_own[r, i] * sRec[KEY_K, j]
                sq = sq + d_own[r, i] * sRec[KEY_Q, j]
            sk, sq = self.row_sum(sk), self.row_sum(sq)
            u[r] = beta * (v_in[r, 0] - decay * sk)
            mOut[n, 0, hv, rows[r]] = (decay * sq + u[r] * sGate[KQ, 0]).to(mOut.element_type)

        if flush:
            # S = A S0 + Σ_j W_j d_j k_jᵀ, then the token: e^g S + u k̂ᵀ. Past the cursor
            # every W_j, d_j and staged key is zero.
            if const_expr(self.flush_mma):
                self.flush_on_tensor_cores(gS, d_own, units, sKeys, sRec, ring_decay, decay, u,
                                           tidx, lane, rows)
            else:
                group = tidx - lane  # lane 0 of this thread's row group
                state = cute.make_rmem_tensor((self.vec, self.vecs_per_lane, R), Float32)
                state.store(raw.load().to(Float32) * ring_decay)
                for j in cutlass.range_constexpr(self.L):
                    key = self.lane_columns(sKeys[None, j], lane).load()
                    w = sRec[WEIGHT, j]
                    for r in cutlass.range_constexpr(R):
                        d = cute.arch.shuffle_sync(d_own[r, j // LANES_PER_ROW],
                                                   (group + j % LANES_PER_ROW) % 32)
                        state[None, None, r].store(state[None, None, r].load() + key * (w * d))
                for r in cutlass.range_constexpr(R):
                    state[None, None, r].store(state[None, None, r].load() * decay + k_hat * u[r])
                self.store_rows(state, gS, lane, rows)
        else:
            for r in cutlass.range_constexpr(R):
                # All 8 lanes of the row store the same value to one address.
                mRingD[slot, hv, cursor, rows[r]] = u[r].to(mRingD.element_type)

    @cute.jit
    def flush_on_tensor_cores(self, gS: cute.Tensor, d_own: cute.Tensor, units: cute.Tensor,
                              sFlush, sRec: cute.Tensor, ring_decay: Float32, decay: Float32,
                              u, tidx: Int32, lane: Int32, rows):
        """The flush's rebuild as MMAs, a warp to a 16-row block (and, with more warps than
        blocks, to a share of its columns): S = A S0 + C K, C the block's W_j d_j (bf16) and
        K the records' keys, then the token: e^g S + u k̂ᵀ. The rows are read again (L2
        hits) in the accumulators' layout, first, so that the staging hides their latency;
        no CTA keeps them live from its first load."""
        sCoef, sPairs, sU = sFlush
        warp, g, c = tidx // 32, tidx % 32 // 4, tidx % 4  # an MMA's (group, thread in group)
        warps, blocks = self.threads // 32, self.rows_per_cta // MMA_ROWS
        parts = warps // blocks
        spans = self.K // 8 // parts  # 8-column spans of the block's columns this warp takes
        block, part = warp % blocks, warp // blocks
        local = tidx // LANES_PER_ROW  # this thread's first row among the CTA's
        first = rows[0] - local  # the CTA's first row in the head
        top = block * MMA_ROWS + g  # this thread's rows top and top + 8 of the CTA's
        s0 = cute.make_rmem_tensor((2, 2, spans), gS.element_type)
        for x in cutlass.range_constexpr(spans):
            col = (part * spans + x) * 8 + 2 * c  # this thread's two accumulator columns
            for half in cutlass.range_constexpr(2):
                cute.autovec_copy(cute.local_tile(gS[first + top + 8 * half, None], (2,),
                                                  (col // 2,)), s0[None, half, x])

        for r in cutlass.range_constexpr(self.rows_per_thread):
            row = local + r * self.groups
            if lane == 0:
                sU[row] = u[r]
            # Lane l holds d_j of records j = l + 8 i; the pair (j, j + 1) is lanes l, l + 1.
            for i in cutlass.range_constexpr(2 * self.k_steps):
                coef = Float32(0.0)
                if const_expr(i < self.records_per_lane):
                    coef = d_own[r, i] * sRec[WEIGHT, lane + LANES_PER_ROW * i]
                after = cute.arch.shuffle_sync_bfly(coef, offset=1)
                if lane % 2 == 0:
                    sCoef[row, (lane + LANES_PER_ROW * i) // 2] = bf16_pair(coef, after)
        cute.arch.barrier()

        a = [[sCoef[top + 8 * (x % 2), 8 * ks + c + 4 * (x // 2)] for x in range(4)]
             for ks in range(self.k_steps)]
        u_rows = [sU[top], sU[top + 8]]
        for x in cutlass.range_constexpr(spans):
            n = (part * spans + x) * 8  # the span's first column
            acc = [Float32(0.0)] * 4
            for ks in cutlass.range_constexpr(self.k_steps):
                b = [sPairs[8 * ks + c, n + g], sPairs[8 * ks + c + 4, n + g]]
                acc = mma_bf16(a[ks], b, acc)
            col = n + 2 * c
            for half in cutlass.range_constexpr(2):
                new = cute.make_rmem_tensor((2,), Float32)
                for e in cutlass.range_constexpr(2):
                    s = ring_decay * Float32(s0[e, half, x]) + acc[2 * half + e]
                    new[e] = s * decay + u_rows[half] * units[col + e, 0, 0]
                out = cute.make_rmem_tensor((2,), gS.element_type)
                out.store(new.load().to(gS.element_type))
                cute.autovec_copy(out, cute.local_tile(gS[first + top + 8 * half, None], (2,),
                                                       (col // 2,)))
