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


def tiny_gemma4_vl(vision_heads: int = 4, seed: int = 0) -> Any:
    """A random tiny ``Gemma4ForConditionalGeneration``: a 2-layer vision tower (``vision_heads`` heads) and a 2-layer
    text model (4 query heads), no audio tower; image token id 5. The vision attention modules carry a
    ``layer_idx`` numbered from 0, like the text model's, so the two towers share layer indices 0 and 1."""
    import pytest
    import transformers as tf

    if not hasattr(tf, "Gemma4Config"):
        pytest.skip("transformers without Gemma4")
    text = tf.Gemma4TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=16,
        max_position_embeddings=1024,
        num_kv_shared_layers=0,
        sliding_window=512,
        hidden_size_per_layer_input=8,
        layer_types=["full_attention"] * 2,
        pad_token_id=0,
    )
    vision = tf.Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=vision_heads,
        num_key_value_heads=vision_heads,
        head_dim=16,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
    )
    special = dict(image_token_id=5, boi_token_id=6, eoi_token_id=7, video_token_id=8, boa_token_id=9)
    cfg = tf.Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        eoa_token_index=10,
        audio_token_id=11,
        **special,
    )
    torch.manual_seed(seed)
    return tf.Gemma4ForConditionalGeneration(cfg).eval()


def gemma4_vl_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of :func:`tiny_gemma4_vl`: one 16x16-patch image (256 patches, pooled to 64 image tokens) inside a
    192-token prompt."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="xy"), -1)
    ids = torch.randint(12, 500, (1, 192), generator=g)
    ids[0, 4:68] = 5
    return {
        "input_ids": ids,
        "pixel_values": torch.rand(1, 256, 48, generator=g),
        "image_position_ids": grid.reshape(1, 256, 2),
    }


def tiny_bart(encoder_heads: int = 4, decoder_heads: int = 4, seed: int = 0) -> Any:
    """A random tiny ``BartForConditionalGeneration``: 2 encoder and 2 decoder layers on one config. Encoder
    self-attention (non-causal), decoder self-attention (causal) and decoder cross-attention modules all carry that
    config and ``layer_idx`` 0 and 1."""
    import transformers as tf

    cfg = tf.BartConfig(
        vocab_size=500,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=encoder_heads,
        decoder_attention_heads=decoder_heads,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return tf.BartForConditionalGeneration(cfg).eval()


def bart_batch(enc_len: int = 160, dec_len: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of :func:`tiny_bart`: ``enc_len`` encoder tokens, ``dec_len`` decoder tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 500, (1, enc_len), generator=g),
        "decoder_input_ids": torch.randint(3, 500, (1, dec_len), generator=g),
    }
