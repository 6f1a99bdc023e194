"""Registration with transformers, switching on/off, model families."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from hf_ext.attention.sale import SALEConfig, disable_sale, enable_sale, sale_stats
from hf_ext.attention.sale.attention import reset_warnings
from tests.sale._models import rand_ids, tiny_family

SPARSE = SALEConfig(min_seq_len=64, block_q=16, block_k=16, local_window=32)


def test_registered_in_both_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import hf_ext  # noqa: F401
    from hf_ext.attention.sale.attention import sale_attention_forward

    assert ALL_ATTENTION_FUNCTIONS["sale"] is sale_attention_forward
    assert "sale" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping  # else padding masks are silently dropped


def test_import_defers_registration_until_transformers_loads_modeling_utils():
    code = (
        "import sys, torch, transformers\n"
        "import hf_ext\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "assert not any(m.startswith(('triton', 'hf_ext_kernels')) for m in sys.modules)\n"
        "from transformers import LlamaForCausalLM\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M\n"
        "assert 'sale' in A and 'sale' in M._global_mapping\n"
        "assert not any(m.startswith('hf_ext_kernels') for m in sys.modules)  # kernels load on first call\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_from_pretrained_set_attn_and_disable(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_family("llama")
    enable_sale(model, SPARSE)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sale").eval()
    assert loaded.config._attn_implementation == "sale"
    assert SALEConfig.from_dict(loaded.config.sale_config) == SPARSE
    ids = rand_ids(200)
    with torch.no_grad(), sale_stats() as st:
        loaded(ids)
    assert st.sparse_calls == 2  # both layers took the sparse path (200 >= min_seq_len=64)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config._attn_implementation == "sdpa"
    plain.set_attn_implementation("sale")
    assert plain.config._attn_implementation == "sale"
    disable_sale(plain)
    assert plain.config._attn_implementation == "sdpa"

    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    enable_sale(eager)
    assert eager.config._attn_implementation == "sale"
    assert disable_sale(eager).config._attn_implementation == "eager"  # restores what was there before


@pytest.mark.parametrize("family", ["mistral", "gemma", "gemma2", "gemma3"])
def test_other_families_tiny_tau_equals_reference(family):
    """Every family runs under "sale"; layers SALE cannot take (softcap, sliding window) fall back honestly."""
    model = tiny_family(family)
    ids = rand_ids(300)
    ref_impl = "eager" if family == "gemma2" else "sdpa"  # gemma2's softcap is eager-only in transformers
    model.set_attn_implementation(ref_impl)
    with torch.no_grad():
        ref = model(ids).logits
    enable_sale(model, SALEConfig(min_seq_len=64, block_q=16, block_k=16, tau=1e-9))
    reset_warnings()
    with torch.no_grad(), sale_stats() as st, warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model(ids).logits
    paths = [c["path"] for c in st.calls]
    expected = {
        "mistral": ["sparse", "sparse"],
        "gemma": ["sparse", "sparse"],
        "gemma2": ["fallback:softcap", "fallback:softcap"],
        "gemma3": ["fallback:sliding_window", "sparse"],
    }[family]
    assert paths == expected
    msgs = [str(r.message) for r in rec]
    if family in ("gemma2", "gemma3"):
        assert any("not supported by SALE" in m for m in msgs), msgs
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_softcap_model_with_a_static_cache_matches_eager():
    """Gemma2 (logit softcapping) runs its own eager attention under "sale"; with no mask over a static cache (the
    first prefill into it) each query sees the cache slots up to itself, as sdpa's is_causal means, not the empty
    slots after the prompt."""
    from transformers import StaticCache

    model = tiny_family("gemma2")
    ids = rand_ids(20)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(ids).logits
    enable_sale(model)  # a short prompt: the dense path
    with torch.no_grad():
        got = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=64)).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_attention_sink_logits_are_honoured_by_the_dense_path():
    """gpt-oss passes its attention-sink logits as ``s_aux``; sdpa would drop them, so such calls run the model's
    eager attention (short prompts, and the documented fallback of long ones), equal to attn_implementation='eager'."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GptOssConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4096,
        layer_types=["full_attention", "full_attention"],
        max_position_embeddings=4096,
    )
    model = tf.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.sinks.normal_(0, 2.0)  # sinks that matter
    ids = rand_ids(40)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(ids).logits
    long_enough = SALEConfig(min_seq_len=32, block_q=16, block_k=16, local_window=16)
    for cfg_sale, path in ((SALEConfig(), "dense"), (long_enough, "fallback:bias")):
        enable_sale(model, cfg_sale)
        reset_warnings()
        with torch.no_grad(), sale_stats() as st, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = model(ids).logits
        assert {c["path"] for c in st.calls} == {path}
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_padded_batch_prefilled_into_a_static_cache_runs_sparse():
    """A static cache passes its whole length with the slots after the prompt masked for every query; those keys
    are dropped, so a left-padded batch still takes the sparse path (equal to sdpa as tau -> 0)."""
    from transformers import StaticCache

    model = tiny_family("llama")
    ids = rand_ids(100, batch=2)
    am = torch.ones_like(ids)
    am[0, :25] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
    enable_sale(model, SALEConfig(min_seq_len=32, block_q=16, block_k=16, local_window=16, tau=1e-9))
    reset_warnings()
    with torch.no_grad(), sale_stats() as st, warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = model(
            ids, attention_mask=am, past_key_values=StaticCache(config=model.config, max_cache_len=160)
        ).logits
    assert {c["path"] for c in st.calls} == {"sparse"} and not [r for r in rec if "SALE" in str(r.message)]
    real = am.bool()
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-4)


def test_disable_restores_every_sub_model_and_the_models_own_default():
    """disable_sale gives each sub-model back what it ran (a vision tower keeps sdpa while the text model was on
    eager); a model loaded with attn_implementation="sale" goes back to transformers' default for it (eager for
    Gemma2, which sdpa cannot run), not to sdpa unconditionally."""
    from hf_ext.testing import tiny_llava

    from .test_calibrate import MIXED_IMPLS, _impls

    model = tiny_llava(attn_implementation=MIXED_IMPLS)
    before = _impls(model)
    enable_sale(model, SPARSE)
    assert _impls(model) == ("sale", "sale", "sale")
    disable_sale(model)
    assert _impls(model) == before == ("eager", "eager", "sdpa")


def test_disable_after_loading_with_sale_picks_the_models_default(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_family("gemma2").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sale")
    assert disable_sale(model).config._attn_implementation == "eager"  # Gemma2 has no sdpa path


def test_enable_and_disable_across_a_peft_wrapper():
    """The remembered implementation lives on the transformers model under a PeftModel: enabling on the base model
    and disabling on its PeftModel raised after switching (attribute forwarding), and enabling on the PeftModel
    then disabling on ``merge_and_unload()``'s model restored sdpa instead of eager."""
    from peft import LoraConfig, get_peft_model

    from hf_ext.testing import tiny_llama

    def eager_model():
        m = tiny_llama()
        m.set_attn_implementation("eager")
        return m

    base = eager_model()
    enable_sale(base, SPARSE)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert disable_sale(peft_model).config._attn_implementation == "eager"
    assert not any(k.startswith("_hf_ext_sale") for k in vars(base))

    peft_model = get_peft_model(eager_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable_sale(peft_model, SPARSE)
    assert peft_model.config._attn_implementation == "sale"
    merged = peft_model.merge_and_unload()
    assert disable_sale(merged).config._attn_implementation == "eager"
