"""SGLang's ReplaySSM decode step (`--enable-linear-replayssm`) in PyTorch: the CPU path and
the oracle for the ring kernel (kernels/replayssm_decode.py), read from SGLang 0.5.23's
`fused_recurrent_gdn_replayssm_decode` and its backend's cursor rules.

A slot's pool entry is a checkpoint; the slot's ring holds one update record for each token
since. Record j of a slot holds, for that token:
- d_j = β (v − α S k̂), the delta-rule vector after the decay (ring_d [P, HV, L, V]),
- k̂_j, the L2-normalised, unscaled key (ring_k [P, H, L, K], a key head's for its group),
- g_j, the log-decay (ring_g [P, HV, L], float32).
With m records the state is S = (Π α_j) S0 + Σ_j (Π_{i>j} α_i) d_j k̂_jᵀ, the classic
recurrence over those tokens. A step rebuilds S, runs its token, and either appends its
record at position m or, at m = L − 1 or when forced, writes the state after its token to
the checkpoint; the ring then counts as empty. The cursor m is SGLang's backend's: it hands
each step a snapshot (`write_pos`) and advances its own copy once per forward, to 0 after a
flush and to m + 1 otherwise.

Float32 math, like the classic reference. SGLang's kernel rebuilds S with the records in
the output dtype (bf16) through a dot product, so it agrees to bf16 tolerance.
"""

from __future__ import annotations

import torch

from .reference import gate_and_beta, l2_normalize, valid_rows
from .validation import RingCall


def replayssm_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    ring_d: torch.Tensor,
    ring_k: torch.Tensor,
    ring_g: torch.Tensor,
    write_pos: torch.Tensor,
    state_indices: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    force_flush: torch.Tensor | None = None,
    error_flag: torch.Tensor | None = None,
    min_valid_slot: int = 0,
) -> None:
    """One ReplaySSM decode token for B requests, in place on the checkpoints and rings.

    q, k [B, H, K]; v, out [B, HV, V]; a, b [B, HV]; state_pool [P, HV, V, K]; rings as the
    module says, L = ring_d.shape[2]; write_pos [B] int32, the records in request n's ring;
    force_flush [B] (nonzero: flush this step) or None; state_indices [B]. An index below
    min_valid_slot is padding: output zero, nothing read or written. An index >= P or a cursor outside
    0 .. L - 1 is an error: the request is skipped likewise and the error flag set.
    """
    H, HV = q.shape[1], v.shape[1]
    L = ring_d.shape[2]
    valid, out_of_range = valid_rows(state_indices, state_pool.shape[0], min_valid_slot)
    cursor = write_pos.long()
    bad_cursor = valid & ((cursor < 0) | (cursor >= L))
    valid &= ~bad_cursor
    if error_flag is not None:
        error = (out_of_range | bad_cursor).any().to(error_flag.dtype)
        error_flag.copy_(torch.maximum(error_flag, error))

    out.zero_()
    rows = valid.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    slots, m = state_indices[rows].long(), cursor[rows]
    group = HV // H

    k_hat = l2_normalize(k[rows].float())                                   # [R, H, K]
    kn = k_hat.repeat_interleave(group, dim=1)                              # [R, HV, K]
    qn = l2_normalize(q[rows].float()).repeat_interleave(group, dim=1) * scale
    g, beta = gate_and_beta(a[rows], b[rows], A_log, dt_bias)               # [R, HV]

    # The state from the checkpoint and the m records of each request's ring.
    live = (torch.arange(L, device=q.device)[None] < m[:, None])[:, None]   # [R, 1, L]
    G = torch.where(live, ring_g[slots].float(), 0.0)                       # [R, HV, L]
    total = G.sum(-1)
    later = torch.where(live, (total[..., None] - G.cumsum(-1)).exp(), 0.0)  # Π_{i>j} α_i
    # Places past the cursor hold stale records, or anything: masked, not weighted by zero.
    d_live = torch.where(live[..., None], ring_d[slots].float(), 0.0)
    k_live = torch.where(live[..., None],
                         ring_k[slots].float().repeat_interleave(group, dim=1), 0.0)
    records = torch.einsum("rhl,rhlv,rhlk->rhvk", later, d_live, k_live)
    S = total.exp()[..., None, None] * state_pool[slots].float() + records  # [R, HV, V, K]

    # This token, in the one-pass form of SPEC.md's step.
    alpha = g.exp()
    Sk = alpha[..., None] * torch.einsum("rhvk,rhk->rhv", S, kn)
    Sq = alpha[..., None] * torch.einsum("rhvk,rhk->rhv", S, qn)
    d = beta[..., None] * (v[rows].float() - Sk)
    out[rows] = (Sq + d * (kn * qn).sum(-1, keepdim=True)).to(out.dtype)

    flush = m == L - 1
    if force_flush is not None:
        flush |= force_flush[rows] != 0
    folded = alpha[..., None, None] * S + d[..., None] * kn[..., None, :]
    state_pool[slots[flush]] = folded[flush].to(state_pool.dtype)
    keep, at = slots[~flush], m[~flush]
    ring_d[keep, :, at] = d[~flush].to(ring_d.dtype)
    ring_k[keep, :, at] = k_hat[~flush].to(ring_k.dtype)
    ring_g[keep, :, at] = g[~flush].to(ring_g.dtype)


def replayssm_reference(rc: RingCall, error_flag: torch.Tensor | None = None) -> None:
    """The reference step for a validated call, its one token taken out of [B, 1, ...]."""
    c = rc.call
    replayssm_decode_reference(
        c.q[:, 0], c.k[:, 0], c.v[:, 0], c.a[:, 0], c.b[:, 0], c.A_log, c.dt_bias, c.state_pool,
        rc.ring_d, rc.ring_k, rc.ring_g, rc.write_pos, c.state_indices, c.out[:, 0],
        scale=c.scale, force_flush=rc.force_flush, error_flag=error_flag,
        min_valid_slot=c.min_valid_slot)
