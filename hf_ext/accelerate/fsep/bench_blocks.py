"""Blocks of the FSEP benchmark's decoder stacks (``--attention``), beside the MoE layers under test."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttnBlock(nn.Module):
    """Causal GQA self-attention (no norm, no rotary embedding) over rows cut into sequences.

    Args:
        hidden: model width ``H``.
        heads / kv_heads / head_dim: query heads, key-value heads (divides ``heads``), head size.
        seq: tokens per sequence; the ``T`` rows of a call are ``T / seq`` sequences.
        gen: generator for the weights (its device is where they are made).

    ``forward(x [T, H]) -> [T, H]``.
    """

    def __init__(
        self, hidden: int, heads: int, kv_heads: int, head_dim: int, seq: int, gen: torch.Generator
    ) -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim, self.seq = heads, kv_heads, head_dim, seq
        qkv = (heads + 2 * kv_heads) * head_dim
        self.qkv = nn.Parameter(torch.randn(qkv, hidden, generator=gen, device=gen.device) * 0.02)
        self.o = nn.Parameter(torch.randn(hidden, heads * head_dim, generator=gen, device=gen.device) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        if t % self.seq:
            raise ValueError(f"AttnBlock: {t} rows are not whole sequences of {self.seq}")
        b = t // self.seq
        q, k, v = (
            F.linear(x, self.qkv)
            .view(b, self.seq, -1)
            .split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        )
        q = q.reshape(b, self.seq, self.heads, d).transpose(1, 2)
        k = k.reshape(b, self.seq, self.kv_heads, d).transpose(1, 2)
        v = v.reshape(b, self.seq, self.kv_heads, d).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(t, self.heads * d), self.o)
