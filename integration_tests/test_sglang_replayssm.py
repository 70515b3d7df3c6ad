"""SGLang 0.5.23's ReplaySSM decode (--enable-linear-replayssm) on gdn_backend, against
SGLang's real code: the flags resolve with gdn_backend, SGLang's dispatcher hands the rings
to our kernel, and over many steps with flushes, reused slots and padding our outputs,
records and checkpoints equal SGLang's own Triton ReplaySSM kernel's on the same rings
(compiled on the GPU, under Triton's interpreter on the CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from engines import require

require("sglang")

import sglang_kit  # noqa: E402

sglang_kit.install_stand_ins()  # before SGLang's modules import sgl_kernel (the GPU machine)
require("sglang.srt.layers.attention.linear.gdn_backend")

from gdn_backend.integrations import sglang as plugin  # noqa: E402
from gdn_backend.testing import RingPool  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
H, HV, K, V, L = 2, 4, 128, 128, 16
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


def test_the_spec_ring_stays_sglangs_error(registered, tiny_model):
    with pytest.raises(ValueError, match="replayssm-spec requires the triton or flashinfer"):
        resolve(tiny_model, "--enable-linear-replayssm-spec", "--speculative-algorithm", "EAGLE",
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
def test_the_spec_ring_reference_equals_sglangs_triton_kernels(device):
    """The spec ring's oracle (--enable-linear-replayssm-spec, not served yet) against
    SGLang's verify, cursor advance and (on the GPU) fold, over 14 steps with folds,
    ragged windows and a padding row: outputs to bf16 rounding, states and records to
    float32 rounding, cursors equal."""
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
