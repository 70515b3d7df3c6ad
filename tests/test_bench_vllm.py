"""vLLM's verify kernel, exported for the benchmark, imports without the rest of vLLM."""

import os
import subprocess
import sys

import pytest

from gdn_backend.bench import vllm as bench_vllm


def test_exported_kernel_imports_from_the_export_alone(tmp_path):
    pytest.importorskip("vllm")
    bench_vllm.export(str(tmp_path))
    probe = (
        "import sys, vllm\n"
        f"assert vllm.__file__.startswith({str(tmp_path)!r}), vllm.__file__\n"
        f"import {bench_vllm.KERNEL} as kernel\n"
        "assert callable(kernel.fused_sigmoid_gating_delta_rule_update)\n"
        "from gdn_backend.bench import vllm as bench_vllm\n"
        "assert bench_vllm.available()\n"
        f"assert bench_vllm.version() == {bench_vllm.version()!r}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_our_call_names_the_arguments_vllms_kernel_takes():
    pytest.importorskip("vllm")
    import inspect

    from vllm.third_party.flash_linear_attention.ops.fused_sigmoid_gating import (
        fused_sigmoid_gating_delta_rule_update)

    taken = set(inspect.signature(fused_sigmoid_gating_delta_rule_update).parameters)
    assert {"initial_state", "inplace_final_state", "cu_seqlens", "ssm_state_indices",
            "num_accepted_tokens", "use_qk_l2norm_in_kernel"} <= taken
