"""The engines' kernels, exported for the benchmark, import without the rest of the engine."""

import inspect
import os
import subprocess
import sys

import pytest

from gdn_backend.bench import sglang as bench_sglang
from gdn_backend.bench import vllm as bench_vllm

EXPORTS = {  # package: (peer module, {kernel module: function it must hold})
    "sglang": (bench_sglang, {bench_sglang.PACKED: "fused_recurrent_gated_delta_rule_packed_decode",
                              bench_sglang.UNPACKED: "fused_sigmoid_gating_delta_rule_update",
                              bench_sglang.RING: "fused_recurrent_gdn_replayssm_decode",
                              bench_sglang.SPEC_RING: "commit_gdn_replayssm_spec"}),
    "vllm": (bench_vllm, {bench_vllm.KERNEL: "fused_sigmoid_gating_delta_rule_update"}),
}


@pytest.mark.parametrize("package", EXPORTS)
def test_exported_kernels_import_from_the_export_alone(tmp_path, package):
    pytest.importorskip(package)
    peer, kernels = EXPORTS[package]
    peer.export(str(tmp_path))
    probe = (
        f"import sys, {package}\n"
        f"assert {package}.__file__.startswith({str(tmp_path)!r}), {package}.__file__\n"
        + "".join(f"import {module} as m\nassert callable(m.{fn})\n"
                  for module, fn in kernels.items())
        + f"from gdn_backend.bench import {package} as peer\n"
        "assert peer.available()\n"
        f"assert peer.version() == {peer.version()!r}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_our_vllm_call_names_the_arguments_its_kernel_takes():
    pytest.importorskip("vllm")
    from vllm.third_party.flash_linear_attention.ops.fused_sigmoid_gating import (
        fused_sigmoid_gating_delta_rule_update)

    taken = set(inspect.signature(fused_sigmoid_gating_delta_rule_update).parameters)
    assert {"initial_state", "inplace_final_state", "cu_seqlens", "ssm_state_indices",
            "num_accepted_tokens", "use_qk_l2norm_in_kernel"} <= taken


def test_our_sglang_replayssm_call_names_the_arguments_its_kernel_takes():
    pytest.importorskip("sglang")
    from sglang.kernels.ops.attention.linear.fused_recurrent_linear_replayssm import (
        fused_recurrent_gdn_replayssm_decode)

    taken = set(inspect.signature(fused_recurrent_gdn_replayssm_decode).parameters)
    assert {"mixed_qkv", "initial_state", "d_cache", "k_cache", "g_cache", "out",
            "ssm_state_indices", "write_pos", "force_flush", "use_qk_l2norm_in_kernel"} <= taken
