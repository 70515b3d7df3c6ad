"""vLLM's Qwen GDN layer with gdn_backend serving its decode and MTP verify.

`GDNBackendGatedDeltaNetAttention` subclasses vLLM 0.33.0's `QwenGatedDeltaNetAttention`
and is registered under its name (`PluggableLayer.register_oot`), so vLLM builds it in its
place for every Qwen3-Next and Qwen3.5 GDN layer. It replaces two methods that run inside
vLLM's own `qwen_gdn_attention_core` custom op (so torch.compile and CUDA graphs see the
same op as before):

- `_forward_core_decode_non_spec` (plain decode): vLLM's conv update, then gdn_backend's
  op on the conv output in place, the pool and the block-table slots;
- `_forward_core`, for batches of decodes only (vLLM takes it for them where its packed
  decode is switched off) and of speculative (MTP) verifies only: vLLM's conv update with
  its accepted-token bookkeeping, then the op with per-token slots and ragged rows.

Everything else (prefill, batches mixing prefill or plain decode with verify, the layers
gdn_backend does not serve) runs vLLM's own code, per layer, as `gdn_backend_unserved`
says. Qwen3.5 layers on vLLM's fused CUDA spec path (gated RMSNorm fused into the
verify kernel) keep that kernel for their verify batches; their other batches reach
`_forward_core` and are served.
"""

from __future__ import annotations

import logging

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn import qwen_gdn_linear_attn as vllm_gdn

from ...kernels.launch import SUPPORTED_HEAD_DIMS
from . import ops

logger = logging.getLogger(__name__)

LAYER_NAME = vllm_gdn.QwenGatedDeltaNetAttention.__name__


def unserved_reason(layer) -> str | None:
    """Why gdn_backend does not serve this layer, or None where it does."""
    dims = (layer.head_k_dim, layer.head_v_dim)
    if any(d not in SUPPORTED_HEAD_DIMS for d in dims):
        return f"its head dims K, V = {dims}; gdn_backend's kernel serves {SUPPORTED_HEAD_DIMS}"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return "gdn_backend's kernel needs an sm_90+ CUDA GPU"
    return None


class GDNBackendGatedDeltaNetAttention(vllm_gdn.QwenGatedDeltaNetAttention):
    """vLLM's Qwen GDN layer; decode and MTP verify on gdn_backend where it serves them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gdn_backend_unserved = unserved_reason(self)
        if self.gdn_backend_unserved is not None:
            logger.info("gdn_backend: %s stays on vLLM's kernels: %s", self.prefix,
                        self.gdn_backend_unserved)
        elif self.enable_fused_gdn_spec_decode:
            logger.info("gdn_backend active for %s: decode; its verify batches keep vLLM's fused "
                        "CUDA kernel (gated RMSNorm fused)", self.prefix)
        else:
            logger.info("gdn_backend active for %s: decode and MTP verify", self.prefix)

    def _conv_state(self):
        state = self.kv_cache[0]
        # The conv kernels take (..., dim, width - 1); vLLM's SD layout stores the transpose.
        return state if vllm_gdn.is_conv_state_dim_first() else state.transpose(-1, -2)

    def _conv_weights(self):
        return self.conv1d.weight.view(self.conv1d.weight.size(0), self.conv1d.weight.size(2))

    def _forward_core_decode_non_spec(self, mixed_qkv, b, a, core_attn_out, attn_metadata):
        if self.gdn_backend_unserved is not None:
            return super()._forward_core_decode_non_spec(mixed_qkv, b, a, core_attn_out,
                                                         attn_metadata)
        n = attn_metadata.num_actual_tokens
        indices = attn_metadata.non_spec_state_indices_tensor[:n]
        mixed_qkv = vllm_gdn.causal_conv1d_update(
            mixed_qkv[:n], self._conv_state(), self._conv_weights(), self.conv1d.bias,
            self.activation, conv_state_indices=indices, validate_data=False)
        ops.packed_decode(
            mixed_qkv=mixed_qkv, a=a[:n], b=b[:n], A_log=self.A_log, dt_bias=self.dt_bias,
            scale=self.head_k_dim**-0.5, initial_state=self.kv_cache[1],
            out=core_attn_out[:n].unsqueeze(1), ssm_state_indices=indices,
            use_qk_l2norm_in_kernel=True)

    def _forward_core(self, mixed_qkv, b, a, core_attn_out):
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if self.gdn_backend_unserved is None and metadata is not None and not metadata.num_prefills:
            if metadata.spec_sequence_masks is None and metadata.num_decodes > 0:
                return self._forward_core_decode_non_spec(mixed_qkv, b, a, core_attn_out, metadata)
            if metadata.spec_sequence_masks is not None and metadata.num_decodes == 0:
                return self._forward_core_spec_decode(mixed_qkv, b, a, core_attn_out, metadata)
        return super()._forward_core(mixed_qkv, b, a, core_attn_out)

    def _forward_core_spec_decode(self, mixed_qkv, b, a, core_attn_out, attn_metadata):
        """A batch of MTP verifies only: vLLM's conv update, then gdn_backend's op."""
        n = attn_metadata.num_actual_tokens
        requests = attn_metadata.num_spec_decodes
        slots = attn_metadata.spec_state_indices_tensor
        query_start_loc = attn_metadata.spec_query_start_loc
        mixed_qkv = vllm_gdn.causal_conv1d_update(
            mixed_qkv[:n], self._conv_state(), self._conv_weights(), self.conv1d.bias,
            self.activation, conv_state_indices=slots[:, 0][:requests],
            num_accepted_tokens=attn_metadata.num_accepted_tokens,
            query_start_loc=query_start_loc, max_query_len=slots.size(-1), validate_data=False)
        ops.spec_decode(
            mixed_qkv, a[:n], b[:n], self.A_log, self.dt_bias, self.head_k_dim**-0.5,
            self.kv_cache[1], core_attn_out[:n], query_start_loc[:requests + 1],
            slots[:requests], attn_metadata.num_accepted_tokens[:requests])
