import pytest
import torch

from attnres.ops import cpu_kernel


@pytest.fixture(autouse=True)
def _seed_and_determinism():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["fused", "torch"])
def cpu_read_impl(request, monkeypatch):
    """Run a test once with the fused CPU kernel and once with the PyTorch implementation."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernel, "_enabled", False)
    elif cpu_kernel.load() is None:
        pytest.skip(f"the fused CPU read is unavailable: {cpu_kernel.unavailable_reason()}")
    return request.param
