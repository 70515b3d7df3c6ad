"""From a validated call to a compiled kernel: pick the configuration, launch it.

Host work only, no device synchronisation: the configuration comes from shapes,
dtypes, strides and pointer alignment, never from tensor values.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch

from ..validation import Call, Problem, RingCall
from . import compile as _compile
from .heuristics import choose_ring_tile, choose_tile, ring_tiles_for, tiles_for

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


def config_for(call: Call) -> _compile.KernelConfig:
    problem, pool = call.problem, call.state_pool
    inter, inter_idx = call.intermediate_states, call.intermediate_indices
    vec = 16 // pool.element_size()
    tile = choose_tile(problem.batch, problem.num_v_heads, problem.head_v_dim, problem.tokens,
                       pool.element_size(), intermediate=inter is not None,
                       per_token_slots=call.per_token_slots, ragged=call.ragged)
    state_ok = _aligned(pool, vec, pool.stride()[:1])
    mode = None
    if inter is not None:
        state_ok = state_ok and _aligned(inter, vec, inter.stride()[:2])
        mode = "rows" if inter_idx is None else "indexed"
    return _compile.KernelConfig(
        num_heads=problem.num_heads, num_v_heads=problem.num_v_heads,
        head_k_dim=problem.head_k_dim, head_v_dim=problem.head_v_dim, tokens=problem.tokens,
        qkv_dtype=call.q.dtype, gate_dtype=call.a.dtype, A_log_dtype=call.A_log.dtype,
        dt_bias_dtype=call.dt_bias.dtype,
        state_dtype=pool.dtype, index_dtype=call.state_indices.dtype,
        rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
        tensor_cores=tile.tensor_cores, intermediate=mode,
        inter_index_dtype=None if inter_idx is None else inter_idx.dtype,
        update_state=call.update_state,
        per_token_slots=call.per_token_slots, ragged=call.ragged,
        qkv_vectorized=all(_aligned(t, _compile.qk_chunk(problem.head_k_dim), t.stride()[:3])
                           for t in (call.q, call.k)),
        state_vectorized=state_ok,
        use_pdl=_compile.USE_PDL,
    )


def on_device(device: torch.device):
    """The tensors' device made current for a launch where it is not: the kernel runs on the
    current device's current stream (TVM-FFI), which must be the tensors'."""
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def gated_delta_rule_decode(call: Call, error_flag: torch.Tensor) -> None:
    device = call.state_pool.device
    check_supported(call.problem, device)
    kernel = _compile.CACHE.get(config_for(call), device.index)
    with on_device(device):
        kernel(call.q, call.k, call.v, call.a, call.b, call.A_log, call.dt_bias,
               call.state_pool, call.state_indices, call.out, error_flag,
               call.intermediate_states, call.intermediate_indices, call.num_accepted_tokens,
               call.cu_seqlens, call.scale, call.min_valid_slot)


def warmup_configs(base: _compile.KernelConfig) -> list[_compile.KernelConfig]:
    """`base` at every tile the heuristic can choose for some batch size."""
    if base.ring_len:
        tiles = ring_tiles_for(base.num_v_heads, base.head_v_dim)
    else:
        tiles = tiles_for(base.num_v_heads, base.head_v_dim, base.tokens,
                          base.state_dtype.itemsize, base.intermediate is not None,
                          per_token_slots=base.per_token_slots, ragged=base.ragged)
    return [replace(base, rows_per_cta=t.rows_per_cta, rows_per_thread=t.rows_per_thread,
                    tensor_cores=t.tensor_cores) for t in tiles]


def compile_ahead(base: _compile.KernelConfig, device: int) -> None:
    for cfg in warmup_configs(base):
        _compile.CACHE.get(cfg, device)


def replayssm_config(rc: RingCall) -> _compile.KernelConfig:
    """The one-token decode's configuration, on rings, at the ReplaySSM tile."""
    p = rc.call.problem
    tile = choose_ring_tile(p.batch, p.num_v_heads, p.head_v_dim)
    chunk = _compile.qk_chunk(p.head_k_dim)
    return replace(config_for(rc.call), rows_per_cta=tile.rows_per_cta,
                   rows_per_thread=tile.rows_per_thread, tensor_cores=False,
                   ring_len=rc.ring_len, ring_dtype=rc.ring_d.dtype,
                   force_flush=rc.force_flush is not None,
                   ring_vectorized=_aligned(rc.ring_k, chunk, rc.ring_k.stride()[:1]))


def replayssm_decode(rc: RingCall, error_flag: torch.Tensor) -> None:
    c = rc.call
    device = c.state_pool.device
    check_supported(c.problem, device)
    kernel = _compile.CACHE.get(replayssm_config(rc), device.index)
    with on_device(device):
        kernel(c.q, c.k, c.v, c.a, c.b, c.A_log, c.dt_bias, c.state_pool, c.state_indices,
               c.out, error_flag, rc.ring_d, rc.ring_k, rc.ring_g, rc.write_pos,
               rc.force_flush, c.scale, c.min_valid_slot)
