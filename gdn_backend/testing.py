"""Random decode problems shaped the way engines hand them over.

Shared by the tests, the integration tests and the benchmark: a pool with
scattered slots, a batch with padding (and optionally out-of-range) rows, q/k/v
as views of one packed row, any slot pitch. Values are random, never zeros, so
that a kernel that skips work or misindexes cannot pass by accident.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .op import split_packed_qkv

PAD_SLOT_ID = -1


@dataclass
class DecodeProblem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    state_pool: torch.Tensor
    state_indices: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    @property
    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.a, self.b, self.A_log, self.dt_bias,
                self.state_pool, self.state_indices)

    def clone(self) -> "DecodeProblem":
        """A deep copy: same values, fresh storage, same strides (the pool keeps its pitch)."""
        kwargs = {k: copy_strided(v) if isinstance(v, torch.Tensor) else v
                  for k, v in self.kwargs.items()}
        return DecodeProblem(*(copy_strided(t) for t in self.args), kwargs=kwargs)


def copy_strided(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A copy of `t` on `device` with the same sizes and strides (views stay views of a row)."""
    base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    new_base = base.to(device if device is not None else t.device, copy=True)
    return new_base.as_strided(t.size(), t.stride(), t.storage_offset())


def strided_pool(num_slots: int, HV: int, V: int, K: int, *, dtype, device,
                 slot_pitch: int | None = None, generator=None) -> torch.Tensor:
    """A random [P, HV, V, K] pool whose slot stride is `slot_pitch` elements."""
    dense = HV * V * K
    pitch = dense if slot_pitch is None else slot_pitch
    buf = torch.randn(num_slots * pitch, generator=generator, device=device).mul_(0.5).to(dtype)
    return buf.as_strided((num_slots, HV, V, K), (pitch, V * K, K, 1))


def make_problem(
    batch: int,
    tokens: int = 1,
    num_heads: int = 2,
    num_v_heads: int = 4,
    head_k_dim: int = 128,
    head_v_dim: int = 128,
    *,
    num_slots: int | None = None,
    state_dtype: torch.dtype = torch.float32,
    qkv_dtype: torch.dtype = torch.bfloat16,
    gate_dtype: torch.dtype = torch.bfloat16,
    param_dtype: torch.dtype = torch.float32,
    index_dtype: torch.dtype = torch.int32,
    num_padding: int = 0,
    num_out_of_range: int = 0,
    min_valid_slot: int = 0,
    slot_pitch: int | None = None,
    packed_qkv: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> DecodeProblem:
    """A fresh random problem: `batch` rows, of which `num_padding` are padding and
    `num_out_of_range` name slots >= P, at random positions; the others name
    distinct random slots of a pool of `num_slots`."""
    B, T, H, HV, K, V = batch, tokens, num_heads, num_v_heads, head_k_dim, head_v_dim
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_valid = B - num_padding - num_out_of_range
    P = num_slots if num_slots is not None else max(2 * B, 4) + min_valid_slot
    assert num_valid >= 0 and P - min_valid_slot >= num_valid

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    if packed_qkv:
        # SGLang's decode: one conv output row [q | k | v] per token, split into views.
        q, k, v = split_packed_qkv(randn(B, T, 2 * H * K + HV * V, dtype=qkv_dtype), H, HV, K, V)
    else:
        q, k = randn(B, T, H, K, dtype=qkv_dtype), randn(B, T, H, K, dtype=qkv_dtype)
        v = randn(B, T, HV, V, dtype=qkv_dtype)
    a = randn(B, T, HV, dtype=gate_dtype)
    b = randn(B, T, HV, dtype=gate_dtype)
    # As the model initialises them: A in (1, 16), dt_bias around zero.
    A_log = (torch.rand(HV, generator=gen) * 15 + 1).log().to(param_dtype).to(device)
    dt_bias = randn(HV, dtype=param_dtype, scale=0.5)

    pool = copy_strided(strided_pool(P, HV, V, K, dtype=state_dtype, device="cpu",
                                     slot_pitch=slot_pitch, generator=gen), device)

    slots = (torch.randperm(P - min_valid_slot, generator=gen)[:num_valid] + min_valid_slot).tolist()
    bad = [P + int(i) for i in torch.randint(0, 1 << 20, (num_out_of_range,), generator=gen)]
    rows = slots + [PAD_SLOT_ID] * num_padding + bad
    order = torch.randperm(B, generator=gen).tolist()
    indices = torch.tensor([rows[i] for i in order], dtype=index_dtype, device=device)
    kwargs = {"min_valid_slot": min_valid_slot} if min_valid_slot else {}
    return DecodeProblem(q, k, v, a, b, A_log, dt_bias, pool, indices, kwargs)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, any host synchronisation on CUDA is an error (torch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def per_token_slots(problem: DecodeProblem, *, seed: int = 0, padded_writes: int = 1):
    """vLLM's per-token slots for `problem`'s requests: (state_indices [B, T], num_accepted [B]).

    Request n reads the slot `problem.state_indices` gives it (padding stays padding), from
    column num_accepted[n] - 1, which it writes again after that token; its other columns
    are fresh slots, `padded_writes` of them (over the batch) padding.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T = problem.q.shape[:2]
    P = problem.state_pool.shape[0]
    reads = problem.state_indices.cpu().long()
    taken = set(reads.tolist())
    fresh = [s for s in torch.randperm(P, generator=gen).tolist()
             if s not in taken and s >= problem.kwargs.get("min_valid_slot", 0)]
    assert len(fresh) >= B * T, "the pool needs a fresh slot for every token"
    accepted = torch.randint(1, T + 1, (B,), generator=gen)
    table = torch.tensor(fresh[: B * T]).view(B, T)
    table[torch.arange(B), accepted - 1] = reads
    writes = [(n, t) for n in range(B) for t in range(T) if t != accepted[n] - 1]
    for i in torch.randperm(len(writes), generator=gen)[:padded_writes].tolist():
        table[writes[i]] = PAD_SLOT_ID
    device = problem.state_indices.device
    return (table.to(problem.state_indices.dtype).to(device),
            accepted.to(torch.int32).to(device))


def ragged_rows(problem: DecodeProblem, lengths, trailing: int = 2) -> dict:
    """`problem`'s requests as ragged rows: request n keeps its first lengths[n] tokens, one
    after another in [1, N, ...] inputs, with `trailing` tokens of no request at the end.

    Returns q, k, v, a, b and cu_seqlens [B + 1] (int32).
    """
    device = problem.q.device
    gen = torch.Generator(device="cpu").manual_seed(len(lengths) + trailing)

    def flat(x):
        rows = [x[n, :length] for n, length in enumerate(lengths)]
        extra = torch.randn(trailing, *x.shape[2:], generator=gen).to(x.dtype).to(device)
        return torch.cat(rows + [extra]).unsqueeze(0)

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"q": flat(problem.q), "k": flat(problem.k), "v": flat(problem.v),
            "a": flat(problem.a), "b": flat(problem.b), "cu_seqlens": cu.to(device)}


class RingPool:
    """One layer's ReplaySSM state as SGLang keeps it: a checkpoint pool, a ring per slot
    (d [P, HV, L, V], k [P, H, L, K], g [P, HV, L]) and the per-slot cursor its backend
    advances, beside a classic pool that starts from the same checkpoints.

    The rings start full of random records, so a kernel that reads past a cursor fails.
    """

    def __init__(self, num_slots: int, num_heads: int = 2, num_v_heads: int = 4,
                 head_k_dim: int = 128, head_v_dim: int = 128, ring_len: int = 16, *,
                 state_dtype: torch.dtype = torch.float32, ring_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", slot_pitch: int | None = None,
                 seed: int = 0):
        P, H, HV, K, V, L = num_slots, num_heads, num_v_heads, head_k_dim, head_v_dim, ring_len
        self.H, self.HV, self.K, self.V, self.L = H, HV, K, V, L
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        ring_dtype = state_dtype if ring_dtype is None else ring_dtype
        self.checkpoint = copy_strided(strided_pool(P, HV, V, K, dtype=state_dtype, device="cpu",
                                                    slot_pitch=slot_pitch, generator=self.gen),
                                       self.device)
        self.classic = copy_strided(self.checkpoint)
        # Stale records shaped like real ones: unit keys, log-decays below zero.
        self.ring_d = self.randn(P, HV, L, V, dtype=ring_dtype, scale=0.5)
        keys = torch.randn(P, H, L, K, generator=self.gen)
        self.ring_k = (keys / keys.norm(dim=-1, keepdim=True)).to(ring_dtype).to(self.device)
        self.ring_g = (-torch.rand(P, HV, L, generator=self.gen)).to(self.device)
        self.write_pos = torch.zeros(P, dtype=torch.int32, device=self.device)
        self.A_log = (torch.rand(HV, generator=self.gen) * 15 + 1).log().to(self.device)
        self.dt_bias = self.randn(HV, scale=0.5)

    def randn(self, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(dtype).to(self.device)

    @property
    def rings(self) -> tuple:
        return self.ring_d, self.ring_k, self.ring_g

    def tokens(self, B: int) -> tuple:
        """q, k [B, 1, H, K] and v [B, 1, HV, V] as views of packed rows; a, b [B, 1, HV]."""
        H, HV, K, V = self.H, self.HV, self.K, self.V
        q, k, v = split_packed_qkv(self.randn(B, 1, 2 * H * K + HV * V, dtype=torch.bfloat16),
                                   H, HV, K, V)
        a, b = (self.randn(B, 1, HV, dtype=torch.bfloat16) for _ in range(2))
        return q, k, v, a, b

    def cursors(self, idx: torch.Tensor) -> torch.Tensor:
        """SGLang's per-forward snapshot of the cursors (padding rows read slot 0's)."""
        return self.write_pos[idx.clamp(min=0).long()].clone()

    def poison_past(self, idx: torch.Tensor, cursor: torch.Tensor) -> None:
        """NaN in every place at or past each request's cursor of its slot's rings (idx >= 0):
        what a step must not read into any sum."""
        L = self.L
        for slot, m in zip(idx.tolist(), cursor.tolist()):
            if slot >= 0 and 0 <= m < L:
                for ring in self.rings:
                    ring[slot, :, m:] = float("nan")

    def advance(self, idx: torch.Tensor, cursor: torch.Tensor, force: torch.Tensor | None):
        """SGLang's backend after the step: 0 where it flushed, one on elsewhere."""
        flushed = cursor == self.L - 1
        if force is not None:
            flushed |= force != 0
        real = idx >= 0
        self.write_pos[idx[real].long()] = torch.where(flushed, 0, cursor + 1)[real].to(torch.int32)

    def step(self, slots, force=None):
        """One token for requests on `slots` (-1: padding) through the ReplaySSM op and the
        classic op; returns both outputs [B, HV, V]."""
        from .op import gated_delta_rule_decode
        from .replayssm import replayssm_decode

        idx = torch.tensor(slots, dtype=torch.int32, device=self.device)
        force = None if force is None else torch.tensor(force, dtype=torch.int32,
                                                        device=self.device)
        q, k, v, a, b = self.tokens(len(slots))
        cursor = self.cursors(idx)
        ring_out = torch.full(v.shape, float("nan"), dtype=v.dtype, device=self.device)
        replayssm_decode(q, k, v, a, b, self.A_log, self.dt_bias, self.checkpoint, *self.rings,
                         cursor, idx, force_flush=force, out=ring_out)
        classic_out = gated_delta_rule_decode(q, k, v, a, b, self.A_log, self.dt_bias,
                                              self.classic, idx)
        self.advance(idx, cursor, force)
        return ring_out[:, 0], classic_out[:, 0]


class SpecRing:
    """SGLang's spec ring state for tests and the benchmark: checkpoints [layers, P, HV, V, K],
    rings of R request rows full of random records (bf16 high and low parts, unit keys,
    negative log-decays), and cursors somewhere on the circle."""

    def __init__(self, num_slots: int, num_rows: int, num_heads: int = 2, num_v_heads: int = 4,
                 head_k_dim: int = 128, head_v_dim: int = 128, ring_len: int = 16, *,
                 layers: int = 1, state_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", seed: int = 0):
        P, R, H, HV, K, V, L = (num_slots, num_rows, num_heads, num_v_heads, head_k_dim,
                                head_v_dim, ring_len)
        self.H, self.HV, self.K, self.V, self.L = H, HV, K, V, L
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.checkpoint = self.randn(layers, P, HV, V, K, dtype=state_dtype, scale=0.5)
        d = torch.randn(layers, R, HV, L, V, generator=self.gen) * 0.3
        keys = torch.randn(layers, R, H, L, K, generator=self.gen)
        keys = keys / keys.norm(dim=-1, keepdim=True)
        self.ring_d, self.ring_d_low = self._split(d)
        self.ring_k, self.ring_k_low = self._split(keys)
        self.ring_g = (-torch.rand(layers, R, HV, L, generator=self.gen)).to(self.device)
        self.write_pos = torch.randint(0, L // 2 + 1, (R,), generator=self.gen,
                                       dtype=torch.int32).to(self.device)
        self.cache_base = torch.randint(0, L, (R,), generator=self.gen,
                                        dtype=torch.int32).to(self.device)
        self.is_flush = torch.zeros(R, dtype=torch.int8, device=self.device)
        self.A_log = (torch.rand(HV, generator=self.gen) * 15 + 1).log().to(self.device)
        self.dt_bias = self.randn(HV, scale=0.5)

    def randn(self, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(dtype).to(self.device)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        high = x.bfloat16()
        return high.to(self.device), (x - high.float()).bfloat16().to(self.device)

    def rings(self, layer: int | None = 0) -> tuple:
        """(ring_d, ring_k, ring_g, ring_d_low, ring_k_low) of one layer, or of all (None)."""
        pick = (lambda t: t) if layer is None else (lambda t: t[layer])
        return tuple(pick(t) for t in (self.ring_d, self.ring_k, self.ring_g, self.ring_d_low,
                                       self.ring_k_low))

    @property
    def cursors(self) -> tuple:
        return self.write_pos, self.cache_base, self.is_flush

    def window(self, lengths) -> tuple:
        """q, k [1, N, H, K], v [1, N, HV, V], a, b [1, N, HV] and cu_seqlens [B + 1] for
        requests of these token counts."""
        N = sum(lengths)
        q, k = (self.randn(1, N, self.H, self.K, dtype=torch.bfloat16) for _ in range(2))
        v = self.randn(1, N, self.HV, self.V, dtype=torch.bfloat16)
        a, b = (self.randn(1, N, self.HV, dtype=torch.bfloat16) for _ in range(2))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                          device=self.device)
        return q, k, v, a, b, cu

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a verify or fold may write, for snapshots and comparisons."""
        return [self.checkpoint, self.ring_d, self.ring_d_low, self.ring_k, self.ring_k_low,
                self.ring_g, self.write_pos, self.cache_base, self.is_flush]

    def to(self, device) -> "SpecRing":
        """A copy on `device` (the reference's inputs on the CPU, say)."""
        twin = object.__new__(SpecRing)
        twin.__dict__.update({name: t.to(device).clone() if isinstance(t, torch.Tensor) else t
                              for name, t in self.__dict__.items()})
        twin.device = torch.device(device)
        return twin
