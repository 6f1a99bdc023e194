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
