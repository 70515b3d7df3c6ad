"""flash-linear-attention's fused recurrent kernel as a decode peer, with gather/scatter
around it (it takes dense per-request states, not a pool)."""

from __future__ import annotations

IN_PLACE = False  # gathers and scatters: allocates inside the graph


def serves(cell) -> bool:
    """Decode only."""
    return cell.mode == "decode"


def available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        return True
    except Exception:
        return False


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("flash-linear-attention")


def step(cell):
    """fn(i): FLA's fused_recurrent_gated_delta_rule on cell's valid rows of slot set i."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    n = cell.valid
    q, k, v = (x[:n].contiguous() for x in (cell.q, cell.k, cell.v))

    def run(i: int) -> None:
        idx = cell.indices[i, :n].long()
        _, final = fused_recurrent_gated_delta_rule(
            q, k, v, g=cell.a[:n], beta=cell.b[:n], initial_state=cell.pool.index_select(0, idx),
            output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
            A_log=cell.A_log, dt_bias=cell.dt_bias, use_beta_sigmoid_in_kernel=True,
            state_v_first=True)
        cell.pool.index_copy_(0, idx, final.to(cell.pool.dtype))
    return run
