"""vLLM's GDN decode calls, served by gdn_backend's op, on vLLM's own tensors.

vLLM keeps a layer's recurrent states in its shared cache: the pool is a strided view
[blocks, HV, V, K], block 0 is its null block (padding: never read nor written, output rows
zero), and the slot indices come from its block table (int32). These functions need no vLLM
to run, so the GPU machine, where vLLM does not install, tests them on vLLM's layouts.
"""

from __future__ import annotations

from ...op import gated_delta_rule_decode, split_packed_qkv

# vLLM's null block: the padding slot of its mamba state pools.
NULL_BLOCK_ID = 0


def _heads(mixed_qkv, ssm_state):
    HV, V, K = ssm_state.shape[1:]
    return (mixed_qkv.shape[-1] - HV * V) // (2 * K), HV, K, V


def packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                  use_qk_l2norm_in_kernel=False):
    """vLLM's packed-decode contract (`fused_recurrent_gated_delta_rule_packed_decode`).

    mixed_qkv [B, 2HK + HV V] (rows q | k | v), a and b [B, HV], the pool
    initial_state [P, HV, V, K] updated in place, out [B, 1, HV, V]; indices <= 0 pad.
    """
    if not use_qk_l2norm_in_kernel:
        raise NotImplementedError(
            "gdn_backend normalises q and k in the kernel, as Qwen3-Next does; this caller "
            "asked for un-normalised q/k")
    H, HV, K, V = _heads(mixed_qkv, initial_state)
    q, k, v = split_packed_qkv(mixed_qkv.unsqueeze(1), H, HV, K, V)
    # vLLM hands a strided column of its block table outside FULL graphs; the op takes
    # contiguous indices (a no-op when they already are, as under graphs).
    gated_delta_rule_decode(q, k, v, a.unsqueeze(1), b.unsqueeze(1), A_log, dt_bias, initial_state,
                            ssm_state_indices.contiguous(), scale=scale, out=out,
                            min_valid_slot=NULL_BLOCK_ID + 1)
    return out, initial_state


def spec_decode(mixed_qkv, a, b, A_log, dt_bias, scale, ssm_state, out, query_start_loc,
                state_indices, num_accepted_tokens):
    """vLLM's MTP verify (its `fused_sigmoid_gating_delta_rule_update` with
    `inplace_final_state=True`), on its per-token slots and ragged rows.

    mixed_qkv [N, 2HK + HV V] and a, b [N, HV]: the tokens of every request one after
    another, request n's from query_start_loc[n] to query_start_loc[n + 1]; state_indices
    [B, T] (a block-table slice: any row stride); request n reads slot
    [n, num_accepted_tokens[n] - 1] and writes the state after token t to slot [n, t]; out
    [N, HV, V]. Slots <= 0 are the null block.
    """
    H, HV, K, V = _heads(mixed_qkv, ssm_state)
    q, k, v = split_packed_qkv(mixed_qkv.unsqueeze(0), H, HV, K, V)
    gated_delta_rule_decode(q, k, v, a.unsqueeze(0), b.unsqueeze(0), A_log, dt_bias, ssm_state,
                            state_indices, scale=scale, out=out.unsqueeze(0),
                            min_valid_slot=NULL_BLOCK_ID + 1,
                            num_accepted_tokens=num_accepted_tokens, cu_seqlens=query_start_loc)
    return out
