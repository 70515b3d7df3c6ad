"""Many ReplaySSM decode steps on gdn_backend (through the SGLang adapter) and on SGLang's
own Triton kernel, from the same rings: returns the largest relative errors between the two.

    TRITON_INTERPRET=1 python integration_tests/sglang_replayssm_steps.py f32

runs it on the CPU under Triton's interpreter, which must be on before Triton is first
imported (its library's own jit functions are made then), so the CPU test runs this as a
process of its own and reads the JSON it prints. SGLang's kernel rebuilds the state through
tl.dot in its output's dtype; the interpreter's bf16 dot reads the operands' raw bits (a
step's output comes out ~1e8), so on the CPU SGLang's kernel writes a float32 output,
which keeps that dot in float32, and ours the bf16 output SGLang asks of it.
"""

import json
import sys

import torch
from sglang.kernels.ops.attention.linear.fused_recurrent_linear_replayssm import (
    fused_recurrent_gdn_replayssm_decode)

from gdn_backend.integrations.sglang import GDNBackendKernel
from gdn_backend.testing import PAD_SLOT_ID, RingPool, relative_error

H, HV, K, V, L = 2, 4, 128, 128, 16
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def packed(q, k, v):
    """SGLang's conv output rows [B, 2HK + HV V] that the views q, k, v [B, 1, ...] come from."""
    return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)[:, 0]


def compare(device: str, state_dtype: torch.dtype, steps: int = L + 6,
            sglang_out_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Requests on reused slots of 8 (slot 0 never named), one padding row, forced flushes
    at random: the largest errors of outputs, checkpoints and rings over all steps."""
    ours = RingPool(9, H, HV, K, V, L, state_dtype=state_dtype, device=device, seed=21)
    theirs = [t.clone() for t in (ours.checkpoint, *ours.rings)]
    gen = torch.Generator().manual_seed(22)
    kernel = GDNBackendKernel()
    errors = {"output": 0.0, "flushes": 0, "padding_row_zero": True}
    for _ in range(steps):
        live = (torch.randperm(8, generator=gen)[:3] + 1).tolist()
        idx = torch.tensor(live + [PAD_SLOT_ID], dtype=torch.int32, device=device)
        force = (torch.rand(4, generator=gen) < 0.1).to(torch.int32).to(device)
        cursor = ours.cursors(idx)
        errors["flushes"] += int(((cursor == L - 1) | (force != 0))[:-1].sum())
        q, k, v, a, b = ours.tokens(4)
        mixed, a, b = packed(q, k, v), a[:, 0], b[:, 0]
        got = kernel.packed_decode(
            mixed, a, b, A_log=ours.A_log, dt_bias=ours.dt_bias, scale=K**-0.5,
            ssm_states=ours.checkpoint, cache_indices=idx, num_v_heads=HV, head_v_dim=V,
            replayssm_d=ours.ring_d, replayssm_k=ours.ring_k, replayssm_g=ours.ring_g,
            replayssm_write_pos=cursor, replayssm_force_flush=force)
        want = torch.empty(4, 1, HV, V, dtype=sglang_out_dtype, device=device)
        fused_recurrent_gdn_replayssm_decode(
            mixed_qkv=mixed.contiguous(), a=a, b=b, A_log=ours.A_log, dt_bias=ours.dt_bias,
            scale=K**-0.5, initial_state=theirs[0], d_cache=theirs[1], k_cache=theirs[2],
            g_cache=theirs[3], out=want, ssm_state_indices=idx, write_pos=cursor,
            force_flush=force, use_qk_l2norm_in_kernel=True)
        ours.advance(idx, cursor, force)
        errors["output"] = max(errors["output"], relative_error(got[0], want[:, 0]))
        errors["padding_row_zero"] &= bool((got[0, -1] == 0).all())
    for name, mine, sglang in zip(("checkpoints", "ring_d", "ring_k", "ring_g"),
                                  (ours.checkpoint, *ours.rings), theirs):
        errors[name] = relative_error(mine, sglang)
    errors["slot_0_untouched"] = bool(torch.equal(ours.checkpoint[0], theirs[0][0]))
    return errors


if __name__ == "__main__":
    print(json.dumps(compare("cpu", DTYPES[sys.argv[1]], sglang_out_dtype=torch.float32)))
