"""enable_sale on a model that refuses "sale" leaves it untouched."""

from __future__ import annotations

import pytest
import torch

from hf_ext.attention.sale import SALEConfig, enable_sale


def test_refused_enable_changes_nothing():
    """Falcon does not dispatch through AttentionInterface: enable_sale raised, but only after writing sale_config
    (saved into config.json by save_pretrained) and the remembered previous implementation."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.FalconConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        new_decoder_architecture=True,
        num_kv_heads=2,
    )
    model = tf.FalconForCausalLM(cfg).eval()
    before = dict(vars(model))
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="refused attn_implementation='sale'"):
        enable_sale(model, SALEConfig(min_seq_len=64))
    assert model.config._attn_implementation == impl
    assert getattr(model.config, "sale_config", None) is None
    assert set(vars(model)) == set(before)
