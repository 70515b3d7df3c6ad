"""One benchmark cell: a mode, a shape, a pool dtype, B requests of T tokens, and the bytes
that mode must move.

A cell's pool holds `sets` disjoint sets of scattered slots, at least 256 MiB of state in
all, so that a graph of `sets` launches back to back never finds a slot in L2. One row of
every batch of B >= 4 is padding (the last), slot 0 is never a request's slot (a peer may
use it as a padding sink). Modes (SPEC.md):

- decode: request n reads and writes its slot (T tokens).
- verify: SGLang's chain verify: the state after every token to an intermediate row (one a
  slot, so that rows too are cold), the pool left alone.
- slots: vLLM's per-token slots: request n reads slot [n, num_accepted[n] - 1] and writes
  token t's state to slot [n, t], T fresh slots a request.
- ragged: SGLang's ragged verify: request n has T - n % T tokens (T, T - 1, ..., 1, T, ...),
  in [1, N, ...] inputs with cu_seqlens, its states to intermediate rows.
- replayssm: SGLang's ReplaySSM decode (--enable-linear-replayssm, rings of L = 16 in the
  pool's dtype): one token, each request's cursor uniform over 0 .. L - 1 (the steady state:
  a 16th of the requests flush each step), force flags given and zero.
- spec: SGLang's ReplaySSM spec ring (--enable-linear-replayssm-spec): verify, cursor
  advance and commit fold, a round a step (spec_ring.py has its own cells).

Bytes a valid request must move: one state read, plus one written for each state the mode
keeps (decode 1, verify and slots T, ragged its length). ReplaySSM: the checkpoint read and
its m records, then its record appended or, on a flush, the state written. Each cell's copy
moves `copy_bytes`: its own bytes, but for ReplaySSM the classic decode step's (one state
read and written), the floor that mode is to beat.
"""

from __future__ import annotations

import math

import torch

from ..op import gated_delta_rule_decode, split_packed_qkv
from ..replayssm import replayssm_decode

MODES = ("decode", "verify", "slots", "ragged", "replayssm", "spec")
SHAPES = {"TP1": (16, 32), "TP8": (2, 4)}
POOLS = {"fp32": torch.float32, "bf16": torch.bfloat16}
K = V = 128
COLD_BYTES = 256 << 20
MAX_SETS = 1024
RING = 16  # SGLang's default --linear-replayssm-cache-len


def set_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` [sets, ...] on the GPU, each set's row starting 32 bytes apart at least: as the
    engines' per-step index tensors do (FlashInfer's bf16 kernels require it)."""
    row = t[0].numel()
    pitch = -(-row * t.element_size() // 32) * 32 // t.element_size()
    store = torch.empty(t.shape[0], pitch, dtype=t.dtype, device="cuda")
    store[:, :row] = t.flatten(1).to("cuda")
    return store[:, :row].view(t.shape)


class Cell:
    def __init__(self, mode: str, shape: str, pool: str, B: int, T: int, seed: int = 0):
        assert mode in MODES
        self.mode, self.shape, self.pool_name = mode, shape, pool
        self.H, self.HV = SHAPES[shape]
        self.B, self.T = B, T
        self.valid = B - 1 if B >= 4 else B
        self.lengths = [T - n % T if mode == "ragged" else T for n in range(B)]
        writes = {"decode": [1] * B, "verify": [T] * B, "slots": [T] * B,
                  "ragged": self.lengths, "replayssm": [1] * B}[mode]
        self.slot_bytes = self.HV * V * K * POOLS[pool].itemsize
        self.bytes = self.copy_bytes = self.slot_bytes * sum(1 + w for w in writes[: self.valid])
        self.sets = max(2, min(MAX_SETS, math.ceil(COLD_BYTES / (self.valid * self.slot_bytes))))
        gen = torch.Generator(device="cpu").manual_seed(seed)

        # Slots: a request owns one (T with per-token slots); none is slot 0.
        owned = T if mode == "slots" else 1
        P = 1 + self.sets * self.valid * owned
        self.pool = torch.randn(P, self.HV, V, K, device="cuda").mul_(0.5).to(POOLS[pool])
        order = (torch.randperm(P - 1, generator=gen) + 1).view(self.sets, self.valid, owned)
        pad = torch.full((self.sets, B - self.valid, owned), -1, dtype=torch.long)
        table = torch.cat([order, pad], dim=1).to(torch.int32)  # [sets, B, owned]
        self.indices = set_rows(table if mode == "slots" else table[..., 0])
        self.accepted = (torch.randint(1, T + 1, (B,), generator=gen).to(torch.int32).cuda()
                         if mode == "slots" else None)
        self.inter = self.inter_rows = None
        if mode in ("verify", "ragged"):
            # A row a slot, and one more: FlashInfer indexes its buffer by batch row (B rows
            # from each set's first), the others by the row indices here.
            self.inter = torch.randn(self.sets * self.valid + 1, T, self.HV, V, K,
                                     device="cuda").to(POOLS[pool])
            rows = torch.arange(self.sets * self.valid).view(self.sets, self.valid)
            self.inter_rows = set_rows(torch.cat([rows, pad[..., 0]], dim=1).to(torch.int32))

        # Inputs as SGLang hands them over: q, k, v views of one packed conv output row.
        tokens = sum(self.lengths) if mode == "ragged" else B * T
        width = 2 * self.H * K + self.HV * V
        mixed = torch.randn(tokens, width, generator=gen).to(torch.bfloat16).cuda()
        gates = [torch.randn(tokens, self.HV, generator=gen).to(torch.bfloat16).cuda()
                 for _ in range(2)]
        lead = (1, tokens) if mode == "ragged" else (B, T)
        self.mixed = mixed.view(*lead, width)
        self.q, self.k, self.v = split_packed_qkv(self.mixed, self.H, self.HV, K, V)
        self.a, self.b = (g.view(*lead, self.HV) for g in gates)
        self.cu_seqlens = None
        if mode == "ragged":
            self.cu_seqlens = torch.tensor([0, *torch.tensor(self.lengths).cumsum(0).tolist()],
                                           dtype=torch.int32, device="cuda")
        self.A_log = (torch.rand(self.HV, generator=gen) * 15 + 1).log().cuda()
        self.dt_bias = torch.randn(self.HV, generator=gen).cuda()
        self.out = torch.empty(*lead, self.HV, V, dtype=torch.bfloat16, device="cuda")
        if mode == "replayssm":
            self.make_rings(P, gen)

    def make_rings(self, P: int, gen) -> None:
        """ReplaySSM's rings for every slot, each set's cursors, and the bytes they move."""
        assert self.T == 1
        dtype = POOLS[self.pool_name]
        self.ring_d = torch.randn(P, self.HV, RING, V, device="cuda").mul_(0.5).to(dtype)
        keys = torch.randn(P, self.H, RING, K, device="cuda")
        self.ring_k = (keys / keys.norm(dim=-1, keepdim=True)).to(dtype)
        self.ring_g = -torch.rand(P, self.HV, RING, device="cuda")
        cursors = torch.randint(0, RING, (self.sets, self.B), generator=gen)
        self.cursors = set_rows(cursors.to(torch.int32))
        self.force = torch.zeros(self.B, dtype=torch.int32, device="cuda")
        record = (self.HV * V + self.H * K) * dtype.itemsize + self.HV * 4
        m = cursors[:, : self.valid].double()
        flushes = (m == RING - 1).double()
        per_set = (self.valid * self.slot_bytes + m.sum(1) * record
                   + flushes.sum(1) * self.slot_bytes + (1 - flushes).sum(1) * record)
        self.bytes = int(per_set.mean())

    @property
    def rings(self) -> tuple:
        return self.ring_d, self.ring_k, self.ring_g

    @property
    def warmup_options(self) -> dict:
        """gdn_backend.warmup's mode arguments for this cell."""
        return dict(intermediate=self.mode in ("verify", "ragged"),
                    per_token_slots=self.mode == "slots", ragged=self.mode == "ragged")

    def ours(self, i: int) -> None:
        """gdn_backend's op on slot set i."""
        if self.mode == "replayssm":
            replayssm_decode(self.q, self.k, self.v, self.a, self.b, self.A_log, self.dt_bias,
                             self.pool, *self.rings, self.cursors[i], self.indices[i],
                             force_flush=self.force, out=self.out)
            return
        self.classic(i)

    def classic(self, i: int) -> None:
        """gdn_backend's classic op (the pool's states read and written) on slot set i."""
        options = {}
        if self.inter is not None:
            options = dict(intermediate_states=self.inter, intermediate_indices=self.inter_rows[i],
                           update_state=False)
        gated_delta_rule_decode(self.q, self.k, self.v, self.a, self.b, self.A_log, self.dt_bias,
                                self.pool, self.indices[i], out=self.out,
                                num_accepted_tokens=self.accepted, cu_seqlens=self.cu_seqlens,
                                **options)

    def copy_of(self, nbytes: int):
        """fn(i): a device copy moving `nbytes`, a buffer of its own for every set."""
        return copy_of(self.sets, nbytes)


def copy_of(sets: int, nbytes: int):
    """fn(i): a device copy moving `nbytes` (read + write), from and to a buffer of its own
    for each of `sets` sets (cold both ways)."""
    n = nbytes // 2 // 256 * 64  # whole 256-byte rows: every set's buffer stays aligned
    src = torch.randint(-(1 << 30), 1 << 30, (sets, n), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    return lambda i: dst[i].copy_(src[i])
