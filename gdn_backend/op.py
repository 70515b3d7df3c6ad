"""The pooled decode op: validation, dispatch, the torch.library registration.

`gated_delta_rule_decode` is the one public entry. It validates the call against
SPEC.md, then hands it to the CuTe DSL kernel (CUDA, sm_90+) or to the reference
(CPU). It is registered as the custom op `gdn_backend::gated_delta_rule_decode`,
which mutates the pool, `out`, the intermediate states and the error flag, so
`torch.compile` and CUDA-graph capture see it as one opaque, in-place call.
"""

from __future__ import annotations


import torch

from . import errors as _flag
from .reference import decode_reference
from .validation import validate

OP_NAME = "gdn_backend::gated_delta_rule_decode"


def split_packed_qkv(mixed: torch.Tensor, H: int, HV: int, K: int, V: int):
    """q [.., H, K], k [.., H, K], v [.., HV, V] as views of packed rows [.., 2HK + HV V].

    This is how SGLang's and vLLM's conv output holds them; the op reads the views in
    place, so a packed-decode entry costs no split.
    """
    q = mixed[..., : H * K].unflatten(-1, (H, K))
    k = mixed[..., H * K : 2 * H * K].unflatten(-1, (H, K))
    v = mixed[..., 2 * H * K :].unflatten(-1, (HV, V))
    return q, k, v


def _default_scale(head_k_dim: int, scale: float | None) -> float:
    return head_k_dim**-0.5 if scale is None else float(scale)


def _run(
    q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, error_flag,
    scale, min_valid_slot, intermediate_states, intermediate_indices, update_state,
    num_accepted_tokens, cu_seqlens, max_tokens,
) -> None:
    call = validate(
        q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out,
        scale=scale, min_valid_slot=min_valid_slot, intermediate_states=intermediate_states,
        intermediate_indices=intermediate_indices, update_state=update_state,
        num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens, max_tokens=max_tokens,
    )
    dispatch(call, call.state_pool.device, call.problem.batch, error_flag,
             "gated_delta_rule_decode", decode_reference)


def dispatch(validated, device: torch.device, batch: int, error_flag: torch.Tensor,
             kernel: str, reference) -> None:
    """A validated call of `batch` requests on `device` to `launch.<kernel>` on CUDA, to
    `reference` on the CPU."""
    _check_flag_tensor(error_flag, device)
    if batch == 0:
        return
    if device.type == "cuda":
        from .kernels import launch

        getattr(launch, kernel)(validated, error_flag)
    elif device.type == "cpu":
        reference(validated, error_flag)
    else:
        raise NotImplementedError(
            f"state_pool is on {device}; gdn_backend runs on the CPU (reference) "
            "and on CUDA sm_90+ (kernel)"
        )


def _check_flag_tensor(error_flag: torch.Tensor, device: torch.device) -> None:
    if error_flag.shape != (1,) or error_flag.dtype != torch.int32 or error_flag.device != device:
        raise ValueError(
            f"error_flag is {tuple(error_flag.shape)} {error_flag.dtype} on {error_flag.device}; "
            f"it must be a [1] int32 tensor on {device} (gdn_backend.error_flag(device))"
        )


@torch.library.custom_op(
    OP_NAME, mutates_args=("state_pool", "out", "error_flag", "intermediate_states")
)
def _decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    out: torch.Tensor,
    error_flag: torch.Tensor,
    scale: float,
    min_valid_slot: int,
    intermediate_states: torch.Tensor | None,
    intermediate_indices: torch.Tensor | None,
    update_state: bool,
    num_accepted_tokens: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_tokens: int | None,
) -> None:
    _run(
        q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, error_flag,
        scale, min_valid_slot, intermediate_states, intermediate_indices, update_state,
        num_accepted_tokens, cu_seqlens, max_tokens,
    )


@_decode_op.register_fake
def _decode_op_fake(
    q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, error_flag,
    scale, min_valid_slot, intermediate_states, intermediate_indices, update_state,
    num_accepted_tokens, cu_seqlens, max_tokens,
) -> None:
    validate(
        q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out,
        scale=scale, min_valid_slot=min_valid_slot, intermediate_states=intermediate_states,
        intermediate_indices=intermediate_indices, update_state=update_state,
        num_accepted_tokens=num_accepted_tokens, cu_seqlens=cu_seqlens, max_tokens=max_tokens,
    )


def gated_delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    min_valid_slot: int = 0,
    intermediate_states: torch.Tensor | None = None,
    intermediate_indices: torch.Tensor | None = None,
    update_state: bool = True,
    num_accepted_tokens: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """One Gated DeltaNet decode step of T tokens, in place on a pooled state.

    Args (SPEC.md's shapes):
        q, k: [B, T, H, K] bf16/fp16 (any strides with the head dim contiguous).
        v: [B, T, HV, V], same dtype as q.
        a, b: [B, T, HV] gate inputs; A_log, dt_bias: [HV].
        state_pool: [P, HV, V, K] fp32/bf16, each slot dense, any slot stride.
        state_indices: [B] int32/int64; request n reads and writes slot
            state_indices[n]. Or per-token slots [B, T] (last dim contiguous, any
            row stride): request n reads slot [n, num_accepted_tokens[n] - 1] and
            writes the state after token t to slot [n, t] (vLLM's speculative
            decode); a write slot that is padding is skipped.
        scale: query scale, K**-0.5 by default.
        out: optional output shaped like v (v's dtype), written in place.
        min_valid_slot: indices below it are padding (0: negative indices pad,
            SGLang's PAD_SLOT_ID = -1; 1: slot 0 is a null block too, vLLM's).
            Indices >= P are errors: skipped and recorded in the error flag.
        intermediate_states: optional [N, T, HV, V, K] (pool dtype) receiving the
            state after every token, for speculative verify.
        intermediate_indices: optional [B] rows of intermediate_states for each
            request (row n when not given); same padding rule as state_indices.
        update_state: False leaves the pool untouched (verify writes only the
            intermediate states).
        num_accepted_tokens: [B] int32, with per-token state_indices: 1..T.
        cu_seqlens: [B + 1] int32, ragged rows: request n has tokens cu_seqlens[n]
            .. cu_seqlens[n + 1] - 1 (0 to T of them) of q, k [1, N, H, K],
            v [1, N, HV, V], a, b [1, N, HV]; out is [1, N, HV, V].
        max_tokens: T for ragged rows, where neither per-token state_indices nor
            intermediate_states give it.

    Returns `out`. Padding rows of `out` are zero; slots not named by a valid
    index are left byte-for-byte unchanged. With ragged rows, output tokens that
    belong to no request are left as they were. A malformed row (a length past
    T, num_accepted_tokens outside 1..T) is skipped and sets the error flag.
    """
    if out is None:
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    scale = _default_scale(q.shape[-1], scale)
    flag = _flag.error_flag(state_pool.device)
    _decode_op(
        q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, flag,
        scale, min_valid_slot, intermediate_states, intermediate_indices, update_state,
        num_accepted_tokens, cu_seqlens, max_tokens,
    )
    _flag.check_after_call(state_pool.device)
    return out


def warmup(
    *,
    device: torch.device | str,
    num_heads: int,
    num_v_heads: int,
    head_k_dim: int = 128,
    head_v_dim: int = 128,
    state_dtype: torch.dtype = torch.float32,
    qkv_dtype: torch.dtype = torch.bfloat16,
    gate_dtype: torch.dtype = torch.bfloat16,
    A_log_dtype: torch.dtype = torch.float32,
    dt_bias_dtype: torch.dtype = torch.bfloat16,
    index_dtype: torch.dtype = torch.int32,
    tokens: tuple[int, ...] = (1,),
    intermediate: bool = False,
    per_token_slots: bool = False,
    ragged: bool = False,
) -> None:
    """Prepare a configuration before CUDA-graph capture.

    Runs the op once per token count on a one-request batch whose only index is
    padding, so nothing is written to any pool: this allocates the device's
    error flag and compiles every kernel variant the configuration needs, and
    no call inside capture allocates or compiles. `intermediate`, `per_token_slots`
    and `ragged` name the modes of the calls to come.
    """
    device = torch.device(device)
    H, HV, K, V = num_heads, num_v_heads, head_k_dim, head_v_dim
    pool = torch.zeros(1, HV, V, K, dtype=state_dtype, device=device)
    A_log = torch.zeros(HV, dtype=A_log_dtype, device=device)
    dt_bias = torch.zeros(HV, dtype=dt_bias_dtype, device=device)
    for T in tokens:
        q = torch.zeros(1, T, H, K, dtype=qkv_dtype, device=device)
        v = torch.zeros(1, T, HV, V, dtype=qkv_dtype, device=device)
        gate = torch.zeros(1, T, HV, dtype=gate_dtype, device=device)
        pad = torch.full((1, T) if per_token_slots else (1,), -1, dtype=index_dtype,
                         device=device)
        options = dict(
            intermediate_states=(torch.zeros(1, T, HV, V, K, dtype=state_dtype, device=device)
                                 if intermediate else None),
            intermediate_indices=pad if intermediate else None,
            update_state=not intermediate,
            num_accepted_tokens=(torch.ones(1, dtype=torch.int32, device=device)
                                 if per_token_slots else None),
            cu_seqlens=(torch.tensor([0, T], dtype=torch.int32, device=device)
                        if ragged else None),
            max_tokens=T if ragged else None,
        )
        out = gated_delta_rule_decode(q, q, v, gate, gate, A_log, dt_bias, pool, pad, **options)
        if device.type == "cuda":
            from .kernels import launch

            call = validate(q, q, v, gate, gate, A_log, dt_bias, pool, pad, out, scale=1.0,
                            min_valid_slot=0, **options)
            launch.compile_ahead(launch.config_for(call), pool.device.index)
