"""Block-sparse attention kernels (SALE estimate + block-sparse FlashAttention forward)."""
