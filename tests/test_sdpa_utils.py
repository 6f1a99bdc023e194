"""hf_ext.utils.sdpa: SDPA kept off cuDNN's kernel inside the scope, the caller's other choices kept, cuDNN's flag
restored after it."""

from __future__ import annotations

import pytest
import torch

from hf_ext.utils.sdpa import check_sdpa_cudnn, sdpa_without_cudnn


def _flags() -> tuple[bool, bool, bool, bool]:
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


def test_scope_disables_only_cudnn_and_restores_the_previous_choice():
    before = _flags()
    assert before[0]  # PyTorch's default allows cuDNN
    with sdpa_without_cudnn():
        assert _flags() == (False, True, True, True)
        q = torch.randn(2, 4, 5, 8)
        mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))
        got = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert _flags() == before
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="boom"), sdpa_without_cudnn():
        raise RuntimeError("boom")
    assert _flags() == before  # restored on an exception too
    with sdpa_without_cudnn(active=False):
        assert _flags() == before


def test_the_callers_choice_of_the_other_kernels_stands():
    b = torch.backends.cuda
    b.enable_flash_sdp(False)
    try:
        with sdpa_without_cudnn():
            assert _flags() == (False, False, True, True)  # flash stays off inside
        assert _flags() == (True, False, True, True)
        b.enable_mem_efficient_sdp(False)
        b.enable_math_sdp(False)
        with sdpa_without_cudnn():  # cuDNN is the only kernel the caller allowed: left as it is
            assert _flags() == (True, False, False, False)
        b.enable_cudnn_sdp(False)
        b.enable_math_sdp(True)
        with sdpa_without_cudnn():
            assert _flags() == (False, False, False, True)
        assert _flags() == (False, False, False, True)  # a caller who had cuDNN off keeps it off
    finally:
        for enable in (b.enable_flash_sdp, b.enable_mem_efficient_sdp, b.enable_math_sdp, b.enable_cudnn_sdp):
            enable(True)


def test_check_sdpa_cudnn_names_the_parameter():
    assert check_sdpa_cudnn(True) is True and check_sdpa_cudnn(False) is False
    for bad in (1, "no", None):
        with pytest.raises(ValueError, match="sdpa_cudnn must be True or False"):
            check_sdpa_cudnn(bad)
