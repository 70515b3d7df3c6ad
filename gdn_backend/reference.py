"""SPEC.md in PyTorch: the oracle every kernel is tested against, and the CPU path.

Float32 math, token by token, in the order SPEC.md writes it, for every mode: one slot a
request or per-token slots, rows of T tokens or ragged rows, with or without intermediate
states. `decode_reference` takes a validated `Call` (the op's path); the plain-argument
entry validates first. It reads and writes only the slots that valid indices name, so it
honours padding, out-of-range indices and malformed rows exactly like a kernel must.
Boolean masks select the valid rows, which synchronises on a GPU: it is an oracle there,
never the hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import Call, validate

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


def gated_delta_rule_decode_reference(q, k, v, a, b, A_log, dt_bias, state_pool, state_indices,
                                      out, *, scale, error_flag=None, **options) -> None:
    """SPEC.md's step on plain arguments (the op's, `out` given): validated, then run."""
    decode_reference(validate(q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out,
                              scale=scale, **{"min_valid_slot": 0, **options}), error_flag)


def _request_tokens(call: Call):
    """(lengths [B], rows_ok [B], gather): how many tokens each request has, whether its row
    is well formed, and a function taking [B, T, ...] (or ragged [1, N, ...]) inputs to
    [B, T, ...] per-request tokens (a ragged row's tokens past its length repeat its last)."""
    B, T = call.problem.batch, call.problem.tokens
    device = call.q.device
    if not call.ragged:
        return (torch.full((B,), T, device=device), torch.ones(B, dtype=torch.bool, device=device),
                lambda x: x)
    N = call.q.shape[1]
    cu = call.cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    rows_ok = (starts >= 0) & (lengths >= 0) & (lengths <= T) & (cu[1:] <= N)
    last = (lengths - 1).clamp(min=0)[:, None]
    positions = (starts[:, None] + torch.minimum(torch.arange(T, device=device)[None], last))
    positions = positions.clamp(0, max(N - 1, 0))
    return lengths, rows_ok, lambda x: x[0][positions]


def decode_reference(call: Call, error_flag: torch.Tensor | None = None) -> None:
    """One decode step for every request of a validated call, in place on its pool.

    Request n reads one slot (state_indices[n], or [n, num_accepted[n] - 1] with per-token
    slots), runs its tokens in order (T, or its row's length with ragged rows), and writes
    the state after token t to intermediate_states[row, t] and (per-token slots) to slot
    [n, t], and after its last token to its slot (update_state, one slot a request). A
    request runs only where its slot and rows are real and its row is well formed; a
    malformed row (length past T, num_accepted outside 1..T) or an index past its buffer
    is skipped and sets the error flag.
    """
    B, T = call.problem.batch, call.problem.tokens
    H, HV, V = call.problem.num_heads, call.problem.num_v_heads, call.problem.head_v_dim
    pool, device = call.state_pool, call.q.device
    P, low = pool.shape[0], call.min_valid_slot
    lengths, rows_ok, per_request = _request_tokens(call)

    accepted_ok = torch.ones_like(rows_ok)
    if call.per_token_slots:
        accepted = call.num_accepted_tokens.long()
        accepted_ok = (accepted >= 1) & (accepted <= T)
        column = (accepted - 1).clamp(0, T - 1)[:, None]
        read_slots = call.state_indices.long().gather(1, column)[:, 0]
    else:
        read_slots = call.state_indices.long()
    valid, out_of_range = valid_rows(read_slots, P, low)
    inter, inter_rows = call.intermediate_states, None
    if inter is not None:
        inter_rows = (call.intermediate_indices.long() if call.intermediate_indices is not None
                      else torch.arange(B, device=device))
        inter_valid, inter_oob = valid_rows(inter_rows, inter.shape[0], low)
        # A request runs only when both of its destinations are real.
        valid &= inter_valid
        out_of_range |= inter_oob
    out_of_range |= ~rows_ok | ~accepted_ok
    valid &= rows_ok & accepted_ok & (lengths >= 1)
    if call.per_token_slots:
        written = (torch.arange(T, device=device)[None] < lengths[:, None]) & valid[:, None]
        out_of_range |= ((call.state_indices.long() >= P) & written).any(dim=1)
    if error_flag is not None:
        error_flag.copy_(torch.maximum(error_flag, out_of_range.any().to(error_flag.dtype)))

    out = call.out
    # Zero the output of every row whose tokens are known (a ragged row past T or past the
    # inputs is not), then write the rows that run. Tokens of no row are left alone.
    if call.ragged:
        cu = call.cu_seqlens.long()
        for n in rows_ok.nonzero().squeeze(1).tolist():
            out[0, cu[n]:cu[n + 1]] = 0
    else:
        out.zero_()
    rows = valid.nonzero().squeeze(1)
    if rows.numel() == 0:
        return

    group = HV // H
    pick = lambda x: per_request(x)[rows]  # noqa: E731  [R, T, ...]
    qn = l2_normalize(pick(call.q).float()).repeat_interleave(group, dim=2) * call.scale
    kn = l2_normalize(pick(call.k).float()).repeat_interleave(group, dim=2)
    vf = pick(call.v).float()
    g, beta = gate_and_beta(pick(call.a), pick(call.b), call.A_log, call.dt_bias)
    active = torch.arange(T, device=device)[None] < lengths[rows][:, None]  # [R, T]

    S = pool[read_slots[rows]].float()  # [R, HV, V, K]: every read before any write
    o = torch.empty(rows.numel(), T, HV, V, dtype=torch.float32, device=device)
    for t in range(T):
        step = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (vf[:, t] - torch.einsum("rhvk,rhk->rhv", step, kn[:, t]))
        step = step + u[..., None] * kn[:, t, :, None, :]
        o[:, t] = torch.einsum("rhvk,rhk->rhv", step, qn[:, t])
        now = active[:, t]
        S = torch.where(now[:, None, None, None], step, S)
        if inter is not None:
            inter[inter_rows[rows[now]], t] = S[now].to(inter.dtype)
        if call.per_token_slots:
            slots = call.state_indices[rows, t].long()
            write = now & (slots >= low) & (slots < P)
            pool[slots[write]] = S[write].to(pool.dtype)
    o = o.to(out.dtype)
    if call.ragged:
        cu = call.cu_seqlens.long()
        for r, n in enumerate(rows.tolist()):
            out[0, cu[n]:cu[n + 1]] = o[r, : cu[n + 1] - cu[n]]
    else:
        out[rows] = o
    if call.update_state and not call.per_token_slots:
        pool[read_slots[rows]] = S.to(pool.dtype)
