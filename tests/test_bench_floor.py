"""The verify floor's pass (bench/floor.py) stores every request's state T times, in SGLang's
[B, T, HV, V, K] layout: run on the CPU through Triton's interpreter."""

import os
import subprocess
import sys

import pytest

CHECK = """
import torch
from gdn_backend.bench.floor import launch
src = torch.randn(3, 2, 16, 64)
for streaming in (False, True):
    dst = torch.full((3, {T}, 2, 16, 64), float("nan"))
    launch(src, dst, {T}, 1024, 4, streaming)
    assert torch.equal(dst, src.unsqueeze(1).expand_as(dst)), streaming
"""


@pytest.mark.parametrize("T", [2, 3])
def test_the_floor_pass_writes_each_state_once_per_token(T):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", CHECK.format(T=T)], env=env, check=True, timeout=300)
