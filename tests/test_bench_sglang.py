"""SGLang's decode kernels, exported for the benchmark, import without the rest of SGLang."""

import os
import subprocess
import sys

import pytest

from gdn_backend.bench import sglang as bench_sglang


def test_exported_kernels_import_from_the_export_alone(tmp_path):
    pytest.importorskip("sglang")
    bench_sglang.export(str(tmp_path))
    probe = (
        "import sys, sglang\n"
        f"assert sglang.__file__.startswith({str(tmp_path)!r}), sglang.__file__\n"
        f"import {bench_sglang.PACKED} as p, {bench_sglang.UNPACKED} as u\n"
        "assert callable(p.fused_recurrent_gated_delta_rule_packed_decode)\n"
        "assert callable(u.fused_sigmoid_gating_delta_rule_update)\n"
        "from gdn_backend.bench import sglang as bench_sglang\n"
        "assert bench_sglang.available()\n"
        f"assert bench_sglang.version() == {bench_sglang.version()!r}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
