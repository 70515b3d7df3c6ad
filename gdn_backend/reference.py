"""SPEC.md in PyTorch: the oracle every kernel is tested against, and the CPU path.

Float32 math, token by token, in the order SPEC.md writes it. It takes arguments
the op has already validated; it reads and writes only the slots that valid
indices name, so it honours padding and out-of-range indices exactly like a
kernel must. Boolean masks select the valid rows, which synchronises on a GPU:
it is an oracle there, never the hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(sum(x**2) + 1e-6) over the last dim, as the model and FLA do."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def gate_and_beta(a, b, A_log, dt_bias):
    """g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), in float32."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float(), threshold=20.0)
    return g, b.float().sigmoid()


def valid_rows(indices: torch.Tensor, num_slots: int, min_valid_slot: int):
    """(valid, out_of_range) masks of a [B] index tensor.

    Indices below `min_valid_slot` are padding; indices at or past `num_slots`
    are errors, treated like padding and reported through the error flag.
    """
    idx = indices.long()
    out_of_range = idx >= num_slots
    return (idx >= min_valid_slot) & ~out_of_range, out_of_range


def gated_delta_rule_decode_reference(
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
    *,
    scale: float,
    min_valid_slot: int = 0,
    intermediate_states: torch.Tensor | None = None,
    intermediate_indices: torch.Tensor | None = None,
    update_state: bool = True,
    error_flag: torch.Tensor | None = None,
) -> None:
    """One decode step of T tokens for B requests, in place on `state_pool`.

    Shapes as SPEC.md: q, k [B, T, H, K]; v, out [B, T, HV, V]; a, b [B, T, HV];
    state_pool [P, HV, V, K]; state_indices [B]. `intermediate_states`
    [N, T, HV, V, K] receives the state after each token of each valid request,
    at row `intermediate_indices[n]` (or row n when those are not given).
    `update_state=False` leaves the pool untouched (speculative verify).
    """
    B, T, H, _ = q.shape
    HV = v.shape[2]
    valid, out_of_range = valid_rows(state_indices, state_pool.shape[0], min_valid_slot)
    if intermediate_states is not None:
        if intermediate_indices is None:
            intermediate_indices = torch.arange(B, device=q.device)
        inter_valid, inter_oob = valid_rows(
            intermediate_indices, intermediate_states.shape[0], min_valid_slot
        )
        # A request runs only when both of its destinations are real.
        valid &= inter_valid
        out_of_range |= inter_oob
    if error_flag is not None:
        error_flag.copy_(torch.maximum(error_flag, out_of_range.any().to(error_flag.dtype)))

    out.zero_()
    rows = valid.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    slots = state_indices[rows].long()

    group = HV // H
    qn = l2_normalize(q[rows].float()).repeat_interleave(group, dim=2) * scale
    kn = l2_normalize(k[rows].float()).repeat_interleave(group, dim=2)
    vf = v[rows].float()
    g, beta = gate_and_beta(a[rows], b[rows], A_log, dt_bias)

    S = state_pool[slots].float()  # [R, HV, V, K]
    o = torch.empty(rows.numel(), T, HV, v.shape[3], dtype=torch.float32, device=q.device)
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (vf[:, t] - torch.einsum("rhvk,rhk->rhv", S, kn[:, t]))
        S = S + u[..., None] * kn[:, t, :, None, :]
        o[:, t] = torch.einsum("rhvk,rhk->rhv", S, qn[:, t])
        if intermediate_states is not None:
            inter_rows = intermediate_indices[rows].long()
            intermediate_states[inter_rows, t] = S.to(intermediate_states.dtype)
    out[rows] = o.to(out.dtype)
    if update_state:
        state_pool[slots] = S.to(state_pool.dtype)
