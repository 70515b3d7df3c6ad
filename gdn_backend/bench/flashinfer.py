"""FlashInfer's pooled GDN kernels as a benchmark peer (the seed project; 0.7.2 read for this).

On sm_90 `gated_delta_rule_decode_pretranspose` serves a pool through `initial_state` and
`initial_state_indices`: T = 1 on CuTe DSL kernels for either state dtype, T > 1 on its bf16
multi-token kernel or, for fp32, through `gated_delta_rule_mtp`. `gated_delta_rule_mtp`
(fp32 state only) also writes every token's state, to a per-batch intermediate buffer
(verify) or to per-token pool slots `ssm_state_indices [B, T]` (vLLM's form). Neither takes
ragged rows. Where FlashInfer differs from SPEC.md:
- its bf16 kernels redirect a negative (padding) index to slot 0, which they read and write:
  the benchmark never gives slot 0 to a request;
- its intermediate buffer is indexed by batch row, not by a row index: each slot set gets
  rows of its own, so that the writes stay cold;
- its bf16 kernels need every tensor 32-byte aligned, index rows too ("Misaligned Tensor
  data" otherwise): the cells' per-set index rows start 32 bytes apart;
- per-token slots take the read slot as an index of its own (computed here, untimed) and do
  not check write slots for padding (none is padding in the benchmark's cells).
"""

from __future__ import annotations

import torch

from .cells import set_rows

IN_PLACE = True


def serves(cell) -> bool:
    """Decode, chain verify, and per-token slots on an fp32 pool (its mtp kernel)."""
    fp32 = cell.pool.dtype == torch.float32
    return cell.mode in ("decode", "verify") or (cell.mode == "slots" and fp32)


def available() -> bool:
    try:
        import flashinfer.gdn_decode  # noqa: F401
        return True
    except Exception:
        return False


def version() -> str:
    import flashinfer

    return flashinfer.__version__


def step(cell):
    """fn(i): FlashInfer's kernel for the cell's mode on slot set i, on the pool in place."""
    from flashinfer.gdn_decode import gated_delta_rule_decode_pretranspose, gated_delta_rule_mtp

    fp32 = cell.pool.dtype == torch.float32
    common = dict(q=cell.q, k=cell.k, v=cell.v, A_log=cell.A_log, a=cell.a, dt_bias=cell.dt_bias,
                  b=cell.b, scale=cell.q.shape[-1] ** -0.5, output=cell.out)
    rows = lambda i: cell.inter[i * cell.valid: i * cell.valid + cell.B]  # noqa: E731

    if cell.mode == "decode":
        # T > 1 takes its state-updating multi-token path; the option exists only there.
        update = {} if cell.T == 1 else dict(disable_state_update=False)
        return lambda i: gated_delta_rule_decode_pretranspose(
            state=None, initial_state=cell.pool, initial_state_indices=cell.indices[i],
            backend="flashinfer", **update, **common)
    if cell.mode == "verify" and fp32:
        return lambda i: gated_delta_rule_mtp(
            initial_state=cell.pool, initial_state_indices=cell.indices[i],
            intermediate_states_buffer=rows(i), disable_state_update=True, **common)
    if cell.mode == "verify":
        return lambda i: gated_delta_rule_decode_pretranspose(
            state=None, initial_state=cell.pool, initial_state_indices=cell.indices[i],
            intermediate_states_buffer=rows(i), disable_state_update=True,
            backend="flashinfer", **common)
    # Per-token slots (fp32): the read slot of every request of every set, as an index.
    reads = set_rows(cell.indices.gather(2, (cell.accepted.long() - 1)[None, :, None].expand(
        cell.sets, -1, 1))[..., 0])
    return lambda i: gated_delta_rule_mtp(
        initial_state=cell.pool, initial_state_indices=reads[i],
        ssm_state_indices=cell.indices[i], disable_state_update=False, **common)
