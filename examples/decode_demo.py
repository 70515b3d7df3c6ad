"""A pooled decode in a few lines: the engine's view of gdn_backend.

A per-layer state pool, requests in scattered slots, a batch padded with
PAD_SLOT_ID = -1 to a CUDA-graph size, and a few decode steps in place. Each
step is checked against the same requests decoded one at a time, each on its
own copy of its state. Runs on the CPU (reference) or on an sm_90+ GPU (kernel).
"""

import argparse

import torch

import gdn_backend
from gdn_backend.testing import PAD_SLOT_ID, relative_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    # Qwen3-Next-80B's GDN layer at TP8: 2 query/key heads, 4 value heads, K = V = 128.
    H, HV, K, V = 2, 4, 128, 128
    pool = torch.randn(64, HV, V, K, device=device) * 0.1
    slots = torch.tensor([41, 3, 17, 58, 9, 30], device=device)
    batch = torch.cat([slots, torch.full((2,), PAD_SLOT_ID, device=device)])  # padded to 8
    gdn_backend.warmup(device=device, num_heads=H, num_v_heads=HV, index_dtype=batch.dtype)

    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots.cpu()] = False
    pool_before = pool.clone()
    singles = [pool[s : s + 1].clone() for s in slots.tolist()]
    worst = 0.0
    for _ in range(args.steps):
        q, k = (torch.randn(8, 1, H, K, device=device, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(8, 1, HV, V, device=device, dtype=torch.bfloat16)
        a, b = (torch.randn(8, 1, HV, device=device) for _ in range(2))
        A_log = torch.linspace(0, 2.7, HV, device=device)
        dt_bias = torch.zeros(HV, device=device)
        out = gdn_backend.gated_delta_rule_decode(q, k, v, a, b, A_log, dt_bias, pool, batch)
        assert (out[len(slots):] == 0).all(), "padding rows must be zero"
        for n, single in enumerate(singles):
            alone = gdn_backend.gated_delta_rule_decode(
                q[n : n + 1], k[n : n + 1], v[n : n + 1], a[n : n + 1], b[n : n + 1],
                A_log, dt_bias, single, torch.zeros(1, dtype=batch.dtype, device=device))
            worst = max(worst, relative_error(out[n], alone[0]))
    for n, s in enumerate(slots.tolist()):
        worst = max(worst, relative_error(pool[s], singles[n][0]))
    assert torch.equal(pool[untouched], pool_before[untouched]), "untouched slots must not change"
    assert worst < 1e-2
    print(f"gdn_backend {gdn_backend.__version__} on {device}: {args.steps} decode steps of "
          f"{len(slots)} requests in scattered slots of a 64-slot pool, batch padded to 8 with -1.")
    print(f"checked: each request equals itself decoded alone (worst relative error {worst:.1e}), "
          "padding rows are zero, the 58 slots no request names are unchanged.")


if __name__ == "__main__":
    main()
