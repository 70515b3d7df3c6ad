"""gdn_backend inside SGLang 0.5.23's real Python code (CPU: the op's reference path)."""

import argparse

import pytest
import torch

from engines import require

require("sglang.srt.layers.attention.linear.gdn_backend")

from sglang.srt import runtime_context  # noqa: E402
from sglang.srt.layers.attention.linear import gdn_backend as sglang_gdn  # noqa: E402
from sglang.srt.layers.attention.linear.kernels.kernel_backend import (  # noqa: E402
    LinearAttnKernelBase)
from sglang.srt.layers.attention.linear.utils import (  # noqa: E402
    resolve_linear_attn_backends)
from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from gdn_backend.integrations import sglang as plugin  # noqa: E402
from sglang_kit import write_model_config  # noqa: E402

H, HV, K, V = 2, 4, 128, 128


def parse(argv):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def registered():
    plugin.register()
    HookRegistry.apply_hooks()
    return plugin


def write_tiny_model(path, head_dim=128):
    """A local Qwen3-Next config, so SGLang resolves its arguments offline."""
    return write_model_config(path, H, HV, head_dim)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("qwen3_next"))


def build_dispatcher(model_path, *flags):
    """SGLang's dispatcher as its attention registry builds it, under SGLang's own
    runtime context for these server flags."""
    args = parse(["--model-path", model_path, "--device", "cpu", "--skip-tokenizer-init",
                  "--disable-radix-cache", *flags])
    ctx = runtime_context.create_context(ServerArgs.from_cli_args(args), role="scheduler")
    with runtime_context.use_context(ctx):
        backends = resolve_linear_attn_backends()
        return sglang_gdn.GDNKernelDispatcher(backends.decode, backends.prefill, backends.verify)


def test_sglang_loader_finds_the_plugin():
    plugins = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert plugins["gdn_backend"][0] is plugin.register


def test_server_parser_accepts_the_flag(registered):
    args = parse(["--model-path", "x", "--linear-attn-decode-backend", "gdn_backend"])
    assert args.linear_attn_decode_backend == "gdn_backend"


def test_kernel_implements_sglangs_interface():
    assert issubclass(plugin.GDNBackendKernel, LinearAttnKernelBase)
    assert plugin.GDNBackendKernel.supports_packed_decode


def test_dispatcher_builds_gdn_backend_for_decode_and_verify(registered, tiny_model, monkeypatch):
    monkeypatch.setattr(plugin, "check_device", lambda: None)  # the CPU machine has no GPU
    dispatcher = build_dispatcher(tiny_model, "--linear-attn-decode-backend", "gdn_backend")
    assert isinstance(dispatcher.decode_kernel, plugin.GDNBackendKernel)
    assert dispatcher.supports_packed_decode
    assert dispatcher.verify_kernel is dispatcher.decode_kernel
    assert type(dispatcher.extend_kernel).__name__ == "TritonGDNKernel"
    assert type(dispatcher.tree_verify_kernel).__name__ == "TritonGDNKernel"


def test_explicit_verify_backend_is_kept(registered, tiny_model, monkeypatch):
    monkeypatch.setattr(plugin, "check_device", lambda: None)
    dispatcher = build_dispatcher(tiny_model, "--linear-attn-decode-backend", "gdn_backend",
                                  "--linear-attn-verify-backend", "triton")
    assert isinstance(dispatcher.decode_kernel, plugin.GDNBackendKernel)
    assert type(dispatcher.verify_kernel).__name__ == "TritonGDNKernel"


def test_other_backends_are_left_alone(registered, tiny_model):
    dispatcher = build_dispatcher(tiny_model, "--linear-attn-decode-backend", "triton")
    assert type(dispatcher.decode_kernel).__name__ == "TritonGDNKernel"


def test_no_gpu_is_a_clear_startup_error(registered, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="drop --linear-attn-decode-backend gdn_backend"):
        build_dispatcher(tiny_model, "--linear-attn-decode-backend", "gdn_backend")


def test_base_backend_flag_selects_decode_and_keeps_triton_prefill(registered, tiny_model,
                                                                   monkeypatch):
    monkeypatch.setattr(plugin, "check_device", lambda: None)
    dispatcher = build_dispatcher(tiny_model, "--linear-attn-backend", "gdn_backend")
    assert isinstance(dispatcher.decode_kernel, plugin.GDNBackendKernel)
    assert type(dispatcher.extend_kernel).__name__ == "TritonGDNKernel"


def test_unsupported_head_dims_are_a_clear_startup_error(registered, tmp_path, monkeypatch):
    monkeypatch.setattr(plugin, "check_device", lambda: None)
    model = write_tiny_model(tmp_path, head_dim=64)
    with pytest.raises(RuntimeError, match=r"K, V = \(64, 64\).*drop --linear-attn-decode-backend"):
        build_dispatcher(model, "--linear-attn-decode-backend", "gdn_backend")


def test_explicit_decode_backend_wins_over_the_base_flag(registered, tiny_model, monkeypatch):
    monkeypatch.setattr(plugin, "check_device", lambda: None)
    dispatcher = build_dispatcher(tiny_model, "--linear-attn-backend", "gdn_backend",
                                  "--linear-attn-decode-backend", "triton")
    assert type(dispatcher.decode_kernel).__name__ == "TritonGDNKernel"
    assert type(dispatcher.verify_kernel).__name__ == "TritonGDNKernel"
    assert type(dispatcher.extend_kernel).__name__ == "TritonGDNKernel"


@pytest.mark.parametrize("mode, ragged", [("static", False), ("compact", True),
                                          ("cap-accept", True)])
def test_sglangs_ragged_verify_mode_reaches_our_verify_kernel(registered, tiny_model, monkeypatch,
                                                              mode, ragged):
    monkeypatch.setattr(plugin, "check_device", lambda: None)
    monkeypatch.setenv("SGLANG_RAGGED_VERIFY_MODE", mode)
    dispatcher = build_dispatcher(tiny_model, "--linear-attn-decode-backend", "gdn_backend")
    assert dispatcher.verify_kernel is dispatcher.decode_kernel
    assert dispatcher.verify_kernel.ragged_verify is ragged


def test_an_unknown_ragged_verify_mode_is_sglangs_own_error(registered, tiny_model, monkeypatch):
    monkeypatch.setattr(plugin, "check_device", lambda: None)
    monkeypatch.setenv("SGLANG_RAGGED_VERIFY_MODE", "sometimes")
    with pytest.raises(ValueError, match="invalid SGLANG_RAGGED_VERIFY_MODE='sometimes'"):
        build_dispatcher(tiny_model, "--linear-attn-decode-backend", "gdn_backend")
