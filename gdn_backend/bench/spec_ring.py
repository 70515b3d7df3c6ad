"""The benchmark's spec-ring cells: SGLang's --enable-linear-replayssm-spec step, ours and
SGLang's, against the intermediate-state verify it replaces.

A step is what SGLang runs for a GDN layer in one speculative round: the chain verify of T
drafts on the spec ring, the cursor advance by the accepted counts (SGLang's own kernel on
both sides, elementwise on the batch) and the commit's fold. Every request accepts all T
tokens and the rows' cursors are staggered over the W a row can hold at a verify (0, T,
..., up to L - 2T), so each step folds the rows whose ring is full: a third of them at
T = 4, L = 16, the steady state. One graph replays every slot set once, so a replay moves
every row one round on; its time per set is the step's. The fold runs one layer (SGLang's
folds every layer in one launch: per layer, its launch cost is smaller than here).

Held against: our intermediate-state verify of the same batch (bench mode `verify`) plus a
device copy of one state per request, the floor of SGLang's commit copy from the
intermediate buffer to the pool (`baseline_us`; the goal is ours <= 0.4 of it), and a
copy of those bytes (`copy_us`: one state read, T written, then one read and written).
"""

from __future__ import annotations

import importlib
import math

import torch

from ..replayssm_spec import replayssm_spec_fold, replayssm_spec_verify
from .cells import COLD_BYTES, MAX_SETS, POOLS, SHAPES, Cell, K, V, copy_of, set_rows
from .sglang import SPEC_RING
from .tiles import forced_tile, tile_name
from .timing import settle, time_graph

RING = 16  # SGLang's --linear-replayssm-cache-len default


class SpecCell:
    mode = "spec"

    def __init__(self, shape: str, pool: str, B: int, T: int, seed: int = 0):
        self.shape, self.pool_name, self.B, self.T = shape, pool, B, T
        self.H, self.HV = SHAPES[shape]
        self.valid = B - 1 if B >= 4 else B
        dtype = POOLS[pool]
        self.slot_bytes = self.HV * V * K * dtype.itemsize
        self.sets = max(2, min(MAX_SETS, math.ceil(COLD_BYTES / (self.valid * self.slot_bytes))))
        gen = torch.Generator().manual_seed(seed)
        P = R = 1 + self.sets * self.valid   # slot 0 and row 0 are the padding row's
        order = (torch.randperm(P - 1, generator=gen) + 1).view(self.sets, self.valid)
        rows = (torch.randperm(R - 1, generator=gen) + 1).view(self.sets, self.valid)
        pad = torch.full((self.sets, B - self.valid), -1, dtype=torch.long)
        self.indices = set_rows(torch.cat([order, pad], 1).to(torch.int32))
        self.rows = set_rows(torch.cat([rows, pad + 1], 1).to(torch.int32))
        self.accept = torch.tensor([T] * self.valid + [0] * (B - self.valid), dtype=torch.int32,
                                   device="cuda")

        L, H, HV = RING, self.H, self.HV
        keys = torch.randn(1, R, H, L, K, device="cuda")
        keys = keys / keys.norm(dim=-1, keepdim=True)
        d = torch.randn(1, R, HV, L, V, device="cuda") * 0.3
        self.held = [0, *range(T, L - 2 * T + 1, T)]  # W at a verify, before the fold
        staggered = torch.tensor(self.held, dtype=torch.int32)[torch.arange(R) % len(self.held)]
        self.state = dict(
            checkpoint=(torch.randn(1, P, HV, V, K, device="cuda") * 0.5).to(dtype),
            ring_d=d.bfloat16(), ring_d_low=(d - d.bfloat16().float()).bfloat16(),
            ring_k=keys.bfloat16(), ring_k_low=(keys - keys.bfloat16().float()).bfloat16(),
            ring_g=-torch.rand(1, R, HV, L, device="cuda"),
            write_pos=staggered.cuda(), cache_base=torch.randint(0, L, (R,), generator=gen,
                                                                 dtype=torch.int32).cuda(),
            is_flush=torch.zeros(R, dtype=torch.int8, device="cuda"))
        self.theirs = {name: t.clone() for name, t in self.state.items()}

        N = B * T
        self.q, self.k = (torch.randn(N, H, K, generator=gen).bfloat16().cuda() for _ in range(2))
        self.v = torch.randn(N, HV, V, generator=gen).bfloat16().cuda()
        self.a, self.b = (torch.randn(N, HV, generator=gen).bfloat16().cuda() for _ in range(2))
        self.cu_seqlens = torch.arange(0, N + 1, T, dtype=torch.int32, device="cuda")
        self.A_log = (torch.rand(HV, generator=gen) * 15 + 1).log().cuda()
        self.dt_bias = torch.randn(HV, generator=gen).cuda()
        self.out = torch.empty(1, N, HV, V, dtype=torch.bfloat16, device="cuda")

        # Bytes a step moves, per request on average: the checkpoint and the W records read,
        # the window's T records appended, the fold's share (a state read and written, its
        # W + T records read, once in len(held) steps).
        record = (HV * V + H * K) * 2 * 2 + HV * 4
        W = sum(self.held) / len(self.held)
        fold = (2 * self.slot_bytes + (W + T) * record) / len(self.held)
        self.bytes = int(self.valid * (self.slot_bytes + (W + T) * record + fold))
        # The intermediate-state verify's bytes and the commit copy's.
        self.copy_bytes = self.valid * self.slot_bytes * (1 + T + 2)

    def layer(self, state: dict) -> tuple:
        return (state["ring_d"][0], state["ring_k"][0], state["ring_g"][0],
                state["ring_d_low"][0], state["ring_k_low"][0])

    def verify(self, i: int) -> None:
        s = self.state
        replayssm_spec_verify(self.q[None], self.k[None], self.v[None], self.a[None],
                              self.b[None], self.A_log, self.dt_bias, s["checkpoint"][0],
                              *self.layer(s), self.cu_seqlens, self.indices[i], self.rows[i],
                              s["write_pos"], s["cache_base"], s["is_flush"],
                              max_tokens=self.T, out=self.out)

    def advance(self, state: dict, i: int) -> None:
        """SGLang's cursor advance (commit_gdn_replayssm_spec), the same on both sides."""
        commit_gdn_replayssm_spec = importlib.import_module(SPEC_RING).commit_gdn_replayssm_spec
        commit_gdn_replayssm_spec(
            write_pos=state["write_pos"], cache_base=state["cache_base"],
            is_flush=state["is_flush"], num_accepted=self.accept, replay_indices=self.rows[i],
            max_cache_len=RING, max_spec_len=self.T, fold_every_commit=False, null_block_id=-1)

    def ours(self, i: int) -> None:
        """gdn_backend's step on slot set i: verify, SGLang's advance, our fold."""
        s = self.state
        self.verify(i)
        self.advance(s, i)
        replayssm_spec_fold(s["checkpoint"], s["ring_d"], s["ring_k"], s["ring_g"],
                            s["ring_d_low"], s["ring_k_low"], self.indices[i], self.rows[i],
                            s["write_pos"], s["cache_base"], s["is_flush"], self.accept)

    def sglang_verify(self, i: int) -> None:
        """SGLang's verify on slot set i (its GDNAttnBackend's launch)."""
        kernels = importlib.import_module(SPEC_RING)
        s = self.theirs
        kernels.gdn_replayssm_spec_decode(
            q=self.q, k=self.k, v=self.v, a=self.a, b=self.b, A_log=self.A_log,
            dt_bias=self.dt_bias, checkpoint_state=s["checkpoint"][0], d_cache=s["ring_d"][0],
            k_cache=s["ring_k"][0], g_cache=s["ring_g"][0], rawv_cache=s["ring_d_low"][0],
            rawk_cache=s["ring_k_low"][0], beta_cache=None, out=self.out[0],
            query_start_loc=self.cu_seqlens, ssm_state_indices=self.indices[i],
            replay_indices=self.rows[i], write_pos=s["write_pos"], cache_base=s["cache_base"],
            is_flush=s["is_flush"], max_cache_len=RING, max_spec_len=self.T, scale=K ** -0.5,
            use_qk_l2norm_in_kernel=True, null_block_id=-1, launch_mode="verify")

    def sglang(self, i: int) -> None:
        """SGLang's step on slot set i, as its GDNAttnBackend and commit run it."""
        kernels = importlib.import_module(SPEC_RING)
        s = self.theirs
        self.sglang_verify(i)
        self.advance(s, i)
        kernels.commit_gdn_replayssm_circular(
            checkpoint_state=s["checkpoint"], d_cache=s["ring_d"], k_cache=s["ring_k"],
            g_cache=s["ring_g"], d_residual_cache=s["ring_d_low"],
            k_residual_cache=s["ring_k_low"], state_batch_indices=self.indices[i],
            replay_indices=self.rows[i], write_pos=s["write_pos"], cache_base=s["cache_base"],
            is_flush=s["is_flush"], accept_lens=self.accept, null_block_id=-1)


def time_cell(cell: SpecCell, replays: int, tiles=()) -> dict:
    """The row of one cell: ours, SGLang's step (its advance is on both sides), the baseline."""
    settle(cell.ours, cell.sets)
    ours = time_graph(cell.ours, cell.sets, replays)
    baseline = Cell("verify", cell.shape, cell.pool_name, cell.B, cell.T)
    verify_us = time_graph(baseline.classic, baseline.sets, replays)
    commit_copy = time_graph(baseline.copy_of(2 * cell.valid * cell.slot_bytes), baseline.sets,
                             replays)
    del baseline
    copy = time_graph(copy_of(cell.sets, cell.copy_bytes), cell.sets, replays)
    row = dict(mode="spec", shape=cell.shape, pool=cell.pool_name, T=cell.T, B=cell.B,
               valid=cell.valid, bytes=cell.bytes, sets=cell.sets, ours_us=ours, copy_us=copy,
               ratio=ours / copy, tbps=cell.bytes / (ours * 1e-6) / 1e12,
               spec_verify_us=time_graph(cell.verify, cell.sets, replays),
               baseline_us=verify_us + commit_copy, goal=ours / (verify_us + commit_copy))
    row["sglang_us"] = time_graph(cell.sglang, cell.sets, replays)
    row["sglang_verify_us"] = time_graph(cell.sglang_verify, cell.sets, replays)
    for tile in tiles:  # the verify and the fold at each tile, steps otherwise the same
        with forced_tile(tile):
            name = tile_name(tile)
            row.setdefault("tile_us", {})[name] = time_graph(cell.ours, cell.sets, replays)
            # The verify alone, so that the step's gain at a tile splits between its kernels.
            row.setdefault("tile_verify_us", {})[name] = time_graph(cell.verify, cell.sets,
                                                                    replays)
    return row
