"""Scoped choice of PyTorch's SDPA kernels around ``generate`` loops.

PyTorch may run ``F.scaled_dot_product_attention`` with cuDNN's kernel (it prefers it on Hopper). cuDNN plans
its kernel for each new input shape, and in ``generate`` the KV length grows by one every step: every step of a
job whose shapes were not seen before pays for a new plan. Measured on an H100 (torch 2.11, transformers 5.24,
Llama-3.1-8B shape, 60 left-padded rows of up to 1,000 prompt tokens, up to 272 forced new tokens, each mode in a
fresh process; ``python benchmarks/tie_generate_sdpa.py``): the first call took 32.5 s with cuDNN allowed and 11.7 s
without; the same shapes again took 10.6 s and 11.2 s. The flash and memory-efficient kernels need no plan.

Example:
    >>> import torch
    >>> with sdpa_without_cudnn():
    ...     torch.backends.cuda.cudnn_sdp_enabled()
    False
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sdpa_without_cudnn(active: bool = True) -> Iterator[None]:
    """Inside, SDPA may not use cuDNN's kernel; the caller's choice of the other kernels stands, and cuDNN's flag is
    restored on exit (also on an exception). If the caller left no other kernel enabled, or ``active`` is false,
    nothing changes. No effect on models whose attention does not call SDPA. The flags are process-wide, as
    PyTorch's own ``sdpa_kernel``'s."""
    import torch

    b = torch.backends.cuda
    prev = b.cudnn_sdp_enabled()
    if active and (b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.math_sdp_enabled()):
        b.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        b.enable_cudnn_sdp(prev)


def check_sdpa_cudnn(value: object) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` naming ``sdpa_cudnn``."""
    if not isinstance(value, bool):
        raise ValueError(f"sdpa_cudnn must be True or False, got {value!r}")
    return value


__all__ = ["check_sdpa_cudnn", "sdpa_without_cudnn"]
