"""vLLM's packed-decode and MTP-verify calls served by gdn_backend, on vLLM's layout: packed
mixed_qkv, a state pool that is a strided view into a shared cache buffer, null-block (slot
0) padding, int32 slots from its block table (a strided column for decode, a row-strided
slice for verify, per-token slots and ragged rows). CPU (reference) and GPU (kernel, in a
graph); the adapter needs no vLLM to run."""

import pytest
import torch

from gdn_backend.integrations.vllm.ops import packed_decode, spec_decode
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


def spec_tensors(cache, lengths, T, seed):
    """An MTP-verify batch as vLLM lays it out: tokens [N, 2HK + HV V] row after row,
    per-token slots [B, T] as a slice of the block table (a row stride past T), rows of
    `lengths` tokens (0: a FULL-graph padding row, slots 0, num_accepted 1), int32 throughout.
    Returns mixed, a, b, slots, num_accepted, query_start_loc on the cache's device."""
    gen = torch.Generator().manual_seed(seed)
    B, tokens = len(lengths), sum(lengths)
    mixed = torch.randn(tokens, QKV, generator=gen).to(torch.bfloat16)
    a, b = (torch.randn(tokens, HV, generator=gen).to(torch.bfloat16) for _ in range(2))
    blocks = (torch.randperm(cache.ssm_state.shape[0] - 1, generator=gen)[: B * T] + 1).view(B, T)
    accepted = torch.randint(1, T + 1, (B,), generator=gen).to(torch.int32)
    padding = torch.tensor(lengths) == 0
    blocks[padding], accepted[padding] = 0, 1
    table = torch.zeros(B, T + 2, dtype=torch.int32)
    table[:, :T] = blocks.to(torch.int32)
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    device = cache.device
    return (mixed.to(device), a.to(device), b.to(device), table.to(device)[:, :T],
            accepted.to(device), qsl.to(device))


def reference_spec(cache, mixed, a, b, query_start_loc, slots, accepted):
    """vLLM's verify contract, request by request, from gdn_backend's reference on one slot:
    read [n, num_accepted - 1], the state after token t to [n, t] (slots <= 0 skipped)."""
    before = cache.ssm_state.clone()
    pool = before.clone()
    out = torch.zeros(mixed.shape[0], HV, V, dtype=torch.bfloat16, device=cache.device)
    qsl = query_start_loc.tolist()
    for n in range(len(qsl) - 1):
        start, end = qsl[n], qsl[n + 1]
        read = int(slots[n, int(accepted[n]) - 1])
        if end == start or read <= 0:
            continue
        q, k, v = torch.split(mixed[start:end].unsqueeze(0), [H * K, H * K, HV * V], -1)
        states = torch.empty(1, end - start, HV, V, K, dtype=pool.dtype, device=cache.device)
        row_out = torch.empty(1, end - start, HV, V, dtype=torch.bfloat16, device=cache.device)
        gated_delta_rule_decode_reference(
            q.unflatten(-1, (H, K)).contiguous(), k.unflatten(-1, (H, K)).contiguous(),
            v.unflatten(-1, (HV, V)).contiguous(), a[start:end].unsqueeze(0),
            b[start:end].unsqueeze(0), cache.A_log, cache.dt_bias, before.clone(),
            torch.tensor([read], device=cache.device), row_out, scale=K**-0.5,
            intermediate_states=states, update_state=False)
        out[start:end] = row_out[0]
        for t in range(end - start):
            if slots[n, t] > 0:
                pool[slots[n, t]] = states[0, t]
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
    with pytest.raises(NotImplementedError, match="un-normalised q/k"):
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


def call_spec(cache, mixed, a, b, slots, accepted, qsl, out):
    return spec_decode(mixed, a, b, cache.A_log, cache.dt_bias, K**-0.5, cache.ssm_state, out,
                       qsl, slots, accepted)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_vllm_mtp_verify_gives_the_references_answer(device, state_dtype):
    cache = VLLMLayer(device, blocks=40, state_dtype=state_dtype, seed=11)
    mixed, a, b, slots, accepted, qsl = spec_tensors(cache, [4, 2, 0, 3, 1, 4], 4, seed=12)
    want_out, want_pool = reference_spec(cache, mixed, a, b, qsl, slots, accepted)
    buffer_before = cache.buffer.clone()
    out = torch.zeros(mixed.shape[0], HV, V, dtype=torch.bfloat16, device=device)
    call_spec(cache, mixed, a, b, slots, accepted, qsl, out)
    assert relative_error(out, want_out) < 8e-3
    tol = 2e-5 if state_dtype == torch.float32 else 8e-3
    named = slots[slots > 0].unique().long()
    assert relative_error(cache.ssm_state[named], want_pool[named]) < tol
    touched = torch.zeros(cache.buffer.shape[0], dtype=torch.bool, device=device)
    touched[named] = True
    assert torch.equal(cache.buffer[~touched], buffer_before[~touched])


@pytest.mark.gpu
def test_vllm_mtp_verify_in_a_cuda_graph():
    """vLLM's FULL-graph verify: captured at 8 requests of 4 tokens, replayed with rows of
    fewer tokens and padding rows (no tokens, slots 0, num_accepted 1), on new slots."""
    T, capture = 4, [4] * 8
    cache = VLLMLayer("cuda", blocks=80, state_dtype=torch.float32, seed=13)
    static = list(spec_tensors(cache, capture, T, seed=14))
    out = torch.zeros(static[0].shape[0], HV, V, dtype=torch.bfloat16, device="cuda")
    call_spec(cache, *static, out)  # eager warm-up compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call_spec(cache, *static, out)
    for step, lengths in enumerate(([4] * 8, [4, 1, 3, 2, 4, 0, 0, 0], [2] + [0] * 7)):
        fresh = spec_tensors(cache, lengths, T, seed=15 + step)
        for dst, src in zip(static, fresh):  # fewer tokens: the rest is no request's
            dst[: src.shape[0]].copy_(src)
        tokens = fresh[0].shape[0]
        want_out, want_pool = reference_spec(cache, *fresh[:3], fresh[5], fresh[3], fresh[4])
        out.zero_()
        with no_host_sync():
            graph.replay()
        assert relative_error(out[:tokens], want_out) < 8e-3
        named = fresh[3][fresh[3] > 0].unique().long()
        assert relative_error(cache.ssm_state[named], want_pool[named]) < 2e-5
