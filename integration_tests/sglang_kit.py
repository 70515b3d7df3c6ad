"""SGLang 0.5.23's own GDN attention test kit, run with a chosen GDN decode backend.

The kit (`sglang/test/kits/attention_unittest`, shipped in SGLang's wheel) builds SGLang's
real `HybridLinearAttnBackend` / `GDNAttnBackend`, its `HybridReqToTokenPool` and mamba pool,
a mock model runner and real `ForwardBatch`es, and checks them against its pure-PyTorch
reference. Its server arguments select `triton`; `use_backend` selects a backend the way a
user does: gdn_backend through `--linear-attn-decode-backend gdn_backend` with SGLang's
plugin loader and hook registry, triton as the kit has it.

What the kit does not do itself, and what stands in here (none of it is on the decode or
verify path):
- `sgl_kernel`, SGLang's CUDA extension, is not installed on the GPU test machine: an import
  hook serves stand-in modules for it, as SGLang's own `maybe_stub_sgl_kernel()` does (that
  helper's module imports `datasets`). SGLang's GDN decode and verify call Triton kernels,
  not sgl_kernel ops.
- The parallel context needs `attn_dcp_rank` before a fixture is built (SGLang's dense kit
  sets it, the GDN kit does not).
- The kit publishes `model_path="dummy"`; the plugin's start-up check reads the GDN head dims
  of the served model, so a tiny local Qwen3-Next config with the kit's head dims stands in.
- The kit's pool is fp32. A bf16 pool is what `--mamba-ssm-dtype bfloat16` gives SGLang;
  here the kit's `Mamba2StateDType` is given that dtype.
- On a CPU-only machine the kit saves and restores the CUDA RNG around its seeding; there
  is no CUDA RNG there, so those two calls do nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import json
import sys
import unittest
from pathlib import Path
from unittest import mock

import torch

BACKENDS = ("triton", "gdn_backend")
# Qwen3-Next's GDN head counts per GPU (key heads, value heads) and head dim.
HEADS = {"TP1": (16, 32), "TP8": (2, 4)}
HEAD_DIM = 128


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__getattr__ = lambda name: mock.MagicMock(name=f"{module.__name__}.{name}")


class _StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "sgl_kernel" or fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), is_package=True)
        return None


def install_stand_ins() -> None:
    """Call before importing the kit: sgl_kernel where it is missing, the parallel context."""
    try:
        import sgl_kernel  # noqa: F401
    except (ImportError, OSError):
        if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _StandInFinder())
    from sglang.srt.runtime_context import get_parallel

    get_parallel().override_permanently(attn_dcp_rank=0)
    if not torch.cuda.is_available():
        torch.cuda.get_rng_state = lambda device="cuda": None
        torch.cuda.set_rng_state = lambda state, device="cuda": None


def load_plugins() -> None:
    """SGLang's own plugin loading: entry points of `sglang.srt.plugins`, then its hooks."""
    from sglang.srt.plugins import load_plugins as sglang_load_plugins

    sglang_load_plugins()


def write_model_config(path: Path, num_k_heads: int, num_v_heads: int, head_dim: int) -> str:
    """A local Qwen3-Next config with these GDN dims, for SGLang's model-config lookup."""
    from transformers import Qwen3NextConfig

    Qwen3NextConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                    num_attention_heads=4, num_key_value_heads=2,
                    linear_num_key_heads=num_k_heads, linear_num_value_heads=num_v_heads,
                    linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
                    vocab_size=1000, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=128, shared_expert_intermediate_size=128,
                    ).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["Qwen3NextForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@contextlib.contextmanager
def use_backend(name: str, *, ssm_dtype: torch.dtype, model_path: str | None = None,
                **flags):
    """Fixtures built inside use `name` for GDN decode and an SSM pool of `ssm_dtype`.

    `flags` are further server arguments, as a user passes them (`linear_attn_verify_backend`,
    say). gdn_backend is chosen by its decode flag; `model_path` names the served model's
    config (`write_model_config`).
    """
    from sglang.srt.configs.mamba_utils import Mamba2StateDType
    from sglang.srt.runtime_context import RuntimeContext
    from sglang.test.kits.attention_unittest.attention_methods import gdn_attention

    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: the kit runs with one of {BACKENDS}")
    if name == "gdn_backend":
        flags = {"linear_attn_decode_backend": name, "model_path": model_path, **flags}
    publish = RuntimeContext.override_server_args

    def with_user_flags(self, **fields):
        return publish(self, **{**fields, **flags})

    def state_dtype(conv, temporal):
        return Mamba2StateDType(conv=conv, temporal=ssm_dtype)

    with mock.patch.object(RuntimeContext, "override_server_args", with_user_flags), \
            mock.patch.object(gdn_attention, "Mamba2StateDType", state_dtype):
        yield


class Comparisons:
    """Records every `torch.testing.assert_close` the kit makes: the actual tensor and its
    largest absolute error. Then the kit's own check runs, with its own tolerances."""

    def __init__(self):
        self.actuals: list[torch.Tensor] = []
        self.errors: list[float] = []

    @contextlib.contextmanager
    def recording(self):
        check = torch.testing.assert_close

        def record(actual, expected, *args, **kwargs):
            self.actuals.append(actual.detach().clone())
            self.errors.append(max_error(actual, expected))
            return check(actual, expected, *args, **kwargs)

        with mock.patch.object(torch.testing, "assert_close", record):
            yield self

    @property
    def max(self) -> float:
        return max(self.errors, default=float("nan"))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def testcase() -> unittest.TestCase:
    """The `testcase` the kit's functions take (for skipTest and assertIsInstance)."""
    return unittest.TestCase(methodName="__init__")


def decode_case(heads: str, prefix_lens=(14, 15, 16), name="gdn_decode_page_boundary"):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.test.kits.attention_unittest.attention_methods.gdn_attention import (
        GDNAttentionCase)

    H, HV = HEADS[heads]
    return GDNAttentionCase(name=f"{name}_{heads}", backend="triton",
                            forward_mode=ForwardMode.DECODE, num_k_heads=H, num_v_heads=HV,
                            page_size=16, prefix_lens=tuple(prefix_lens))


def verify_case(heads: str, draft_tokens: int = 3, prefix_lens=(4, 7), name="gdn_verify"):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.test.kits.attention_unittest.attention_methods.gdn_attention import (
        GDNAttentionCase)

    H, HV = HEADS[heads]
    return GDNAttentionCase(name=f"{name}_{heads}_t{draft_tokens}", backend="triton",
                            forward_mode=ForwardMode.TARGET_VERIFY, num_k_heads=H,
                            num_v_heads=HV, page_size=16, prefix_lens=tuple(prefix_lens),
                            extend_lens=(draft_tokens,) * len(prefix_lens))


def reference_of_tokens(fixture, case, mixed_qkv, a, b, initial_ssm_states):
    """The kit's pure-PyTorch reference on `case`'s tokens (EXTEND/DECODE lengths) of this
    fixture's layer and slots: (output [1, tokens, HV, V], states after the last token)."""
    from sglang.test.kits.attention_unittest.attention_methods import gdn_attention as kit

    view = dataclasses.replace(fixture, case=case, mixed_qkv=mixed_qkv, a=a, b=b)
    ref = kit._pure_torch_gdn_reference(view, initial_ssm_states)
    return ref.output, ref.final_states


def ssm_states(fixture) -> torch.Tensor:
    from sglang.test.kits.attention_unittest.attention_methods import gdn_attention as kit

    return kit._ssm_states(fixture)


def cache_indices(fixture) -> torch.Tensor:
    from sglang.test.kits.attention_unittest.attention_methods import gdn_attention as kit

    return kit._cache_indices(fixture)
