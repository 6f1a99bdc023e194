"""enable_sale / disable_sale revert edge cases."""

from __future__ import annotations

import pytest

from hf_ext.attention.sale import SALEConfig, disable_sale, enable_sale


def _tiny_got_ocr2():
    """A random tiny GOT-OCR2: its top-level model and vision encoder do not dispatch through AttentionInterface
    (transformers refuses to switch them), its Qwen2 text model does."""
    import transformers as tf

    if not hasattr(tf, "GotOcr2ForConditionalGeneration"):
        pytest.skip("transformers without GOT-OCR2")
    text = tf.Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    vision = tf.GotOcr2VisionConfig(
        hidden_size=32,
        output_channels=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        mlp_dim=64,
        global_attn_indexes=[0],
    )
    return tf.GotOcr2ForConditionalGeneration(
        tf.GotOcr2Config(vision_config=vision, text_config=text, image_token_index=5)
    ).eval()


def _internal_impls(model) -> list:
    configs, seen = [], set()
    stack = [model.config, *(getattr(m, "config", None) for m in model.modules())]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        configs.append(c)
        stack.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}) or {})
    return [(type(c).__name__, vars(c).get("_attn_implementation_internal")) for c in configs]


def test_a_refused_enable_leaves_the_sub_models_it_switched_as_they_were():
    """transformers switched GOT-OCR2's text model to "sale" while refusing the top-level model (it only warns);
    enable_sale then raised 'refused' but left the text model on "sale", remembering nothing."""
    model = _tiny_got_ocr2()
    before = _internal_impls(model)
    assert ("Qwen2Config", "sdpa") in before
    attrs = set(vars(model))
    with pytest.raises(ValueError, match="refused attn_implementation='sale'"):
        enable_sale(model, SALEConfig(min_seq_len=64))
    assert _internal_impls(model) == before
    assert set(vars(model)) == attrs
    assert all(getattr(c, "sale_config", None) is None for c in (model.config, model.config.text_config))
    disable_sale(model)  # nothing to undo
    assert _internal_impls(model) == before
