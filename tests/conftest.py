"""Shared pytest fixtures: tiny models, the local tokenizer, Triton interpreter mode, gloo runner."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads TRITON_INTERPRET when it is first imported, so on a machine without CUDA switch the
# interpreter on here, before any test module can import triton.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # Two CPU cores are shared by two xdist workers.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from hf_ext.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    from hf_ext.testing import tiny_llama

    return tiny_llama()


@pytest.fixture
def tiny_qwen2():
    from hf_ext.testing import tiny_qwen2

    return tiny_qwen2()


@pytest.fixture
def tiny_qwen3():
    from hf_ext.testing import tiny_qwen3

    return tiny_qwen3()


@pytest.fixture(params=["qwen2_moe", "mixtral", "olmoe"])
def tiny_moe(request):
    from hf_ext.testing import tiny_moe

    return tiny_moe(request.param)


@pytest.fixture
def triton_interpret():
    """Run Triton kernels on CPU through the interpreter within the test."""
    from hf_ext.testing import triton_interpret

    with triton_interpret():
        yield


@pytest.fixture
def run_distributed():
    """``run_distributed(fn, world_size=2, *args)``: fn(rank, world_size, *args) in gloo processes."""
    from hf_ext.testing import run_distributed

    return run_distributed
