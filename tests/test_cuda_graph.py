"""The op inside CUDA graphs, as an engine's graph runner uses it (GPU only)."""

import pytest
import torch

import gdn_backend
from gdn_backend.kernels.compile import CACHE
from gdn_backend import split_packed_qkv
from gdn_backend.testing import PAD_SLOT_ID, no_host_sync

pytestmark = pytest.mark.gpu

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 2])
def test_graph_replay_with_new_requests_equals_eager(state_dtype, tokens):
    H, HV, K, V, P = 2, 4, 128, 128, 200
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    pool = (torch.randn(P, HV, V, K, generator=gen) * 0.5).to(state_dtype).to(dev)
    A_log = torch.rand(HV, generator=gen).add(1).log().to(dev)
    dt_bias = torch.randn(HV, generator=gen).to(dev)
    gdn_backend.warmup(device=dev, num_heads=H, num_v_heads=HV, state_dtype=state_dtype,
                       dt_bias_dtype=torch.float32, tokens=(tokens,))
    compiled = CACHE.compilations

    for bs in BUCKETS:
        # The graph's static inputs: the conv output rows, gates, slot indices, output.
        mixed = torch.zeros(bs, tokens, 2 * H * K + HV * V, dtype=torch.bfloat16, device=dev)
        q, k, v = split_packed_qkv(mixed, H, HV, K, V)
        a = torch.zeros(bs, tokens, HV, dtype=torch.bfloat16, device=dev)
        b = torch.zeros_like(a)
        idx = torch.full((bs,), PAD_SLOT_ID, dtype=torch.int32, device=dev)
        out = torch.empty(bs, tokens, HV, V, dtype=torch.bfloat16, device=dev)

        def step(pool_, out_):
            gdn_backend.gated_delta_rule_decode(q, k, v, a, b, A_log, dt_bias, pool_, idx, out=out_)

        graph = torch.cuda.CUDAGraph()
        with no_host_sync():
            with torch.cuda.graph(graph):
                step(pool, out)

        for _ in range(3):
            # New requests in reused slots, the batch padded to the bucket with -1.
            live = int(torch.randint(1, bs + 1, (1,), generator=gen))
            slots = torch.randperm(P, generator=gen)[:live].to(torch.int32)
            idx.copy_(torch.cat([slots, torch.full((bs - live,), PAD_SLOT_ID, dtype=torch.int32)]))
            mixed.copy_(torch.randn(mixed.shape, generator=gen))
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(torch.randn(b.shape, generator=gen))
            out.fill_(float("nan"))
            eager_pool, eager_out = pool.clone(), torch.empty_like(out)
            step(eager_pool, eager_out)

            with no_host_sync():
                graph.replay()
            assert torch.equal(out, eager_out)
            assert (out[live:] == 0).all()
            assert torch.equal(pool, eager_pool)
    assert CACHE.compilations == compiled, "nothing may compile after warm-up"


def test_capture_without_warmup_is_a_clear_error():
    H, HV = 2, 4
    dev = torch.device("cuda")
    gdn_backend.warmup(device=dev, num_heads=H, num_v_heads=HV)  # flag allocated, T=1 compiled
    q = torch.zeros(1, 7, H, 128, dtype=torch.bfloat16, device=dev)  # T=7: never warmed up
    v = torch.zeros(1, 7, HV, 128, dtype=torch.bfloat16, device=dev)
    gate = torch.zeros(1, 7, HV, dtype=torch.bfloat16, device=dev)
    params = torch.zeros(HV, device=dev), torch.zeros(HV, dtype=torch.bfloat16, device=dev)
    pool = torch.zeros(2, HV, 128, 128, device=dev)
    idx = torch.zeros(1, dtype=torch.int32, device=dev)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="gdn_backend.warmup"):
        with torch.cuda.graph(graph):
            gdn_backend.gated_delta_rule_decode(q, q, v, gate, gate, *params, pool, idx)
