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
    """The sizes of one validated call. `tokens` is T, the most tokens a request has."""

    batch: int
    tokens: int
    num_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    num_slots: int


@dataclass(frozen=True)
class Call:
    """One validated call: its tensors, options and sizes, handed as one to the kernels'
    launch and to the reference."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    state_pool: torch.Tensor
    state_indices: torch.Tensor
    out: torch.Tensor
    scale: float
    min_valid_slot: int
    intermediate_states: torch.Tensor | None
    intermediate_indices: torch.Tensor | None
    update_state: bool
    num_accepted_tokens: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    problem: Problem

    @property
    def per_token_slots(self) -> bool:
        """state_indices [B, T]: read slot [n, num_accepted[n] - 1], token t's state to [n, t]."""
        return self.state_indices.dim() == 2

    @property
    def ragged(self) -> bool:
        """cu_seqlens [B + 1]: request n has tokens cu[n] .. cu[n+1] - 1 of [1, N, ...] inputs."""
        return self.cu_seqlens is not None


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


def _check_dense_slots(name: str, t: torch.Tensor, inner_dims: int,
                       what: str = "[HV, V, K]") -> None:
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
            f"{name} has strides {t.stride()}; each slot must be dense {what} with strides "
            f"(..., {', '.join(map(str, expected))}) (a per-layer view with any slot stride "
            "is fine, other layouts are not copied silently)"
        )
    for dim in range(t.dim() - inner_dims):
        if t.shape[dim] > 1 and t.stride(dim) < step:
            raise ValueError(
                f"{name} has stride {t.stride(dim)} in dim {dim}; it must be at least {step} "
                "so that slots do not overlap"
            )


def _check_index_vector(name: str, t: torch.Tensor, length: int, what: str, dtypes) -> None:
    _check_rank(name, t, 1, what)
    _check_dtype(name, t, dtypes)
    _check_shape(name, t, (length,), what)
    if length > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} has stride {t.stride(0)}; it must be contiguous")


def _tokens_per_request(q, cu_seqlens, state_indices, intermediate_states, max_tokens) -> int:
    """T: q's token dim, or for ragged rows the bound every row's length is held to."""
    if cu_seqlens is None:
        if max_tokens is not None:
            raise ValueError("max_tokens was given without cu_seqlens; without ragged rows "
                             "T is q's token dim")
        return q.shape[1]
    implied = {}
    if state_indices.dim() == 2:
        implied["state_indices [B, T]"] = state_indices.shape[1]
    if intermediate_states is not None and intermediate_states.dim() == 5:
        implied["intermediate_states [N, T, HV, V, K]"] = intermediate_states.shape[1]
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise TypeError(f"max_tokens is {max_tokens!r}; it must be an int")
        implied["max_tokens"] = max_tokens
    if not implied:
        raise ValueError("ragged rows (cu_seqlens) need T, the most tokens a request has: give "
                         "max_tokens, per-token state_indices [B, T] or intermediate_states")
    first, *others = implied.values()
    if any(other != first for other in others):  # no set: under torch.compile these are SymInts
        raise ValueError("ragged rows get different T from "
                         + ", ".join(f"{k} ({v})" for k, v in implied.items()))
    return first


def validate(
    q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, *,
    scale, min_valid_slot, intermediate_states=None, intermediate_indices=None,
    update_state=True, num_accepted_tokens=None, cu_seqlens=None, max_tokens=None,
) -> Call:
    """Check one call against SPEC.md; return it as one validated `Call`."""
    _check_rank("q", q, 4, "[B, T, H, K] (ragged rows: [1, N, H, K])")
    _check_rank("v", v, 4, "[B, T, HV, V] (ragged rows: [1, N, HV, V])")
    HV, V = v.shape[2], v.shape[3]
    _check_rank("state_pool", state_pool, 4, "[P, HV, V, K]")
    P = state_pool.shape[0]
    if not isinstance(state_indices, torch.Tensor):
        raise TypeError(f"state_indices must be a torch.Tensor, got {type(state_indices).__name__}")
    if state_indices.dim() not in (1, 2):
        raise ValueError(f"state_indices has shape {tuple(state_indices.shape)}; it must be [B] "
                         "(one slot a request) or [B, T] (per-token slots)")
    if intermediate_states is not None:
        _check_rank("intermediate_states", intermediate_states, 5, "[N, T, HV, V, K]")

    ragged = cu_seqlens is not None
    if ragged:
        _check_rank("cu_seqlens", cu_seqlens, 1, "[B + 1]")
        _check_dtype("cu_seqlens", cu_seqlens, (torch.int32,))
        if cu_seqlens.shape[0] < 1:
            raise ValueError("cu_seqlens is empty; it must be [B + 1] with B >= 0")
        if cu_seqlens.shape[0] > 1 and cu_seqlens.stride(0) != 1:
            raise ValueError(f"cu_seqlens has stride {cu_seqlens.stride(0)}; it must be contiguous")
        B = cu_seqlens.shape[0] - 1
        if q.shape[0] != 1:
            raise ValueError(f"q has shape {tuple(q.shape)}; with ragged rows (cu_seqlens) it "
                             "must be [1, N, H, K], every request's tokens one after another")
    else:
        B = q.shape[0]
    N, H, K = q.shape[1], q.shape[2], q.shape[3]
    T = _tokens_per_request(q, cu_seqlens, state_indices, intermediate_states, max_tokens)
    lead = (1, N) if ragged else (B, T)
    lead_text = "[1, N" if ragged else "[B, T"

    _check_dtype("q", q, QKV_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; it must match q's dtype {q.dtype}")
    _check_rank("k", k, 4, f"{lead_text}, H, K]")
    _check_shape("k", k, tuple(q.shape), f"q's shape {lead_text}, H, K]")
    if tuple(v.shape[:2]) != lead:
        raise ValueError(f"v has shape {tuple(v.shape)}; it must be {lead_text}, HV, V] with "
                         f"its first dims {lead} from q")
    if T < 1 or T > MAX_TOKENS:
        raise ValueError(f"T = {T} tokens per request; T must be in 1..{MAX_TOKENS}")
    if H < 1 or HV % H != 0:
        raise ValueError(
            f"v has HV = {HV} value heads and q has H = {H} heads; HV must be a positive multiple of H"
        )

    for name, t in (("a", a), ("b", b)):
        _check_rank(name, t, 3, f"{lead_text}, HV]")
        _check_dtype(name, t, GATE_DTYPES)
        _check_shape(name, t, (*lead, HV), f"{lead_text}, HV]")
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

    _check_dtype("state_indices", state_indices, INDEX_DTYPES)
    if state_indices.dim() == 2:
        _check_shape("state_indices", state_indices, (B, T), "[B, T] (per-token slots)")
        if T > 1 and state_indices.stride(1) != 1:
            raise ValueError(f"state_indices has strides {state_indices.stride()}; per-token "
                             "slots need the last dim contiguous (any row stride)")
        if num_accepted_tokens is None:
            raise ValueError("per-token state_indices [B, T] need num_accepted_tokens [B]: "
                             "request n reads slot [n, num_accepted_tokens[n] - 1]")
        _check_index_vector("num_accepted_tokens", num_accepted_tokens, B, "[B]", (torch.int32,))
        if intermediate_states is not None:
            raise ValueError("per-token state_indices write each token's state to its own "
                             "slot; intermediate_states do not combine with them")
        if not update_state:
            raise ValueError("per-token state_indices write each token's state to its slot; "
                             "update_state=False does not apply to them")
    else:
        _check_index_vector("state_indices", state_indices, B, "[B]", INDEX_DTYPES)
        if num_accepted_tokens is not None:
            raise ValueError("num_accepted_tokens was given with state_indices [B]; it goes "
                             "with per-token state_indices [B, T]")

    _check_rank("out", out, 4, f"{lead_text}, HV, V]")
    if out.dtype != v.dtype:
        raise TypeError(f"out has dtype {out.dtype}; it must match v's dtype {v.dtype}")
    _check_shape("out", out, (*lead, HV, V), f"{lead_text}, HV, V]")

    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _check_last_dim_contiguous(name, t)

    if intermediate_states is not None:
        if intermediate_states.dtype != state_pool.dtype:
            raise TypeError(
                f"intermediate_states has dtype {intermediate_states.dtype}; "
                f"it must match state_pool's dtype {state_pool.dtype}"
            )
        rows = intermediate_states.shape[0]
        _check_shape("intermediate_states", intermediate_states, (rows, T, HV, V, K),
                     "[N, T, HV, V, K]")
        _check_dense_slots("intermediate_states", intermediate_states, 3)
        if intermediate_indices is None:
            if rows < B:
                raise ValueError(
                    f"intermediate_states has {rows} rows for B = {B} requests; without "
                    "intermediate_indices it needs at least B rows (row n for request n)"
                )
        else:
            _check_index_vector("intermediate_indices", intermediate_indices, B, "[B]",
                                INDEX_DTYPES)
    elif intermediate_indices is not None:
        raise ValueError("intermediate_indices was given without intermediate_states")

    tensors = {
        "q": q, "k": k, "v": v, "a": a, "b": b, "A_log": A_log, "dt_bias": dt_bias,
        "state_indices": state_indices, "out": out,
        "intermediate_states": intermediate_states, "intermediate_indices": intermediate_indices,
        "num_accepted_tokens": num_accepted_tokens, "cu_seqlens": cu_seqlens,
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
    return Call(q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, out, float(scale),
                min_valid_slot, intermediate_states, intermediate_indices, bool(update_state),
                num_accepted_tokens, cu_seqlens, Problem(B, T, H, HV, K, V, P))


# ReplaySSM: one warp scans a ring's decays, a record a lane.
MAX_RING = 32
# CUDA's limit on a grid's second and third dimensions.
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class RingCall:
    """One validated ReplaySSM decode call: a one-token `Call` on the checkpoints, and the
    rings (d [P, HV, L, V], k [P, H, L, K], g [P, HV, L]) with each request's cursor."""

    call: Call
    ring_d: torch.Tensor
    ring_k: torch.Tensor
    ring_g: torch.Tensor
    write_pos: torch.Tensor
    force_flush: torch.Tensor | None

    @property
    def ring_len(self) -> int:
        return self.ring_d.shape[2]


def validate_rings(call: Call, ring_d, ring_k, ring_g, write_pos, force_flush) -> RingCall:
    """Check ReplaySSM's rings and cursors against a validated one-token call."""
    p = call.problem
    if p.tokens != 1 or call.ragged or call.per_token_slots or call.intermediate_states is not None:
        raise ValueError("ReplaySSM decode runs one token a request, one slot each: q [B, 1, H, K], "
                         "state_indices [B], no ragged rows or intermediate states")
    if not call.update_state:
        raise ValueError("ReplaySSM decode writes its ring and, on a flush, the checkpoint; "
                         "update_state=False does not apply to it")
    P, H, HV, K, V = p.num_slots, p.num_heads, p.num_v_heads, p.head_k_dim, p.head_v_dim
    _check_rank("ring_d", ring_d, 4, "[P, HV, L, V]")
    L = ring_d.shape[2]
    if L < 1 or L > MAX_RING:
        raise ValueError(f"ring_d holds L = {L} records a slot; L must be in 1..{MAX_RING}")
    _check_rank("ring_k", ring_k, 4, "[P, H, L, K]")
    _check_rank("ring_g", ring_g, 3, "[P, HV, L]")
    _check_dtype("ring_d", ring_d, STATE_DTYPES)
    if ring_k.dtype != ring_d.dtype:
        raise TypeError(f"ring_k has dtype {ring_k.dtype}; it must match ring_d's {ring_d.dtype}")
    _check_dtype("ring_g", ring_g, (torch.float32,))
    for name, t, shape, what in (("ring_d", ring_d, (P, HV, L, V), "[P, HV, L, V]"),
                                 ("ring_k", ring_k, (P, H, L, K), "[P, H, L, K]"),
                                 ("ring_g", ring_g, (P, HV, L), "[P, HV, L]")):
        _check_shape(name, t, shape, f"{what}, a ring per pool slot")
        _check_dense_slots(name, t, t.dim() - 1, what.replace("P, ", ""))
    _check_index_vector("write_pos", write_pos, p.batch, "[B]", (torch.int32,))
    if force_flush is not None:
        _check_index_vector("force_flush", force_flush, p.batch, "[B]", (torch.int32,))
    device = call.state_pool.device
    for name, t in (("ring_d", ring_d), ("ring_k", ring_k), ("ring_g", ring_g),
                    ("write_pos", write_pos), ("force_flush", force_flush)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}; it must be on state_pool's device {device}")
    return RingCall(call, ring_d, ring_k, ring_g, write_pos, force_flush)


@dataclass(frozen=True)
class SpecRings:
    """SGLang's spec ring, keyed by request rows: d, d_low [.., R, HV, L, V] and k, k_low
    [.., R, H, L, K] (bf16 high and low parts of each record), g [.., R, HV, L] float32, the
    rows of the batch's requests [B] and the rows' cursors [R] (write_pos, cache_base int32,
    is_flush int8). Leading dims: none for a verify (one layer), [layers] for a fold."""

    ring_d: torch.Tensor
    ring_d_low: torch.Tensor
    ring_k: torch.Tensor
    ring_k_low: torch.Tensor
    ring_g: torch.Tensor
    rows: torch.Tensor
    write_pos: torch.Tensor
    cache_base: torch.Tensor
    is_flush: torch.Tensor

    @property
    def ring_len(self) -> int:
        return self.ring_d.shape[-2]


@dataclass(frozen=True)
class SpecVerifyCall:
    """One validated spec-ring verify: a ragged, state-preserving `Call` on the checkpoints
    and the request rows' rings."""

    call: Call
    rings: SpecRings


@dataclass(frozen=True)
class SpecFoldCall:
    """One validated commit fold over every layer: checkpoints [layers, P, HV, V, K], the
    requests' slots [B], their rings, accepted counts and optional snapshot slots/steps."""

    checkpoint: torch.Tensor
    state_indices: torch.Tensor
    rings: SpecRings
    accept_lens: torch.Tensor
    track_indices: torch.Tensor | None
    track_steps: torch.Tensor | None
    num_heads: int

    @property
    def batch(self) -> int:
        return self.state_indices.shape[0]


def validate_spec_rings(ring_d, ring_d_low, ring_k, ring_k_low, ring_g, rows, write_pos,
                        cache_base, is_flush, *, lead: tuple[int, ...], num_heads: int | None,
                        num_v_heads: int, head_k_dim: int, head_v_dim: int, batch: int,
                        device: torch.device) -> SpecRings:
    """Check the spec ring's tensors; `lead` is () for one layer or (layers,)."""
    HV, K, V = num_v_heads, head_k_dim, head_v_dim
    names = "layers, " if lead else ""
    _check_rank("ring_d", ring_d, len(lead) + 4, f"[{names}R, HV, L, V]")
    R, L = ring_d.shape[len(lead)], ring_d.shape[-2]
    if L < 1 or L > MAX_RING or L & (L - 1):
        raise ValueError(f"ring_d holds L = {L} records a row; L must be a power of two in "
                         f"1..{MAX_RING} (SGLang's cursors wrap with a mask)")
    _check_rank("ring_k", ring_k, len(lead) + 4, f"[{names}R, H, L, K]")
    H = ring_k.shape[len(lead) + 1] if num_heads is None else num_heads
    if H < 1 or HV % H:
        raise ValueError(f"ring_k has shape {tuple(ring_k.shape)}; its H must divide HV = {HV}")
    for name, t in (("ring_d_low", ring_d_low), ("ring_k_low", ring_k_low)):
        if t is None:
            raise ValueError(f"{name} is None; the spec ring keeps every record's low part "
                             "(SGLang's replayssm_rawv / replayssm_rawk)")
    _check_dtype("ring_d", ring_d, (torch.bfloat16, torch.float16))
    for name, t in (("ring_k", ring_k), ("ring_d_low", ring_d_low), ("ring_k_low", ring_k_low)):
        if t.dtype != ring_d.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; it must match ring_d's {ring_d.dtype}")
    _check_dtype("ring_g", ring_g, (torch.float32,))
    for name, t, shape, what in (
            ("ring_d", ring_d, (HV, L, V), "HV, L, V"), ("ring_d_low", ring_d_low, (HV, L, V), "HV, L, V"),
            ("ring_k", ring_k, (H, L, K), "H, L, K"), ("ring_k_low", ring_k_low, (H, L, K), "H, L, K"),
            ("ring_g", ring_g, (HV, L), "HV, L")):
        _check_shape(name, t, (*lead, R, *shape), f"[{names}R, {what}]")
        _check_dense_slots(name, t, len(shape), f"[{what}]")
    _check_index_vector("replay_indices", rows, batch, "[B], each request's ring row",
                        INDEX_DTYPES)
    for name, t, dtype in (("write_pos", write_pos, torch.int32),
                           ("cache_base", cache_base, torch.int32),
                           ("is_flush", is_flush, torch.int8)):
        _check_index_vector(name, t, R, "[R], a value a request row", (dtype,))
    for name, t in (("ring_d", ring_d), ("ring_d_low", ring_d_low), ("ring_k", ring_k),
                    ("ring_k_low", ring_k_low), ("ring_g", ring_g), ("replay_indices", rows),
                    ("write_pos", write_pos), ("cache_base", cache_base), ("is_flush", is_flush)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}; it must be on the checkpoints' device {device}")
    return SpecRings(ring_d, ring_d_low, ring_k, ring_k_low, ring_g, rows, write_pos,
                     cache_base, is_flush)


def validate_spec_fold(checkpoint, ring_d, ring_d_low, ring_k, ring_k_low, ring_g,
                       state_indices, replay_indices, write_pos, cache_base, is_flush,
                       accept_lens, track_indices, track_steps) -> SpecFoldCall:
    """Check one commit fold: checkpoints [layers, P, HV, V, K] and every layer's rings."""
    _check_rank("checkpoint", checkpoint, 5, "[layers, P, HV, V, K]")
    _check_dtype("checkpoint", checkpoint, STATE_DTYPES)
    layers, P, HV, V, K = checkpoint.shape
    if P < 1:
        raise ValueError("checkpoint has no slots; it must have P >= 1")
    _check_dense_slots("checkpoint", checkpoint, 3)
    if not isinstance(state_indices, torch.Tensor) or state_indices.dim() != 1:
        raise ValueError("state_indices must be a [B] tensor of the requests' slots")
    B = state_indices.shape[0]
    _check_index_vector("state_indices", state_indices, B, "[B]", INDEX_DTYPES)
    for name, count in (("requests", B), ("layers", layers)):
        if count > MAX_GRID_YZ:  # the fold's grid is (tiles x heads, requests, layers)
            raise ValueError(f"the fold takes at most {MAX_GRID_YZ} {name} a call; this one has "
                             f"{count}: split it")
    rings = validate_spec_rings(ring_d, ring_d_low, ring_k, ring_k_low, ring_g, replay_indices,
                                write_pos, cache_base, is_flush, lead=(layers,), num_heads=None,
                                num_v_heads=HV, head_k_dim=K, head_v_dim=V, batch=B,
                                device=checkpoint.device)
    _check_index_vector("accept_lens", accept_lens, B, "[B], accepted tokens a request",
                        INDEX_DTYPES)
    if (track_indices is None) != (track_steps is None):
        raise ValueError("track_indices and track_steps come together (the radix cache's "
                         "snapshots) or not at all")
    if track_indices is not None:
        _check_index_vector("track_indices", track_indices, B, "[B], a snapshot slot or -1",
                            INDEX_DTYPES)
        _check_index_vector("track_steps", track_steps, B, "[B], the accepted step to snapshot",
                            INDEX_DTYPES)
    for name, t in (("state_indices", state_indices), ("accept_lens", accept_lens),
                    ("track_indices", track_indices), ("track_steps", track_steps)):
        if t is not None and t.device != checkpoint.device:
            raise ValueError(f"{name} is on {t.device}; it must be on checkpoint's device "
                             f"{checkpoint.device}")
    return SpecFoldCall(checkpoint, state_indices, rings, accept_lens, track_indices,
                        track_steps, ring_k.shape[2])
