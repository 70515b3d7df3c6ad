"""SGLang's ReplaySSM spec ring (`--enable-linear-replayssm-spec`) in PyTorch: the oracle for
its kernels to come, read from SGLang 0.5.23's `gdn_replayssm_spec_decode` (verify),
`commit_gdn_replayssm_spec` (cursors) and `commit_gdn_replayssm_circular` (the fold).

Chain verify without intermediate states. The pool entry of a slot is a checkpoint S0; the
request's circular ring holds the update records of its accepted tokens since, keyed by the
request's row r (SGLang's `req_pool_indices`), not by the slot:
- ring_d [R, HV, L, V] and ring_k [R, H, L, K], bf16 high parts, with ring_d_low and
  ring_k_low their bf16 low parts (x = high + low to about 16 bits): d_j = β (v − α S k̂),
  the delta-rule vector after the decay, and k̂_j, the normalised, unscaled key;
- ring_g [R, HV, L] float32, the log-decays;
- per row: write_pos (records held), cache_base (where record 0 sits: record c is at
  (cache_base + c) mod L, L a power of two) and is_flush.
With W records the state is S = e^Γ S0 + Σ_c λ_c d_c k̂_cᵀ (Γ = Σ g_c, λ_c = Π_{c'>c} α_c').

A verify runs each request's draft window from S, writes every token's output, and appends
the window's records after the W held (those that fit: W + s < L). The commit advances
write_pos by the accepted count (the bonus token included), which drops the rejected
drafts' records, and once a row nears capacity (W' + 2T > L with a float32 checkpoint; at
every commit otherwise) folds its W' records into the checkpoint and empties the ring.

Float32 math, the records taken whole (high + low). SGLang's verify reads only the high
parts and runs its dots in TF32, so it agrees to that tolerance.
"""

from __future__ import annotations

import torch

from .reference import gate_and_beta, l2_normalize


def _ring_state(S0, d, k, g, heads_per_key):
    """e^Γ S0 + Σ_c λ_c d_c k_cᵀ over the records given: d [C, HV, V], k [C, H, K], g [C, HV]."""
    if g.shape[0] == 0:
        return S0.clone()
    total = g.sum(0)
    later = (total - g.cumsum(0)).exp()                                     # λ_c [C, HV]
    kv = k.repeat_interleave(heads_per_key, dim=1)                           # [C, HV, K]
    return total.exp()[:, None, None] * S0 + torch.einsum("ch,chv,chk->hvk", later, d, kv)


def _records(ring_d, ring_d_low, ring_k, ring_k_low, ring_g, r, positions):
    """Records at these ring positions of row r, whole, in float32: d [C, HV, V], k, g."""
    d = ring_d[r, :, positions].float()
    k = ring_k[r, :, positions].float()
    if ring_d_low is not None:
        d = d + ring_d_low[r, :, positions].float()
        k = k + ring_k_low[r, :, positions].float()
    return d.transpose(0, 1), k.transpose(0, 1), ring_g[r, :, positions].float().t()


def _split(x: torch.Tensor, low: torch.Tensor | None, dtype: torch.dtype):
    """x as `dtype` (the high part) and, with a low buffer, the rest in it too."""
    high = x.to(dtype)
    return high, None if low is None else (x - high.float()).to(low.dtype)


def replayssm_spec_verify_reference(
    q, k, v, a, b, A_log, dt_bias, checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low,
    cu_seqlens, state_indices, replay_indices, write_pos, cache_base, is_flush, out, *,
    scale: float,
) -> None:
    """One chain verify for B requests, in place on `out` and the rings.

    q, k [N, H, K]; v, out [N, HV, V]; a, b [N, HV]: request n's tokens are
    cu_seqlens[n] .. cu_seqlens[n + 1] - 1. checkpoint [P, HV, V, K], read through
    state_indices [B] (negative: padding, its output rows zero, nothing read or written).
    The rings and cursors are read and written through replay_indices [B]. A row whose
    is_flush is set is skipped, its output left as it was (SGLang's verify: its commit
    has always cleared it by then).
    """
    H, HV, L = q.shape[1], v.shape[1], ring_d.shape[2]
    group = HV // H
    for n in range(state_indices.shape[0]):
        start, end = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
        slot, r = int(state_indices[n]), int(replay_indices[n])
        if slot < 0:
            out[start:end] = 0
            continue
        if int(is_flush[r]):
            continue
        held, base = int(write_pos[r]), int(cache_base[r])
        positions = [(base + c) % L for c in range(held)]
        S = _ring_state(checkpoint[slot].float(),
                        *_records(ring_d, ring_d_low, ring_k, ring_k_low, ring_g, r, positions),
                        group)
        k_hat = l2_normalize(k[start:end].float())                          # [T_n, H, K]
        kn = k_hat.repeat_interleave(group, dim=1)
        qn = l2_normalize(q[start:end].float()).repeat_interleave(group, dim=1) * scale
        g, beta = gate_and_beta(a[start:end], b[start:end], A_log, dt_bias)  # [T_n, HV]
        for s in range(end - start):
            alpha = g[s].exp()[:, None, None]
            d = beta[s][:, None] * (v[start + s].float()
                                    - alpha[..., 0] * torch.einsum("hvk,hk->hv", S, kn[s]))
            S = alpha * S + d[..., None] * kn[s][:, None, :]
            out[start + s] = torch.einsum("hvk,hk->hv", S, qn[s]).to(out.dtype)
            if held + s < L:
                p = (base + held + s) % L
                ring_d[r, :, p], low_d = _split(d, ring_d_low, ring_d.dtype)
                ring_k[r, :, p], low_k = _split(k_hat[s], ring_k_low, ring_k.dtype)
                if ring_d_low is not None:
                    ring_d_low[r, :, p], ring_k_low[r, :, p] = low_d, low_k
                ring_g[r, :, p] = g[s]


def replayssm_spec_commit_reference(
    checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low, state_indices, replay_indices,
    write_pos, cache_base, is_flush, accept_lens, *, max_tokens: int,
    track_indices=None, track_steps=None,
) -> None:
    """SGLang's commit after a verify, its three steps: the cursors advance by the accepted
    counts (`replayssm_spec_advance_reference`), rows at capacity fold their records into
    the checkpoint (`replayssm_spec_fold_reference`, every layer's in SGLang) and their
    rings start over after them (`replayssm_spec_finish_reference`)."""
    replayssm_spec_advance_reference(write_pos, cache_base, is_flush, accept_lens,
                                     replay_indices, ring_len=ring_d.shape[2],
                                     max_tokens=max_tokens,
                                     fold_every_commit=checkpoint.dtype != torch.float32)
    replayssm_spec_fold_reference(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low,
                                  state_indices, replay_indices, write_pos, cache_base,
                                  is_flush, accept_lens, track_indices=track_indices,
                                  track_steps=track_steps)
    replayssm_spec_finish_reference(write_pos, cache_base, is_flush, state_indices,
                                    replay_indices, ring_len=ring_d.shape[2])


def replayssm_spec_advance_reference(write_pos, cache_base, is_flush, accept_lens,
                                     replay_indices, *, ring_len: int, max_tokens: int,
                                     fold_every_commit: bool) -> None:
    """SGLang's commit_gdn_replayssm_spec: each row's records grow by its accepted count (the
    bonus token included), and is_flush marks a row whose next window might not fit
    (W' + 2T > L), or any row with records where every commit folds. A row that was
    already marked starts over after its records."""
    L = ring_len
    for n in range(replay_indices.shape[0]):
        r = int(replay_indices[n])
        if r < 0:
            continue
        accepted, held, flushing = int(accept_lens[n]), int(write_pos[r]), int(is_flush[r])
        if accepted > 0 and flushing:
            cache_base[r] = (int(cache_base[r]) + held) % L
        new = accepted if flushing else held + accepted
        write_pos[r] = new
        is_flush[r] = int(new > 0) if fold_every_commit else int(new + 2 * max_tokens > L)


def replayssm_spec_fold_reference(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low,
                                  state_indices, replay_indices, write_pos, cache_base,
                                  is_flush, accept_lens, *, track_indices=None,
                                  track_steps=None) -> None:
    """SGLang's commit_gdn_replayssm_circular for one layer, after the cursors: a marked
    row's W' records fold into its checkpoint; the cursors are left for
    `replayssm_spec_finish_reference`, once every layer has folded. track_indices /
    track_steps (optional, [B]): the radix cache's snapshots, the state after accepted
    step track_steps[n] written to slot track_indices[n] (negative: none), from the
    checkpoint as it was."""
    L, HV, H = ring_d.shape[2], ring_d.shape[1], ring_k.shape[1]
    for n in range(replay_indices.shape[0]):
        slot, r = int(state_indices[n]), int(replay_indices[n])
        if slot < 0 or r < 0:
            continue
        held, base = int(write_pos[r]), int(cache_base[r])
        S0 = checkpoint[slot].float()

        def state_after(count):
            positions = [(base + c) % L for c in range(count)]
            return _ring_state(S0, *_records(ring_d, ring_d_low, ring_k, ring_k_low, ring_g,
                                             r, positions), HV // H)

        if track_indices is not None and int(track_indices[n]) >= 0 and int(track_steps[n]) >= 0:
            count = held - int(accept_lens[n]) + int(track_steps[n]) + 1
            checkpoint[int(track_indices[n])] = state_after(count).to(checkpoint.dtype)
        if int(is_flush[r]):
            checkpoint[slot] = state_after(held).to(checkpoint.dtype)


def replayssm_spec_finish_reference(write_pos, cache_base, is_flush, state_indices,
                                    replay_indices, *, ring_len: int) -> None:
    """After the fold: a folded row's ring starts after its records, empty."""
    for n in range(replay_indices.shape[0]):
        slot, r = int(state_indices[n]), int(replay_indices[n])
        if slot >= 0 and r >= 0 and int(is_flush[r]):
            cache_base[r] = (int(cache_base[r]) + int(write_pos[r])) % ring_len
            write_pos[r] = 0
            is_flush[r] = 0


def replayssm_spec_state(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low, slot: int,
                         row: int, write_pos, cache_base) -> torch.Tensor:
    """The state [HV, V, K] (float32) that slot's checkpoint and row's ring stand for."""
    L = ring_d.shape[2]
    held, base = int(write_pos[row]), int(cache_base[row])
    positions = [(base + c) % L for c in range(held)]
    return _ring_state(checkpoint[slot].float(),
                       *_records(ring_d, ring_d_low, ring_k, ring_k_low, ring_g, row, positions),
                       ring_d.shape[1] // ring_k.shape[1])
