"""Shared by tests/ and integration_tests/: `gpu` tests skip cleanly without an sm_90+ GPU."""

import pytest
import torch


def cuda_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def pytest_collection_modifyitems(config, items):
    if cuda_sm90():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU of sm_90 or newer")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
