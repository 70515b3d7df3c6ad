"""SGLang: gdn_backend as the GDN decode (and chain-verify) kernel, chosen by a server flag.

    pip install gdn-backend
    python -m sglang.launch_server --model-path Qwen/Qwen3-Next-80B-A3B-Instruct \\
        --linear-attn-decode-backend gdn_backend

SGLang finds this module through its `sglang.srt.plugins` entry point and calls
`register()` in every process. That adds `gdn_backend` to the linear-attention
backend choices and wraps `GDNKernelDispatcher.__init__` (SGLang's own
HookRegistry), the place where SGLang picks its GDN kernels: when the flag names
gdn_backend, decode and chain speculative verify go to `GDNBackendKernel`, which
runs gdn_backend's op on SGLang's own `ssm_states` pool and `cache_indices`
(PAD_SLOT_ID = -1 padding) with no copy, gather or scatter; with
--enable-linear-replayssm, decode runs gdn_backend's ring kernel on SGLang's rings; with
--enable-linear-replayssm-spec, the spec ring's verify and commit fold run gdn_backend's
(sglang_spec_ring.py). A resolution hook lets both flags through SGLang's argument check.
Prefill and tree verify stay on SGLang's kernels.

Written against SGLang 0.5.23.
"""

from __future__ import annotations

import logging

import torch

from ..kernels.launch import SUPPORTED_HEAD_DIMS
from ..op import gated_delta_rule_decode, split_packed_qkv
from ..replayssm import replayssm_decode
from . import sglang_spec_ring


def _kernel_base() -> type:
    """SGLang's kernel interface where SGLang is installed; a plain base where it is not
    (the GPU test machine), so the same adapter code runs and is tested on both."""
    try:
        from sglang.srt.layers.attention.linear.kernels.kernel_backend import (
            LinearAttnKernelBase)
    except ImportError:
        return object
    return LinearAttnKernelBase

logger = logging.getLogger(__name__)

BACKEND_NAME = "gdn_backend"
FLAG = f"--linear-attn-decode-backend {BACKEND_NAME}"
RAGGED_VERIFY_ENV = "SGLANG_RAGGED_VERIFY_MODE"
DISPATCHER_INIT = "sglang.srt.layers.attention.linear.gdn_backend.GDNKernelDispatcher.__init__"
LINEAR_ATTN_CHECKS = "handle_linear_attn_backend"  # SGLang's resolution step for these flags


RING_ARGS = ("replayssm_d", "replayssm_k", "replayssm_g", "replayssm_write_pos")


def _refuse_unserved(kwargs: dict) -> None:
    """ReplaySSM buffers reach only packed decode in SGLang 0.5.23; anywhere else they would
    mean a mode this adapter does not serve."""
    served = [name for name, value in kwargs.items()
              if name.startswith("replayssm_") and value is not None]
    if served:
        raise NotImplementedError(
            f"gdn_backend takes SGLang's ReplaySSM buffers in packed decode (the decode ring) "
            f"and in the spec ring's own hooks only (got {', '.join(served)} here): turn off "
            f"the ReplaySSM flags, or drop {FLAG}")


class GDNBackendKernel(_kernel_base()):
    """SGLang's linear-attention kernel interface, served by gdn_backend's pooled op.

    ragged_verify: SGLang's verify rows may differ in length (SGLANG_RAGGED_VERIFY_MODE other
    than static), so chain verify runs on `query_start_loc`, in CUDA graphs too.
    """

    supports_packed_decode = True
    # Verify reads q/k/v as strided views of the conv output, like decode.
    supports_strided_target_verify_qkv = True

    def __init__(self, ragged_verify: bool = False):
        self.ragged_verify = ragged_verify

    def packed_decode(self, mixed_qkv, a, b, *, A_log, dt_bias, scale, ssm_states,
                      cache_indices, num_v_heads, head_v_dim, **kwargs):
        """One token per request from the conv output rows [B, 2HK + HV V]; returns [1, B, HV, V].

        With --enable-linear-replayssm SGLang hands this layer's rings and its cursor
        snapshot too (kwargs replayssm_d, _k, _g, _write_pos, _force_flush): the step
        then runs on them, the pool holding checkpoints.
        """
        rings = [kwargs.pop(name, None) for name in RING_ARGS]
        force_flush = kwargs.pop("replayssm_force_flush", None)
        _refuse_unserved(kwargs)
        K = ssm_states.shape[-1]
        H = (mixed_qkv.shape[-1] - num_v_heads * head_v_dim) // (2 * K)
        q, k, v = split_packed_qkv(mixed_qkv.unsqueeze(1), H, num_v_heads, K, head_v_dim)
        if any(t is not None for t in rings):
            if any(t is None for t in rings):
                given = ", ".join(n for n, t in zip(RING_ARGS, rings) if t is not None)
                raise ValueError(f"SGLang's ReplaySSM decode needs all of {', '.join(RING_ARGS)}; "
                                 f"got only {given}")
            out = replayssm_decode(q, k, v, a.unsqueeze(1), b.unsqueeze(1), A_log, dt_bias,
                                   ssm_states, *rings, cache_indices, scale=scale,
                                   force_flush=force_flush)
        else:
            out = gated_delta_rule_decode(
                q, k, v, a.unsqueeze(1), b.unsqueeze(1), A_log, dt_bias, ssm_states,
                cache_indices, scale=scale)
        return out.transpose(0, 1)

    def decode(self, q, k, v, a, b, *, A_log, dt_bias, ssm_states, cache_indices,
               query_start_loc, **kwargs):
        """q, k [1, B, H, K] and v [1, B, HV, V] (views of the conv output); returns [1, B, HV, V]."""
        _refuse_unserved(kwargs)
        out = gated_delta_rule_decode(
            q[0].unsqueeze(1), k[0].unsqueeze(1), v[0].unsqueeze(1), a.unsqueeze(1),
            b.unsqueeze(1), A_log, dt_bias, ssm_states, cache_indices)
        return out.transpose(0, 1)

    def target_verify(self, A_log, dt_bias, q, k, v, a, b, *, ssm_states, cache_indices,
                      query_start_loc, intermediate_states_buffer, intermediate_state_indices,
                      cache_steps, retrieve_parent_token=None, **kwargs):
        """Chain verify of up to T = cache_steps draft tokens per request, q/k/v [1, N, ...].

        Writes the state after every token to intermediate_states_buffer[row, t]
        ([rows, D_max, HV, V, K], row intermediate_state_indices[n]) and leaves the
        pool alone: SGLang copies the accepted step back itself. Rows of T tokens each
        (static verify) or as `query_start_loc` gives them (ragged verify).
        """
        _refuse_unserved(kwargs)
        if retrieve_parent_token is not None:
            raise NotImplementedError(
                "gdn_backend serves chain verify only; SGLang routes tree verify to its own kernel")
        B, T = cache_indices.shape[0], cache_steps
        states = dict(intermediate_states=intermediate_states_buffer[:, :T],
                      intermediate_indices=intermediate_state_indices[:B], update_state=False)
        if self.ragged_verify:
            return gated_delta_rule_decode(
                q, k, v, a.unsqueeze(0), b.unsqueeze(0), A_log, dt_bias, ssm_states,
                cache_indices, cu_seqlens=query_start_loc[:B + 1], **states)
        if q.shape[1] != B * T:
            raise ValueError(
                f"chain verify got {q.shape[1]} tokens for {B} requests of {T} draft tokens; "
                f"with {RAGGED_VERIFY_ENV}=static every request has {T}")
        per_request = lambda x: x[0].unflatten(0, (B, T))  # noqa: E731  [B, T, heads, dim] views
        out = gated_delta_rule_decode(
            per_request(q), per_request(k), per_request(v), a.unflatten(0, (B, T)),
            b.unflatten(0, (B, T)), A_log, dt_bias, ssm_states, cache_indices, **states)
        return out.flatten(0, 1).unsqueeze(0)

    def extend(self, q, k, v, g, beta, *, ssm_states, cache_indices, query_start_loc, **kwargs):
        raise NotImplementedError(
            "gdn_backend serves GDN decode and chain verify; prefill stays on SGLang's kernels "
            "(choose them with --linear-attn-prefill-backend)")


def selected() -> bool:
    """Whether this process's server arguments name gdn_backend for GDN decode.

    An explicit --linear-attn-decode-backend wins; the base --linear-attn-backend
    counts only where no decode backend is named, as in SGLang's own resolution.
    """
    from sglang.srt.runtime_context import get_exec

    mamba = get_exec().mamba
    decode = mamba.linear_attn_decode_backend
    return (decode or mamba.linear_attn_backend) == BACKEND_NAME


def ragged_verify() -> bool:
    """Whether SGLang hands chain verify rows of different lengths (its ragged verify)."""
    from sglang.srt.speculative.ragged_verify import RaggedVerifyMode, read_ragged_verify_mode

    return read_ragged_verify_mode() != RaggedVerifyMode.STATIC


def check_device() -> None:
    """Fail at start-up, naming the flag to drop, where the kernel cannot run."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"gdn_backend needs an sm_90+ CUDA GPU and none is available: drop {FLAG}")
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        raise RuntimeError(
            f"gdn_backend needs an sm_90+ GPU (H100, H200 or newer); this one is sm_{major}{minor}: "
            f"drop {FLAG}")


def check_model() -> None:
    """Fail at start-up, naming the flag to drop, for GDN head dims the kernel does not serve."""
    from sglang.srt.arg_groups.model_override_base import model_config_of
    from sglang.srt.runtime_context import get_server_args

    hf = model_config_of(get_server_args()).hf_config
    hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    dims = (getattr(hf, "linear_key_head_dim", None), getattr(hf, "linear_value_head_dim", None))
    if any(d not in SUPPORTED_HEAD_DIMS for d in dims):
        raise RuntimeError(
            f"this model's GDN head dims are K, V = {dims}; gdn_backend's kernel serves "
            f"{SUPPORTED_HEAD_DIMS} (Qwen3-Next): drop {FLAG}")


def _dispatcher_init(original, self, decode_backend, prefill_backend, verify_backend=None):
    """SGLang's dispatcher, with gdn_backend's kernel for decode and chain verify when chosen.

    gdn_backend serves no prefill: where the prefill choice resolves to its name (the
    base flag names it), SGLang's Triton prefill runs, whether or not decode is ours.
    """
    from sglang.srt.layers.attention.linear.utils import LinearAttnKernelBackend
    from sglang.srt.runtime_context import get_exec

    mamba = get_exec().mamba
    named = mamba.linear_attn_prefill_backend or mamba.linear_attn_backend
    if prefill_backend.is_custom() and named == BACKEND_NAME:
        prefill_backend = LinearAttnKernelBackend.TRITON
    if not selected():
        return original(self, decode_backend, prefill_backend, verify_backend)
    serve_verify = mamba.linear_attn_verify_backend is None  # no explicit choice
    check_device()
    check_model()
    # SGLang maps names it does not know to CUSTOM; let it build everything else as usual.
    original(self, LinearAttnKernelBackend.TRITON, prefill_backend, verify_backend)
    kernel = GDNBackendKernel(ragged_verify=ragged_verify())
    self.decode_kernel = kernel
    self.supports_packed_decode = True
    if serve_verify:
        self.verify_kernel = kernel
        self.verify_kernel_is_flashinfer = False
    logger.info("gdn_backend active: GDN decode%s%s%s run on gdn_backend's pooled CuTe DSL "
                "kernels", " (on ReplaySSM's rings)" if mamba.enable_linear_replayssm else "",
                " and chain verify" if serve_verify else "",
                " and the ReplaySSM spec ring's verify and fold"
                if mamba.enable_linear_replayssm_spec else "")


def _linear_attn_checks(server_args, previous) -> None:
    """SGLang's resolution step for the linear-attention flags, with gdn_backend accepted
    for both ReplaySSM modes.

    SGLang's step lists the decode kernels that serve --enable-linear-replayssm (triton,
    helion) and --enable-linear-replayssm-spec (triton, flashinfer) and raises for any
    other. gdn_backend serves both: the step runs with the decode choice declared as
    triton, so that every other ReplaySSM guard still applies (cache length, radix
    strategy, PD, draft chains only, the two modes exclusive), and the choice is declared
    back to gdn_backend after it.
    """
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.arg_groups.overrides import declare_resolution

    cfg = resolving_view(server_args)
    decode = cfg.linear_attn_decode_backend or cfg.linear_attn_backend
    if decode != BACKEND_NAME or not (cfg.enable_linear_replayssm
                                      or cfg.enable_linear_replayssm_spec):
        return previous(server_args)
    declare_resolution(server_args, __name__, linear_attn_decode_backend="triton")
    previous(server_args)
    declare_resolution(server_args, __name__, linear_attn_decode_backend=BACKEND_NAME)


_registered = False


def register() -> None:
    """SGLang general-plugin entry point (group `sglang.srt.plugins`)."""
    global _registered
    from sglang.srt.arg_groups.choices import (
        LINEAR_ATTN_KERNEL_BACKEND_CHOICES, add_linear_attn_kernel_backend_choices)
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in LINEAR_ATTN_KERNEL_BACKEND_CHOICES:
        add_linear_attn_kernel_backend_choices([BACKEND_NAME])
    if _registered:  # SGLang calls plugins once a process; tests may call again
        return
    HookRegistry.register(DISPATCHER_INIT, _dispatcher_init, HookType.AROUND)
    register_resolution_hook(LINEAR_ATTN_CHECKS)(_linear_attn_checks)
    sglang_spec_ring.register()
    _registered = True
