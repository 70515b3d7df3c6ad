"""The runs of SGLang's GDN attention kit, one function a mode, each on a fresh kit fixture
built under `sglang_kit.use_backend`.

The kit's own runners check outputs (and, for decode, the pool) against its reference:
eager decode, its CUDA-graph decode (SGLang's capture and replay metadata, no padding,
no real graph) and eager and CUDA-graph chain/tree verify. Three runs it lacks are here,
on its fixtures and its reference:
- `decode_in_cuda_graph_with_padding`: a real `torch.cuda.CUDAGraph` captured on SGLang's
  static metadata buffers, replayed with fewer live requests than captured (SGLang pads
  them with PAD_SLOT_ID) and with requests moved to other pool slots;
- `verify_and_commit`: chain verify, then SGLang's own commit of the accepted step
  (`update_mamba_state_after_mtp_verify`), checked against the kit's reference run over
  the accepted tokens;
- `decode_through_dispatcher`: SGLang's metadata and kernel dispatcher without its Triton
  conv and attention metadata, so that the kit runs on a CPU (the op's reference path);
- `replayssm_decode_steps`: SGLang's decode ring (`--enable-linear-replayssm`) on the kit's
  fixture, step after step past a flush, through SGLang's own cursor metadata;
- `replayssm_spec_verify`: SGLang's spec ring (`--enable-linear-replayssm-spec`) on the kit's
  fixture: its chain verify from checkpoints and request rows' rings holding records.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from types import SimpleNamespace
from unittest import mock

import torch

from sglang_kit import HEAD_DIM, cache_indices, ssm_states, testcase

MAX_CONTEXT_LEN = 64
RING = 16  # --linear-replayssm-cache-len, SGLang's default


def _kit():
    from sglang.test.kits.attention_unittest.attention_methods import gdn_attention

    return gdn_attention


def _build(case, **kwargs):
    device = kwargs.pop("device", "cuda")
    return _kit().build_gdn_attention_fixture(
        testcase(), case, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM,
        max_context_len=MAX_CONTEXT_LEN, device=device, **kwargs)


@contextlib.contextmanager
def kernel_calls():
    """Counts the calls into gdn_backend's and SGLang's Triton GDN kernels, and into the
    spec ring's verify op from the plugin's hook, by name."""
    from sglang.srt.layers.attention.linear.kernels.gdn_triton import TritonGDNKernel

    from gdn_backend.integrations.sglang import GDNBackendKernel

    from gdn_backend.integrations import sglang_spec_ring

    calls = collections.Counter()
    with contextlib.ExitStack() as stack:
        # The spec ring's verify: the plugin's hook calls the op by this module name.
        spec_verify = sglang_spec_ring.replayssm_spec_verify

        def counted_spec_verify(*args, **kwargs):
            calls["gdn_backend.replayssm_spec_verify"] += 1
            return spec_verify(*args, **kwargs)

        stack.enter_context(mock.patch.object(sglang_spec_ring, "replayssm_spec_verify",
                                              counted_spec_verify))
        for cls in (GDNBackendKernel, TritonGDNKernel):
            for method in ("packed_decode", "decode", "target_verify"):
                original = getattr(cls, method)

                def counted(self, *args, _original=original, _name=f"{cls.__name__}.{method}",
                            **kwargs):
                    calls[_name] += 1
                    return _original(self, *args, **kwargs)

                stack.enter_context(mock.patch.object(cls, method, counted))
        yield calls


def _reference(fixture, case, req_pool_indices, inputs, initial_ssm_states):
    """The kit's reference for `case`'s tokens on the slots these request rows map to."""
    view = dataclasses.replace(
        fixture, case=case, forward_batch=SimpleNamespace(req_pool_indices=req_pool_indices),
        mixed_qkv=inputs["mixed_qkv"], a=inputs["a"], b=inputs["b"])
    ref = _kit()._pure_torch_gdn_reference(view, initial_ssm_states)
    return ref.output, ref.final_states


def _check(actual, expected):
    kit = _kit()
    torch.testing.assert_close(actual, expected, atol=kit.GDN_ATOL, rtol=kit.GDN_RTOL)


# The kit's own runners.

def kit_decode(case):
    _kit().run_gdn_attention_case(testcase(), case, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM)


def kit_decode_cuda_graph(case):
    from sglang.test.kits.attention_unittest.runner_modes.cuda_graph_decode_runner import (
        run_gdn_cuda_graph_decode_case)

    run_gdn_cuda_graph_decode_case(testcase(), case, head_k_dim=HEAD_DIM, head_v_dim=HEAD_DIM,
                                   cuda_graph_capture_batch_size=case.batch_size)


def kit_verify(case, topk=1):
    from sglang.test.kits.attention_unittest.runner_modes.speculative_target_verify_runner import (
        run_gdn_eagle_verify_case)

    run_gdn_eagle_verify_case(testcase(), case, topk=topk, head_k_dim=HEAD_DIM,
                              head_v_dim=HEAD_DIM)


def kit_verify_cuda_graph(case, topk=1):
    from sglang.test.kits.attention_unittest.runner_modes.speculative_target_verify_runner import (
        run_gdn_eagle_verify_cuda_graph_case)

    run_gdn_eagle_verify_cuda_graph_case(testcase(), case, topk=topk, head_k_dim=HEAD_DIM,
                                         head_v_dim=HEAD_DIM)


# Runs the kit lacks.

def decode_in_cuda_graph_with_padding(case, capture_bs, replays):
    """Capture decode at `capture_bs` rows, then replay once per (prefix_lens, slots) in
    `replays`: live request i on pool slot slots[i], the rows past them padding. Each
    replay continues from the pool the last one left. Returns the pad rows' outputs."""
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.test.kits.attention_unittest.runner_modes.cuda_graph_decode_runner import (
        _init_cuda_graph_capture_metadata, _init_cuda_graph_replay_metadata)

    kit = _kit()
    fixture = _build(case, disable_cuda_graph=False, runner_batch_size=capture_bs)
    backend, runner = fixture.backend, fixture.runner
    pool = ssm_states(fixture)
    pool[1:] = torch.randn_like(pool[1:], dtype=torch.float32).mul_(0.05).to(pool.dtype)

    def fresh_inputs():
        return kit.make_gdn_random_inputs(
            kit.make_gdn_case_with_prefix_lens(case, "rows", (0,) * capture_bs), fixture,
            dtype=fixture.mixed_qkv.dtype, device="cuda")

    def batch(prefix_lens, name):
        rows = kit.make_gdn_case_with_prefix_lens(case, name, tuple(prefix_lens))
        return rows, kit._make_forward_batch(rows, runner, max_context_len=MAX_CONTEXT_LEN,
                                             device="cuda")

    static = fresh_inputs()
    capture_case, capture_batch = batch((0,) * capture_bs, f"{case.name}_capture")
    saved = kit._clone_gdn_cache(fixture)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        _init_cuda_graph_capture_metadata(backend, capture_bs, capture_batch)
        # SGLang's graph runner runs each graph's forward eagerly before capturing it.
        kit.run_gdn_forward(fixture, capture_batch, static)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = kit.run_gdn_forward(fixture, capture_batch, static)
    kit._restore_gdn_cache(fixture, saved)

    pad_rows = []
    for step, (prefix_lens, slots) in enumerate(replays):
        live = len(prefix_lens)
        padded = tuple(prefix_lens) + (0,) * (capture_bs - live)  # seq_len 1: SGLang's pad rows
        _, replay_batch = batch(padded, f"{case.name}_replay{step}")
        live_rows = replay_batch.req_pool_indices[:live].clone()
        mapping = runner.req_to_token_pool.req_index_to_mamba_index_mapping
        mapping[live_rows] = torch.tensor(slots, dtype=mapping.dtype, device="cuda")
        inputs = fresh_inputs()
        for name, buf in static.items():
            buf.copy_(inputs[name])
        before = pool.clone()
        live_inputs = {name: t[:live] for name, t in inputs.items()}
        live_case = kit.make_gdn_case_with_prefix_lens(case, "live", tuple(prefix_lens))
        want_out, want_pool = _reference(fixture, live_case, live_rows, live_inputs, before)
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
            _init_cuda_graph_replay_metadata(backend, capture_bs, replay_batch)
        graph.replay()
        torch.cuda.synchronize()
        named = torch.tensor(slots, dtype=torch.long, device="cuda")
        _check(out[:, :live], want_out)
        _check(pool[named], want_pool[named])
        others = torch.ones(pool.shape[0], dtype=torch.bool, device="cuda")
        others[named] = False
        assert torch.equal(pool[others], before[others]), "a slot no live request names changed"
        pad_rows.append(out[:, live:].clone())
    return pad_rows


def verify_and_commit(case, accepted):
    """Chain verify, then SGLang's commit of `accepted[n]` tokens of request n."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.test.kits.attention_unittest.runner_modes.speculative_target_verify_runner import (
        _make_spec_verify_input, _prepare_target_verify_batch)

    kit = _kit()
    fixture = _build(case)
    batch = fixture.forward_batch
    _prepare_target_verify_batch(batch, case, "cuda")
    batch.spec_info = _make_spec_verify_input(case, batch, topk=1, device="cuda",
                                              spec_kind="eagle")
    inputs = kit.gdn_fixture_inputs(fixture)
    pool = ssm_states(fixture)
    initial = pool.clone()
    want_out = kit.expected_gdn_verify_output_from_inputs(fixture, case, inputs, (None, initial),
                                                          topk=1)
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=fixture.backend)):
        fixture.backend.init_forward_metadata(batch)
        out = kit.run_gdn_forward(fixture, batch, inputs)
        assert torch.equal(pool, initial), "verify wrote the pool"
        steps = torch.tensor(accepted, dtype=torch.int32, device="cuda") - 1
        fixture.backend.update_mamba_state_after_mtp_verify(
            last_correct_step_indices=steps, mamba_track_indices=None,
            mamba_steps_to_track=None, model=None, req_pool_indices=batch.req_pool_indices)
    _check(out, want_out)

    T = case.input_lens[0]
    kept = torch.cat([torch.arange(n * T, n * T + a) for n, a in enumerate(accepted)]).cuda()
    accepted_case = dataclasses.replace(case, name="accepted", forward_mode=ForwardMode.EXTEND,
                                        extend_lens=tuple(accepted))
    _, want_pool = _reference(fixture, accepted_case, batch.req_pool_indices,
                              {name: t[kept] for name, t in inputs.items()}, initial)
    slots = cache_indices(fixture).long()
    _check(pool[slots], want_pool[slots])
    others = torch.ones(pool.shape[0], dtype=torch.bool, device="cuda")
    others[slots] = False
    assert torch.equal(pool[others], initial[others]), "the commit changed an unnamed slot"


def decode_through_dispatcher(case, device):
    """SGLang's decode metadata, pool and kernel dispatcher on the kit's fixture, the conv
    left out (the kit's conv is the identity on one token). Returns (out, pool)."""
    fixture = _build(case, device=device)
    linear = fixture.backend.linear_attn_backend
    linear.init_forward_metadata(fixture.forward_batch)
    layer = fixture.actual_module.attn
    pool = ssm_states(fixture)
    initial = pool.clone()
    out = linear.kernel_dispatcher.packed_decode(
        mixed_qkv=fixture.mixed_qkv, a=fixture.a, b=fixture.b, A_log=layer.A_log,
        dt_bias=layer.dt_bias, scale=layer.head_k_dim**-0.5, ssm_states=pool,
        cache_indices=linear.forward_metadata.mamba_cache_indices,
        num_v_heads=layer.num_v_heads, head_v_dim=layer.head_v_dim)
    want_out, want_pool = _reference(fixture, case, fixture.forward_batch.req_pool_indices,
                                     _kit().gdn_fixture_inputs(fixture), initial)
    slots = cache_indices(fixture).long()
    _check(out, want_out)
    _check(pool[slots], want_pool[slots])
    return out, pool


def replayssm_decode_steps(case, steps, device="cuda"):
    """SGLang's decode ring on the kit's fixture: its pool built with
    `enable_linear_replayssm` (SGLang's MambaPool allocates each slot's ring beside its
    checkpoint), then `steps` decode steps of the case's requests, each through SGLang's
    metadata (its cursor snapshot, flush rule and advance) and the layer's forward, which hands
    the rings to the kernel. Each step's output is checked against the kit's reference run on
    from the state before it; a slot's checkpoint changes only on a flush, to the reference's
    state after that step. On a CPU the layer's forward is SGLang's dispatcher call as its
    `forward_decode` makes it (the kit's conv is the identity on one token). Returns the flushes."""
    from functools import partial

    from sglang.srt.mem_cache.memory_pool import HybridReqToTokenPool
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    kit = _kit()
    ring_pool = partial(HybridReqToTokenPool, enable_linear_replayssm=True,
                        linear_replayssm_cache_len=RING)
    with mock.patch.object(kit, "HybridReqToTokenPool", ring_pool):
        fixture = _build(case, device=device)
    backend, runner = fixture.backend, fixture.runner
    linear = backend.linear_attn_backend
    layer = fixture.actual_module.attn
    assert runner.req_to_token_pool.mamba_pool.enable_linear_replayssm
    pool = ssm_states(fixture)
    state = pool.clone()  # the reference's states, run on from step to step
    flushes = 0
    for step in range(steps):
        prefix = tuple(p + step for p in case.prefix_lens)
        step_case = kit.make_gdn_case_with_prefix_lens(case, f"{case.name}_step{step}", prefix)
        batch = kit._make_forward_batch(step_case, runner, max_context_len=MAX_CONTEXT_LEN,
                                        device=device)
        inputs = kit.make_gdn_random_inputs(step_case, fixture, dtype=fixture.mixed_qkv.dtype,
                                            device=device)
        want_out, want_state = _reference(fixture, step_case, batch.req_pool_indices, inputs,
                                          state)
        before = pool.clone()
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
            # On a CPU, the linear backend's metadata alone: the full-attention half's is Triton.
            (backend if device == "cuda" else linear).init_forward_metadata(batch)
            meta = linear.forward_metadata
            if device == "cuda":
                out = kit.run_gdn_forward(fixture, batch, inputs)
            else:
                cache = runner.req_to_token_pool.mamba2_layer_cache(layer.layer_id)
                out = linear.kernel_dispatcher.packed_decode(
                    mixed_qkv=inputs["mixed_qkv"], a=inputs["a"], b=inputs["b"],
                    A_log=layer.A_log, dt_bias=layer.dt_bias, scale=layer.head_k_dim**-0.5,
                    ssm_states=pool, cache_indices=meta.mamba_cache_indices,
                    num_v_heads=layer.num_v_heads, head_v_dim=layer.head_v_dim,
                    replayssm_d=cache.replayssm_d, replayssm_k=cache.replayssm_k,
                    replayssm_g=cache.replayssm_g, replayssm_write_pos=meta.replayssm_write_pos,
                    replayssm_force_flush=meta.replayssm_force_flush)
        _check(out, want_out)
        flushed = meta.replayssm_write_pos == RING - 1
        if meta.replayssm_force_flush is not None:
            flushed = flushed | (meta.replayssm_force_flush.to(flushed.device) != 0)
        slots = meta.mamba_cache_indices.long()
        for slot, flush in zip(slots.tolist(), flushed.tolist()):
            if flush:
                _check(pool[slot], want_state[slot].to(pool.dtype))
            else:
                assert torch.equal(pool[slot], before[slot]), f"step {step}: slot {slot} written"
        flushes += int(flushed.sum())
        others = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
        others[slots] = False
        assert torch.equal(pool[others], before[others]), "a slot no request names changed"
        state = want_state
    return flushes


def replayssm_spec_verify(case, device="cuda", held=(3, 5), bases=(14, 2)):
    """SGLang's spec ring on the kit's verify fixture: its pool built with
    `enable_linear_replayssm_spec` (rings keyed by request row, no intermediate states), each
    request's ring seeded with `held` records from `bases` on (the first wraps the circle),
    then the kit's chain verify through SGLang's backend (`_replayssm_target_verify`). Checked:
    the outputs against the kit's reference run from the states checkpoint and records stand
    for; the pool and the cursors untouched (SGLang's commit advances them); and the window's
    appended records: with every draft accepted, the rings stand for the reference's state
    after the window. On a CPU the verify is SGLang's `_replayssm_target_verify` call as its
    `forward_extend` makes it (the kit's conv is the identity)."""
    from functools import partial

    from sglang.srt.mem_cache.memory_pool import HybridReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.test.kits.attention_unittest.runner_modes.speculative_target_verify_runner import (
        _make_spec_verify_input, _prepare_target_verify_batch)

    from gdn_backend.reference_replayssm_spec import replayssm_spec_state

    kit = _kit()
    ring_pool = partial(HybridReqToTokenPool, enable_linear_replayssm_spec=True,
                        linear_replayssm_cache_len=RING)
    with mock.patch.object(kit, "HybridReqToTokenPool", ring_pool):
        fixture = _build(case, device=device)
    batch = fixture.forward_batch
    _prepare_target_verify_batch(batch, case, device)
    batch.spec_info = _make_spec_verify_input(case, batch, topk=1, device=device,
                                              spec_kind="eagle")
    runner, linear = fixture.runner, fixture.backend.linear_attn_backend
    layer = fixture.actual_module.attn
    mamba_pool = runner.req_to_token_pool.mamba_pool
    cache = runner.req_to_token_pool.mamba2_layer_cache(layer.layer_id)
    cursors = (mamba_pool.replayssm_spec_write_pos, mamba_pool.replayssm_cache_base,
               mamba_pool.replayssm_is_flush)
    rings = (cache.replayssm_d, cache.replayssm_k, cache.replayssm_g, cache.replayssm_rawv,
             cache.replayssm_rawk)
    _seed_records(*rings)
    rows = batch.req_pool_indices.long()
    cursors[0][rows] = torch.tensor(held, dtype=cursors[0].dtype, device=device)
    cursors[1][rows] = torch.tensor(bases, dtype=cursors[1].dtype, device=device)
    pool = ssm_states(fixture)
    slots = cache_indices(fixture).long()

    def ring_states(write_pos):
        states = pool.float().clone()
        for slot, row in zip(slots.tolist(), rows.tolist()):
            states[slot] = replayssm_spec_state(pool, *rings, slot, row, write_pos, cursors[1])
        return states

    initial = ring_states(cursors[0])
    inputs = kit.gdn_fixture_inputs(fixture)
    want_out = kit.expected_gdn_verify_output_from_inputs(fixture, case, inputs, (None, initial),
                                                          topk=1)
    before = [t.clone() for t in (pool, *cursors)]
    T = case.input_lens[0]
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=fixture.backend)):
        if device == "cuda":
            fixture.backend.init_forward_metadata(batch)
            out = kit.run_gdn_forward(fixture, batch, inputs)
        else:  # the linear backend's metadata alone: the full-attention half's is Triton
            linear.init_forward_metadata(batch)
            meta = linear.forward_metadata
            q, k, v = fixture.actual_module.split_qkv(inputs["mixed_qkv"])
            out = linear._replayssm_target_verify(
                layer=layer, query=q, key=k, value=v, a=inputs["a"], b=inputs["b"],
                mamba_pool=mamba_pool, layer_cache=cache,
                cache_indices=meta.mamba_cache_indices, replay_indices=batch.req_pool_indices,
                query_start_loc=meta.query_start_loc, draft_token_num=T)
    _check(out.reshape(want_out.shape), want_out)
    for now, then in zip((pool, *cursors), before):
        assert torch.equal(now, then), "the verify wrote the pool or a cursor"
    window = dataclasses.replace(case, name="window", forward_mode=ForwardMode.EXTEND,
                                 extend_lens=(T,) * case.batch_size)
    _, want_after = _reference(fixture, window, batch.req_pool_indices, inputs, initial)
    accepted = cursors[0].clone()
    accepted[rows] += T
    after = ring_states(accepted)
    _check(after[slots], want_after[slots].float())


def _seed_records(ring_d, ring_k, ring_g, ring_d_low, ring_k_low):
    """Random records in every ring place: d small, keys unit, log-decays negative, each d
    and key as SGLang keeps them, a bf16 high part and its bf16 low part."""
    gen = torch.Generator().manual_seed(31)
    d = torch.randn(ring_d.shape, generator=gen) * 0.2
    keys = torch.randn(ring_k.shape, generator=gen)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    for whole, high, low in ((d, ring_d, ring_d_low), (keys, ring_k, ring_k_low)):
        high.copy_(whole.to(high.dtype))
        low.copy_((whole - high.float().cpu()).to(low.dtype))
    ring_g.copy_(-torch.rand(ring_g.shape, generator=gen) * 0.5)
