"""SGLang 0.5.23's ReplaySSM modes on gdn_backend, against SGLang's real code: the decode ring
(--enable-linear-replayssm) and the spec ring (--enable-linear-replayssm-spec). The flags
resolve with gdn_backend and SGLang's other guards still apply; SGLang's dispatcher hands
the decode rings to our kernel and its spec-ring verify and commit run ours through the
HookRegistry; over many steps with flushes or folds, reused slots and padding our outputs,
records, checkpoints and cursors equal SGLang's own Triton kernels' on the same rings
(compiled on the GPU, under Triton's interpreter on the CPU)."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from engines import require

require("sglang")

import sglang_kit  # noqa: E402

sglang_kit.install_stand_ins()  # before SGLang's modules import sgl_kernel (the GPU machine)
require("sglang.srt.layers.attention.linear.gdn_backend")

from gdn_backend.integrations import sglang as plugin  # noqa: E402
from gdn_backend.reference_replayssm_spec import (  # noqa: E402
    replayssm_spec_advance_reference, replayssm_spec_commit_reference,
    replayssm_spec_verify_reference)
from gdn_backend.testing import RingPool, relative_error  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
H, HV, K, V, L = 2, 4, 128, 128, 16
T = 4  # the spec ring's draft window
TOL = 8e-3  # SGLang rebuilds the state through bf16 tensor-core dots


def resolve(tiny_model, *flags):
    """SGLang's resolution of these server flags, as the scheduler sees it."""
    from test_sglang import parse
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    args = parse(["--model-path", tiny_model, "--device", "cpu", "--skip-tokenizer-init",
                  "--disable-radix-cache", *flags])
    ctx = runtime_context.create_context(ServerArgs.from_cli_args(args), role="scheduler")
    with runtime_context.use_context(ctx):
        return runtime_context.get_exec().mamba, plugin.selected()


@pytest.fixture(scope="module")
def registered():
    from sglang.srt.plugins.hook_registry import HookRegistry

    plugin.register()
    HookRegistry.apply_hooks()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return sglang_kit.write_model_config(tmp_path_factory.mktemp("qwen3_next"), H, HV, 128)


@pytest.mark.parametrize("flag", ["--linear-attn-decode-backend", "--linear-attn-backend"])
def test_replayssm_decode_resolves_with_gdn_backend(registered, tiny_model, flag):
    mamba, selected = resolve(tiny_model, "--enable-linear-replayssm", flag, "gdn_backend")
    assert mamba.enable_linear_replayssm and selected
    assert mamba.linear_attn_decode_backend == "gdn_backend"


def test_sglangs_other_replayssm_guards_still_apply(registered, tiny_model):
    with pytest.raises(ValueError, match="cache-len must be >= 1"):
        resolve(tiny_model, "--enable-linear-replayssm", "--linear-replayssm-cache-len", "0",
                "--linear-attn-decode-backend", "gdn_backend")


SPEC = ["--enable-linear-replayssm-spec", "--speculative-algorithm", "EAGLE",
        "--speculative-num-draft-tokens", "4", "--speculative-eagle-topk", "1",
        "--speculative-num-steps", "3"]


def test_the_spec_ring_resolves_with_gdn_backend(registered, tiny_model):
    mamba, selected = resolve(tiny_model, *SPEC, "--linear-attn-decode-backend", "gdn_backend")
    assert mamba.enable_linear_replayssm_spec and selected
    assert mamba.linear_attn_decode_backend == "gdn_backend"


def test_sglangs_spec_ring_guards_still_apply(registered, tiny_model):
    with pytest.raises(ValueError, match="mutually exclusive"):
        resolve(tiny_model, *SPEC, "--enable-linear-replayssm",
                "--linear-attn-decode-backend", "gdn_backend")


def interpreted(script: str, *args: str) -> dict:
    """Run one of the comparison scripts under Triton's interpreter, in a process that
    starts with it on (it must be on before Triton is first imported); its JSON result."""
    run = subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                         capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", ["f32", "bf16"])
def test_steps_equal_sglangs_triton_replayssm_kernel(device, state_dtype):
    if device == "cpu":
        errors = interpreted("sglang_replayssm_steps.py", state_dtype)
    else:
        from sglang_replayssm_steps import DTYPES, compare

        errors = compare("cuda", DTYPES[state_dtype])
    assert errors.pop("flushes") >= 3
    assert errors.pop("padding_row_zero") and errors.pop("slot_0_untouched")
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("device", DEVICES)
def test_spec_ring_steps_equal_sglangs_triton_kernels(device):
    """The spec ring's ops (the reference on the CPU, the kernels on CUDA) against SGLang's
    verify, cursor advance and (on the GPU) fold, over 14 steps with folds, ragged windows
    and a padding row: outputs to bf16 rounding, states and records to float32 rounding,
    cursors equal."""
    if device == "cpu":
        errors = interpreted("sglang_replayssm_spec_steps.py")
    else:
        from sglang_replayssm_spec_steps import compare

        errors = compare("cuda")
    assert errors.pop("folds") >= 4 and errors.pop("padding_rows_zero")
    assert all(errors.pop(f"{name}_equal") for name in ("write_pos", "cache_base", "is_flush"))
    assert errors.pop("output") < TOL, errors
    assert max(errors.values()) < 1e-3, errors  # TF32 dots on the GPU


def test_sglangs_dispatcher_hands_the_rings_to_our_kernel(registered, tiny_model, monkeypatch):
    from sglang_replayssm_steps import packed
    from test_sglang import build_dispatcher

    monkeypatch.setattr(plugin, "check_device", lambda: None)  # the CPU machine has no GPU
    dispatcher = build_dispatcher(tiny_model, "--enable-linear-replayssm",
                                  "--linear-attn-decode-backend", "gdn_backend")
    pool = RingPool(5, H, HV, K, V, L, seed=23)
    pool.write_pos[2] = L - 1
    idx = torch.tensor([2, 4], dtype=torch.int32)
    reference = RingPool(5, H, HV, K, V, L, seed=23)
    q, k, v, a, b = pool.tokens(2)
    out = dispatcher.packed_decode(
        packed(q, k, v), a[:, 0], b[:, 0], A_log=pool.A_log, dt_bias=pool.dt_bias,
        scale=K**-0.5, ssm_states=pool.checkpoint, cache_indices=idx, num_v_heads=HV,
        head_v_dim=V, replayssm_d=pool.ring_d, replayssm_k=pool.ring_k,
        replayssm_g=pool.ring_g, replayssm_write_pos=pool.cursors(idx),
        replayssm_force_flush=None)
    reference.write_pos[2] = L - 1
    want = torch.empty(2, 1, HV, V, dtype=torch.bfloat16)
    from gdn_backend import replayssm_decode

    replayssm_decode(q, k, v, a, b, reference.A_log, reference.dt_bias, reference.checkpoint,
                     *reference.rings, reference.cursors(idx), idx, out=want)
    assert torch.equal(out[0], want[:, 0])
    assert not torch.equal(pool.checkpoint[2], RingPool(5, H, HV, K, V, L, seed=23).checkpoint[2])
    for mine, ref in zip((pool.checkpoint, *pool.rings), (reference.checkpoint, *reference.rings)):
        assert torch.equal(mine, ref)


# The spec ring's two SGLang places, through the HookRegistry, on SGLang's own layouts.

def test_the_spec_ring_hooks_are_installed(registered):
    from sglang.kernels.ops.attention.linear import gdn_replayssm_spec_decode as spec
    from sglang.srt.layers.attention.linear.gdn_backend import GDNAttnBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from gdn_backend.integrations import sglang_spec_ring as ring

    for target, hook in ((ring.TARGET_VERIFY, ring.target_verify), (ring.FOLD, ring.fold)):
        assert (HookType.AROUND, hook) in [(t, h) for t, h, _ in HookRegistry._hooks[target]]
    # SGLang's own functions, wrapped in place (its commit imports the fold at call time).
    assert hasattr(GDNAttnBackend._replayssm_target_verify, "__wrapped__")
    assert hasattr(spec.commit_gdn_replayssm_circular, "__wrapped__")


def layer_state(gen, layers=1):
    pool = types.SimpleNamespace(
        replayssm_spec_write_pos=torch.tensor([5, 0, 10], dtype=torch.int32),
        replayssm_cache_base=torch.tensor([3, 0, 9], dtype=torch.int32),
        replayssm_is_flush=torch.zeros(3, dtype=torch.int8))
    keys = torch.randn(layers, 3, H, L, K, generator=gen)
    cache = types.SimpleNamespace(
        temporal=torch.randn(layers, 6, HV, V, K, generator=gen) * 0.5,
        replayssm_d=(torch.randn(layers, 3, HV, L, V, generator=gen) * 0.3).bfloat16(),
        replayssm_rawv=(torch.randn(layers, 3, HV, L, V, generator=gen) * 1e-3).bfloat16(),
        replayssm_k=(keys / keys.norm(dim=-1, keepdim=True)).bfloat16(),
        replayssm_rawk=(keys * 1e-4).bfloat16(),
        replayssm_g=-torch.rand(layers, 3, HV, L, generator=gen))
    return pool, cache


def test_sglangs_verify_method_runs_ours_on_its_layouts(registered, monkeypatch):
    from sglang.srt.layers.attention.linear.gdn_backend import GDNAttnBackend

    monkeypatch.setattr(plugin, "selected", lambda: True)
    gen = torch.Generator().manual_seed(1)
    pool, cache = layer_state(gen)
    one = types.SimpleNamespace(**{name: t[0] for name, t in vars(cache).items()})
    layer = types.SimpleNamespace(num_k_heads=H, head_k_dim=K, num_v_heads=HV, head_v_dim=V,
                                  A_log=(torch.rand(HV, generator=gen) * 15 + 1).log(),
                                  dt_bias=torch.randn(HV, generator=gen) * 0.5)
    N = 3 * T
    query, key = (torch.randn(1, N, H * K, generator=gen).bfloat16() for _ in range(2))
    value = torch.randn(1, N, HV * V, generator=gen).bfloat16()
    a, b = (torch.randn(N, HV, generator=gen).bfloat16() for _ in range(2))
    qsl = torch.arange(0, N + 1, T, dtype=torch.int32)
    slots, rows = torch.tensor([4, -1, 1], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    ref = types.SimpleNamespace(**{name: t.clone() for name, t in vars(one).items()})
    ref_pool = types.SimpleNamespace(**{name: t.clone() for name, t in vars(pool).items()})
    got = GDNAttnBackend._replayssm_target_verify(
        object(), layer=layer, query=query, key=key, value=value, a=a, b=b, mamba_pool=pool,
        layer_cache=one, cache_indices=slots, replay_indices=rows, query_start_loc=qsl,
        draft_token_num=T)
    want = torch.empty(N, HV, V, dtype=torch.bfloat16)
    replayssm_spec_verify_reference(
        query.view(N, H, K), key.view(N, H, K), value.view(N, HV, V), a, b, layer.A_log,
        layer.dt_bias, ref.temporal, ref.replayssm_d, ref.replayssm_k, ref.replayssm_g,
        ref.replayssm_rawv, ref.replayssm_rawk, qsl, slots, rows,
        ref_pool.replayssm_spec_write_pos, ref_pool.replayssm_cache_base,
        ref_pool.replayssm_is_flush, want, scale=K**-0.5)
    assert got.shape == value.shape
    assert torch.equal(got.view(N, HV, V), want)
    assert (got.view(N, HV, V)[T:2 * T] == 0).all()
    assert torch.equal(one.replayssm_d, ref.replayssm_d)


def test_sglangs_commit_folds_every_layer_then_resets_the_cursors(registered, monkeypatch):
    from sglang.kernels.ops.attention.linear import gdn_replayssm_spec_decode as spec

    monkeypatch.setattr(plugin, "selected", lambda: True)
    gen = torch.Generator().manual_seed(2)
    pool, cache = layer_state(gen, layers=2)
    slots, rows = torch.tensor([4, 1], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    accept = torch.tensor([3, 2], dtype=torch.int32)
    want = []
    for layer in range(2):
        ref = {name: t[layer].clone() for name, t in vars(cache).items()}
        cursors = [t.clone() for t in vars(pool).values()]
        replayssm_spec_commit_reference(
            ref["temporal"], ref["replayssm_d"], ref["replayssm_k"], ref["replayssm_g"],
            ref["replayssm_rawv"], ref["replayssm_rawk"], slots, rows, *cursors, accept,
            max_tokens=T)
        want.append((ref["temporal"], cursors))
    # SGLang's own advance is a Triton kernel (no CPU): the reference's stands in for it.
    replayssm_spec_advance_reference(pool.replayssm_spec_write_pos, pool.replayssm_cache_base,
                                     pool.replayssm_is_flush, accept, rows, ring_len=L,
                                     max_tokens=T, fold_every_commit=False)
    assert pool.replayssm_is_flush[2] == 1 and pool.replayssm_is_flush[0] == 0
    spec.commit_gdn_replayssm_circular(
        checkpoint_state=cache.temporal, d_cache=cache.replayssm_d, k_cache=cache.replayssm_k,
        g_cache=cache.replayssm_g, d_residual_cache=cache.replayssm_rawv,
        k_residual_cache=cache.replayssm_rawk, state_batch_indices=slots, replay_indices=rows,
        write_pos=pool.replayssm_spec_write_pos, cache_base=pool.replayssm_cache_base,
        is_flush=pool.replayssm_is_flush, accept_lens=accept)
    for layer, (checkpoint, cursors) in enumerate(want):
        assert relative_error(cache.temporal[layer], checkpoint) < 1e-6
        for now, then in zip(vars(pool).values(), cursors):
            assert torch.equal(now, then)
