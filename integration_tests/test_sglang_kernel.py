"""SGLang's calls into GDNBackendKernel with SGLang-shaped tensors: packed decode, decode,
chain verify, and decode captured in CUDA graphs the way SGLang's graph runner does it.

The adapter needs no SGLang to run, so these run on the CPU (reference path) and on the
GPU machine (kernel), where SGLang itself does not fit.
"""

import pytest
import torch

import gdn_backend
from gdn_backend.integrations.sglang import GDNBackendKernel
from gdn_backend.kernels import compile as kernel_compile
from gdn_backend.reference import gated_delta_rule_decode_reference
from gdn_backend.testing import PAD_SLOT_ID, no_host_sync, relative_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
H, HV, K, V = 2, 4, 128, 128
QKV = 2 * H * K + HV * V
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}


class SGLangLayer:
    """One GDN layer's tensors as SGLang holds them: pool [slots + 1, HV, V, K] with slot 0
    reserved, fp32 A_log, bf16 dt_bias."""

    def __init__(self, device, slots=40, state_dtype=torch.float32, seed=0):
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.device = device
        self.ssm_states = self.randn(slots + 1, HV, V, K, scale=0.5).to(state_dtype)
        self.A_log = (torch.rand(HV, generator=self.gen) * 15 + 1).log().to(device)
        self.dt_bias = self.randn(HV, scale=0.5).to(torch.bfloat16)

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.device)

    def batch(self, bs, live, tokens=1):
        """Conv output rows, gates and cache_indices for `live` requests padded to `bs`."""
        mixed = self.randn(bs * tokens, QKV).to(torch.bfloat16)
        a, b = (self.randn(bs * tokens, HV).to(torch.bfloat16) for _ in range(2))
        slots = torch.randperm(self.ssm_states.shape[0] - 1, generator=self.gen)[:live] + 1
        idx = torch.cat([slots, torch.full((bs - live,), PAD_SLOT_ID)]).to(torch.int32)
        return mixed, a, b, idx.to(self.device)

    def expected(self, mixed, a, b, idx, tokens=1, **kwargs):
        """The reference on plain contiguous copies: (out [bs, T, HV, V], pool after)."""
        bs = idx.shape[0]
        rows = mixed.float().view(bs, tokens, QKV)
        q = rows[..., : H * K].reshape(bs, tokens, H, K).to(torch.bfloat16).contiguous()
        k = rows[..., H * K : 2 * H * K].reshape(bs, tokens, H, K).to(torch.bfloat16).contiguous()
        v = rows[..., 2 * H * K :].reshape(bs, tokens, HV, V).to(torch.bfloat16).contiguous()
        pool = self.ssm_states.clone()
        out = torch.empty(bs, tokens, HV, V, dtype=torch.bfloat16, device=self.device)
        gated_delta_rule_decode_reference(
            q, k, v, a.view(bs, tokens, HV), b.view(bs, tokens, HV), self.A_log, self.dt_bias,
            pool, idx, out, scale=K**-0.5, **kwargs)
        return out, pool


def untouched(layer, idx, before):
    named = idx[idx >= 0].long()
    keep = torch.ones(layer.ssm_states.shape[0], dtype=torch.bool, device=layer.device)
    keep[named] = False
    return torch.equal(layer.ssm_states[keep], before[keep])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_packed_decode_gives_the_references_answer(device, state_dtype):
    layer = SGLangLayer(device, state_dtype=state_dtype, seed=1)
    mixed, a, b, idx = layer.batch(8, 6)
    want_out, want_pool = layer.expected(mixed, a, b, idx)
    before = layer.ssm_states.clone()
    out = GDNBackendKernel().packed_decode(
        mixed, a, b, A_log=layer.A_log, dt_bias=layer.dt_bias, scale=K**-0.5,
        ssm_states=layer.ssm_states, cache_indices=idx, num_v_heads=HV, head_v_dim=V,
        replayssm_d=None, replayssm_k=None)
    assert out.shape == (1, 8, HV, V)
    assert relative_error(out[0], want_out[:, 0]) < TOL[torch.bfloat16]
    assert (out[0, 6:] == 0).all()
    assert relative_error(layer.ssm_states, want_pool) < TOL[state_dtype]
    assert untouched(layer, idx, before)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_of_split_views_gives_the_references_answer(device):
    layer = SGLangLayer(device, seed=2)
    mixed, a, b, idx = layer.batch(5, 4)
    want_out, want_pool = layer.expected(mixed, a, b, idx)
    # SGLang's non-packed path: torch.split views of the conv output, [1, B, heads, dim].
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
    out = GDNBackendKernel().decode(
        q.view(1, 5, H, K), k.view(1, 5, H, K), v.view(1, 5, HV, V), a, b, A_log=layer.A_log,
        dt_bias=layer.dt_bias, ssm_states=layer.ssm_states, cache_indices=idx,
        query_start_loc=torch.arange(6, dtype=torch.int32, device=device))
    assert out.shape == (1, 5, HV, V)
    assert relative_error(out[0], want_out[:, 0]) < TOL[torch.bfloat16]
    assert relative_error(layer.ssm_states, want_pool) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_chain_verify_writes_intermediate_states_and_leaves_the_pool(device):
    bs, live, T, D_max, rows = 4, 3, 3, 4, 6
    layer = SGLangLayer(device, seed=3)
    mixed, a, b, idx = layer.batch(bs, live, tokens=T)
    # SGLang's per-layer buffer [rows + 1, D_max, HV, V, K]; row `rows` is its discard row.
    buffer = torch.full((rows + 1, D_max, HV, V, K), float("nan"), device=device)
    rows_idx = torch.tensor([0, 1, 2, rows], dtype=torch.int32, device=device)
    want_inter = buffer[:, :T].clone()
    want_out, _ = layer.expected(mixed, a, b, idx, tokens=T, intermediate_states=want_inter,
                                 intermediate_indices=rows_idx, update_state=False)
    before = layer.ssm_states.clone()
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
    out = GDNBackendKernel().target_verify(
        layer.A_log, layer.dt_bias, q.view(1, bs * T, H, K), k.view(1, bs * T, H, K),
        v.view(1, bs * T, HV, V), a, b, ssm_states=layer.ssm_states, cache_indices=idx,
        query_start_loc=torch.arange(0, bs * T + 1, T, dtype=torch.int32, device=device),
        intermediate_states_buffer=buffer, intermediate_state_indices=rows_idx,
        cache_steps=T, retrieve_parent_token=None)
    assert out.shape == (1, bs * T, HV, V)
    assert relative_error(out[0].view(bs, T, HV, V)[:live], want_out[:live]) < TOL[torch.bfloat16]
    assert torch.equal(layer.ssm_states, before)
    assert relative_error(buffer[:live, :T], want_inter[:live]) < TOL[torch.float32]
    assert buffer[:, T:].isnan().all() and buffer[rows].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_ragged_chain_verify_runs_each_row_on_query_start_loc(device):
    """SGLang's ragged verify: rows of 1..T tokens one after another, padding rows (slot -1)
    with tokens too, the states to the intermediate buffer, the pool left alone."""
    bs, live, T, D_max = 4, 3, 3, 4
    lengths = [3, 1, 2, 2]
    layer = SGLangLayer(device, seed=7)
    mixed, a, b, idx = layer.batch(bs, live, tokens=T)
    rows = torch.cat([torch.arange(n * T, n * T + length) for n, length in enumerate(lengths)])
    mixed, a, b = mixed[rows.to(device)], a[rows.to(device)], b[rows.to(device)]
    N = len(rows)
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                       device=device)
    buffer = torch.full((bs + 1, D_max, HV, V, K), float("nan"), device=device)
    rows_idx = torch.tensor([0, 1, 2, bs], dtype=torch.int32, device=device)
    before = layer.ssm_states.clone()
    q, k, v = torch.split(mixed, [H * K, H * K, HV * V], dim=-1)
    out = GDNBackendKernel(ragged_verify=True).target_verify(
        layer.A_log, layer.dt_bias, q.view(1, N, H, K), k.view(1, N, H, K), v.view(1, N, HV, V),
        a, b, ssm_states=layer.ssm_states, cache_indices=idx, query_start_loc=qsl,
        intermediate_states_buffer=buffer, intermediate_state_indices=rows_idx, cache_steps=T,
        retrieve_parent_token=None)
    assert out.shape == (1, N, HV, V)
    assert torch.equal(layer.ssm_states, before)
    for n, length in enumerate(lengths):
        start = int(qsl[n])
        want_out, _ = layer.expected(mixed[start:start + length], a[start:start + length],
                                     b[start:start + length], idx[n:n + 1], tokens=length)
        if n >= live:
            assert (out[0, start:start + length] == 0).all()
            continue
        assert relative_error(out[0, start:start + length], want_out[0]) < TOL[torch.bfloat16]
        want_inter = torch.empty(1, length, HV, V, K, device=device)
        layer.expected(mixed[start:start + length], a[start:start + length],
                       b[start:start + length], idx[n:n + 1], tokens=length,
                       intermediate_states=want_inter, update_state=False)
        assert relative_error(buffer[n, :length], want_inter[0]) < TOL[torch.float32]
        assert buffer[n, length:].isnan().all()


def test_static_chain_verify_of_unequal_rows_is_refused():
    """T is SGLang's draft_token_num (cache_steps); with static verify every request has T
    tokens, so another count is an error rather than a wrong T."""
    layer = SGLangLayer("cpu", seed=6)
    mixed, a, b, idx = layer.batch(2, 2, tokens=3)
    q, k, v = torch.split(mixed[:5], [H * K, H * K, HV * V], dim=-1)
    with pytest.raises(ValueError, match="5 tokens for 2 requests of 3 draft tokens.*static"):
        GDNBackendKernel().target_verify(
            layer.A_log, layer.dt_bias, q.view(1, 5, H, K), k.view(1, 5, H, K),
            v.view(1, 5, HV, V), a[:5], b[:5], ssm_states=layer.ssm_states, cache_indices=idx,
            query_start_loc=torch.tensor([0, 3, 5], dtype=torch.int32),
            intermediate_states_buffer=torch.zeros(3, 3, HV, V, K),
            intermediate_state_indices=torch.arange(2, dtype=torch.int32), cache_steps=3)


def test_a_partial_set_of_replayssm_rings_is_a_clear_error():
    layer = SGLangLayer("cpu", seed=4)
    mixed, a, b, idx = layer.batch(2, 2)
    with pytest.raises(ValueError, match="needs all of replayssm_d"):
        GDNBackendKernel().packed_decode(
            mixed, a, b, A_log=layer.A_log, dt_bias=layer.dt_bias, scale=K**-0.5,
            ssm_states=layer.ssm_states, cache_indices=idx, num_v_heads=HV, head_v_dim=V,
            replayssm_d=torch.zeros(1))


def test_replayssm_buffers_outside_packed_decode_are_refused_naming_the_option():
    layer = SGLangLayer("cpu", seed=4)
    mixed, a, b, idx = layer.batch(2, 2)
    q, k, v = (x.view(1, 2, -1, 128) for x in torch.split(mixed, [H * K, H * K, HV * V], -1))
    with pytest.raises(NotImplementedError, match="replayssm_g here"):
        GDNBackendKernel().decode(
            q, k, v, a, b, A_log=layer.A_log, dt_bias=layer.dt_bias,
            ssm_states=layer.ssm_states, cache_indices=idx, query_start_loc=None,
            replayssm_g=torch.zeros(1))


def test_tree_verify_is_left_to_sglang():
    with pytest.raises(NotImplementedError, match="chain verify only"):
        GDNBackendKernel().target_verify(
            None, None, None, None, None, None, None, ssm_states=None, cache_indices=None,
            query_start_loc=None, intermediate_states_buffer=None, intermediate_state_indices=None,
            cache_steps=2, retrieve_parent_token=torch.zeros(1))


def test_prefill_is_left_to_sglang():
    with pytest.raises(NotImplementedError, match="prefill stays on SGLang"):
        GDNBackendKernel().extend(None, None, None, None, None, ssm_states=None,
                                  cache_indices=None, query_start_loc=None)


BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_in_sglang_style_cuda_graphs(state_dtype):
    """Capture packed decode per batch bucket with -1 padding, replay with new requests in
    reused slots: equal to eager, no host sync in replay, nothing compiled after warm-up."""
    layer = SGLangLayer("cuda", slots=150, state_dtype=state_dtype, seed=5)
    kernel = GDNBackendKernel()
    gdn_backend.warmup(device="cuda", num_heads=H, num_v_heads=HV, state_dtype=state_dtype,
                       A_log_dtype=torch.float32, dt_bias_dtype=torch.bfloat16)
    compiled = kernel_compile.CACHE.compilations

    def step(mixed, a, b, idx, pool):
        return kernel.packed_decode(mixed, a, b, A_log=layer.A_log, dt_bias=layer.dt_bias,
                                    scale=K**-0.5, ssm_states=pool, cache_indices=idx,
                                    num_v_heads=HV, head_v_dim=V)

    for bs in BUCKETS:
        static = layer.batch(bs, bs)  # the graph's static buffers
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(*static, layer.ssm_states)
        for _ in range(2):
            fresh = layer.batch(bs, int(torch.randint(1, bs + 1, (1,), generator=layer.gen)))
            for dst, src in zip(static, fresh):
                dst.copy_(src)
            pool = layer.ssm_states.clone()
            eager = step(*fresh, pool)
            with no_host_sync():
                graph.replay()
            assert torch.equal(out, eager)
            assert torch.equal(layer.ssm_states, pool)
            assert (out[0, fresh[3] < 0] == 0).all()
    assert kernel_compile.CACHE.compilations == compiled
