"""gdn_backend inside vLLM 0.33.0's real Python code (CPU: the op's reference path)."""

import pytest
import torch

from engines import require

require("vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn")

from vllm.model_executor.layers.mamba.gdn import qwen_gdn_linear_attn  # noqa: E402
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group  # noqa: E402

from gdn_backend.integrations import vllm as plugin  # noqa: E402

VLLMS_OWN = qwen_gdn_linear_attn.fused_recurrent_gated_delta_rule_packed_decode


@pytest.fixture
def restore_vllm():
    yield
    qwen_gdn_linear_attn.fused_recurrent_gated_delta_rule_packed_decode = VLLMS_OWN


def test_vllm_loader_finds_the_plugin():
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["gdn_backend"] is plugin.register


def test_disabled_plugin_leaves_vllm_untouched(monkeypatch, restore_vllm):
    monkeypatch.delenv(plugin.ENABLE_ENV, raising=False)
    plugin.register()
    assert qwen_gdn_linear_attn.fused_recurrent_gated_delta_rule_packed_decode is VLLMS_OWN


def test_enabled_plugin_routes_vllms_gdn_decode_call(monkeypatch, restore_vllm):
    monkeypatch.setenv(plugin.ENABLE_ENV, "1")
    plugin.register()
    plugin.register()  # vLLM calls it in several places of one process: idempotent
    routed = qwen_gdn_linear_attn.fused_recurrent_gated_delta_rule_packed_decode
    assert routed is plugin.packed_decode

    # The call exactly as vLLM's _forward_core_decode_non_spec makes it (keywords only), on
    # a strided state view with slot 0 as the null block and an int32 block-table column.
    from test_vllm_kernel import HV, K, V, VLLMLayer

    layer = VLLMLayer("cpu", seed=4)
    mixed, a, b, idx = layer.batch(6, 4)
    want_out, want_pool = layer.expected(mixed, a, b, idx)
    null_block = layer.ssm_state[0].clone()
    out = torch.zeros(6, 1, HV, V, dtype=torch.bfloat16)
    qwen_gdn_linear_attn.fused_recurrent_gated_delta_rule_packed_decode(
        mixed_qkv=mixed, a=a, b=b, A_log=layer.A_log, dt_bias=layer.dt_bias, scale=K**-0.5,
        initial_state=layer.ssm_state, out=out, ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)
    assert torch.equal(out, want_out)
    assert torch.equal(layer.ssm_state, want_pool)
    assert torch.equal(layer.ssm_state[0], null_block)


def test_signature_matches_vllms_own():
    import inspect

    ours = inspect.signature(plugin.packed_decode).parameters
    theirs = inspect.signature(VLLMS_OWN).parameters
    assert list(ours) == list(theirs)
    assert ours["use_qk_l2norm_in_kernel"].default == theirs["use_qk_l2norm_in_kernel"].default
