"""The ReplaySSM decode op (SGLang's --enable-linear-replayssm): validation, dispatch, the
torch.library registration.

A slot's pool entry is a checkpoint and its ring holds the update records of the tokens
since (reference_replayssm.py has the math). `replayssm_decode` runs one token a request:
it reads the checkpoint and the request's `write_pos[n]` records, writes the output, and
appends the token's record at position write_pos[n]; at write_pos[n] = L - 1, or where
force_flush[n] is set, it writes the state after the token to the checkpoint instead and
appends nothing. The cursor is the caller's: SGLang's backend advances its own copy once a
forward, to 0 after a flush and by one otherwise.

Registered as `gdn_backend::replayssm_decode`, mutating the pool, the rings, `out` and the
error flag, so torch.compile and CUDA-graph capture see one opaque in-place call.
"""

from __future__ import annotations

import torch

from . import errors as _flag
from .op import _default_scale, dispatch
from .reference_replayssm import replayssm_reference
from .validation import validate, validate_rings

OP_NAME = "gdn_backend::replayssm_decode"


def _validate(q, k, v, a, b, A_log, dt_bias, state_pool, ring_d, ring_k, ring_g, write_pos,
              state_indices, out, force_flush, scale, min_valid_slot):
    call = validate(q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out,
                    scale=scale, min_valid_slot=min_valid_slot)
    return validate_rings(call, ring_d, ring_k, ring_g, write_pos, force_flush)


@torch.library.custom_op(
    OP_NAME, mutates_args=("state_pool", "ring_d", "ring_k", "ring_g", "out", "error_flag"))
def _replayssm_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    A_log: torch.Tensor, dt_bias: torch.Tensor, state_pool: torch.Tensor,
    ring_d: torch.Tensor, ring_k: torch.Tensor, ring_g: torch.Tensor, write_pos: torch.Tensor,
    state_indices: torch.Tensor, out: torch.Tensor, error_flag: torch.Tensor,
    force_flush: torch.Tensor | None, scale: float, min_valid_slot: int,
) -> None:
    rc = _validate(q, k, v, a, b, A_log, dt_bias, state_pool, ring_d, ring_k, ring_g,
                   write_pos, state_indices, out, force_flush, scale, min_valid_slot)
    dispatch(rc, rc.call.state_pool.device, rc.call.problem.batch, error_flag,
             "replayssm_decode", replayssm_reference)


@_replayssm_op.register_fake
def _replayssm_op_fake(q, k, v, a, b, A_log, dt_bias, state_pool, ring_d, ring_k, ring_g,
                       write_pos, state_indices, out, error_flag, force_flush, scale,
                       min_valid_slot) -> None:
    _validate(q, k, v, a, b, A_log, dt_bias, state_pool, ring_d, ring_k, ring_g, write_pos,
              state_indices, out, force_flush, scale, min_valid_slot)


def replayssm_decode(
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
    *,
    scale: float | None = None,
    force_flush: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    min_valid_slot: int = 0,
) -> torch.Tensor:
    """One ReplaySSM decode token per request, in place on the checkpoints and rings.

    Args:
        q, k: [B, 1, H, K]; v: [B, 1, HV, V]; a, b: [B, 1, HV]; A_log, dt_bias: [HV]; as
            for `gated_delta_rule_decode` at T = 1.
        state_pool: [P, HV, V, K] fp32/bf16 checkpoints, any slot stride.
        ring_d: [P, HV, L, V] fp32/bf16, record j's β (v - α S k̂) of each value head.
        ring_k: [P, H, L, K], ring_d's dtype: record j's normalised, unscaled key.
        ring_g: [P, HV, L] fp32: record j's log-decay. Each ring slot dense, any slot stride.
        write_pos: [B] int32, the records in request n's ring (0 .. L - 1).
        state_indices: [B] int32/int64 slots; below min_valid_slot is padding (zero
            output, nothing read or written), >= P is an error (skipped, error flag).
        force_flush: optional [B] int32; nonzero flushes request n this step.
        scale, out, min_valid_slot: as for `gated_delta_rule_decode`.

    A cursor outside 0 .. L - 1 is an error like an index past the pool. Returns `out`.
    """
    if out is None:
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    scale = _default_scale(q.shape[-1], scale)
    flag = _flag.error_flag(state_pool.device)
    _replayssm_op(q, k, v, a, b, A_log, dt_bias, state_pool, ring_d, ring_k, ring_g, write_pos,
                  state_indices, out, flag, force_flush, scale, min_valid_slot)
    _flag.check_after_call(state_pool.device)
    return out


def warmup_replayssm(
    *,
    device: torch.device | str,
    num_heads: int,
    num_v_heads: int,
    ring_len: int = 16,
    head_k_dim: int = 128,
    head_v_dim: int = 128,
    state_dtype: torch.dtype = torch.float32,
    ring_dtype: torch.dtype | None = None,
    qkv_dtype: torch.dtype = torch.bfloat16,
    gate_dtype: torch.dtype = torch.bfloat16,
    A_log_dtype: torch.dtype = torch.float32,
    dt_bias_dtype: torch.dtype = torch.bfloat16,
    index_dtype: torch.dtype = torch.int32,
) -> None:
    """Prepare ReplaySSM decode before CUDA-graph capture, with and without force_flush.

    Runs the op on a one-request batch whose only index is padding (nothing is written),
    then compiles every tile a batch size can choose. ring_dtype: the d and k rings',
    state_dtype's by default (SGLang's decode rings follow the SSM dtype).
    """
    device = torch.device(device)
    H, HV, K, V, L = num_heads, num_v_heads, head_k_dim, head_v_dim, ring_len
    ring_dtype = state_dtype if ring_dtype is None else ring_dtype
    pool = torch.zeros(1, HV, V, K, dtype=state_dtype, device=device)
    rings = (torch.zeros(1, HV, L, V, dtype=ring_dtype, device=device),
             torch.zeros(1, H, L, K, dtype=ring_dtype, device=device),
             torch.zeros(1, HV, L, dtype=torch.float32, device=device))
    A_log = torch.zeros(HV, dtype=A_log_dtype, device=device)
    dt_bias = torch.zeros(HV, dtype=dt_bias_dtype, device=device)
    q = torch.zeros(1, 1, H, K, dtype=qkv_dtype, device=device)
    v = torch.zeros(1, 1, HV, V, dtype=qkv_dtype, device=device)
    gate = torch.zeros(1, 1, HV, dtype=gate_dtype, device=device)
    pad = torch.full((1,), -1, dtype=index_dtype, device=device)
    cursor = torch.zeros(1, dtype=torch.int32, device=device)
    for force in (None, cursor):
        out = replayssm_decode(q, q, v, gate, gate, A_log, dt_bias, pool, *rings, cursor, pad,
                               force_flush=force)
        if device.type == "cuda":
            from .kernels import launch

            rc = _validate(q, q, v, gate, gate, A_log, dt_bias, pool, *rings, cursor, pad, out,
                           force, 1.0, 0)
            launch.compile_ahead(launch.replayssm_config(rc), pool.device.index)
