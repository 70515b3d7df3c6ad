import pytest
import torch

# Every contract test runs on the CPU (reference) and, on a GPU machine, on CUDA (kernel).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
