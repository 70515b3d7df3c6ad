"""From a validated call to a compiled kernel: pick the configuration, launch it.

Host work only, no device synchronisation: the configuration comes from shapes,
dtypes, strides and pointer alignment, never from tensor values.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ..validation import Problem
from . import compile as _compile
from .heuristics import choose_tile, tiles_for

SUPPORTED_HEAD_DIMS = (128,)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def check_supported(problem: Problem, device: torch.device) -> None:
    """Raise NotImplementedError, naming what is supported, for what the kernel does not serve."""
    major, minor = _capability(device)
    if major < 9:
        raise NotImplementedError(
            f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; gdn_backend's kernels "
            "need an sm_90+ GPU (H100, H200 or newer)")
    for name, dim in (("head_k_dim (K)", problem.head_k_dim), ("head_v_dim (V)", problem.head_v_dim)):
        if dim not in SUPPORTED_HEAD_DIMS:
            raise NotImplementedError(
                f"{name} is {dim}; the CUDA kernel supports {SUPPORTED_HEAD_DIMS} (Qwen3-Next's 128)")


def _aligned(t: torch.Tensor, elements: int, strides) -> bool:
    return t.data_ptr() % (elements * t.element_size()) == 0 and all(s % elements == 0 for s in strides)


def config_for(problem: Problem, q, k, a, A_log, dt_bias, state_pool, state_indices,
               intermediate_states, intermediate_indices, update_state) -> _compile.KernelConfig:
    vec = 16 // state_pool.element_size()
    tile = choose_tile(problem.batch, problem.num_v_heads, problem.head_v_dim, problem.tokens,
                       state_pool.element_size(), intermediate=intermediate_states is not None)
    state_ok = _aligned(state_pool, vec, state_pool.stride()[:1])
    mode = None
    if intermediate_states is not None:
        state_ok = state_ok and _aligned(intermediate_states, vec, intermediate_states.stride()[:2])
        mode = "rows" if intermediate_indices is None else "indexed"
    return _compile.KernelConfig(
        num_heads=problem.num_heads, num_v_heads=problem.num_v_heads,
        head_k_dim=problem.head_k_dim, head_v_dim=problem.head_v_dim, tokens=problem.tokens,
        qkv_dtype=q.dtype, gate_dtype=a.dtype, A_log_dtype=A_log.dtype,
        dt_bias_dtype=dt_bias.dtype,
        state_dtype=state_pool.dtype, index_dtype=state_indices.dtype,
        rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
        tensor_cores=tile.tensor_cores, intermediate=mode,
        inter_index_dtype=None if intermediate_indices is None else intermediate_indices.dtype,
        update_state=update_state,
        qkv_vectorized=all(_aligned(t, _compile.qk_chunk(problem.head_k_dim), t.stride()[:3])
                           for t in (q, k)),
        state_vectorized=state_ok,
        use_pdl=_compile.USE_PDL,
    )


def gated_delta_rule_decode(
    problem: Problem, q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, error_flag,
    *, scale, min_valid_slot, intermediate_states, intermediate_indices, update_state,
) -> None:
    check_supported(problem, state_pool.device)
    cfg = config_for(problem, q, k, a, A_log, dt_bias, state_pool, state_indices,
                     intermediate_states, intermediate_indices, update_state)
    kernel = _compile.CACHE.get(cfg)
    kernel(q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, error_flag,
           intermediate_states, intermediate_indices, scale, min_valid_slot)


def warmup_configs(base: _compile.KernelConfig) -> list[_compile.KernelConfig]:
    """`base` at every tile the heuristic can choose for some batch size."""
    return [replace(base, rows_per_cta=t.rows_per_cta, rows_per_thread=t.rows_per_thread,
                    tensor_cores=t.tensor_cores)
            for t in tiles_for(base.num_v_heads, base.head_v_dim, base.tokens,
                               base.state_dtype.itemsize, base.intermediate is not None)]


def compile_ahead(base: _compile.KernelConfig) -> None:
    for cfg in warmup_configs(base):
        _compile.CACHE.get(cfg)
