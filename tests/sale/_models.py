"""Tiny models of every supported family and helpers shared by the SALE tests."""

from __future__ import annotations

from typing import Any

import torch

from hf_ext.testing import TINY_LM_KWARGS

COMMON: dict[str, Any] = dict(TINY_LM_KWARGS)


def tiny_family(name: str, seed: int = 0) -> Any:
    """A random tiny causal LM: llama, qwen2, qwen3, mistral, gemma, gemma2 (softcap), gemma3 (sliding)."""
    import transformers as tf

    from hf_ext import testing

    if name == "llama":
        return testing.tiny_llama(seed)
    if name == "qwen2":
        return testing.tiny_qwen2(seed)
    if name == "qwen3":
        return testing.tiny_qwen3(seed)
    torch.manual_seed(seed)
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=None)).eval()
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**COMMON, head_dim=16)).eval()
    if name == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=128)).eval()
    if name == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **COMMON, head_dim=16, sliding_window=128, layer_types=["sliding_attention", "full_attention"]
        )
        return tf.Gemma3ForCausalLM(cfg).eval()
    raise ValueError(name)


def rand_ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, n), generator=g)
