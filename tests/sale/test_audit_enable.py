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


def _impls(model) -> tuple:
    c = model.config
    subs = [getattr(c, k) for k in ("text_config", "vision_config") if hasattr(c, k)]
    return (c._attn_implementation, *(s._attn_implementation for s in subs))


def test_disable_leaves_a_model_that_is_not_on_sale_as_it_is():
    """disable_sale on a model not running "sale" (never enabled, or disabled already) switched it to transformers'
    default: an eager model became sdpa on a second disable_sale."""
    from hf_ext.attention.sale import disable_sale
    from hf_ext.testing import tiny_llama

    model = tiny_llama()
    model.set_attn_implementation("eager")
    disable_sale(model)  # never enabled
    assert _impls(model) == ("eager",)
    enable_sale(model)
    enable_sale(model, SALEConfig(min_seq_len=64))  # twice: still remembers eager
    disable_sale(model)
    assert _impls(model) == ("eager",)
    disable_sale(model)  # again
    assert _impls(model) == ("eager",)


def test_disable_puts_back_sub_models_that_were_not_on_sale():
    """Only the (sub-)models on "sale" go back to the default when the previous implementation is unknown or was
    "sale": a vision tower on eager next to a text model on "sale" came back as sdpa."""
    from hf_ext.attention.sale import disable_sale, register_sale
    from hf_ext.testing import tiny_llava

    register_sale()
    model = tiny_llava(attn_implementation={"": "sdpa", "text_config": "sale", "vision_config": "eager"})
    disable_sale(model)  # "sale" set by hand on the text model only
    assert _impls(model) == ("sdpa", "sdpa", "eager")
    model.set_attn_implementation({"": "sale", "text_config": "sale", "vision_config": "eager"})
    enable_sale(model)  # switches the vision tower to "sale" too ...
    assert _impls(model) == ("sale", "sale", "sale")
    disable_sale(model)  # ... and puts its eager back
    assert _impls(model) == ("sdpa", "sdpa", "eager")


def test_the_config_reaches_a_vision_tower_whose_attention_has_no_layer_idx():
    """enable_sale wrote sale_config only to the configs of modules with a ``layer_idx``; Llava's CLIP vision tower has
    none, so it ran "sale" with the default SALEConfig: the user's min_seq_len (and tau, backend, on_unsupported) was
    ignored there."""
    from hf_ext.attention.sale import sale_stats
    from hf_ext.testing import tiny_llava

    model = tiny_llava()
    ids = torch.randint(6, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    ids[0, 4:20] = 5  # the 16 image tokens
    pix = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pix).logits
    cfg = SALEConfig(min_seq_len=16, tau=1e-9, block_q=16, block_k=16, local_window=16)
    enable_sale(model, cfg)
    assert model.config.vision_config.sale_config == cfg.to_dict()
    with torch.no_grad(), sale_stats() as st:
        out = model(input_ids=ids, pixel_values=pix).logits
    vision = [c for c in st.calls if c["layer_idx"] is None]
    assert [c["path"] for c in vision] == ["sparse"], st.calls  # 17 patch tokens >= min_seq_len: sparse
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("taus", [[[0.01] * 8] * 2, [[0.01] * 4]], ids=["other_head_count", "missing_layer"])
def test_taus_that_do_not_fit_the_model_are_refused_before_any_change(taus):
    """Per-layer thresholds calibrated for another model were accepted by enable_sale; the ValueError came only from
    the first prompt long enough for the sparse path, mid-generation. Now enable_sale raises naming taus and leaves
    the model as it was; calibrate still replaces such stored thresholds."""
    from hf_ext.attention.sale import calibrate
    from hf_ext.testing import tiny_llama

    model = tiny_llama()  # 2 layers, 4 query heads
    with pytest.raises(ValueError, match="taus"):
        enable_sale(model, SALEConfig(taus=taus, min_seq_len=64))
    assert model.config._attn_implementation == "sdpa" and getattr(model.config, "sale_config", None) is None
    model.config.sale_config = SALEConfig(taus=taus, block_q=16, block_k=16, local_window=16).to_dict()
    new = calibrate(
        model, torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0)), theta=0.4
    )
    assert len(new.taus) == 2 and all(len(r) == 4 for r in new.taus)
    enable_sale(model)
