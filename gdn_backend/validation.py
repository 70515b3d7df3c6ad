"""SPEC.md's input rules, checked on the host before anything is launched.

Every check reads only shapes, strides, dtypes and devices, never tensor data, so
validation costs no device synchronisation and is safe inside CUDA-graph capture.
A failed check raises before anything is written; the message names the argument,
what it got and what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# fp32 q/k/v too: Hugging Face models run in fp32 on the CPU (SPEC.md names bf16, fp16).
QKV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GATE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PARAM_DTYPES = (torch.float32, torch.bfloat16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_TOKENS = 8


@dataclass(frozen=True)
class Problem:
    """The sizes of one validated call."""

    batch: int
    tokens: int
    num_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    num_slots: int


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be one of: {_names(allowed)}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be {what} = {expected}")


def _check_rank(name: str, t: torch.Tensor, rank: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be {rank}-D {what}")


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} has strides {t.stride()}; its last dim must be contiguous (stride 1)"
        )
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name} has strides {t.stride()}; negative strides are not supported")


def _check_dense_slots(name: str, t: torch.Tensor, inner_dims: int) -> None:
    """The trailing `inner_dims` dims are dense row-major; leading strides are free."""
    expected, step = [], 1
    for size in reversed(t.shape[-inner_dims:]):
        expected.append(step)
        step *= size
    expected.reverse()
    got = list(t.stride()[-inner_dims:])
    # Strides of size-1 dims never move an address; ignore them.
    if any(g != e for g, e, n in zip(got, expected, t.shape[-inner_dims:]) if n > 1):
        raise ValueError(
            f"{name} has strides {t.stride()}; each slot must be dense [HV, V, K] with strides "
            f"(..., {', '.join(map(str, expected))}) (a per-layer view with any slot stride "
            "is fine, other layouts are not copied silently)"
        )
    for dim in range(t.dim() - inner_dims):
        if t.shape[dim] > 1 and t.stride(dim) < step:
            raise ValueError(
                f"{name} has stride {t.stride(dim)} in dim {dim}; it must be at least {step} "
                "so that slots do not overlap"
            )


def validate(
    q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, *,
    scale, min_valid_slot, intermediate_states, intermediate_indices,
) -> Problem:
    """Check one call against SPEC.md; return its sizes."""
    _check_rank("q", q, 4, "[B, T, H, K]")
    B, T, H, K = q.shape
    _check_rank("v", v, 4, "[B, T, HV, V]")
    HV, V = v.shape[2], v.shape[3]
    _check_rank("state_pool", state_pool, 4, "[P, HV, V, K]")
    P = state_pool.shape[0]

    _check_dtype("q", q, QKV_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; it must match q's dtype {q.dtype}")
    _check_rank("k", k, 4, "[B, T, H, K]")
    _check_shape("k", k, (B, T, H, K), "q's shape [B, T, H, K]")
    if v.shape[:2] != (B, T):
        raise ValueError(f"v has shape {tuple(v.shape)}; it must be [B, T, HV, V] with B, T = {B}, {T} from q")
    if T < 1 or T > MAX_TOKENS:
        raise ValueError(f"q has T = {T} tokens per request; T must be in 1..{MAX_TOKENS}")
    if H < 1 or HV % H != 0:
        raise ValueError(
            f"v has HV = {HV} value heads and q has H = {H} heads; HV must be a positive multiple of H"
        )

    for name, t in (("a", a), ("b", b)):
        _check_rank(name, t, 3, "[B, T, HV]")
        _check_dtype(name, t, GATE_DTYPES)
        _check_shape(name, t, (B, T, HV), "[B, T, HV]")
    if b.dtype != a.dtype:
        raise TypeError(f"b has dtype {b.dtype}; it must match a's dtype {a.dtype}")
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        _check_rank(name, t, 1, "[HV]")
        _check_dtype(name, t, PARAM_DTYPES)
        _check_shape(name, t, (HV,), "[HV]")

    _check_dtype("state_pool", state_pool, STATE_DTYPES)
    _check_shape("state_pool", state_pool, (P, HV, V, K), "[P, HV, V, K]")
    if P < 1:
        raise ValueError("state_pool has no slots; it must have P >= 1")
    _check_dense_slots("state_pool", state_pool, 3)

    _check_rank("state_indices", state_indices, 1, "[B]")
    _check_dtype("state_indices", state_indices, INDEX_DTYPES)
    _check_shape("state_indices", state_indices, (B,), "[B]")
    if B > 1 and state_indices.stride(0) != 1:
        raise ValueError(f"state_indices has stride {state_indices.stride(0)}; it must be contiguous")

    _check_rank("out", out, 4, "[B, T, HV, V]")
    if out.dtype != v.dtype:
        raise TypeError(f"out has dtype {out.dtype}; it must match v's dtype {v.dtype}")
    _check_shape("out", out, (B, T, HV, V), "[B, T, HV, V]")

    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _check_last_dim_contiguous(name, t)

    if intermediate_states is not None:
        _check_rank("intermediate_states", intermediate_states, 5, "[N, T, HV, V, K]")
        if intermediate_states.dtype != state_pool.dtype:
            raise TypeError(
                f"intermediate_states has dtype {intermediate_states.dtype}; "
                f"it must match state_pool's dtype {state_pool.dtype}"
            )
        N = intermediate_states.shape[0]
        _check_shape("intermediate_states", intermediate_states, (N, T, HV, V, K), "[N, T, HV, V, K]")
        _check_dense_slots("intermediate_states", intermediate_states, 3)
        if intermediate_indices is None:
            if N < B:
                raise ValueError(
                    f"intermediate_states has {N} rows for B = {B} requests; without "
                    "intermediate_indices it needs at least B rows (row n for request n)"
                )
        else:
            _check_rank("intermediate_indices", intermediate_indices, 1, "[B]")
            _check_dtype("intermediate_indices", intermediate_indices, INDEX_DTYPES)
            _check_shape("intermediate_indices", intermediate_indices, (B,), "[B]")
            if B > 1 and intermediate_indices.stride(0) != 1:
                raise ValueError(
                    f"intermediate_indices has stride {intermediate_indices.stride(0)}; it must be contiguous"
                )
    elif intermediate_indices is not None:
        raise ValueError("intermediate_indices was given without intermediate_states")

    tensors = {
        "q": q, "k": k, "v": v, "a": a, "b": b, "A_log": A_log, "dt_bias": dt_bias,
        "state_indices": state_indices, "out": out,
        "intermediate_states": intermediate_states, "intermediate_indices": intermediate_indices,
    }
    for name, t in tensors.items():
        if t is not None and t.device != state_pool.device:
            raise ValueError(f"{name} is on {t.device}; it must be on state_pool's device {state_pool.device}")

    if not isinstance(scale, (int, float)) or not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale is {scale!r}; it must be a finite number")
    if not isinstance(min_valid_slot, int) or min_valid_slot < 0:
        raise ValueError(
            f"min_valid_slot is {min_valid_slot!r}; it must be an int >= 0 "
            "(0: negative indices are padding; 1: slot 0 is a null block too)"
        )
    return Problem(B, T, H, HV, K, V, P)
