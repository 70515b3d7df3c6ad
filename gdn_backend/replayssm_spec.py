"""The spec-ring ops (SGLang's --enable-linear-replayssm-spec): validation, dispatch, the
torch.library registration.

A slot's pool entry is a checkpoint; the request's ring, keyed by its request row, holds the
records of its accepted tokens since (reference_replayssm_spec.py has the math and layouts).
- `replayssm_spec_verify` runs each request's draft window from the state the checkpoint and
  records stand for, writes every token's output and appends the window's records; it
  writes no state.
- `replayssm_spec_fold` is the commit after SGLang's cursor advance: every layer's rows
  marked is_flush fold their records into the checkpoint, the radix cache's snapshot slots
  get the state after their step, then the folded rows' rings start over.

A negative slot is padding (zero output, nothing read or written). A slot past the pool, a
row past the rings, a cursor past L, a malformed cu_seqlens row or a snapshot out of range
is skipped with the error flag set, its memory untouched.
"""

from __future__ import annotations

import torch

from . import errors as _flag
from .op import _default_scale, dispatch
from .reference_replayssm_spec import (
    replayssm_spec_finish_reference, replayssm_spec_fold_reference,
    replayssm_spec_verify_reference)
from .validation import (SpecVerifyCall, validate, validate_spec_fold, validate_spec_rings)

VERIFY_OP = "gdn_backend::replayssm_spec_verify"
FOLD_OP = "gdn_backend::replayssm_spec_fold"


def _validate_verify(q, k, v, a, b, A_log, dt_bias, checkpoint, ring_d, ring_k, ring_g,
                     ring_d_low, ring_k_low, cu_seqlens, state_indices, replay_indices,
                     write_pos, cache_base, is_flush, out, max_tokens, scale, min_valid_slot):
    call = validate(q, k, v, a, b, A_log, dt_bias, checkpoint, state_indices, out, scale=scale,
                    min_valid_slot=min_valid_slot, update_state=False, cu_seqlens=cu_seqlens,
                    max_tokens=max_tokens)
    if state_indices.dim() != 1:
        raise ValueError("the spec ring's verify reads one checkpoint a request: state_indices [B]")
    p = call.problem
    rings = validate_spec_rings(ring_d, ring_d_low, ring_k, ring_k_low, ring_g, replay_indices,
                                write_pos, cache_base, is_flush, lead=(), num_heads=p.num_heads,
                                num_v_heads=p.num_v_heads, head_k_dim=p.head_k_dim,
                                head_v_dim=p.head_v_dim, batch=p.batch,
                                device=checkpoint.device)
    return SpecVerifyCall(call, rings)


def _bad_row(slot, row, rings, pool_slots) -> bool:
    """A request whose slot is past the pool, or whose row or cursor is out of range."""
    if slot >= pool_slots:
        return True
    if slot < 0:
        return False
    R, L = rings.write_pos.shape[0], rings.ring_len
    return not 0 <= row < R or not 0 <= int(rings.write_pos[row]) <= L


def _verify_on_cpu(vc: SpecVerifyCall, error_flag: torch.Tensor) -> None:
    """The reference a request at a time, with the kernel's rules: a malformed row is left
    alone; a bad slot, row or cursor (flagged) and padding (below min_valid_slot) get zero
    output, but for a row waiting for its fold, which the verify never writes."""
    c, r = vc.call, vc.rings
    cu = c.cu_seqlens.tolist()
    N, P, T, R = c.q.shape[1], c.state_pool.shape[0], c.problem.tokens, r.write_pos.shape[0]
    for n in range(c.problem.batch):
        start, end = cu[n], cu[n + 1]
        slot, row = int(c.state_indices[n]), int(r.rows[n])
        if not 0 <= start <= end <= N or end - start > T:
            error_flag.fill_(1)
            continue
        in_pool = c.min_valid_slot <= slot < P
        bad = slot >= P or (in_pool and _bad_row(slot, row, r, P))
        if bad:
            error_flag.fill_(1)
        if bad or not in_pool:
            if not (in_pool and 0 <= row < R and int(r.is_flush[row])):
                c.out[0, start:end] = 0
            continue
        replayssm_spec_verify_reference(
            c.q[0], c.k[0], c.v[0], c.a[0], c.b[0], c.A_log, c.dt_bias, c.state_pool, r.ring_d,
            r.ring_k, r.ring_g, r.ring_d_low, r.ring_k_low,
            torch.tensor([start, end], dtype=torch.int32), torch.tensor([slot]),
            torch.tensor([row]), r.write_pos, r.cache_base, r.is_flush, c.out[0],
            scale=c.scale)


@torch.library.custom_op(
    VERIFY_OP, mutates_args=("ring_d", "ring_k", "ring_g", "ring_d_low", "ring_k_low", "out",
                             "error_flag"))
def _verify_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, checkpoint: torch.Tensor,
    ring_d: torch.Tensor, ring_k: torch.Tensor, ring_g: torch.Tensor, ring_d_low: torch.Tensor | None,
    ring_k_low: torch.Tensor | None, cu_seqlens: torch.Tensor, state_indices: torch.Tensor,
    replay_indices: torch.Tensor, write_pos: torch.Tensor, cache_base: torch.Tensor,
    is_flush: torch.Tensor, out: torch.Tensor, error_flag: torch.Tensor, max_tokens: int,
    scale: float, min_valid_slot: int,
) -> None:
    vc = _validate_verify(q, k, v, a, b, A_log, dt_bias, checkpoint, ring_d, ring_k, ring_g,
                          ring_d_low, ring_k_low, cu_seqlens, state_indices, replay_indices,
                          write_pos, cache_base, is_flush, out, max_tokens, scale,
                          min_valid_slot)
    dispatch(vc, checkpoint.device, vc.call.problem.batch, error_flag,
             "replayssm_spec_verify", _verify_on_cpu)


@_verify_op.register_fake
def _verify_op_fake(q, k, v, a, b, A_log, dt_bias, checkpoint, ring_d, ring_k, ring_g,
                    ring_d_low, ring_k_low, cu_seqlens, state_indices, replay_indices,
                    write_pos, cache_base, is_flush, out, error_flag, max_tokens, scale,
                    min_valid_slot) -> None:
    _validate_verify(q, k, v, a, b, A_log, dt_bias, checkpoint, ring_d, ring_k, ring_g,
                     ring_d_low, ring_k_low, cu_seqlens, state_indices, replay_indices,
                     write_pos, cache_base, is_flush, out, max_tokens, scale, min_valid_slot)


def replayssm_spec_verify(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, checkpoint: torch.Tensor,
    ring_d: torch.Tensor, ring_k: torch.Tensor, ring_g: torch.Tensor,
    ring_d_low: torch.Tensor, ring_k_low: torch.Tensor, cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor, replay_indices: torch.Tensor, write_pos: torch.Tensor,
    cache_base: torch.Tensor, is_flush: torch.Tensor, *, max_tokens: int,
    scale: float | None = None, out: torch.Tensor | None = None, min_valid_slot: int = 0,
) -> torch.Tensor:
    """One chain verify on the spec ring, in place on `out` and the rings.

    Args:
        q, k: [1, N, H, K]; v: [1, N, HV, V]; a, b: [1, N, HV]: request n's tokens are
            cu_seqlens[n] .. cu_seqlens[n + 1] - 1 ([B + 1] int32, at most max_tokens each).
        checkpoint: [P, HV, V, K] fp32/bf16, read through state_indices [B] (int32/int64).
        ring_d, ring_d_low: [R, HV, L, V] bf16 high and low parts of the records' update
            vectors; ring_k, ring_k_low: [R, H, L, K] of their normalised keys; ring_g:
            [R, HV, L] fp32 log-decays; L a power of two up to 32.
        replay_indices: [B] int32/int64, each request's ring row. write_pos, cache_base: [R]
            int32 records held and where record 0 sits; is_flush: [R] int8, a row waiting
            for its fold (skipped here, its output left as it was).
        scale, out, min_valid_slot: as for `gated_delta_rule_decode`.

    Returns `out`, [1, N, HV, V].
    """
    if out is None:
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    scale = _default_scale(q.shape[-1], scale)
    flag = _flag.error_flag(checkpoint.device)
    _verify_op(q, k, v, a, b, A_log, dt_bias, checkpoint, ring_d, ring_k, ring_g, ring_d_low,
               ring_k_low, cu_seqlens, state_indices, replay_indices, write_pos, cache_base,
               is_flush, out, flag, max_tokens, scale, min_valid_slot)
    _flag.check_after_call(checkpoint.device)
    return out


def _fold_on_cpu(fc, error_flag: torch.Tensor) -> None:
    """Every layer's fold a request at a time, then the cursor reset, with the kernel's
    rules for bad requests (skipped by both)."""
    r, P = fc.rings, fc.checkpoint.shape[1]
    kept = []
    for n in range(fc.batch):
        slot, row = int(fc.state_indices[n]), int(r.rows[n])
        bad = _bad_row(slot, row, r, P)
        if not bad and slot >= 0 and fc.track_indices is not None:
            track, step = int(fc.track_indices[n]), int(fc.track_steps[n])
            count = int(r.write_pos[row]) - int(fc.accept_lens[n]) + step + 1
            bad = track >= 0 and step >= 0 and (track >= P or not 0 <= count <= int(r.write_pos[row]))
        if bad:
            error_flag.fill_(1)
        elif slot >= 0:
            kept.append(n)
    if not kept:
        return
    pick = torch.tensor(kept, dtype=torch.int64)
    slots, rows, accept = fc.state_indices[pick], r.rows[pick], fc.accept_lens[pick]
    track = None if fc.track_indices is None else fc.track_indices[pick]
    steps = None if fc.track_steps is None else fc.track_steps[pick]
    for layer in range(fc.checkpoint.shape[0]):
        replayssm_spec_fold_reference(
            fc.checkpoint[layer], r.ring_d[layer], r.ring_k[layer], r.ring_g[layer],
            r.ring_d_low[layer], r.ring_k_low[layer], slots, rows, r.write_pos, r.cache_base,
            r.is_flush, accept, track_indices=track, track_steps=steps)
    replayssm_spec_finish_reference(r.write_pos, r.cache_base, r.is_flush, slots, rows,
                                    ring_len=r.ring_len)


def _validate_fold(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low, state_indices,
                   replay_indices, write_pos, cache_base, is_flush, accept_lens, track_indices,
                   track_steps):
    return validate_spec_fold(checkpoint, ring_d, ring_d_low, ring_k, ring_k_low, ring_g,
                              state_indices, replay_indices, write_pos, cache_base, is_flush,
                              accept_lens, track_indices, track_steps)


@torch.library.custom_op(
    FOLD_OP, mutates_args=("checkpoint", "write_pos", "cache_base", "is_flush", "error_flag"))
def _fold_op(
    checkpoint: torch.Tensor, ring_d: torch.Tensor, ring_k: torch.Tensor, ring_g: torch.Tensor,
    ring_d_low: torch.Tensor | None, ring_k_low: torch.Tensor | None, state_indices: torch.Tensor,
    replay_indices: torch.Tensor, write_pos: torch.Tensor, cache_base: torch.Tensor,
    is_flush: torch.Tensor, accept_lens: torch.Tensor, track_indices: torch.Tensor | None,
    track_steps: torch.Tensor | None, error_flag: torch.Tensor,
) -> None:
    fc = _validate_fold(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low,
                        state_indices, replay_indices, write_pos, cache_base, is_flush,
                        accept_lens, track_indices, track_steps)
    dispatch(fc, checkpoint.device, fc.batch, error_flag, "replayssm_spec_fold",
             _fold_on_cpu)


@_fold_op.register_fake
def _fold_op_fake(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low, state_indices,
                  replay_indices, write_pos, cache_base, is_flush, accept_lens, track_indices,
                  track_steps, error_flag) -> None:
    _validate_fold(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low, state_indices,
                   replay_indices, write_pos, cache_base, is_flush, accept_lens, track_indices,
                   track_steps)


def replayssm_spec_fold(
    checkpoint: torch.Tensor, ring_d: torch.Tensor, ring_k: torch.Tensor, ring_g: torch.Tensor,
    ring_d_low: torch.Tensor, ring_k_low: torch.Tensor, state_indices: torch.Tensor,
    replay_indices: torch.Tensor, write_pos: torch.Tensor, cache_base: torch.Tensor,
    is_flush: torch.Tensor, accept_lens: torch.Tensor, *,
    track_indices: torch.Tensor | None = None, track_steps: torch.Tensor | None = None,
) -> None:
    """The commit's fold (SGLang's commit_gdn_replayssm_circular), after its cursor advance.

    checkpoint: [layers, P, HV, V, K], or [P, HV, V, K] for one layer, with the rings
    likewise led by [layers] (SGLang's all-layer buffers). state_indices, replay_indices,
    accept_lens: [B] (accepted tokens, the bonus one included); track_indices / track_steps:
    [B] or None, the radix cache's snapshots: the state after accepted step track_steps[n]
    to slot track_indices[n] (negative: none). Each request's row marked is_flush folds its
    write_pos records into its checkpoint in every layer and starts over after them.
    """
    if isinstance(checkpoint, torch.Tensor) and checkpoint.dim() == 4:
        checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low = (
            t.unsqueeze(0) if isinstance(t, torch.Tensor) else t
            for t in (checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low))
    flag = _flag.error_flag(checkpoint.device)
    _fold_op(checkpoint, ring_d, ring_k, ring_g, ring_d_low, ring_k_low, state_indices,
             replay_indices, write_pos, cache_base, is_flush, accept_lens, track_indices,
             track_steps, flag)
    _flag.check_after_call(checkpoint.device)


def warmup_replayssm_spec(
    *,
    device: torch.device | str,
    num_heads: int,
    num_v_heads: int,
    max_tokens: int,
    ring_len: int = 16,
    layers: int = 1,
    head_k_dim: int = 128,
    head_v_dim: int = 128,
    state_dtype: torch.dtype = torch.float32,
    ring_dtype: torch.dtype = torch.bfloat16,
    qkv_dtype: torch.dtype = torch.bfloat16,
    gate_dtype: torch.dtype = torch.bfloat16,
    A_log_dtype: torch.dtype = torch.float32,
    dt_bias_dtype: torch.dtype = torch.bfloat16,
    index_dtype: torch.dtype = torch.int32,
    row_index_dtype: torch.dtype = torch.int32,
) -> None:
    """Prepare the spec ring's verify (for CUDA-graph capture) and its commit fold, with and
    without snapshots: runs each on a one-request batch of padding (nothing is written),
    then compiles every tile a batch size can choose."""
    device = torch.device(device)
    H, HV, K, V, L = num_heads, num_v_heads, head_k_dim, head_v_dim, ring_len
    checkpoint = torch.zeros(layers, 1, HV, V, K, dtype=state_dtype, device=device)
    rings = [torch.zeros(layers, 1, HV, L, V, dtype=ring_dtype, device=device),
             torch.zeros(layers, 1, H, L, K, dtype=ring_dtype, device=device),
             torch.zeros(layers, 1, HV, L, dtype=torch.float32, device=device)]
    rings += [torch.zeros_like(rings[0]), torch.zeros_like(rings[1])]
    cursors = (torch.zeros(1, dtype=torch.int32, device=device),
               torch.zeros(1, dtype=torch.int32, device=device),
               torch.zeros(1, dtype=torch.int8, device=device))
    q = torch.zeros(1, 1, H, K, dtype=qkv_dtype, device=device)
    v = torch.zeros(1, 1, HV, V, dtype=qkv_dtype, device=device)
    gate = torch.zeros(1, 1, HV, dtype=gate_dtype, device=device)
    A_log = torch.zeros(HV, dtype=A_log_dtype, device=device)
    dt_bias = torch.zeros(HV, dtype=dt_bias_dtype, device=device)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    pad = torch.full((1,), -1, dtype=index_dtype, device=device)
    row = torch.zeros(1, dtype=row_index_dtype, device=device)
    one = torch.ones(1, dtype=torch.int32, device=device)
    layer = [t[0] for t in rings]
    out = replayssm_spec_verify(q, q, v, gate, gate, A_log, dt_bias, checkpoint[0], *layer, cu,
                                pad, row, *cursors, max_tokens=max_tokens)
    for track in (None, pad):
        replayssm_spec_fold(checkpoint, *rings, pad, row, *cursors, one, track_indices=track,
                            track_steps=None if track is None else one)
    if device.type != "cuda":
        return
    from .kernels import launch

    vc = _validate_verify(q, q, v, gate, gate, A_log, dt_bias, checkpoint[0], *layer, cu, pad,
                          row, *cursors, out, max_tokens, 1.0, 0)
    launch.compile_ahead(launch.spec_verify_config(vc), device.index)
    for track in (None, pad):
        fc = _validate_fold(checkpoint, *rings, pad, row, *cursors, one, track,
                            None if track is None else one)
        for cfg in launch.spec_fold_configs(fc):
            launch.compile_ahead(cfg, device.index)
