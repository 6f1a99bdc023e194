"""MoE kernels (token permutation / grouped expert GEMM) used by FSEP."""
