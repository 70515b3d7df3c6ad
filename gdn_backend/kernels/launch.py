"""From a validated call to a compiled kernel: pick the configuration, launch it.

Host work only, no device synchronisation: the configuration comes from shapes,
dtypes, strides and pointer alignment, never from tensor values.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch

from ..validation import Call, Problem, RingCall, SpecFoldCall, SpecVerifyCall
from . import compile as _compile
from .heuristics import (TINY, choose_ring_tile, choose_spec_fold_tile, choose_spec_verify_tile,
                         choose_tile, ring_serves, ring_tiles_for, spec_fold_tiles_for,
                         spec_verify_tiles_for, tiles_for)

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
        **decode_tile_fields(tile, state_ok), intermediate=mode,
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
    if base.spec == "finish":
        return [base]
    if base.spec == "verify":
        tiles = spec_verify_tiles_for(base.num_v_heads, base.head_k_dim, base.head_v_dim,
                                      base.state_dtype.itemsize, base.tokens,
                                      base.ring_dtype == torch.bfloat16)
    elif base.spec == "fold":
        tiles = spec_fold_tiles_for(base.num_v_heads, base.head_k_dim, base.head_v_dim,
                                    base.state_dtype.itemsize, base.ring_dtype == torch.bfloat16)
    elif base.ring_len:
        tiles = ring_tiles_for(base.num_v_heads, base.head_v_dim,
                               base.ring_dtype == torch.bfloat16)
    else:
        tiles = tiles_for(base.num_v_heads, base.head_v_dim, base.tokens,
                          base.state_dtype.itemsize, base.intermediate is not None,
                          per_token_slots=base.per_token_slots, ragged=base.ragged)
    if base.spec:
        return [replace(base, **spec_tile_fields(t)) for t in tiles]
    if base.ring_len:
        return [replace(base, **ring_tile_fields(t)) for t in tiles]
    return [replace(base, **decode_tile_fields(t, base.state_vectorized)) for t in tiles]


def decode_tile_fields(tile, state_vectorized: bool) -> dict:
    """A decode configuration's fields for `tile`: its shape, its kernel, and streaming
    intermediate rows where the tile asks for them and the rows take 16-byte stores."""
    return dict(rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
                tensor_cores=tile.tensor_cores,
                streaming_rows=bool(tile.streaming_rows) and state_vectorized)


def spec_tile_fields(tile) -> dict:
    """A spec ring configuration's fields for `tile`: its shape, and where the tensor-core
    kernels keep their checkpoint rows."""
    return dict(rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
                tensor_cores=tile.tensor_cores,
                staged_rows=tile.tensor_cores and bool(tile.staged_rows))


def ring_tile_fields(tile) -> dict:
    """A ReplaySSM decode configuration's fields for `tile`: its shape, and whether it
    flushes on tensor cores."""
    return dict(rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
                tensor_cores=False, flush_mma=bool(tile.flush_mma))


def compile_ahead(base: _compile.KernelConfig, device: int) -> None:
    for cfg in warmup_configs(base):
        _compile.CACHE.get(cfg, device)


def replayssm_config(rc: RingCall) -> _compile.KernelConfig:
    """The one-token decode's configuration, on rings, at the ReplaySSM tile."""
    p = rc.call.problem
    bf16_records = rc.ring_d.dtype == torch.bfloat16
    tile = choose_ring_tile(p.batch, p.num_v_heads, p.head_v_dim, bf16_records)
    if not ring_serves(tile, bf16_records):
        raise ValueError(f"ReplaySSM decode cannot flush on tensor cores on {tile} with "
                         f"{rc.ring_d.dtype} rings: it takes bf16 rings and 16-row blocks")
    chunk = _compile.qk_chunk(p.head_k_dim)
    return replace(config_for(rc.call), **ring_tile_fields(tile), ring_len=rc.ring_len,
                   ring_dtype=rc.ring_d.dtype, force_flush=rc.force_flush is not None,
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


def _spec_rings_vectorized(rings) -> bool:
    chunk = _compile.qk_chunk(rings.ring_k.shape[-1])
    return all(_aligned(t, chunk, t.stride()[:-3]) for t in (rings.ring_k, rings.ring_k_low))


def spec_verify_config(vc: SpecVerifyCall) -> _compile.KernelConfig:
    """The spec ring's verify, at the spec tile."""
    p, rings = vc.call.problem, vc.rings
    tile = choose_spec_verify_tile(p.batch, p.num_v_heads, p.head_k_dim, p.head_v_dim,
                                   vc.call.state_pool.element_size(), p.tokens,
                                   rings.ring_d.dtype == torch.bfloat16)
    return replace(config_for(vc.call),
                   **spec_tile_fields(tile),
                   ring_len=rings.ring_len, ring_dtype=rings.ring_d.dtype, spec="verify",
                   row_index_dtype=rings.rows.dtype,
                   ring_vectorized=_spec_rings_vectorized(rings))


def replayssm_spec_verify(vc: SpecVerifyCall, error_flag: torch.Tensor) -> None:
    c, r = vc.call, vc.rings
    device = c.state_pool.device
    check_supported(c.problem, device)
    kernel = _compile.CACHE.get(spec_verify_config(vc), device.index)
    with on_device(device):
        kernel(c.q, c.k, c.v, c.a, c.b, c.A_log, c.dt_bias, c.state_pool, c.state_indices,
               c.out, error_flag, r.ring_d, r.ring_d_low, r.ring_k, r.ring_k_low, r.ring_g,
               r.rows, r.write_pos, r.cache_base, r.is_flush, c.cu_seqlens, c.scale,
               c.min_valid_slot)


def spec_fold_configs(fc: SpecFoldCall) -> tuple[_compile.KernelConfig, _compile.KernelConfig]:
    """The commit's fold and its cursor reset."""
    layers, P, HV, V, K = fc.checkpoint.shape
    rings = fc.rings
    tile = choose_spec_fold_tile(fc.batch * layers, HV, K, V, fc.checkpoint.element_size(),
                                 rings.ring_d.dtype == torch.bfloat16)
    vec = 16 // fc.checkpoint.element_size()
    fold = _compile.KernelConfig(
        num_heads=fc.num_heads, num_v_heads=HV, head_k_dim=K, head_v_dim=V, tokens=1,
        qkv_dtype=rings.ring_d.dtype, gate_dtype=torch.float32, A_log_dtype=torch.float32,
        dt_bias_dtype=torch.float32, state_dtype=fc.checkpoint.dtype,
        index_dtype=fc.state_indices.dtype,
        **spec_tile_fields(tile),
        state_vectorized=_aligned(fc.checkpoint, vec, fc.checkpoint.stride()[:2]),
        use_pdl=_compile.USE_PDL, ring_len=rings.ring_len, ring_dtype=rings.ring_d.dtype,
        ring_vectorized=_spec_rings_vectorized(rings), spec="fold",
        row_index_dtype=rings.rows.dtype, track=fc.track_indices is not None)
    return fold, replace(fold, spec="finish", rows_per_cta=TINY.rows_per_cta,
                         rows_per_thread=TINY.rows_per_thread, tensor_cores=False,
                         staged_rows=False, state_vectorized=True,
                         ring_vectorized=True, use_pdl=False)


def replayssm_spec_fold(fc: SpecFoldCall, error_flag: torch.Tensor) -> None:
    device = fc.checkpoint.device
    layers, P, HV, V, K = fc.checkpoint.shape
    check_supported(Problem(fc.batch, 1, fc.num_heads, HV, K, V, P), device)
    fold_cfg, finish_cfg = spec_fold_configs(fc)
    fold = _compile.CACHE.get(fold_cfg, device.index)
    finish = _compile.CACHE.get(finish_cfg, device.index)
    r = fc.rings
    # The fold reads accept_lens and the snapshots as int32 (a cast where they are not);
    # without snapshots it is handed accept_lens in their place and never reads them.
    accept = fc.accept_lens.to(torch.int32)
    track = accept if fc.track_indices is None else fc.track_indices.to(torch.int32)
    steps = accept if fc.track_steps is None else fc.track_steps.to(torch.int32)
    with on_device(device):
        fold(fc.checkpoint, fc.state_indices, error_flag, r.ring_d, r.ring_d_low, r.ring_k,
             r.ring_k_low, r.ring_g, r.rows, r.write_pos, r.cache_base, r.is_flush, accept,
             track, steps)
        finish(fc.checkpoint.shape[1], fc.state_indices, r.rows, r.write_pos, r.cache_base,
               r.is_flush, accept, track, steps)
