"""Tiny LatentOmni fixtures for tests, the demo, examples and the CPU benchmark (nothing downloads).

``tiny_latent_omni_tokenizer()`` is the foundation's byte-level BPE tokenizer plus the Qwen2.5-Omni media
tokens and the three latent tokens; ``tiny_latent_omni_config()`` a Qwen2.5-Omni thinker of hidden 64
(2 layers, vision depth 1 with 4-pixel patches, audio 1 layer) whose token ids match that tokenizer.

Example:
    >>> model = tiny_latent_omni(num_visual_latents=8, num_audio_latents=2)
    >>> model.config.num_latents
    10
"""

from __future__ import annotations

import copy
from typing import Any

SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<Unified_Latent>",
    "</Unified_Latent>",
    "<Unified_Latent_pad>",
)


def tiny_latent_omni_tokenizer() -> Any:
    """A fresh (deep-copied) tiny tokenizer with the Qwen2.5-Omni media tokens and the latent tokens."""
    from hf_ext.testing import tiny_tokenizer

    return copy.deepcopy(tiny_tokenizer(extra_special_tokens=SPECIAL_TOKENS))


def tiny_latent_omni_config(**overrides: Any) -> Any:
    """A tiny :class:`LatentOmniConfig` (vocab 512, hidden 64) matching :func:`tiny_latent_omni_tokenizer`.

    Defaults to K = 8 visual + 2 audio latents (stride 4) to keep CPU tests fast; pass overrides for the
    paper's 32 + 8.
    """
    from .configuration_latent_omni import LatentOmniConfig

    tok = tiny_latent_omni_tokenizer()
    tid = tok.convert_tokens_to_ids
    kw: dict[str, Any] = dict(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[0],
            patch_size=4,
            window_size=16,
        ),
        audio_config=dict(
            d_model=32,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            output_dim=64,
            num_mel_bins=128,
        ),
        audio_token_index=tid("<|AUDIO|>"),
        image_token_index=tid("<|IMAGE|>"),
        video_token_index=tid("<|VIDEO|>"),
        audio_start_token_id=tid("<|audio_bos|>"),
        audio_end_token_id=tid("<|audio_eos|>"),
        vision_start_token_id=tid("<|vision_bos|>"),
        vision_end_token_id=tid("<|vision_eos|>"),
        user_token_id=tid("<|im_start|>"),
        latent_start_token_id=tid("<Unified_Latent>"),
        latent_end_token_id=tid("</Unified_Latent>"),
        latent_pad_token_id=tid("<Unified_Latent_pad>"),
        num_visual_latents=8,
        num_audio_latents=2,
        ospe_audio_time_stride=4,
        sync_projection_dim=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    kw.update(overrides)
    return LatentOmniConfig(**kw)


def tiny_latent_omni(seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any) -> Any:
    """A random tiny :class:`LatentOmniForConditionalGeneration` (fp32, eval mode)."""
    import torch

    from .modeling_latent_omni import LatentOmniForConditionalGeneration

    cfg = tiny_latent_omni_config(**overrides)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LatentOmniForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = cfg.get_text_config().eos_token_id
    model.generation_config.pad_token_id = cfg.get_text_config().pad_token_id
    return model


def tiny_latent_omni_processor(**overrides: Any) -> Any:
    """A :class:`LatentOmniProcessor` around the tiny tokenizer (4-pixel patches, 128 mel bins)."""
    from .processing_latent_omni import LatentOmniProcessor

    kw: dict[str, Any] = dict(num_visual_latents=8, num_audio_latents=2, patch_size=4, fps=2.0)
    kw.update(overrides)
    return LatentOmniProcessor.from_tokenizer(tiny_latent_omni_tokenizer(), num_mel_bins=128, **kw)


__all__ = [
    "tiny_latent_omni",
    "tiny_latent_omni_config",
    "tiny_latent_omni_tokenizer",
    "tiny_latent_omni_processor",
]
