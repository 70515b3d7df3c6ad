"""The compile cache: one compiled kernel per configuration, launched through TVM-FFI.

A configuration (`KernelConfig`) fixes everything the kernel is specialised on:
head counts and dims, T, dtypes, the tile shape, the verify options and whether
each tensor allows 16-byte vector access. The batch size B, the pool size P and
every outer stride stay run-time values (`cute.sym_int`), so one compiled kernel
serves every batch size of a CUDA-graph capture sweep and any pool.

Compiled with `--enable-tvm-ffi`, the kernel is called with torch tensors
directly (about 10 µs of host time rather than 80 through DLPack) and runs on
torch's current stream, so CUDA-graph capture needs nothing special.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

CUTE_DTYPES = {}  # filled lazily: importing cutlass is slow and CPU-only users never need it


@dataclass(frozen=True)
class KernelConfig:
    num_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    tokens: int
    qkv_dtype: torch.dtype
    gate_dtype: torch.dtype
    A_log_dtype: torch.dtype
    dt_bias_dtype: torch.dtype
    state_dtype: torch.dtype
    index_dtype: torch.dtype
    rows_per_cta: int
    rows_per_thread: int
    intermediate: str | None = None       # None, "rows" or "indexed"
    inter_index_dtype: torch.dtype | None = None
    update_state: bool = True
    qkv_vectorized: bool = True           # q/k allow vector reads of K/32 elements
    state_vectorized: bool = True         # pool (and intermediate) allow 16-byte accesses
    # fp32 intermediate rows as streaming stores (decode.py; heuristics.Tile.streaming_rows)
    streaming_rows: bool = False
    use_pdl: bool = True
    # decode_mma.py (bf16 pools, T <= 4) rather than decode.py; for the spec ring's verify
    # (T <= 4) and fold, replayssm_spec_mma.py rather than replayssm_spec.py.
    tensor_cores: bool = False
    per_token_slots: bool = False         # state_indices [B, T] with num_accepted_tokens [B]
    ragged: bool = False                  # cu_seqlens [B + 1] over [1, N, ...] token inputs
    # ReplaySSM decode (replayssm_decode.py) on rings of ring_len records when > 0.
    ring_len: int = 0
    ring_dtype: torch.dtype | None = None  # the d and k rings'
    force_flush: bool = False              # a per-request flag can force the flush
    ring_vectorized: bool = True           # ring keys allow vector reads of K/32 elements
    flush_mma: bool = False                # the flush on tensor cores (heuristics.Tile)
    # The spec ring (replayssm_spec.py): "verify", "fold" or "finish", on rings of ring_len
    # records keyed by request rows (indices of row_index_dtype); the fold over `track` slots.
    spec: str | None = None
    row_index_dtype: torch.dtype | None = None
    track: bool = False
    # Its tensor-core kernels: checkpoint rows staged in shared memory (heuristics.Tile).
    staged_rows: bool = False


def qk_chunk(head_k_dim: int) -> int:
    """Elements of a q or k row that one lane of a warp reads at once."""
    return head_k_dim // 32


def _cute_dtype(dtype: torch.dtype):
    import cutlass

    if not CUTE_DTYPES:
        CUTE_DTYPES.update({
            torch.float32: cutlass.Float32, torch.bfloat16: cutlass.BFloat16,
            torch.float16: cutlass.Float16, torch.int32: cutlass.Int32, torch.int64: cutlass.Int64,
        })
    return CUTE_DTYPES[dtype]


def fake_arguments(cfg: KernelConfig) -> tuple:
    """Fake tensors standing for one call: B, P, N and outer strides symbolic."""
    import cutlass
    import cutlass.cute as cute

    H, HV, K, V, T = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.tokens
    fake = cute.runtime.make_fake_tensor
    qkv = _cute_dtype(cfg.qkv_dtype)
    state = _cute_dtype(cfg.state_dtype)
    state_vec = 16 // cfg.state_dtype.itemsize          # elements per 16-byte state vector
    # A warp reads a q or k row in chunks of K/32 elements: strides and base keep them aligned.
    chunk = qk_chunk(cfg.head_k_dim)
    qkv_div = chunk if cfg.qkv_vectorized else 1
    qkv_align = chunk * cfg.qkv_dtype.itemsize if cfg.qkv_vectorized else cfg.qkv_dtype.itemsize
    st_div = state_vec if cfg.state_vectorized else 1
    st_align = 16 if cfg.state_vectorized else cfg.state_dtype.itemsize

    def stride():
        return cute.sym_int64(divisibility=qkv_div)

    B = cute.sym_int()
    # Ragged rows: inputs are [1, N, ...], every request's tokens one after another.
    lead = (cute.sym_int(), cute.sym_int()) if cfg.ragged else (B, T)
    q = fake(qkv, (*lead, H, K), stride=(stride(), stride(), stride(), 1), assumed_align=qkv_align)
    k = fake(qkv, (*lead, H, K), stride=(stride(), stride(), stride(), 1), assumed_align=qkv_align)
    v = fake(qkv, (*lead, HV, V), stride=(cute.sym_int64(), cute.sym_int64(), cute.sym_int64(), 1),
             assumed_align=cfg.qkv_dtype.itemsize)
    gate = _cute_dtype(cfg.gate_dtype)
    a = fake(gate, (*lead, HV), stride=(cute.sym_int64(), cute.sym_int64(), cute.sym_int64()),
             assumed_align=cfg.gate_dtype.itemsize)
    b = fake(gate, (*lead, HV), stride=(cute.sym_int64(), cute.sym_int64(), cute.sym_int64()),
             assumed_align=cfg.gate_dtype.itemsize)
    A_log = fake(_cute_dtype(cfg.A_log_dtype), (HV,), stride=(1,),
                 assumed_align=cfg.A_log_dtype.itemsize)
    dt_bias = fake(_cute_dtype(cfg.dt_bias_dtype), (HV,), stride=(1,),
                   assumed_align=cfg.dt_bias_dtype.itemsize)
    pool = fake(state, (cute.sym_int(), HV, V, K),
                stride=(cute.sym_int64(divisibility=st_div), V * K, K, 1), assumed_align=st_align)
    index = _cute_dtype(cfg.index_dtype)
    if cfg.per_token_slots:
        idx = fake(index, (B, T), stride=(cute.sym_int64(), 1), assumed_align=cfg.index_dtype.itemsize)
    else:
        idx = fake(index, (B,), stride=(1,), assumed_align=cfg.index_dtype.itemsize)
    out = fake(qkv, (*lead, HV, V), stride=(cute.sym_int64(), cute.sym_int64(), cute.sym_int64(), 1),
               assumed_align=cfg.qkv_dtype.itemsize)
    flag = fake(cutlass.Int32, (1,), stride=(1,), assumed_align=4)
    inter = inter_idx = accepted = cu_seqlens = None
    if cfg.intermediate is not None:
        inter = fake(state, (cute.sym_int(), T, HV, V, K),
                     stride=(cute.sym_int64(divisibility=st_div), cute.sym_int64(divisibility=st_div),
                             V * K, K, 1), assumed_align=st_align)
    if cfg.intermediate == "indexed":
        inter_idx = fake(_cute_dtype(cfg.inter_index_dtype), (B,), stride=(1,),
                         assumed_align=cfg.inter_index_dtype.itemsize)
    if cfg.per_token_slots:
        accepted = fake(cutlass.Int32, (B,), stride=(1,), assumed_align=4)
    if cfg.ragged:
        cu_seqlens = fake(cutlass.Int32, (cute.sym_int(),), stride=(1,), assumed_align=4)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    tail = (cutlass.Float32(1.0), cutlass.Int32(0), stream)
    if cfg.spec == "verify":
        return (q, k, v, a, b, A_log, dt_bias, pool, idx, out, flag, *fake_spec_rings(cfg),
                cu_seqlens, *tail)
    if cfg.ring_len:
        return (q, k, v, a, b, A_log, dt_bias, pool, idx, out, flag, *fake_rings(cfg), *tail)
    return (q, k, v, a, b, A_log, dt_bias, pool, idx, out, flag, inter, inter_idx, accepted,
            cu_seqlens, *tail)


def fake_rings(cfg: KernelConfig) -> tuple:
    """ReplaySSM's rings d [P, HV, L, V], k [P, H, L, K], g [P, HV, L], the cursors [B] and
    the force-flush flags [B] (or None): slot strides symbolic, each slot dense."""
    import cutlass
    import cutlass.cute as cute

    H, HV, K, V, L = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.ring_len
    fake = cute.runtime.make_fake_tensor
    ring = _cute_dtype(cfg.ring_dtype)
    size = cfg.ring_dtype.itemsize
    chunk = qk_chunk(K) if cfg.ring_vectorized else 1
    P, B = cute.sym_int(), cute.sym_int()
    ring_d = fake(ring, (P, HV, L, V), stride=(cute.sym_int64(), L * V, V, 1), assumed_align=size)
    ring_k = fake(ring, (P, H, L, K), stride=(cute.sym_int64(divisibility=chunk), L * K, K, 1),
                  assumed_align=chunk * size)
    ring_g = fake(cutlass.Float32, (P, HV, L), stride=(cute.sym_int64(), L, 1), assumed_align=4)
    cursor = fake(cutlass.Int32, (B,), stride=(1,), assumed_align=4)
    force = fake(cutlass.Int32, (B,), stride=(1,), assumed_align=4) if cfg.force_flush else None
    return ring_d, ring_k, ring_g, cursor, force


def fake_spec_rings(cfg: KernelConfig, layers: bool = False) -> tuple:
    """The spec ring: d, d_low [R, HV, L, V], k, k_low [R, H, L, K], g [R, HV, L], then the
    request rows [B] and the rows' cursors write_pos, cache_base [R] and is_flush [R] int8.
    With `layers`, the rings lead with every layer: [layers, R, ...]."""
    import cutlass
    import cutlass.cute as cute

    H, HV, K, V, L = cfg.num_heads, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.ring_len
    fake, sym64 = cute.runtime.make_fake_tensor, cute.sym_int64
    ring = _cute_dtype(cfg.ring_dtype)
    size = cfg.ring_dtype.itemsize
    chunk = qk_chunk(K) if cfg.ring_vectorized else 1
    R, B = cute.sym_int(), cute.sym_int()
    lead = ((cute.sym_int(), R), lambda div=1: (sym64(divisibility=div), sym64(divisibility=div))) \
        if layers else ((R,), lambda div=1: (sym64(divisibility=div),))
    shape, strides = lead
    ring_d = [fake(ring, (*shape, HV, L, V), stride=(*strides(), L * V, V, 1), assumed_align=size)
              for _ in range(2)]
    ring_k = [fake(ring, (*shape, H, L, K), stride=(*strides(chunk), L * K, K, 1),
                   assumed_align=chunk * size) for _ in range(2)]
    ring_g = fake(cutlass.Float32, (*shape, HV, L), stride=(*strides(), L, 1), assumed_align=4)
    rows = fake(_cute_dtype(cfg.row_index_dtype), (B,), stride=(1,),
                assumed_align=cfg.row_index_dtype.itemsize)
    write_pos, cache_base = (fake(cutlass.Int32, (R,), stride=(1,), assumed_align=4)
                             for _ in range(2))
    is_flush = fake(cutlass.Int8, (R,), stride=(1,), assumed_align=1)
    return (ring_d[0], ring_d[1], ring_k[0], ring_k[1], ring_g, rows, write_pos, cache_base,
            is_flush)


def fake_fold_arguments(cfg: KernelConfig) -> tuple:
    """The fold's: checkpoints [layers, P, HV, V, K], slots [B], the flag, the rings of every
    layer with the rows and cursors, then accept_lens, track slots and steps [B] int32."""
    import cutlass
    import cutlass.cute as cute

    HV, K, V = cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim
    fake, sym64 = cute.runtime.make_fake_tensor, cute.sym_int64
    div = 16 // cfg.state_dtype.itemsize if cfg.state_vectorized else 1
    pool = fake(_cute_dtype(cfg.state_dtype), (cute.sym_int(), cute.sym_int(), HV, V, K),
                stride=(sym64(divisibility=div), sym64(divisibility=div), V * K, K, 1),
                assumed_align=16 if cfg.state_vectorized else cfg.state_dtype.itemsize)
    B = cute.sym_int()
    idx = fake(_cute_dtype(cfg.index_dtype), (B,), stride=(1,),
               assumed_align=cfg.index_dtype.itemsize)
    flag = fake(cutlass.Int32, (1,), stride=(1,), assumed_align=4)
    per_request = [fake(cutlass.Int32, (B,), stride=(1,), assumed_align=4) for _ in range(3)]
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return (pool, idx, flag, *fake_spec_rings(cfg, layers=True), *per_request, stream)


def fake_finish_arguments(cfg: KernelConfig) -> tuple:
    """The cursor reset's: the pool's slot count, slots and rows [B], the rows' cursors, then
    accept_lens, track slots and steps [B] int32 (the fold's)."""
    import cutlass
    import cutlass.cute as cute

    fake = cute.runtime.make_fake_tensor
    B, R = cute.sym_int(), cute.sym_int()
    idx = fake(_cute_dtype(cfg.index_dtype), (B,), stride=(1,),
               assumed_align=cfg.index_dtype.itemsize)
    rows = fake(_cute_dtype(cfg.row_index_dtype), (B,), stride=(1,),
                assumed_align=cfg.row_index_dtype.itemsize)
    write_pos, cache_base = (fake(cutlass.Int32, (R,), stride=(1,), assumed_align=4)
                             for _ in range(2))
    is_flush = fake(cutlass.Int8, (R,), stride=(1,), assumed_align=1)
    per_request = [fake(cutlass.Int32, (B,), stride=(1,), assumed_align=4) for _ in range(3)]
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    return (cutlass.Int64(1), idx, rows, write_pos, cache_base, is_flush, *per_request, stream)


def build(cfg: KernelConfig):
    """Compile one configuration (for the GPU this process runs on, or CUTE_DSL_ARCH)."""
    import cutlass.cute as cute

    from .decode import GatedDeltaRuleDecode
    from .decode_mma import GatedDeltaRuleDecodeMMA
    from .replayssm_decode import ReplaySSMDecode
    from .replayssm_spec import ReplaySSMSpecFinish, ReplaySSMSpecFold, ReplaySSMSpecVerify
    from .replayssm_spec_mma import ReplaySSMSpecFoldMMA, ReplaySSMSpecVerifyMMA

    if cfg.spec == "finish":
        return cute.compile(ReplaySSMSpecFinish(ring_len=cfg.ring_len, track=cfg.track),
                            *fake_finish_arguments(cfg), options="--enable-tvm-ffi")

    options = dict(
        num_heads=cfg.num_heads, num_v_heads=cfg.num_v_heads, head_k_dim=cfg.head_k_dim,
        head_v_dim=cfg.head_v_dim, tokens=cfg.tokens, state_bytes=cfg.state_dtype.itemsize,
        rows_per_cta=cfg.rows_per_cta, intermediate=cfg.intermediate,
        update_state=cfg.update_state, use_pdl=cfg.use_pdl, prefetch_state=cfg.state_vectorized,
        per_token_slots=cfg.per_token_slots, ragged=cfg.ragged,
        streaming_rows=cfg.streaming_rows,
    )
    if cfg.spec:
        spec = dict(num_heads=cfg.num_heads, num_v_heads=cfg.num_v_heads,
                    head_k_dim=cfg.head_k_dim, head_v_dim=cfg.head_v_dim,
                    state_bytes=cfg.state_dtype.itemsize, rows_per_cta=cfg.rows_per_cta,
                    rows_per_thread=cfg.rows_per_thread, use_pdl=cfg.use_pdl,
                    prefetch_state=cfg.state_vectorized, ring_len=cfg.ring_len)
        if cfg.tensor_cores:
            spec["staged_rows"] = cfg.staged_rows
        if cfg.spec == "fold":
            kind = ReplaySSMSpecFoldMMA if cfg.tensor_cores else ReplaySSMSpecFold
            return cute.compile(kind(track=cfg.track, **spec), *fake_fold_arguments(cfg),
                                options="--enable-tvm-ffi")
        kind = ReplaySSMSpecVerifyMMA if cfg.tensor_cores else ReplaySSMSpecVerify
        kernel = kind(tokens=cfg.tokens, **spec)
    elif cfg.ring_len:
        kernel = ReplaySSMDecode(rows_per_thread=cfg.rows_per_thread, ring_len=cfg.ring_len,
                                 force_flush=cfg.force_flush, flush_mma=cfg.flush_mma,
                                 **options)
    else:
        kind = GatedDeltaRuleDecodeMMA if cfg.tensor_cores else GatedDeltaRuleDecode
        kernel = kind(rows_per_thread=cfg.rows_per_thread, **options)
    return cute.compile(kernel, *fake_arguments(cfg), options="--enable-tvm-ffi")


class CompileCache:
    """Compiled kernels by device and configuration; counts compilations so tests can prove
    none happen late.

    A compiled kernel's module lives in the context of the device it was built on, so each
    device gets its own, built with that device current.
    """

    def __init__(self):
        self._kernels: dict[tuple[int, KernelConfig], object] = {}
        self._lock = threading.Lock()
        self.compilations = 0

    def get(self, cfg: KernelConfig, device: int):
        key = (device, cfg)
        fn = self._kernels.get(key)
        if fn is None:
            if torch.cuda.is_current_stream_capturing():
                # Loading a module inside capture would invalidate the engine's graph.
                raise RuntimeError(
                    f"gdn_backend has no compiled kernel for {cfg} on cuda:{device} and "
                    "CUDA-graph capture is under way; call gdn_backend.warmup(...) with this "
                    "configuration and device before capturing")
            with self._lock:
                fn = self._kernels.get(key)
                if fn is None:
                    with torch.cuda.device(device):
                        fn = build(cfg)
                    self._kernels[key] = fn
                    self.compilations += 1
        return fn


CACHE = CompileCache()

# Programmatic dependent launch lets the kernel's launch overlap the previous kernel's tail.
USE_PDL = os.environ.get("GDN_BACKEND_PDL", "1") == "1"
