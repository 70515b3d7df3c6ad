"""Many ReplaySSM spec-ring verify and commit steps on gdn_backend's ops (the reference on
the CPU, the kernels on CUDA) and on SGLang's own Triton kernels, from the same checkpoints,
rings and cursors: returns the largest relative errors between the two.

    TRITON_INTERPRET=1 python integration_tests/sglang_replayssm_spec_steps.py

runs it on the CPU under Triton's interpreter, in a process of its own (the interpreter must
be on before Triton is first imported). There SGLang's verify runs with IEEE float32 dots,
and its cursor advance as it is; its fold (`commit_gdn_replayssm_circular`) takes bf16
tl.dot operands, which the interpreter reads as raw bits, so on the CPU both sides fold with
the reference's fold and the comparison covers verify and cursors. On the GPU all three are
SGLang's, compiled. Records are compared whole (high + low parts).
"""

import json

import torch
from sglang.kernels.ops.attention.linear.gdn_replayssm_spec_decode import (
    commit_gdn_replayssm_circular, commit_gdn_replayssm_spec, gdn_replayssm_spec_decode)

import gdn_backend
from gdn_backend.reference_replayssm_spec import (
    replayssm_spec_advance_reference, replayssm_spec_finish_reference,
    replayssm_spec_fold_reference)
from gdn_backend.testing import relative_error

H, HV, K, V, L, T = 2, 4, 128, 128, 16, 4
NAMES = ("checkpoint", "ring_d", "ring_k", "ring_g", "ring_d_low", "ring_k_low", "write_pos",
         "cache_base", "is_flush")


def make_state(device: str, gen) -> dict:
    """A layer's checkpoints (8 slots) and request-row rings (5 rows), as SGLang allocates
    them (zeroed rings and cursors, a float32 checkpoint)."""
    return {
        "checkpoint": (torch.randn(8, HV, V, K, generator=gen) * 0.5).to(device),
        "ring_d": torch.zeros(5, HV, L, V, dtype=torch.bfloat16, device=device),
        "ring_k": torch.zeros(5, H, L, K, dtype=torch.bfloat16, device=device),
        "ring_g": torch.zeros(5, HV, L, device=device),
        "ring_d_low": torch.zeros(5, HV, L, V, dtype=torch.bfloat16, device=device),
        "ring_k_low": torch.zeros(5, H, L, K, dtype=torch.bfloat16, device=device),
        "write_pos": torch.zeros(5, dtype=torch.int32, device=device),
        "cache_base": torch.zeros(5, dtype=torch.int32, device=device),
        "is_flush": torch.zeros(5, dtype=torch.int8, device=device),
    }


def sglang_step(st, q, k, v, a, b, A_log, dt_bias, cu, slots, rows, accept, device):
    out = torch.zeros(q.shape[0], HV, V, dtype=torch.bfloat16, device=device)
    gdn_replayssm_spec_decode(
        q, k, v, a, b, A_log, dt_bias, st["checkpoint"], st["ring_d"], st["ring_k"],
        st["ring_g"], st["ring_d_low"], st["ring_k_low"], None, out, cu, slots, rows,
        st["write_pos"], st["cache_base"], st["is_flush"], max_cache_len=L, max_spec_len=T,
        scale=K**-0.5, null_block_id=-1, launch_mode="verify",
        dot_precision="tf32" if device == "cuda" else "ieee")
    commit_gdn_replayssm_spec(st["write_pos"], st["cache_base"], st["is_flush"], accept, rows,
                              max_cache_len=L, max_spec_len=T, fold_every_commit=False,
                              null_block_id=-1)
    if device == "cuda":
        commit_gdn_replayssm_circular(
            checkpoint_state=st["checkpoint"][None], d_cache=st["ring_d"][None],
            k_cache=st["ring_k"][None], g_cache=st["ring_g"][None],
            d_residual_cache=st["ring_d_low"][None], k_residual_cache=st["ring_k_low"][None],
            state_batch_indices=slots, replay_indices=rows, write_pos=st["write_pos"],
            cache_base=st["cache_base"], is_flush=st["is_flush"], accept_lens=accept)
    else:
        replayssm_spec_fold_reference(*(st[name] for name in NAMES[:6]), slots, rows,
                                      st["write_pos"], st["cache_base"], st["is_flush"], accept)
        replayssm_spec_finish_reference(st["write_pos"], st["cache_base"], st["is_flush"],
                                        slots, rows, ring_len=L)
    return out


def compare(device: str, steps: int = 14) -> dict:
    gen = torch.Generator().manual_seed(31)
    ours = make_state(device, gen)
    theirs = {name: t.clone() for name, t in ours.items()}
    A_log = (torch.rand(HV, generator=gen) * 15 + 1).log().to(device)
    dt_bias = (torch.randn(HV, generator=gen) * 0.5).to(device)
    errors = {"output": 0.0, "folds": 0, "padding_rows_zero": True}
    for _ in range(steps):
        lengths = [T, T, 3, T]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
        N = int(cu[-1])
        q, k = (torch.randn(N, H, K, generator=gen).bfloat16().to(device) for _ in range(2))
        v = torch.randn(N, HV, V, generator=gen).bfloat16().to(device)
        a, b = (torch.randn(N, HV, generator=gen).bfloat16().to(device) for _ in range(2))
        slots = torch.tensor([3, -1, 5, 1], dtype=torch.int32, device=device)
        rows = torch.tensor([0, 4, 2, 3], dtype=torch.int32, device=device)
        accept = torch.tensor([int(torch.randint(1, n + 1, (1,), generator=gen)) for n in lengths],
                              dtype=torch.int32, device=device)
        want = sglang_step(theirs, q, k, v, a, b, A_log, dt_bias, cu, slots, rows, accept, device)
        got = torch.full_like(want, float("nan"))
        gdn_backend.replayssm_spec_verify(
            q[None], k[None], v[None], a[None], b[None], A_log, dt_bias,
            *(ours[name] for name in NAMES[:6]), cu, slots, rows, ours["write_pos"],
            ours["cache_base"], ours["is_flush"], max_tokens=T, out=got[None])
        # SGLang's advance is elementwise on the batch; gdn_backend takes the fold after it.
        replayssm_spec_advance_reference(ours["write_pos"], ours["cache_base"],
                                         ours["is_flush"], accept, rows, ring_len=L,
                                         max_tokens=T, fold_every_commit=False)
        gdn_backend.replayssm_spec_fold(*(ours[name] for name in NAMES[:6]), slots, rows,
                                        ours["write_pos"], ours["cache_base"], ours["is_flush"],
                                        accept)
        errors["output"] = max(errors["output"], relative_error(got, want))
        errors["padding_rows_zero"] &= bool((got[4:8] == 0).all())
        errors["folds"] += int((ours["write_pos"][rows[slots >= 0].long()] == 0).sum())
        for name in ("write_pos", "cache_base", "is_flush"):
            errors[f"{name}_equal"] = errors.get(f"{name}_equal", True) and bool(
                torch.equal(ours[name], theirs[name]))
    errors["checkpoint"] = relative_error(ours["checkpoint"], theirs["checkpoint"])
    errors["ring_g"] = relative_error(ours["ring_g"], theirs["ring_g"])
    # Records whole (high + low): how a record splits is the kernel's (Triton's interpreter
    # converts to bf16 otherwise than the GPU does), their sum is the record.
    for name in ("ring_d", "ring_k"):
        errors[name] = relative_error(ours[name].float() + ours[f"{name}_low"].float(),
                                      theirs[name].float() + theirs[f"{name}_low"].float())
    return errors


if __name__ == "__main__":
    print(json.dumps(compare("cpu")))
