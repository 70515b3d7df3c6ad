"""A plain PyTorch peer for decode: gather the valid rows' states, step, scatter them back."""

from __future__ import annotations

import torch

from ..reference import gate_and_beta, l2_normalize

IN_PLACE = False  # gathers and scatters: allocates inside the graph


def serves(cell) -> bool:
    """Decode only."""
    return cell.mode == "decode"


def available() -> bool:
    return True


def version() -> str:
    return torch.__version__


def step(cell):
    """fn(i): the decode of cell's valid rows on slot set i, through index_select/index_copy_."""
    n, K = cell.valid, cell.q.shape[-1]
    group = cell.HV // cell.H

    def run(i: int) -> None:
        idx = cell.indices[i, :n].long()
        q = l2_normalize(cell.q[:n].float()).repeat_interleave(group, 2) * K**-0.5
        k = l2_normalize(cell.k[:n].float()).repeat_interleave(group, 2)
        g, beta = gate_and_beta(cell.a[:n], cell.b[:n], cell.A_log, cell.dt_bias)
        S = cell.pool.index_select(0, idx).float()
        for t in range(cell.T):
            S = S * g[:, t].exp()[..., None, None]
            u = beta[:, t, :, None] * (cell.v[:n, t].float()
                                       - torch.einsum("nhvk,nhk->nhv", S, k[:, t]))
            S = S + u[..., None] * k[:, t, :, None, :]
            cell.out[:n, t] = torch.einsum("nhvk,nhk->nhv", S, q[:, t]).to(cell.out.dtype)
        cell.pool.index_copy_(0, idx, S.to(cell.pool.dtype))
    return run
