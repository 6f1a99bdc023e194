"""hf_ext.utils.bench.device_name names the GPU a run uses (not always GPU 0); torch.cuda is stood in for on CPU."""

from __future__ import annotations

import platform

import pytest
import torch

from hf_ext.utils import bench


@pytest.fixture
def two_gpus(monkeypatch):
    """A stand-in for torch.cuda: two GPUs named GPU-0 / GPU-1, the current one set by ``state["current"]``."""
    state = {"current": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"GPU-{i}")
    return state


def test_device_name_reports_the_current_or_given_gpu(two_gpus):
    # a run on cuda:1 (torch.cuda.set_device(1)) used to be reported as GPU 0
    assert bench.device_name() == "GPU-1"
    two_gpus["current"] = 0
    assert bench.device_name() == "GPU-0"
    assert bench.device_name("cuda:1") == "GPU-1"
    assert bench.device_name(torch.device("cuda", 1)) == "GPU-1"
    assert bench.device_name(1) == "GPU-1"
    assert bench.device_name("cuda") == "GPU-0"  # no index: the current device
    assert bench.device_name("cpu") == f"cpu-{platform.machine()}"
    two_gpus["current"] = 1
    row = bench.Row("c", "case", "ms", 1.0, "base", 2.0)  # the Row default follows the current device
    assert row.device == "GPU-1"


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("cuda:5", r"device='cuda:5': this machine has 2 CUDA device\(s\)"),
        (-1, "device must be 'cpu', 'cuda' or 'cuda:<index>'"),
        ("tpu", "device must be 'cpu', 'cuda' or 'cuda:<index>'"),
        ("meta", "device must be a CPU or CUDA device"),
        (True, "device must be None, a torch.device"),
        (1.0, "device must be None, a torch.device"),
    ],
)
def test_device_name_refuses_bad_devices(two_gpus, device, match):
    with pytest.raises(ValueError, match=match):
        bench.device_name(device)


def test_device_name_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.device_name() == f"cpu-{platform.machine()}"
    assert bench.Row("c", "case", "ms", 1.0, "base", 2.0).device == f"cpu-{platform.machine()}"
    with pytest.raises(ValueError, match="device='cuda:0': CUDA is not available"):
        bench.device_name("cuda:0")
