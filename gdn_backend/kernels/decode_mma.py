"""The pooled decode on tensor cores, for bf16 pools and up to four tokens.

Same contract, prologue and input staging as `GatedDeltaRuleDecode` (decode.py); what
a warp does with its rows of state differs. The CUDA-core kernel issues about 4 FP
operations per state element and token, plus its share of the row reductions, and on a
bf16 pool at T = 4 that issue, not the bytes, bounds the step (docs/perf_log.md). Here
the per-element work runs on mma.sync (m16n8k16, bf16 in, float32 accumulate):

1. Dᵀ = X · S0ᵀ, X = [k̂_0, q̂_0, k̂_1, q̂_1, ...]: the staged unit vectors, each split
   into a bf16 high part (rows 0-7 of the MMA's A) and a bf16 low part (rows 8-15; what
   the split leaves out is 2^-16 of the value), times the state as loaded (bf16, so exact
   as an operand): every row's 2T dot products, with no shuffles. A pass through shared
   memory turns them around, so a lane reads its own rows' products.
2. The Gram matrix of the vectors, by the same A, gives the token-pair products
   k̂_s·k̂_t and k̂_s·q̂_t.
3. The T-token recurrence runs per row on scalars. With p_x = S·x for every vector x
   still to come, token t takes u_t = β_t (v_t − a_t p_{k̂_t}),
   o_t = a_t p_{q̂_t} + u_t k̂_t·q̂_t and updates p_x = a_t p_x + u_t k̂_t·x: the
   per-token update of decode.py, applied to projections of the state.
4. S_T = (Π_t a_t) S0 + Σ_t w_t u_t k̂_tᵀ (w_t: the decays after token t), one MMA per 16
   rows and 8 columns, whose K dimension pairs (w u high, w u low) with (k̂ high, k̂ low)
   of each token: four tokens fill its 16. Where every token's state is written
   (intermediate states, SGLang's verify), step 4 runs once per token t, with the
   weights of S_t, from S0 as loaded; the last is the new state.

Columns. Lane (g, c) = (lane / 4, lane % 4) of a warp holds rows g, g + 8, g + 16, ...
An MMA fragment gives a lane, of every 16 columns, columns 2c, 2c + 1, 2c + 8 and 2c + 9;
a dot product does not care about the order of its columns, so those are taken to be
one 16-byte vector of each row: lane c holds the vectors c, c + 4, c + 8 and c + 12, and
a quad reads 64 contiguous bytes of a row. Step 1's B operand is then two adjacent
registers of a loaded vector, and step 4's accumulator for the 8-column block 4j + b
lands on elements 2b, 2b + 1 of the lane's vector j of rows g and g + 8, so the new
state replaces the old in the registers it was read into.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T as ir

from .decode import BETA, DECAY, GatedDeltaRuleDecode
from .heuristics import MMA_LANES_PER_ROW, MMA_TOKENS

MMA_ROWS = 16
# Tokens step 4's K dimension holds, and the vectors staged for them (k̂, q̂ each): N of step 1.
MAX_TOKENS = max(MMA_TOKENS)
VECTORS = 2 * MAX_TOKENS
# Shared-memory strides in words, padded so that the lanes of a quarter warp reach
# different banks: per staged vector (K words: its high and low parts), per (column,
# token) of step 4's k̂ words, and per row of the turned-around dot products.
VECTOR_STRIDE = 128 + 4
KHAT_STRIDE = 16 + 4
DOTS_STRIDE = VECTORS + 4


def mma_bf16(a, b, c):
    """D = A·B + C, one warp-wide m16n8k16: A is 4 words of bf16 pairs, B 2, C and D 4 float32."""
    d = llvm.inline_asm(
        llvm.StructType.get_literal([ir.f32()] * 4),
        [Int32(x).ir_value() for x in (*a, *b)] + [Float32(x).ir_value() for x in c],
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
    return [Float32(llvm.extractvalue(ir.f32(), d, [i])) for i in range(4)]


def bf16_pair(low: Float32, high: Float32) -> Int32:
    """One word of two bf16 (round to nearest), `low` in bits 0-15."""
    return Int32(llvm.inline_asm(ir.i32(), [Float32(high).ir_value(), Float32(low).ir_value()],
                                 "cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f"))


def bf16_residual(x: Float32) -> Float32:
    """What rounding x to bf16 leaves out: x = bf16(x) + residual, exactly."""
    return x - Float32(BFloat16(x))


def quad_rows(kernel, tidx: Int32, tile):
    """(lane c of the quad, rows) of a thread of a quad-layout kernel: lane (g, c) of warp w
    holds rows g, g + 8, g + 16, ... of the warp's `warp_rows`."""
    row = tile * kernel.rows_per_cta + tidx // 32 * kernel.warp_rows + tidx % 32 // 4
    return tidx % 4, [row + r * (MMA_ROWS // 2) for r in range(kernel.rows_per_thread)]


@cute.jit
def stage_split_words(sVec: cute.Tensor, n: int, unit, warp_lane: Int32):
    """This lane's 4 columns of staged vector n as the words (high 0-1, low 0-1, high 2-3,
    low 2-3), an MMA's A fragment in one 16-byte read; returns the columns in float32."""
    x = cute.make_rmem_tensor((4,), Float32)
    x.store(unit)
    words = cute.make_rmem_tensor((4,), Int32)
    for half in cutlass.range_constexpr(2):
        a, b = x[2 * half], x[2 * half + 1]
        words[2 * half] = bf16_pair(a, b)
        words[2 * half + 1] = bf16_pair(bf16_residual(a), bf16_residual(b))
    cute.autovec_copy(words, sVec[None, warp_lane, n])
    return x


@cute.jit
def pair_products(own_gram, T: int):
    """The window's token-pair products from the Gram matrix's fragments (lane (g, c) holds
    vector g times vectors 2c, 2c + 1): kk[s][t] = k̂_s·k̂_t (s < t), kq[s][t] = k̂_s·q̂_t
    (s <= t), on every lane."""
    kk = [[Float32(0.0)] * T for _ in range(T)]
    kq = [[Float32(0.0)] * T for _ in range(T)]
    for s in cutlass.range_constexpr(T):
        for t in cutlass.range_constexpr(s, T):
            kk[s][t] = cute.arch.shuffle_sync(own_gram[0], offset=8 * s + t)
            kq[s][t] = cute.arch.shuffle_sync(own_gram[1], offset=8 * s + t)
    return kk, kq


@cute.jit
def row_window(projections: cute.Tensor, v_in: cute.Tensor, r: int, decay, beta, kk, kq,
               weights, lane: Int32, T: int):
    """Step 3 on one row, the same in the four lanes of a quad, from its projections
    p_k[x] = S·k̂_x, p_q[x] = S·q̂_x (staged in shared memory): (o_c, weights[c] u_c) of this
    lane's token c (u_c alone if `weights` is None)."""
    own = cute.make_rmem_tensor((VECTORS,), Float32)
    cute.autovec_copy(projections, own)
    p_k = [own[2 * x] for x in range(T)]
    p_q = [own[2 * x + 1] for x in range(T)]
    o_mine = Float32(0.0)
    mine = Float32(0.0)
    for t in cutlass.range_constexpr(T):
        u = beta[t] * (v_in[r, t] - decay[t] * p_k[t])
        o = decay[t] * p_q[t] + u * kq[t][t]
        for x in cutlass.range_constexpr(t + 1, T):
            p_k[x] = decay[t] * p_k[x] + u * kk[t][x]
            p_q[x] = decay[t] * p_q[x] + u * kq[t][x]
        # Selects, not a branch per token and row: the branches held registers
        # (96 against 80) and cost 6% at T = 4 (docs/perf_log.md, v9).
        o_mine = Float32(cutlass.select_(lane == t, o, o_mine))
        mine = Float32(cutlass.select_(lane == t, u if weights is None else weights[t] * u, mine))
    return o_mine, mine


def update_words(mine):
    """Step 4's A words of each row's weighted u: (high, high) and (low, low) bf16 pairs."""
    high = [bf16_pair(x, x) for x in mine]
    low = [bf16_pair(bf16_residual(x), bf16_residual(x)) for x in mine]
    return high, low


def token_weight(decay, t: int, lane: Int32, T: int) -> Float32:
    """The weight of this lane's token c in the state after token t: the decays after it,
    a_{c+1} ... a_t, for c ≤ t; 0 for later tokens (and for lanes past T)."""
    weight = Float32(0.0)
    for c in range(min(t, T - 1) + 1):
        after = Float32(1.0)
        for x in range(c + 1, t + 1):
            after = after * decay[x]
        weight = Float32(cutlass.select_(lane == c, after, weight))
    return weight


class GatedDeltaRuleDecodeMMA(GatedDeltaRuleDecode):
    """A warp owns `rows_per_thread` / 2 blocks of 16 rows of a head's state; its staged
    vectors and token-pair products serve all of them."""

    lanes_per_row = MMA_LANES_PER_ROW

    def __init__(self, *, rows_per_cta: int, rows_per_thread: int, **options):
        super().__init__(rows_per_cta=rows_per_cta, rows_per_thread=rows_per_thread, **options)
        assert self.vec == 8, "the tensor-core decode serves bf16 pools"
        # One slot a request, rows of equal length (heuristics.serves).
        assert 1 <= self.T <= MAX_TOKENS
        assert not (self.per_token_slots or self.ragged)
        # A lane stages one 4-column group of each vector (K/32 = 4), as 16 bytes.
        assert rows_per_thread % 2 == 0 and self.K == 128
        self.warp_rows = MMA_ROWS * rows_per_thread // 2
        assert rows_per_cta % self.warp_rows == 0
        self.warps = rows_per_cta // self.warp_rows

    def thread_rows(self, tidx: Int32, tile):
        return quad_rows(self, tidx, tile)

    def smem_bytes(self) -> int:
        words = (VECTORS * VECTOR_STRIDE + self.K // 8 * MAX_TOKENS * KHAT_STRIDE
                 + self.warps * self.rows_per_thread * 8 * DOTS_STRIDE + 3 * self.T)
        return words * 4 + 64

    def allocate_units(self, smem):
        """sVec[:, q, n]: columns 4q..4q+3 of vector n (k̂_t at n = 2t, q̂_t at 2t + 1) as
        the words (high 0-1, low 0-1, high 2-3, low 2-3): one 16-byte read is an A fragment.
        sKhat[b, t, g]: k̂_t of column g of 8-column block b as (high, low), step 4's B.
        sDots[:, i, r, w]: warp w's dot products of row 8r + i with each vector."""
        sVec = smem.allocate_tensor(Int32, cute.make_layout(
            (4, self.K // 4, VECTORS), stride=(1, 4, VECTOR_STRIDE)), byte_alignment=16)
        sKhat = smem.allocate_tensor(Int32, cute.make_layout(
            (self.K // 8, MAX_TOKENS, 8), stride=(1, KHAT_STRIDE, MAX_TOKENS * KHAT_STRIDE)),
            byte_alignment=16)
        R = self.rows_per_thread
        sDots = smem.allocate_tensor(Float32, cute.make_layout(
            (VECTORS, 8, R, self.warps),
            stride=(1, DOTS_STRIDE, 8 * DOTS_STRIDE, 8 * DOTS_STRIDE * R)), byte_alignment=16)
        return sVec, sKhat, sDots

    @cute.jit
    def stage_unit_vectors(self, units, sGate: cute.Tensor, t: int, k_unit, q_unit,
                           warp_lane: Int32):
        """Token t's k̂ and q̂ as high and low words (step 1's A), and k̂ once more as
        (high, low) words at the place of each column in step 4's B fragments."""
        sVec, sKhat, _ = units
        for j, unit in ((0, k_unit), (1, q_unit)):
            x = stage_split_words(sVec, 2 * t + j, unit, warp_lane)
            if const_expr(j == 0):
                for e in cutlass.range_constexpr(4):
                    # Column p is element w of 16-byte vector v: lane (g, c) of step 4 with
                    # c = v % 4, g = 2 (v % 4) + w % 2 supplies it for block 4 (v / 4) + w / 2.
                    p = warp_lane * 4 + e
                    v, w = p // 8, p % 8
                    sKhat[v // 4 * 4 + w // 2, t, v % 4 * 2 + w % 2] = bf16_pair(
                        x[e], bf16_residual(x[e]))

    @cute.jit
    def run_tokens(self, mOut: cute.Tensor, mInter: cute.Tensor, mPool: cute.Tensor,
                   mIdx: cute.Tensor, mFlag: cute.Tensor, gS: cute.Tensor, raw: cute.Tensor,
                   v_in: cute.Tensor, units, sGate: cute.Tensor, req, hv, tidx: Int32,
                   lane: Int32, rows, min_valid_slot: Int32):
        sVec, sKhat, sDots = units
        T, R = self.T, self.rows_per_thread
        warp, g = tidx // 32, tidx % 32 // 4

        # Steps 1 and 2. S0[word, j, r]: words 2i, 2i + 1 of vector j of row r are B's
        # columns of k-block 2j + i. vec[:, 2j + i]: vector g's A fragment for that k-block
        # (zero past 2T vectors).
        S0 = cute.recast_tensor(raw, Int32)
        vec = cute.make_rmem_tensor((4, 2 * self.vecs_per_lane), Int32)
        if const_expr(T < MAX_TOKENS):
            vec.fill(0)
        if g < 2 * T:
            for j in cutlass.range_constexpr(self.vecs_per_lane):
                for i in cutlass.range_constexpr(2):
                    cute.autovec_copy(sVec[None, (j * 4 + lane) * 2 + i, g], vec[None, 2 * j + i])
        dots = [[Float32(0.0)] * 4 for _ in range(R)]
        gram = [[Float32(0.0)] * 4 for _ in range(2)]
        for kb in cutlass.range_constexpr(self.K // 16):
            j, i = kb // 2, kb % 2
            a = [vec[x, kb] for x in range(4)]
            for r in cutlass.range_constexpr(R):
                dots[r] = mma_bf16(a, (S0[2 * i, j, r], S0[2 * i + 1, j, r]), dots[r])
            for part in cutlass.range_constexpr(2):
                gram[part] = mma_bf16(a, (a[part], a[part + 2]), gram[part])
        # Lane (g, c) holds vector g times rows 8r + 2c, 8r + 2c + 1 (A's rows g and g + 8
        # are its high and low parts): through shared memory, each lane gets its own rows.
        for r in cutlass.range_constexpr(R):
            for e in cutlass.range_constexpr(2):
                sDots[g, 2 * lane + e, r, warp] = dots[r][e] + dots[r][e + 2]
        cute.arch.sync_warp()
        # x_g·k̂_c and x_g·q̂_c of vector g, of both parts.
        own_gram = [gram[0][e] + gram[0][e + 2] + gram[1][e] + gram[1][e + 2] for e in range(2)]

        # Step 3.
        kk, kq = pair_products(own_gram, T)
        decay = [sGate[DECAY, t] for t in range(T)]
        beta = [sGate[BETA, t] for t in range(T)]
        # w[t]: the decays after token t, by which u_t k̂_tᵀ reaches S_T.
        w = [Float32(1.0)] * T
        for t in cutlass.range_constexpr(T - 2, -1, -1):
            w[t] = w[t + 1] * decay[t + 1]
        # Of this lane's token c, for each of its rows: o_c, and w_c u_c (step 4's A); u_c
        # alone where intermediate states take their own weights.
        intermediate = self.intermediate is not None
        o_mine = [Float32(0.0)] * R
        mine = [Float32(0.0)] * R
        for r in cutlass.range_constexpr(R):
            o_mine[r], mine[r] = row_window(sDots[None, g, r, warp], v_in, r, decay, beta, kk,
                                            kq, None if intermediate else w, lane, T)
        if lane < T:
            for r in cutlass.range_constexpr(R):
                mOut[req[0], lane, hv, rows[r]] = o_mine[r].to(mOut.element_type)

        if const_expr(intermediate):
            khat = self.lane_khat(sKhat, lane, g)
            # S_t = (a_0 ... a_t) S0 + Σ_{c ≤ t} (a_{c+1} ... a_t) u_c k̂_cᵀ: step 4 again for
            # every token, with its own weights, each state straight to its intermediate row
            # (column block by column block: token by token held 40 more registers). The last
            # is the new state.
            inter = mInter[req[1], None, hv, None, None]
            words = [update_words([token_weight(decay, t, lane, T) * u for u in mine])
                     for t in range(T)]
            prefix_decay = [decay[0]] * T
            for t in cutlass.range_constexpr(1, T):
                prefix_decay[t] = prefix_decay[t - 1] * decay[t]
            for j in cutlass.range_constexpr(self.vecs_per_lane):
                for t in cutlass.range_constexpr(T):
                    new = self.updated_block(raw, *words[t], khat, prefix_decay[t], j)
                    out = cute.make_rmem_tensor((8, R), mInter.element_type)
                    out.store(new.load().to(mInter.element_type))
                    for r in cutlass.range_constexpr(R):
                        cute.autovec_copy(out[None, r], cute.local_tile(
                            inter[t, rows[r], None], (8,), (j * MMA_LANES_PER_ROW + lane,)))
                    if const_expr(self.update_state and t == T - 1):
                        raw[None, j, None].store(new.load().to(BFloat16))
            if const_expr(self.update_state):
                self.store_rows(raw, gS, lane, rows)
        elif const_expr(self.update_state):
            # Step 4. A: (high, high) and (low, low) of w_c u_c for rows g + 16m, g + 16m + 8.
            high, low = update_words(mine)
            khat = self.lane_khat(sKhat, lane, g)
            total_decay = w[0] * decay[0]
            for j in cutlass.range_constexpr(self.vecs_per_lane):
                new = self.updated_block(raw, high, low, khat, total_decay, j)
                raw[None, j, None].store(new.load().to(BFloat16))
            self.store_rows(raw, gS, lane, rows)

    @cute.jit
    def lane_khat(self, sKhat, lane: Int32, g):
        """Step 4's B words of this lane's token c (zero for lanes past T)."""
        khat = cute.make_rmem_tensor((self.K // 8,), Int32)
        if const_expr(self.T < MAX_TOKENS):
            khat.fill(0)
        if lane < self.T:
            cute.autovec_copy(sKhat[None, lane, g], khat)
        return khat

    @cute.jit
    def updated_block(self, raw, high, low, khat, total_decay, j: int) -> cute.Tensor:
        """Step 4 on vector j of this thread's rows: total_decay S0 + Σ_c (weighted u_c) k̂_cᵀ,
        (8, rows) float32, from S0 as loaded (`raw`) and the update's A words."""
        R = self.rows_per_thread
        new = cute.make_rmem_tensor((8, R), Float32)
        for m in cutlass.range_constexpr(R // 2):
            a_update = (high[2 * m], high[2 * m + 1], low[2 * m], low[2 * m + 1])
            for b in cutlass.range_constexpr(4):
                d = mma_bf16(a_update, (khat[4 * j + b], khat[4 * j + b]), [Float32(0.0)] * 4)
                for r in cutlass.range_constexpr(2):
                    for e in cutlass.range_constexpr(2):
                        x = 2 * b + e
                        new[x, 2 * m + r] = (total_decay * Float32(raw[x, j, 2 * m + r])
                                             + d[2 * r + e])
        return new
