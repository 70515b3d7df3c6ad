"""End to end: Qwen3-Next generation served from per-layer state pools equals transformers'
own generate() (CPU: the reference path; GPU: the kernel, with and without CUDA graphs)."""

import importlib.util
import os
import sys

import pytest
import torch
from transformers import Qwen3NextForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "generate_example", os.path.join(HERE, "..", "examples", "generate.py"))
generate = sys.modules["generate_example"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def small_model(device, dtype, full_size_gdn=False, seed=0):
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(generate.small_config(full_size_gdn)).to(device=device, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def reference_tokens(model, request):
    prompt = torch.tensor([request.prompt], device=model.device)
    out = model.generate(prompt, max_new_tokens=request.max_new_tokens, do_sample=False)
    return out[0, len(request.prompt):].tolist()


def served(model, state_dtype=torch.float32, slots=3, use_graphs=False, count=6):
    requests = generate.demo_requests(model.config.vocab_size, count=count)
    engine = generate.PooledQwen3Next(model, slots, max_len=48, state_dtype=state_dtype)
    stats = generate.serve(engine, requests, use_graphs=use_graphs, buckets=(1, 2, 4))
    return requests, engine, stats


def test_pooled_serving_crosses_slot_reuse_and_padding():
    model = small_model("cpu", torch.float32)
    requests, engine, stats = served(model)
    slots = [r.slot for r in requests]
    assert len(set(slots)) < len(slots), "fewer slots than requests: some slot is reused"
    # Three slots and buckets 1, 2, 4: three live requests run padded to 4 with slot -1.
    assert stats["steps"] > 0 and all(r.done for r in requests)


def test_greedy_tokens_equal_transformers_generate_on_cpu():
    model = small_model("cpu", torch.float32)
    requests, _, _ = served(model)
    for request in requests:
        assert request.output == reference_tokens(model, request)


def test_step_logits_equal_the_models_forward_on_cpu():
    """Token by token through the pools, the logits of every position match one full forward
    of transformers' model over the same sequence (its chunked GDN path)."""
    model = small_model("cpu", torch.float32)
    sequence = torch.randint(1, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(sequence[None]).logits[0]
    engine = generate.PooledQwen3Next(model, 2, max_len=16)
    engine.reset_slot(2)
    got = torch.stack([engine.step(sequence[p : p + 1], torch.tensor([p]), torch.tensor([2]))[0]
                       for p in range(len(sequence))])
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("use_graphs", [False, True], ids=["eager", "graphs"])
def test_fp32_pool_on_the_gpu_gives_identical_tokens(use_graphs):
    model = small_model("cuda", torch.float32)
    requests, _, _ = served(model, use_graphs=use_graphs)
    for request in requests:
        assert request.output == reference_tokens(model, request)


@pytest.mark.gpu
def test_bf16_pool_on_the_gpu_keeps_the_logits_close():
    """A bf16 pool rounds the state once per step (8 bits of mantissa), so tokens may part
    from the fp32 model's where two logits are closer than that rounding moves them. The
    test holds the logits of every step, fed the same tokens, within 5e-2 relative of the
    fp32 pool's, and the top-1 choices agreeing in at least 95% of steps."""
    model = small_model("cuda", torch.float32)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = generate.PooledQwen3Next(model, 4, max_len=48, state_dtype=dtype)
        gen = torch.Generator().manual_seed(1)
        for slot in range(1, 5):
            engine.reset_slot(slot)
        slots = torch.arange(1, 5, device="cuda")
        steps = []
        for pos in range(24):
            tokens = torch.randint(1, model.config.vocab_size, (4,), generator=gen).cuda()
            steps.append(engine.step(tokens, torch.full((4,), pos, device="cuda"), slots))
        logits[dtype] = torch.stack(steps)
    fp32, bf16 = logits[torch.float32], logits[torch.bfloat16]
    rel = ((bf16 - fp32).norm(dim=-1) / fp32.norm(dim=-1)).max().item()
    agree = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert rel < 5e-2 and agree >= 0.95, (rel, agree)


@pytest.mark.gpu
def test_full_size_gdn_layer_steps_like_the_models_own_layer():
    """One 80B-size GDN layer (H=16, HV=32, K=V=128), bf16 inputs, 64 requests in scattered
    slots, stepped through the pool, against the model's own layer with its own cache."""
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    torch.manual_seed(0)
    config = generate.small_config(full_size_gdn=True)
    layer = hf.Qwen3NextGatedDeltaNet(config, layer_idx=0).cuda().to(torch.bfloat16).eval()
    B, steps = 64, 3
    pool = torch.randn(200, 32, 128, 128, device="cuda") * 0.1
    slots = torch.randperm(199, device="cuda")[:B] + 1
    conv = torch.randn(B, layer.conv_dim, layer.conv_kernel_size, device="cuda").to(torch.bfloat16)
    state = pool[slots].transpose(-1, -2).contiguous()  # the model's layout: [B, HV, K, V]
    ours_conv = conv.clone()
    for _ in range(steps):
        x = torch.randn(B, 1, config.hidden_size, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            q, k, v, z, b, a = layer.fix_query_key_value_ordering(layer.in_proj_qkvz(x), layer.in_proj_ba(x))
            mixed = torch.cat([t.reshape(B, 1, -1) for t in (q, k, v)], -1).transpose(1, 2)
            ref_mixed = hf.causal_conv1d_update(mixed, conv, layer.conv1d.weight.squeeze(1), None, layer.activation)
            our_mixed = hf.causal_conv1d_update(mixed, ours_conv, layer.conv1d.weight.squeeze(1), None, layer.activation)
            rq, rk, rv = generate.gdn_backend.split_packed_qkv(ref_mixed.transpose(1, 2), 16, 32, 128, 128)
            g = -layer.A_log.float().exp() * torch.nn.functional.softplus(a.float() + layer.dt_bias.float())
            ref_out, state = hf.torch_recurrent_gated_delta_rule(
                rq.repeat_interleave(2, 2), rk.repeat_interleave(2, 2), rv, g=g, beta=b.float().sigmoid(),
                initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
            oq, ok, ov = generate.gdn_backend.split_packed_qkv(our_mixed.transpose(1, 2), 16, 32, 128, 128)
            out = generate.gdn_backend.gated_delta_rule_decode(oq, ok, ov, a, b, layer.A_log,
                                                               layer.dt_bias, pool, slots)
        rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
        assert rel < 1e-2, rel
    rel_state = ((pool[slots] - state.transpose(-1, -2)).norm() / state.norm()).item()
    assert rel_state < 1e-4, rel_state
