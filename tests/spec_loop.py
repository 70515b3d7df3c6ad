"""SPEC.md's formulas, written out again in float64, one request, token and head at a time.

Deliberately naive and independent of gdn_backend.reference, so the two check each other.
"""

import math

import torch


def spec_decode_float64(problem, scale=None, min_valid_slot=0):
    """Return (out [B, T, HV, V], {slot: final state [HV, V, K]}, {row: [T, HV, V, K]}) in float64."""
    q, k, v, a, b, A_log, dt_bias, pool, indices = (
        t.detach().cpu() for t in problem.args)
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    P = pool.shape[0]
    scale = K ** -0.5 if scale is None else scale
    out = torch.zeros(B, T, HV, V, dtype=torch.float64)
    finals, steps = {}, {}
    for n in range(B):
        slot = int(indices[n])
        if slot < min_valid_slot or slot >= P:
            continue
        S_all = pool[slot].double().clone()
        steps[n] = torch.empty(T, HV, V, K, dtype=torch.float64)
        for t in range(T):
            for hv in range(HV):
                h = hv // (HV // H)
                qv, kv = q[n, t, h].double(), k[n, t, h].double()
                q_hat = qv / math.sqrt(float((qv * qv).sum()) + 1e-6) * scale
                k_hat = kv / math.sqrt(float((kv * kv).sum()) + 1e-6)
                x = float(a[n, t, hv]) + float(dt_bias[hv])
                softplus = x if x > 20 else math.log1p(math.exp(x))
                g = -math.exp(float(A_log[hv])) * softplus
                beta = 1.0 / (1.0 + math.exp(-float(b[n, t, hv])))
                S = S_all[hv] * math.exp(g)
                u = beta * (v[n, t, hv].double() - S @ k_hat)
                S = S + torch.outer(u, k_hat)
                out[n, t, hv] = S @ q_hat
                S_all[hv] = S
            steps[n][t] = S_all
        finals[slot] = S_all
    return out, finals, steps
