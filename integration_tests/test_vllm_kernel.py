"""vLLM's packed-decode call served by gdn_backend, on vLLM's layout: packed mixed_qkv, a
state pool that is a strided view into a shared cache buffer, null-block (slot 0) padding,
int32 indices as a strided block-table column. CPU (reference) and GPU (kernel, in a graph);
the adapter needs no vLLM to run."""

import pytest
import torch

from gdn_backend.integrations.vllm import packed_decode
from gdn_backend.reference import gated_delta_rule_decode_reference
from gdn_backend.testing import no_host_sync, relative_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
H, HV, K, V = 2, 4, 128, 128
QKV = 2 * H * K + HV * V


class VLLMLayer:
    """One layer's view of vLLM's shared cache: [blocks, page] with the SSM state at an offset
    inside each page (the conv state and other layers share the page)."""

    def __init__(self, device, blocks=30, state_dtype=torch.bfloat16, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device
        page = HV * V * K + 4096  # the slot stride is the page, not HV*V*K
        self.buffer = (torch.randn(blocks, page, generator=self.gen) * 0.5).to(state_dtype).to(device)
        self.ssm_state = self.buffer[:, 2048 : 2048 + HV * V * K].unflatten(1, (HV, V, K))
        self.A_log = (torch.rand(HV, generator=self.gen) * 15 + 1).log().to(device)
        self.dt_bias = torch.randn(HV, generator=self.gen).to(torch.bfloat16).to(device)

    def batch(self, B, live):
        mixed = torch.randn(B, QKV, generator=self.gen).to(torch.bfloat16).to(self.device)
        a, b = (torch.randn(B, HV, generator=self.gen).to(torch.bfloat16).to(self.device) for _ in range(2))
        blocks = torch.randperm(self.ssm_state.shape[0] - 1, generator=self.gen)[:live] + 1
        block_table = torch.zeros(B, 3, dtype=torch.int32)  # padding rows name the null block 0
        block_table[:live, 0] = blocks.to(torch.int32)
        return mixed, a, b, block_table.to(self.device)[:, 0]  # a strided column, as vLLM passes

    def expected(self, mixed, a, b, idx):
        pool = self.ssm_state.clone()
        q, k, v = (t.contiguous() for t in torch.split(mixed.unsqueeze(1), [H * K, H * K, HV * V], -1))
        out = torch.empty(mixed.shape[0], 1, HV, V, dtype=torch.bfloat16, device=self.device)
        gated_delta_rule_decode_reference(
            q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (HV, V)),
            a.unsqueeze(1), b.unsqueeze(1), self.A_log, self.dt_bias, pool, idx.contiguous(), out,
            scale=K**-0.5, min_valid_slot=1)
        return out, pool


def call(layer, mixed, a, b, idx, out):
    return packed_decode(mixed_qkv=mixed, a=a, b=b, A_log=layer.A_log, dt_bias=layer.dt_bias,
                         scale=K**-0.5, initial_state=layer.ssm_state, out=out,
                         ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_vllm_packed_decode_gives_the_references_answer(device, state_dtype):
    layer = VLLMLayer(device, state_dtype=state_dtype, seed=1)
    mixed, a, b, idx = layer.batch(8, 6)
    want_out, want_pool = layer.expected(mixed, a, b, idx)
    buffer_before = layer.buffer.clone()
    out = torch.full((8, 1, HV, V), float("nan"), dtype=torch.bfloat16, device=device)
    got_out, got_state = call(layer, mixed, a, b, idx, out)
    assert got_out is out and got_state is layer.ssm_state
    assert relative_error(out, want_out) < 8e-3
    assert (out[6:] == 0).all()
    assert relative_error(layer.ssm_state, want_pool) < (2e-5 if state_dtype == torch.float32 else 8e-3)
    assert torch.equal(layer.ssm_state[0], buffer_before[0, 2048 : 2048 + HV * V * K].view(HV, V, K))
    # Every byte of the shared buffer outside the named blocks' states is untouched.
    touched = torch.zeros_like(layer.buffer, dtype=torch.bool)
    touched[idx[:6].long(), 2048 : 2048 + HV * V * K] = True
    assert torch.equal(layer.buffer[~touched], buffer_before[~touched])


def test_unnormalised_qk_is_refused():
    layer = VLLMLayer("cpu", seed=2)
    mixed, a, b, idx = layer.batch(2, 2)
    with pytest.raises(NotImplementedError, match="GDN_BACKEND_VLLM"):
        packed_decode(mixed, a, b, layer.A_log, layer.dt_bias, K**-0.5, layer.ssm_state,
                      torch.empty(2, 1, HV, V, dtype=torch.bfloat16), idx)


@pytest.mark.gpu
def test_vllm_packed_decode_in_a_cuda_graph():
    """vLLM's FULL-graph decode: static, contiguous indices padded with the null block."""
    layer = VLLMLayer("cuda", seed=3)
    static_mixed, static_a, static_b, column = layer.batch(16, 16)
    static_idx = column.contiguous()
    out = torch.zeros(16, 1, HV, V, dtype=torch.bfloat16, device="cuda")
    call(layer, static_mixed, static_a, static_b, static_idx, out)  # eager warm-up compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(layer, static_mixed, static_a, static_b, static_idx, out)
    for live in (16, 9, 1):
        mixed, a, b, idx = layer.batch(16, live)
        for dst, src in zip((static_mixed, static_a, static_b, static_idx), (mixed, a, b, idx)):
            dst.copy_(src)
        want_out, want_pool = layer.expected(mixed, a, b, idx)
        with no_host_sync():
            graph.replay()
        assert relative_error(out, want_out) < 8e-3
        assert (out[live:] == 0).all()
        assert relative_error(layer.ssm_state, want_pool) < 8e-3
