"""Shared by tests/ and integration_tests/: `gpu` tests skip cleanly without an sm_90+ GPU,
`multi_gpu` tests with fewer than two."""

import pytest
import torch


def cuda_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if cuda_sm90() else 0
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU of sm_90 or newer"))
        elif "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(
                reason=f"needs two CUDA GPUs of sm_90 or newer; this machine has {gpus}"))
