"""vLLM: gdn_backend as Qwen3-Next's GDN decode kernel, through a general plugin.

    pip install gdn-backend
    GDN_BACKEND_VLLM=1 vllm serve Qwen/Qwen3-Next-80B-A3B-Instruct

vLLM loads this module's `register()` through its `vllm.general_plugins` entry
point in every process. With `GDN_BACKEND_VLLM=1` it points the name vLLM's GDN
layer calls for packed decode (`fused_recurrent_gated_delta_rule_packed_decode`,
looked up in `qwen_gdn_linear_attn`'s globals at every call, inside vLLM's own
`qwen_gdn_attention_core` custom op) at `packed_decode` below, which runs
gdn_backend's op in place on vLLM's state pool and state indices. vLLM pads with
its null block, slot 0, so slot 0 is padding here (`min_valid_slot=1`): never
read nor written, output rows zero. Without the variable vLLM is left untouched.

Written against vLLM 0.33.0. Speculative (MTP) decode stays on vLLM's kernels: its
contract writes each draft step's state to a separate pool slot, which the op's
intermediate-state rows do not express.
"""

from __future__ import annotations

import logging
import os

from ..op import gated_delta_rule_decode, split_packed_qkv

logger = logging.getLogger(__name__)

ENABLE_ENV = "GDN_BACKEND_VLLM"
GDN_MODULE = "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn"
PACKED_DECODE = "fused_recurrent_gated_delta_rule_packed_decode"
# vLLM's null block: the padding slot of its mamba state pools.
NULL_BLOCK_ID = 0


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV) == "1"


def packed_decode(mixed_qkv, a, b, A_log, dt_bias, scale, initial_state, out, ssm_state_indices,
                  use_qk_l2norm_in_kernel=False):
    """vLLM's packed-decode contract, served by gdn_backend's op.

    mixed_qkv [B, 2HK + HV V] (rows q | k | v), a and b [B, HV], the pool
    initial_state [P, HV, V, K] updated in place, out [B, 1, HV, V]; indices <= 0 pad.
    """
    if not use_qk_l2norm_in_kernel:
        raise NotImplementedError(
            "gdn_backend normalises q and k in the kernel, as Qwen3-Next does; this caller "
            f"asked for un-normalised q/k: unset {ENABLE_ENV}")
    HV, V, K = initial_state.shape[1:]
    H = (mixed_qkv.shape[-1] - HV * V) // (2 * K)
    q, k, v = split_packed_qkv(mixed_qkv.unsqueeze(1), H, HV, K, V)
    # vLLM hands a strided column of its block table outside FULL graphs; the op takes
    # contiguous indices (a no-op when they already are, as under graphs).
    gated_delta_rule_decode(q, k, v, a.unsqueeze(1), b.unsqueeze(1), A_log, dt_bias, initial_state,
                            ssm_state_indices.contiguous(), scale=scale, out=out,
                            min_valid_slot=NULL_BLOCK_ID + 1)
    return out, initial_state


def register() -> None:
    """vLLM general-plugin entry point (group `vllm.general_plugins`): cheap and idempotent,
    no CUDA work, and nothing at all unless GDN_BACKEND_VLLM=1."""
    if not enabled():
        return
    import importlib

    module = importlib.import_module(GDN_MODULE)
    if getattr(module, PACKED_DECODE) is not packed_decode:
        setattr(module, PACKED_DECODE, packed_decode)
        logger.info("gdn_backend active: vLLM's GDN packed decode runs gdn_backend's pooled kernel")

