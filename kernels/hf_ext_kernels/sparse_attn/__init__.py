"""Block-sparse attention kernels (SALE estimate + block-sparse FlashAttention forward).

Public API (see :mod:`.ops`): :func:`sale_block_mask`, :func:`block_sparse_attention`,
:func:`sale_attention`, ``DEFAULT_BLOCK_Q``, ``DEFAULT_BLOCK_K``. Torch references live in
:mod:`.naive`; Triton kernels in :mod:`.quant_score` (estimate) and :mod:`.block_sparse` (compute),
imported lazily so that importing this package never imports Triton.
"""

from .ops import (
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    block_sparse_attention,
    sale_attention,
    sale_block_mask,
)

__all__ = [
    "DEFAULT_BLOCK_K",
    "DEFAULT_BLOCK_Q",
    "block_sparse_attention",
    "sale_attention",
    "sale_block_mask",
]
