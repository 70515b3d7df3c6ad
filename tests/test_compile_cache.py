"""The compile cache: one kernel per device and configuration, each built with its device
current (its module loads into that device's context)."""

import contextlib

import torch

from gdn_backend.kernels import compile as kernel_compile
from gdn_backend.kernels.compile import CompileCache, KernelConfig

CFG = KernelConfig(num_heads=2, num_v_heads=4, head_k_dim=128, head_v_dim=128, tokens=1,
                   qkv_dtype=torch.bfloat16, gate_dtype=torch.bfloat16,
                   A_log_dtype=torch.float32, dt_bias_dtype=torch.bfloat16,
                   state_dtype=torch.float32, index_dtype=torch.int32, rows_per_cta=32,
                   rows_per_thread=4)


def test_each_device_gets_its_own_kernel_built_with_that_device_current(monkeypatch):
    current, built = [None], []

    @contextlib.contextmanager
    def device(index):
        before, current[0] = current[0], index
        yield
        current[0] = before

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no GPU here
    monkeypatch.setattr(kernel_compile, "build", lambda cfg: built.append(current[0]) or object())
    cache = CompileCache()
    first = cache.get(CFG, 0)
    assert cache.get(CFG, 0) is first
    second = cache.get(CFG, 1)
    assert second is not first
    assert built == [0, 1] and cache.compilations == 2
