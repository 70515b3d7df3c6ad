"""The pooled Gated DeltaNet decode kernel, in the CuTe DSL, for sm_90+.

One CTA owns one request n, one value head hv and a tile of `rows_per_cta` rows
of that head's [V, K] state. Its threads form groups of 8 lanes; each group owns
`rows_per_thread` rows, and each lane of a group holds the same 16-byte columns
of those rows (column blocks kl, kl + 8, kl + 16, ...), so that every warp-wide
load or store moves whole 128-byte lines. The state is read once, held in
registers in float32 across the T tokens, and written once.

The kernel first issues the state loads, then, while they are in flight, stages
every token's inputs in shared memory (k̂ and q̂ normalised once per CTA, k̂·q̂,
decay and beta), so the token loop itself never waits on global memory.

Per token, SPEC.md's update is computed in the equivalent one-pass form
    Sk = S_old k̂,  Sq = S_old q̂            (both from the state as loaded)
    u  = β (v - e^g Sk),  o = e^g Sq + u (k̂·q̂),  S = e^g S_old + u k̂ᵀ
so each row needs one pass over its registers and two 8-lane reductions.

Padding (index < min_valid_slot) and out-of-range indices (>= P) are decided
here: the CTA writes zero output and touches no state; out-of-range sets the
device error flag.

Within a launch, each CTA asks L2 for the tile of the CTA PREFETCH_AHEAD_BYTES of
state later in the grid, so CTAs mostly find their state in L2 and the DRAM stream
no longer waits on CTAs starting. The CTAs of the first PREFETCH_AHEAD_BYTES, which
no earlier CTA prefetches for, prefetch their own tile instead, under programmatic
dependent launch before the previous kernel has finished: such a CTA reads its
index ahead of time (it may yet change) and asks L2 for that slot's tile; only an
in-range slot is prefetched, and the state is read and written only through the
index read after the wait. Each launch then lets the next one start, so its first
CTAs' index and state latency overlap this one's tail. Later CTAs skip that early
read: it held back their first warp's own loads by an index round trip (up to 9%
of the step at B >= 16 on the H200).
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, const_expr
from cutlass._mlir.dialects import llvm

from .heuristics import LANES_PER_ROW

VECTOR_BYTES = 16
L2NORM_EPS = 1e-6
SOFTPLUS_THRESHOLD = 20.0
# Rows of the per-token scalars staged in shared memory.
DECAY, BETA, KQ = range(3)
# A CTA prefetches into L2 the state tile of the CTA this many bytes of state later in the
# grid: far enough ahead to land before that CTA starts, near enough to still be in L2
# when it does, under the stream of written-back state (H100 sweep: 3-4 MiB best, 8 MiB and
# more evicted before use; H200 sweep: 4 MiB ahead of 2 and 8).
PREFETCH_AHEAD_BYTES = 4 << 20
# ... but 1 MiB ahead in a verify that streams its rows: it moves 5-9 bytes for each byte of
# state, so 4 MiB of state ahead is 20-36 MiB of traffic, about all of L2 (H200 sweep, session
# 12, fp32 verify at T = 4: TP8 B = 64 1.18x -> 1.15x, TP1 B = 16-256 0.01 lower; at T = 8,
# B = 64-128: 1.24x -> 1.17-1.18x). Small grids keep 4 MiB: their first 4 MiB of CTAs prefetch
# their own tiles under PDL (TP8 ragged B = 16 took 1.21x -> 1.36x at 1 MiB); they do not stream.
STREAMING_PREFETCH_AHEAD_BYTES = 1 << 20
# k̂ and q̂ rows in shared memory skip 4 words after every 32: see `unit_layout`.
SMEM_SKEW_EVERY, SMEM_SKEW = 32, 4


class GatedDeltaRuleDecode:
    """Compile-time shape and options; B, P and all outer strides are run-time values.

    intermediate: None, "rows" (request n writes row n of the intermediate
    states) or "indexed" (it writes row intermediate_indices[n]).
    per_token_slots: indices [B, T]; request n reads slot [n, num_accepted[n] - 1] and
    writes the state after token t to slot [n, t].
    ragged: inputs [1, N, ...]; request n has tokens cu_seqlens[n] .. cu_seqlens[n + 1] - 1.

    A subclass keeps the prologue (PDL, prefetches, index checks, padding rows), the state
    and v loads and the input staging, and replaces what a CTA does with them through the
    hooks `allocate_units`, `stage_unit_vectors`, `thread_rows` and `run_tokens`.
    """

    lanes_per_row = LANES_PER_ROW

    def __init__(
        self,
        *,
        num_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        tokens: int,
        state_bytes: int,
        rows_per_cta: int,
        rows_per_thread: int,
        intermediate: str | None = None,
        update_state: bool = True,
        use_pdl: bool = True,
        prefetch_state: bool = True,
        per_token_slots: bool = False,
        ragged: bool = False,
        streaming_rows: bool = False,
    ):
        self.H, self.HV, self.K, self.V, self.T = (
            num_heads, num_v_heads, head_k_dim, head_v_dim, tokens)
        # Elements of one 16-byte state vector, and such vectors per lane per row.
        self.vec = VECTOR_BYTES // state_bytes
        self.vecs_per_lane = head_k_dim // (self.lanes_per_row * self.vec)
        assert self.vecs_per_lane * self.lanes_per_row * self.vec == head_k_dim
        assert head_v_dim % rows_per_cta == 0 and rows_per_cta % rows_per_thread == 0
        self.rows_per_cta = rows_per_cta
        self.tiles = head_v_dim // rows_per_cta
        self.rows_per_thread = rows_per_thread
        self.groups = rows_per_cta // rows_per_thread
        self.threads = self.groups * self.lanes_per_row
        assert intermediate in (None, "rows", "indexed")
        self.intermediate = intermediate
        # Intermediate rows as streaming stores (float32 rows, 16-byte vectors, evict first):
        # a verify writes T states for each one it reads and reads none of them again
        # (heuristics.STREAMING_ROWS_FROM_HEADS says where it pays).
        assert not streaming_rows or (intermediate and state_bytes == 4)
        self.streaming_rows = streaming_rows
        # Per-token slots write every token's state to its own slot, and nothing at the end.
        assert not (per_token_slots and intermediate)
        self.per_token_slots = per_token_slots
        self.update_state = update_state and not per_token_slots
        self.ragged = ragged
        self.use_pdl = use_pdl
        # The L2 prefetch of the state tile is a bulk copy: it needs a 16-byte aligned pool.
        self.prefetch_state = prefetch_state
        # CTAs ahead whose tile a CTA prefetches (0: none).
        tile_bytes = rows_per_cta * head_k_dim * state_bytes
        ahead = STREAMING_PREFETCH_AHEAD_BYTES if streaming_rows else PREFETCH_AHEAD_BYTES
        self.prefetch_ahead = ahead // tile_bytes if prefetch_state else 0

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,          # [B, T, H, K]
        mK: cute.Tensor,          # [B, T, H, K]
        mV: cute.Tensor,          # [B, T, HV, V]
        mA: cute.Tensor,          # [B, T, HV]
        mB: cute.Tensor,          # [B, T, HV]
        mALog: cute.Tensor,       # [HV]
        mDtBias: cute.Tensor,     # [HV]
        mPool: cute.Tensor,       # [P, HV, V, K]
        mIdx: cute.Tensor,        # [B]
        mOut: cute.Tensor,        # [B, T, HV, V]
        mFlag: cute.Tensor,       # [1] int32
        mInter: cute.Tensor,      # [N, T, HV, V, K], or None
        mInterIdx: cute.Tensor,   # [B], or None
        mAccepted: cute.Tensor,   # [B] int32 (per-token slots), or None
        mCuSeqlens: cute.Tensor,  # [B + 1] int32 (ragged rows), or None
        scale: Float32,
        min_valid_slot: Int32,
        stream,
    ):
        grid = [mIdx.shape[0] * self.HV * self.tiles, 1, 1]
        self.kernel(
            mQ, mK, mV, mA, mB, mALog, mDtBias, mPool, mIdx, mOut, mFlag, mInter, mInterIdx,
            mAccepted, mCuSeqlens, scale, min_valid_slot,
        ).launch(grid=grid, block=[self.threads, 1, 1], smem=self.smem_bytes(), stream=stream,
                 use_pdl=self.use_pdl)

    def unit_row_words(self) -> int:
        return self.K + self.K // SMEM_SKEW_EVERY * SMEM_SKEW

    def unit_layout(self):
        """(K, 2, T): k̂ and q̂ of every token, each row skewed by 4 words every 32 columns.

        With a bf16 pool a lane's columns are 32 bytes apart from the next lane's, so unskewed
        lanes l and l + 4 of a row hit the same banks: every 16-byte shared load took two
        passes per quarter warp (ncu: 7.6 wavefronts per load against 3.9 skewed).
        """
        row = self.unit_row_words()
        return cute.make_layout(((SMEM_SKEW_EVERY, self.K // SMEM_SKEW_EVERY), 2, self.T),
                                stride=((1, SMEM_SKEW_EVERY + SMEM_SKEW), row, 2 * row))

    def smem_bytes(self) -> int:
        # k̂ and q̂ of every token, then three scalars of every token (16-byte aligned).
        return (2 * self.unit_row_words() * self.T + 3 * self.T) * 4 + 32

    @cute.jit
    def lane_columns(self, row: cute.Tensor, lane: Int32) -> cute.Tensor:
        """This lane's columns of a [K] row: (vec, vecs_per_lane), stride (1, lanes_per_row * vec)."""
        # (vec, lane, block): the row is runs of lanes_per_row lanes' 16-byte vectors.
        tiles = cute.composition(row, cute.make_layout(
            (self.vec, self.lanes_per_row, self.vecs_per_lane),
            stride=(1, self.vec, self.vec * self.lanes_per_row)))
        return tiles[None, lane, None]

    @cute.jit
    def row_sum(self, x: Float32) -> Float32:
        """Sum over the 8 lanes that share a row (butterfly: every lane gets the total)."""
        for i in cutlass.range_constexpr(3):
            x = x + cute.arch.shuffle_sync_bfly(x, offset=LANES_PER_ROW >> (i + 1))
        return x

    @cute.jit
    def warp_sum(self, x: Float32) -> Float32:
        for i in cutlass.range_constexpr(5):
            x = x + cute.arch.shuffle_sync_bfly(x, offset=16 >> i)
        return x

    @cute.jit
    def load_lane_chunk(self, src: cute.Tensor, warp_lane: Int32) -> cute.Tensor:
        """This lane's K/32 elements of a [K] row, in registers."""
        chunk = self.K // 32
        frag = cute.make_rmem_tensor((chunk,), src.element_type)
        cute.autovec_copy(cute.local_tile(src, (chunk,), (warp_lane,)), frag)
        return frag

    @cute.jit
    def unit_vector(self, frag: cute.Tensor, factor: Float32):
        """A warp's row, lane chunk by lane chunk: frag * rsqrt(sum(frag^2) + eps) * factor in float32."""
        x = frag.load().to(Float32)
        sum_sq = self.warp_sum((x * x).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
        return x * (Float32(cute.math.rsqrt(sum_sq + Float32(L2NORM_EPS), fastmath=True)) * factor)

    @cute.jit
    def stage_inputs(self, mQ: cute.Tensor, mK: cute.Tensor, mA: cute.Tensor, mB: cute.Tensor,
                     mALog: cute.Tensor, mDtBias: cute.Tensor, units, sGate: cute.Tensor,
                     req, h, hv, warp: Int32, warp_lane: Int32, scale: Float32):
        """Every token's k̂ and q̂ (one warp per token), and its gates (the last warp)."""
        T = self.T
        warps = self.threads // 32
        for w in cutlass.range_constexpr(warps):
            if warp == w:
                gates = w == warps - 1
                if const_expr(gates):
                    # Lane t reads token t's gate inputs (lanes past T repeat T - 1), first:
                    # this warp may also own tokens, and these loads must not wait behind
                    # their normalisation.
                    row, tok = self.token(req, cutlass.min(warp_lane, T - 1))
                    a_raw, b_raw = mA[row, tok, hv], mB[row, tok, hv]
                    a_log, dt_bias = mALog[hv], mDtBias[hv]
                tokens = list(range(w, T, warps))
                # All of this warp's loads first, so their latencies overlap.
                frags = [(self.load_lane_chunk(mK[(*self.token(req, t), h, None)], warp_lane),
                          self.load_lane_chunk(mQ[(*self.token(req, t), h, None)], warp_lane))
                         for t in tokens]
                for t, (k_frag, q_frag) in zip(tokens, frags):
                    self.stage_unit_vectors(units, sGate, t, self.unit_vector(k_frag, Float32(1.0)),
                                            self.unit_vector(q_frag, scale), warp_lane)
                if const_expr(gates):
                    if warp_lane < T:  # lane t: token t's decay and beta
                        sGate[DECAY, warp_lane] = Float32(cute.math.exp(
                            self.log_decay(a_raw, dt_bias, a_log)))
                        sGate[BETA, warp_lane] = Float32(1.0) / (
                            Float32(1.0) + Float32(cute.math.exp(-Float32(b_raw))))

    @cute.jit
    def log_decay(self, a_raw, dt_bias, a_log) -> Float32:
        """g = -exp(A_log) softplus(a + dt_bias): a token's log-decay."""
        x = Float32(a_raw) + Float32(dt_bias)
        softplus = x
        if x <= Float32(SOFTPLUS_THRESHOLD):
            softplus = Float32(cute.math.log(Float32(1.0) + Float32(cute.math.exp(x))))
        return -Float32(cute.math.exp(Float32(a_log))) * softplus

    def allocate_units(self, smem):
        """Shared memory for the staged k̂ and q̂: sUnit[:, 0, t] = k̂ of token t, [:, 1, t] = q̂."""
        return smem.allocate_tensor(Float32, self.unit_layout(), byte_alignment=16)

    @cute.jit
    def stage_unit_vectors(self, sUnit: cute.Tensor, sGate: cute.Tensor, t: int, k_unit, q_unit,
                           warp_lane: Int32):
        """Token t's k̂ and q̂ (this lane's chunk of each) and k̂·q̂, into shared memory."""
        chunk = self.K // 32
        for j, unit in ((0, k_unit), (1, q_unit)):
            staged = cute.make_rmem_tensor((chunk,), Float32)
            staged.store(unit)
            cute.autovec_copy(staged, cute.local_tile(sUnit[None, j, t], (chunk,), (warp_lane,)))
        kq = self.warp_sum((k_unit * q_unit).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
        sGate[KQ, t] = kq  # every lane holds the sum: no branch, one store wins

    @cute.jit
    def prefetch_tile(self, mPool: cute.Tensor, mIdx: cute.Tensor, n, hv, tile, tidx: Int32,
                      min_valid_slot: Int32):
        """Before the previous kernel has finished: prefetch this CTA's state tile into L2.

        The index may still be about to change, so it is read past L1 (ld.global.cg: the
        authoritative read after griddepcontrol.wait must not find a stale L1 line) and only
        steers a prefetch, which never faults and never changes what the kernel computes.
        """
        if tidx == 0:
            ptr = (mIdx.iterator + n).llvm_ptr
            width = mIdx.element_type.width
            guess = Int64(mIdx.element_type(llvm.inline_asm(
                mIdx.element_type.mlir_type, [ptr], f"ld.global.cg.b{width} $0, [$1];",
                "=r,l" if width == 32 else "=l,l", has_side_effects=True)))
            self.prefetch_l2(mPool, guess, hv, tile, min_valid_slot)

    @cute.jit
    def prefetch_l2(self, mPool: cute.Tensor, slot: Int64, hv, tile, min_valid_slot: Int32):
        """Bulk-prefetch one state tile into L2, if `slot` is in range (else nothing)."""
        if slot >= Int64(min_valid_slot) and slot < Int64(mPool.shape[0]):
            src = mPool[slot, hv, tile * self.rows_per_cta, None].iterator.llvm_ptr
            nbytes = Int32(self.rows_per_cta * self.K * mPool.element_type.width // 8)
            llvm.inline_asm(None, [src, nbytes.ir_value()],
                            "cp.async.bulk.prefetch.L2.global [$0], $1;", "l,r",
                            has_side_effects=True)

    @cute.jit
    def later_cta(self, bid: Int32):
        """The CTA `prefetch_ahead` places after CTA `bid` in this grid, and its request (past
        the last one where that CTA is past the grid's end)."""
        later = bid + self.prefetch_ahead
        return later, later // (self.tiles * self.HV)

    @cute.jit
    def later_slot(self, mIdx: cute.Tensor, mAccepted: cute.Tensor, bid: Int32) -> Int64:
        """The slot of the later CTA's request, read with no branch before it (the last
        request's past the grid's end, where `prefetch_tile_of` is not called)."""
        _, n = self.later_cta(bid)
        return self.read_slot(mIdx, mAccepted, cutlass.min(n, Int32(mIdx.shape[0] - 1)))

    @cute.jit
    def prefetch_later_tile(self, mPool: cute.Tensor, mIdx: cute.Tensor, mAccepted: cute.Tensor,
                            bid: Int32, min_valid_slot: Int32):
        """Prefetch into L2 the tile of the CTA `prefetch_ahead` places later in this grid."""
        later, n = self.later_cta(bid)
        if n < mIdx.shape[0]:
            self.prefetch_tile_of(mPool, self.read_slot(mIdx, mAccepted, n), later,
                                  min_valid_slot)

    @cute.jit
    def prefetch_tile_of(self, mPool: cute.Tensor, slot: Int64, cta, min_valid_slot: Int32):
        """Prefetch into L2 the state tile that CTA `cta` of this grid reads from `slot`."""
        self.prefetch_l2(mPool, slot, (cta // self.tiles) % self.HV, cta % self.tiles,
                         min_valid_slot)

    @cute.jit
    def begin(self, mPool: cute.Tensor, mIdx: cute.Tensor, mAccepted: cute.Tensor, bid: Int32,
              n, hv, tile, tidx: Int32, min_valid_slot: Int32,
              prefetch_later: bool = True) -> Int64:
        """The launch prologue: the wait for the previous kernel (programmatic dependent
        launch), then the slot this CTA reads and (unless the caller issues it itself, from
        `later_slot` and `prefetch_tile_of`) the L2 prefetch for a later CTA."""
        if const_expr(self.use_pdl):
            # While the previous kernel finishes: pull this CTA's state into L2, if no
            # earlier CTA of this grid prefetches it (per-token slots: the slot is two
            # dependent reads away, too late to matter).
            if const_expr(self.prefetch_ahead > 0 and not self.per_token_slots):
                if bid < self.prefetch_ahead:
                    self.prefetch_tile(mPool, mIdx, n, hv, tile, tidx, min_valid_slot)
            # Everything below may read what the previous kernel wrote.
            cute.arch.griddepcontrol_wait()
            # Let the next launch start its own prefetch now. Not before the wait: then
            # launches would chain ahead without bound, each holding SM slots while waiting.
            cute.arch.griddepcontrol_launch_dependents()

        slot = self.read_slot(mIdx, mAccepted, n)
        if const_expr(prefetch_later and self.prefetch_ahead > 0):
            if tidx == 0:
                self.prefetch_later_tile(mPool, mIdx, mAccepted, bid, min_valid_slot)
        return slot

    @cute.jit
    def read_slot(self, mIdx: cute.Tensor, mAccepted: cute.Tensor, n) -> Int64:
        """The slot request n reads: idx[n], or per-token idx[n, num_accepted[n] - 1] (the
        column clamped into the row; the caller rejects a num_accepted outside 1..T)."""
        if const_expr(self.per_token_slots):
            column = cutlass.max(cutlass.min(Int32(mAccepted[n]), Int32(self.T)), Int32(1)) - 1
            return Int64(mIdx[n, column])
        return Int64(mIdx[n])

    @cute.jit
    def load_rows(self, gS: cute.Tensor, lane: Int32, rows) -> cute.Tensor:
        """This thread's columns of its rows of a [V, K] state: (vec, vecs_per_lane, rows)."""
        raw = cute.make_rmem_tensor((self.vec, self.vecs_per_lane, len(rows)), gS.element_type)
        for r in cutlass.range_constexpr(len(rows)):
            cute.autovec_copy(self.lane_columns(gS[rows[r], None], lane), raw[None, None, r])
        return raw

    @cute.jit
    def load_v(self, mV: cute.Tensor, req, hv, rows) -> cute.Tensor:
        """v of this thread's rows, every token: (rows, T) in float32."""
        v_in = cute.make_rmem_tensor((len(rows), self.T), Float32)
        for t in cutlass.range_constexpr(self.T):
            row, tok = self.token(req, t)
            for r in cutlass.range_constexpr(len(rows)):
                v_in[r, t] = Float32(mV[row, tok, hv, rows[r]])
        return v_in

    @cute.jit
    def store_rows(self, frag: cute.Tensor, dst: cute.Tensor, lane: Int32, rows,
                   streaming: bool = False):
        """Write this thread's rows (registers) to a [V, K] state, converting once if need be.
        streaming: float32 rows as 16-byte st.global.cs (evict first)."""
        out = frag
        if const_expr(frag.element_type != dst.element_type):
            out = cute.make_rmem_tensor(frag.shape, dst.element_type)
            out.store(frag.load().to(dst.element_type))
        for r in cutlass.range_constexpr(len(rows)):
            columns = self.lane_columns(dst[rows[r], None], lane)
            if const_expr(streaming):
                assert dst.element_type == Float32 and self.vec == 4
                for v in cutlass.range_constexpr(self.vecs_per_lane):
                    words = [Float32(out[e, v, r]).ir_value() for e in range(4)]
                    llvm.inline_asm(None, [columns[None, v].iterator.llvm_ptr, *words],
                                    "st.global.cs.v4.f32 [$0], {$1, $2, $3, $4};",
                                    "l,f,f,f,f", has_side_effects=True)
            else:
                cute.autovec_copy(out[None, None, r], columns)

    def thread_rows(self, tidx: Int32, tile):
        """(this thread's lane among those sharing its rows, its rows of the head's [V, K] state)."""
        row0 = tile * self.rows_per_cta + tidx // self.lanes_per_row
        return tidx % self.lanes_per_row, [row0 + r * self.groups
                                           for r in range(self.rows_per_thread)]

    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mA: cute.Tensor, mB: cute.Tensor,
        mALog: cute.Tensor, mDtBias: cute.Tensor, mPool: cute.Tensor, mIdx: cute.Tensor,
        mOut: cute.Tensor, mFlag: cute.Tensor, mInter: cute.Tensor, mInterIdx: cute.Tensor,
        mAccepted: cute.Tensor, mCuSeqlens: cute.Tensor, scale: Float32, min_valid_slot: Int32,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        # Consecutive CTAs walk one request's heads tile by tile, so the CTAs in flight
        # read few, long runs of contiguous state rather than one tile of many slots.
        tile, hv, n = bid % self.tiles, (bid // self.tiles) % self.HV, bid // (self.tiles * self.HV)
        lane, rows = self.thread_rows(tidx, tile)
        T = self.T

        smem = cutlass.utils.SmemAllocator()
        units = self.allocate_units(smem)
        # sGate[:, t] = token t's decay, beta and (for this class) k̂·q̂.
        sGate = smem.allocate_tensor(Float32, cute.make_layout((3, T), stride=(T, 1)),
                                     byte_alignment=16)

        slot = self.begin(mPool, mIdx, mAccepted, bid, n, hv, tile, tidx, min_valid_slot)
        valid = slot >= Int64(min_valid_slot) and slot < Int64(mPool.shape[0])
        out_of_range = slot >= Int64(mPool.shape[0])
        inter_row = Int64(n)
        if const_expr(self.intermediate == "indexed"):
            inter_row = Int64(mInterIdx[n])
            valid = valid and inter_row >= Int64(min_valid_slot) and inter_row < Int64(mInter.shape[0])
            out_of_range = out_of_range or inter_row >= Int64(mInter.shape[0])
        if const_expr(self.per_token_slots):
            accepted = Int32(mAccepted[n])
            valid = valid and accepted >= 1 and accepted <= T
            out_of_range = out_of_range or accepted < 1 or accepted > T
        # What the CTA knows of its request: its row n of the batch, its intermediate row,
        # and (ragged rows) where its tokens start and how many there are.
        req = (n, inter_row, Int32(0), Int32(T))
        # Ragged rows: a malformed row (past T tokens, or past the inputs) is an error and
        # touches nothing, its output included; a row of no tokens does nothing.
        well_formed = True
        if const_expr(self.ragged):
            start = Int32(mCuSeqlens[n])
            length = Int32(mCuSeqlens[n + 1]) - start
            malformed = (start < 0 or length < 0 or length > T
                         or start + length > Int32(mQ.shape[1]))
            well_formed = (start >= 0 and length >= 0 and length <= T
                           and start + length <= Int32(mQ.shape[1]))
            valid = valid and well_formed and length >= 1
            out_of_range = out_of_range or malformed
            req = (n, inter_row, start, length)
        if out_of_range and tidx == 0:
            mFlag[0] = Int32(1)

        if valid:  # uniform over the CTA, so the barriers are safe
            # 1. Issue the state loads first: they are the bytes that matter.
            gS = mPool[slot, hv, None, None]
            raw = self.load_rows(gS, lane, rows)
            # 2. While they fly: this thread's rows' v (issued now, so their latency is not
            #    behind the staging), then every token's inputs in shared memory.
            v_in = self.load_v(mV, req, hv, rows)
            self.stage_inputs(mQ, mK, mA, mB, mALog, mDtBias, units, sGate, req,
                              hv // (self.HV // self.H), hv, tidx // 32, tidx % 32, scale)
            cute.arch.barrier()
            # 3. The T tokens.
            self.run_tokens(mOut, mInter, mPool, mIdx, mFlag, gS, raw, v_in, units, sGate, req,
                            hv, tidx, lane, rows, min_valid_slot)
        else:
            if lane == 0 and well_formed:
                for t in cutlass.range_constexpr(T):
                    if self.has_token(req, t):
                        row, tok = self.token(req, t)
                        for r in rows:
                            mOut[row, tok, hv, r] = mOut.element_type(0.0)

    @cute.jit
    def has_token(self, req, t: int):
        """Whether the request has a token t: always, but for a ragged row shorter than t + 1."""
        if const_expr(self.ragged):
            return Int32(t) < req[3]
        return True

    @cute.jit
    def token(self, req, t):
        """Where token t of the request is: (n, t) of [B, T, ...] inputs, or for ragged rows
        (0, start + t) of [1, N, ...] ones. A ragged row's tokens past its length read its
        last token, so that every read stays inside the row; they are never written."""
        n, _, start, length = req
        if const_expr(self.ragged):
            return 0, start + cutlass.min(Int32(t), length - Int32(1))
        return n, t

    @cute.jit
    def run_tokens(self, mOut: cute.Tensor, mInter: cute.Tensor, mPool: cute.Tensor,
                   mIdx: cute.Tensor, mFlag: cute.Tensor, gS: cute.Tensor, raw: cute.Tensor,
                   v_in: cute.Tensor, sUnit: cute.Tensor, sGate: cute.Tensor, req, hv,
                   tidx: Int32, lane: Int32, rows, min_valid_slot: Int32):
        """The request's tokens on this thread's rows of the state gS ([V, K]), `raw` as
        loaded and the inputs staged; write the outputs and the states. The state stays in
        float32 registers throughout."""
        R, T = self.rows_per_thread, self.T
        state = cute.make_rmem_tensor((self.vec, self.vecs_per_lane, R), Float32)
        state.store(raw.load().to(Float32))
        for t in cutlass.range_constexpr(T):
            if self.has_token(req, t):  # uniform over the CTA
                k_hat = self.lane_columns(sUnit[None, 0, t], lane).load()
                q_hat = self.lane_columns(sUnit[None, 1, t], lane).load()
                decay, beta = sGate[DECAY, t], sGate[BETA, t]
                row, tok = self.token(req, t)
                for r in cutlass.range_constexpr(R):
                    s = state[None, None, r].load()
                    sk = self.row_sum((s * k_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
                    sq = self.row_sum((s * q_hat).reduce(cute.ReductionOp.ADD, Float32(0.0), 0))
                    u = beta * (v_in[r, t] - decay * sk)
                    state[None, None, r].store(s * decay + k_hat * u)
                    # All 8 lanes of the row hold o and store it to one address, one store
                    # winning: a lane-0 branch here split the token loop into blocks per row,
                    # which cost registers and ~10% at T = 4.
                    mOut[row, tok, hv, rows[r]] = (decay * sq + u * sGate[KQ, t]).to(
                        mOut.element_type)
                if const_expr(self.intermediate is not None):
                    self.store_rows(state, mInter[req[1], t, hv, None, None], lane, rows,
                                    streaming=self.streaming_rows)
                if const_expr(self.per_token_slots):
                    self.store_token_slot(state, mPool, mIdx, mFlag, req[0], t, hv, tidx, lane,
                                          rows, min_valid_slot)

        if const_expr(self.update_state):
            self.store_rows(state, gS, lane, rows)

    @cute.jit
    def store_token_slot(self, state: cute.Tensor, mPool: cute.Tensor, mIdx: cute.Tensor,
                         mFlag: cute.Tensor, n, t: int, hv, tidx: Int32, lane: Int32, rows,
                         min_valid_slot: Int32):
        """Per-token slots: the state after token t to slot idx[n, t], unless that is padding
        (skipped) or out of range (skipped, the error flag set)."""
        slot = Int64(mIdx[n, t])
        if slot >= Int64(min_valid_slot) and slot < Int64(mPool.shape[0]):
            self.store_rows(state, mPool[slot, hv, None, None], lane, rows)
        if slot >= Int64(mPool.shape[0]) and tidx == 0:
            mFlag[0] = Int32(1)
