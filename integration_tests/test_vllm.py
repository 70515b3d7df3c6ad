"""gdn_backend inside vLLM 0.33.0's real Python code (CPU: the op's reference path).

The plugin registers its layer through vLLM's own `PluggableLayer.register_oot`; vLLM's
`QwenGatedDeltaNetAttention` then builds gdn_backend's subclass, whose decode and MTP-verify
methods run on vLLM's own `GDNAttentionMetadata`, forward context and cache layout. vLLM's
Triton conv update does not run on a CPU: a stand-in that records its arguments and leaves
the tokens as they are takes its place (the conv is vLLM's, before and after the plugin).
"""

import inspect
from types import SimpleNamespace

import pytest
import torch

from engines import require

require("vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn")

from vllm.forward_context import ForwardContext, override_forward_context  # noqa: E402
from vllm.model_executor.custom_op import op_registry_oot  # noqa: E402
from vllm.model_executor.layers.mamba.gdn import qwen_gdn_linear_attn as vllm_gdn  # noqa: E402
from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group  # noqa: E402
from vllm.v1.attention.backends.gdn_attn import GDNAttentionMetadata  # noqa: E402

from gdn_backend.integrations import vllm as plugin  # noqa: E402
from gdn_backend.integrations.vllm.layer import (  # noqa: E402
    LAYER_NAME, GDNBackendGatedDeltaNetAttention)
from gdn_backend.testing import relative_error  # noqa: E402
from test_vllm_kernel import (HV, K, QKV, V, VLLMLayer, reference_spec,  # noqa: E402
                              spec_tensors)

PREFIX = "model.layers.0.linear_attn"


@pytest.fixture
def registry():
    """vLLM's out-of-tree layer registry, as it was before the test."""
    saved = dict(op_registry_oot)
    yield op_registry_oot
    op_registry_oot.clear()
    op_registry_oot.update(saved)


@pytest.fixture
def enabled(monkeypatch, registry):
    monkeypatch.setenv(plugin.ENABLE_ENV, "1")
    plugin.register()
    return registry


def test_vllm_loader_finds_the_plugin():
    assert load_plugins_by_group(DEFAULT_PLUGINS_GROUP)["gdn_backend"] is plugin.register


def test_disabled_plugin_registers_nothing(monkeypatch, registry):
    monkeypatch.delenv(plugin.ENABLE_ENV, raising=False)
    plugin.register()
    assert LAYER_NAME not in registry


def test_vllm_builds_our_layer_in_place_of_its_own(enabled):
    layer = vllm_gdn.QwenGatedDeltaNetAttention.__new__(vllm_gdn.QwenGatedDeltaNetAttention)
    assert type(layer) is GDNBackendGatedDeltaNetAttention
    assert isinstance(layer, vllm_gdn.QwenGatedDeltaNetAttention)


def test_register_is_idempotent(enabled):
    plugin.register()  # vLLM calls it in several places of one process
    assert enabled[LAYER_NAME] is GDNBackendGatedDeltaNetAttention


def test_another_plugins_layer_is_a_clear_error(monkeypatch, registry):
    class Theirs(vllm_gdn.QwenGatedDeltaNetAttention):
        pass

    registry[LAYER_NAME] = Theirs
    monkeypatch.setenv(plugin.ENABLE_ENV, "1")
    with pytest.raises(RuntimeError, match="another plugin already replaces"):
        plugin.register()


@pytest.mark.parametrize("method", ["_forward_core", "_forward_core_decode_non_spec"])
def test_our_methods_keep_vllms_signatures(method):
    ours = inspect.signature(getattr(GDNBackendGatedDeltaNetAttention, method))
    theirs = inspect.signature(getattr(vllm_gdn.QwenGatedDeltaNetAttention, method))
    assert list(ours.parameters) == list(theirs.parameters)


def test_vllms_metadata_has_the_fields_we_read():
    fields = set(GDNAttentionMetadata.__dataclass_fields__)
    assert {"num_prefills", "num_decodes", "num_spec_decodes", "num_actual_tokens",
            "spec_sequence_masks", "spec_state_indices_tensor", "spec_query_start_loc",
            "num_accepted_tokens", "non_spec_state_indices_tensor"} <= fields


class ConvStandIn:
    """vLLM's causal_conv1d_update on a CPU: records how it was called, returns x as is."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, conv_state, weight, bias, activation, **kwargs):
        self.calls.append(dict(x=x, conv_state=conv_state, weight=weight, **kwargs))
        return x


def built_layer(cache: VLLMLayer):
    """Our layer with the attributes vLLM's __init__ and its cache binding give it."""
    layer = GDNBackendGatedDeltaNetAttention.__new__(GDNBackendGatedDeltaNetAttention)
    torch.nn.Module.__init__(layer)
    layer.prefix, layer.head_k_dim, layer.head_v_dim = PREFIX, K, V
    layer.A_log, layer.dt_bias = cache.A_log, cache.dt_bias
    conv = torch.zeros(cache.ssm_state.shape[0], 3, QKV, dtype=torch.bfloat16)
    layer.kv_cache = (conv, cache.ssm_state)
    layer.conv1d = SimpleNamespace(weight=torch.zeros(QKV, 1, 4), bias=None)
    layer.activation = "silu"
    layer.gdn_backend_unserved = None
    return layer


def run_core(layer, metadata, mixed, a, b, out, monkeypatch):
    conv = ConvStandIn()
    monkeypatch.setattr(vllm_gdn, "causal_conv1d_update", conv)
    context = ForwardContext(no_compile_layers={}, attn_metadata={PREFIX: metadata},
                             slot_mapping={})
    with override_forward_context(context):
        layer._forward_core(mixed, b, a, out)
    return conv


def test_plain_decode_runs_on_the_op(monkeypatch):
    cache = VLLMLayer("cpu", seed=5)
    mixed, a, b, idx = cache.batch(6, 4)
    want_out, want_pool = cache.expected(mixed, a, b, idx)
    layer = built_layer(cache)
    metadata = GDNAttentionMetadata(
        num_prefills=0, num_prefill_tokens=0, num_decodes=6, num_decode_tokens=6,
        num_spec_decodes=0, num_spec_decode_tokens=0, num_actual_tokens=6,
        non_spec_state_indices_tensor=idx)
    out = torch.zeros(8, HV, V, dtype=torch.bfloat16)  # padded past the batch, as vLLM's
    conv = run_core(layer, metadata, mixed, a, b, out, monkeypatch)
    assert torch.equal(conv.calls[0]["conv_state_indices"], idx)
    assert relative_error(out[:6], want_out[:, 0]) < 8e-3
    assert (out[4:] == 0).all()
    assert relative_error(cache.ssm_state, want_pool) < 8e-3


def spec_batch(cache, lengths, T, seed):
    """vLLM's GDNAttentionMetadata for a batch of MTP verifies only, as its builder fills it."""
    mixed, a, b, slots, accepted, qsl = spec_tensors(cache, lengths, T, seed)
    metadata = GDNAttentionMetadata(
        num_prefills=0, num_prefill_tokens=0, num_decodes=0, num_decode_tokens=0,
        num_spec_decodes=len(lengths), num_spec_decode_tokens=sum(lengths),
        num_actual_tokens=sum(lengths), spec_query_start_loc=qsl,
        spec_state_indices_tensor=slots, num_accepted_tokens=accepted,
        spec_sequence_masks=torch.ones(len(lengths), dtype=torch.bool))
    return mixed, a, b, metadata


@pytest.mark.parametrize("lengths", [[4, 4, 4], [4, 2, 3, 1], [3, 0, 2, 0]],
                         ids=["uniform", "ragged", "graph-padded"])
def test_mtp_verify_runs_on_the_op_with_vllms_slots(monkeypatch, lengths):
    T = 4
    cache = VLLMLayer("cpu", blocks=30, state_dtype=torch.float32, seed=6)
    mixed, a, b, metadata = spec_batch(cache, lengths, T, seed=len(lengths) + sum(lengths))
    want_out, want_pool = reference_spec(cache, mixed, a, b, metadata.spec_query_start_loc,
                                         metadata.spec_state_indices_tensor,
                                         metadata.num_accepted_tokens)
    buffer_before = cache.buffer.clone()
    layer = built_layer(cache)
    out = torch.zeros(mixed.shape[0], HV, V, dtype=torch.bfloat16)
    conv = run_core(layer, metadata, mixed, a, b, out, monkeypatch)
    call = conv.calls[0]
    assert torch.equal(call["conv_state_indices"], metadata.spec_state_indices_tensor[:, 0])
    assert call["num_accepted_tokens"] is metadata.num_accepted_tokens
    assert call["max_query_len"] == T
    assert relative_error(out, want_out) < 8e-3
    assert relative_error(cache.ssm_state, want_pool) < 2e-5
    named = metadata.spec_state_indices_tensor[metadata.spec_state_indices_tensor > 0].unique()
    touched = torch.zeros(cache.buffer.shape[0], dtype=torch.bool)
    touched[named.long()] = True
    assert torch.equal(cache.buffer[~touched], buffer_before[~touched])  # null block 0 too


def test_batches_that_mix_prefill_stay_on_vllms_code(monkeypatch):
    layer = built_layer(VLLMLayer("cpu", seed=7))
    seen = []
    monkeypatch.setattr(vllm_gdn.QwenGatedDeltaNetAttention, "_forward_core",
                        lambda self, *args: seen.append(args))
    metadata = GDNAttentionMetadata(
        num_prefills=1, num_prefill_tokens=5, num_decodes=2, num_decode_tokens=2,
        num_spec_decodes=0, num_spec_decode_tokens=0, num_actual_tokens=7)
    context = ForwardContext(no_compile_layers={}, attn_metadata={PREFIX: metadata},
                             slot_mapping={})
    with override_forward_context(context):
        layer._forward_core(None, None, None, None)
    assert len(seen) == 1


def test_an_unserved_layer_stays_on_vllms_code(monkeypatch):
    layer = built_layer(VLLMLayer("cpu", seed=8))
    layer.gdn_backend_unserved = "its head dims K, V = (64, 64)"
    seen = []
    monkeypatch.setattr(vllm_gdn.QwenGatedDeltaNetAttention, "_forward_core_decode_non_spec",
                        lambda self, *args: seen.append(args))
    layer._forward_core_decode_non_spec(None, None, None, None, None)
    assert len(seen) == 1
