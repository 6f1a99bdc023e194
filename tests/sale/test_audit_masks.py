"""Masks and selections a model hands the attention function that SALE must honour (or refuse), never drop."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from hf_ext.attention.sale import SALEConfig, enable_sale, sale_stats
from hf_ext.attention.sale.attention import reset_warnings, sale_attention_forward
from tests.sale._models import rand_ids

BLOCKS = dict(block_q=16, block_k=16, local_window=32)


def _tiny_dsa(v_head_dim: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DeepseekV32Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=v_head_dim,
        head_dim=8,
        index_topk=32,
        index_head_dim=16,
        index_n_heads=2,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
    )
    return tf.DeepseekV32ForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "v_head_dim", [16, 32]
)  # 16: q/k/v dims equal (sparse-capable); 32: head-dim fallback
def test_dsa_indexer_selection_is_honoured(v_head_dim):
    """DeepSeek-V3.2-style models fold their indexer's top-k selection into the mask only for eager/sdpa and pass
    it as ``indices=`` to any other implementation; SALE (sparse and dense paths) ignored it: with tau ~ 0 the
    logits differed from sdpa by ~0.2 and generate() diverged."""
    pytest.importorskip("transformers.models.deepseek_v32")
    model = _tiny_dsa(v_head_dim)
    ids = rand_ids(160)
    with torch.no_grad():
        ref = model(ids).logits
    ref_gen = model.generate(ids[:, :100], max_new_tokens=4, do_sample=False)
    enable_sale(model, SALEConfig(min_seq_len=64, tau=1e-9, **BLOCKS))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids).logits
        gen = model.generate(ids[:, :100], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


class _Mod(torch.nn.Module):
    def __init__(self, cfg: SALEConfig, indexer=None) -> None:
        super().__init__()
        self.num_key_value_groups = 2
        self.is_causal = True
        self.layer_idx = 0
        self.config = type("C", (), {"sale_config": cfg.to_dict()})()
        if indexer is not None:
            self.indexer = indexer
        self.eval()


def _qkv(s=96):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, s, 16, generator=g) for h in (4, 2, 2))


def _sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    ).transpose(1, 2)


def test_token_indices_fold_into_the_mask_and_sparse_refusal_is_explicit():
    q, k, v = _qkv()
    s = q.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(1, s, s, generator=g).masked_fill(~causal, -1e9)
    idx = scores.topk(24, dim=-1).indices.to(torch.int32)  # [B, S, topk], as the DSA indexer returns
    sel = torch.zeros(1, s, s, dtype=torch.bool).scatter(-1, idx.long(), True) & causal
    ref = _sdpa(q, k, v, sel[:, None])
    mask = causal[None, None]
    reset_warnings()
    for cfg in (
        SALEConfig(min_seq_len=32, tau=1e-9, **BLOCKS),
        SALEConfig(min_seq_len=4096),
    ):  # sparse / dense
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, _ = sale_attention_forward(_Mod(cfg), q, k, v, mask, scaling=0.25, indices=idx)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    strict = _Mod(SALEConfig(min_seq_len=32, on_unsupported="error", **BLOCKS))
    with pytest.raises(ValueError, match="index selection"):
        sale_attention_forward(strict, q, k, v, mask, scaling=0.25, indices=idx)


def test_block_indices_use_the_models_block_mask_builder_or_are_refused():
    q, k, v = _qkv()
    s = q.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]

    class Indexer(torch.nn.Module):
        def build_block_mask(self, block_indices, attention_mask, key_length, dtype, device, position_ids):
            keep = torch.zeros(1, 1, s, key_length, dtype=torch.bool)
            keep[..., :16] = True  # first key block only, as a stand-in for the model's builder
            keep = keep & attention_mask
            return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)

    bidx = torch.zeros(1, 1, s, 1, dtype=torch.long)
    mod = _Mod(SALEConfig(min_seq_len=32, tau=1e-9, **BLOCKS), Indexer())
    with warnings.catch_warnings(), sale_stats() as st:
        warnings.simplefilter("ignore")
        out, _ = sale_attention_forward(mod, q, k, v, causal, scaling=0.25, block_indices=bidx)
    keep = causal.clone()
    keep[..., 16:] = False
    torch.testing.assert_close(out, _sdpa(q, k, v, keep), atol=1e-5, rtol=1e-4)
    assert st.calls[0]["path"] != "sparse"
    with pytest.raises(ValueError, match="block_indices"):
        sale_attention_forward(
            _Mod(SALEConfig(min_seq_len=32)), q, k, v, causal, scaling=0.25, block_indices=bidx
        )


def test_gemma4_kv_shared_layers_with_logits_to_keep_match_sdpa():
    """Gemma4 slices the queries of its KV-shared layers to the last ``logits_to_keep`` positions after building the
    mask (guarded only for "sdpa"); with no padding the mask is None, and SALE read "no mask, more keys than queries"
    as sdpa's top-left causal (static-cache prefill): logits off by ~0.4 on the sparse and the dense path."""
    import transformers as tf

    if not hasattr(tf, "Gemma4TextConfig"):
        pytest.skip("transformers without Gemma4")
    torch.manual_seed(0)
    cfg = tf.Gemma4TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=16,
        max_position_embeddings=1024,
        num_kv_shared_layers=2,
        sliding_window=512,
        hidden_size_per_layer_input=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        pad_token_id=0,
    )
    model = tf.Gemma4ForCausalLM(cfg).eval()
    ids = rand_ids(100)
    with torch.no_grad():
        ref = model(ids).logits[:, -5:]
    for min_seq_len in (64, 4096):  # sparse prefill layers / all dense
        enable_sale(model, SALEConfig(min_seq_len=min_seq_len, tau=1e-9, **BLOCKS))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(ids, logits_to_keep=5).logits
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_no_mask_with_fewer_queries_than_keys_is_bottom_right_causal():
    """``None`` mask with Sq < Sk: the queries are the last Sq positions, on the sparse and both dense paths."""
    q, k, v = _qkv(s=96)
    q = q[:, :, -40:]
    ref = _sdpa(q, k, v, torch.ones(40, 96, dtype=torch.bool).tril(56))
    for cfg in (SALEConfig(min_seq_len=32, tau=1e-9, **BLOCKS), SALEConfig(min_seq_len=4096)):
        out, _ = sale_attention_forward(_Mod(cfg), q, k, v, None, scaling=0.25)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def _right_padded_llama_on_sale(length: int, ends: tuple[int, int]) -> tuple[Any, Any, Any, Any]:
    """The tiny Llama, two rows of ``length`` random ids right-padded from ``ends`` on (the mask's zeros), the dense
    logits of that batch, and the model then switched to SALE (sparse from 32 tokens, errors instead of fallbacks)."""
    from tests.sale._models import tiny_family

    model = tiny_family("llama")
    ids = rand_ids(length, batch=2)
    am = torch.ones_like(ids)
    for row, end in enumerate(ends):
        am[row, end:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
    enable_sale(model, SALEConfig(min_seq_len=32, tau=1e-9, on_unsupported="error", **BLOCKS))
    return model, ids, am, ref


@pytest.mark.parametrize("cache", [None, "static"])
def test_right_padded_batch_runs_sparse_and_matches_sdpa(cache):
    """Every row padded at the end (batch of 1 with padding, ``pad_to_multiple_of``, a batch padded to a fixed
    length): the trailing key columns no query sees were dropped as if they were unused static-cache slots, which
    shifted the bottom-right alignment, so the mask check failed: a dense fallback blamed on "packed sequences or
    a custom mask", and a ValueError with ``on_unsupported="error"``."""
    from transformers import StaticCache

    model, ids, am, ref = _right_padded_llama_on_sale(96, ends=(70, 88))
    for rows in (slice(0, 2), slice(0, 1)):  # the batch, and its first row alone (batch of 1)
        kw = {} if cache is None else {"past_key_values": StaticCache(config=model.config, max_cache_len=128)}
        with torch.no_grad(), sale_stats() as st:
            got = model(ids[rows], attention_mask=am[rows], **kw).logits
        assert {c["path"] for c in st.calls} == {"sparse"}
        # every position, the padded ones too: by the mask they see all the real tokens, as under sdpa
        torch.testing.assert_close(got, ref[rows], atol=2e-5, rtol=1e-4)


def test_rows_after_the_visible_keys_attend_to_all_of_them():
    """A mask under which every query sees only the first 40 keys reads as right padding; the queries after them
    are real tokens here, so they must get attention over those 40 keys, not the zeros of a padding row."""
    q, k, v = _qkv(s=96)
    mask = torch.ones(96, 96, dtype=torch.bool).tril()[None, None].clone()
    mask[..., 40:] = False
    for cfg in (SALEConfig(min_seq_len=32, tau=1e-9, **BLOCKS), SALEConfig(min_seq_len=4096)):
        out, _ = sale_attention_forward(_Mod(cfg), q, k, v, mask, scaling=0.25)
        torch.testing.assert_close(out, _sdpa(q, k, v, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_right_padded_chunk_after_cached_tokens_runs_sparse_and_matches_sdpa(cache):
    """Chunked prefill whose last chunk is right-padded (the queries follow cached tokens). DynamicCache: the trailing
    padding was cut down to the last real key, which moved the queries' bottom-right alignment, so the mask check
    failed (dense fallback; ValueError with on_unsupported="error"). StaticCache (its unused slots after the chunk
    are masked too): the cut stopped at the last real key or at the query length, never at the chunk's end, so the
    same failure remained."""
    from transformers import DynamicCache, StaticCache

    model, ids, am, ref = _right_padded_llama_on_sale(160, ends=(130, 150))
    if cache == "dynamic":
        kv = DynamicCache(config=model.config)
    else:
        kv = StaticCache(config=model.config, max_cache_len=256)
    with torch.no_grad(), sale_stats() as st:
        first = model(ids[:, :80], attention_mask=am[:, :80], past_key_values=kv).logits
        second = model(ids[:, 80:], attention_mask=am, past_key_values=kv).logits
    assert {c["path"] for c in st.calls} == {"sparse"}
    torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=2e-5, rtol=1e-4)


def test_triton_backend_on_cpu_with_a_broken_interpreter_is_named_not_an_interpreter_error(monkeypatch):
    """backend="triton" on CPU under TRITON_INTERPRET=1 with triton 3.6 and numpy >= 2.4 failed inside Triton's
    interpreter with an opaque InterpreterError (seen on the device); SALE now names the version pair: a ValueError
    with on_unsupported="error", else the dense fallback with that reason."""
    from hf_ext_kernels.sparse_attn import ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(
        ops, "interpreter_problem", lambda: "Triton's CPU interpreter fails with triton 3.6.0"
    )
    q, k, v = _qkv()
    causal = torch.ones(96, 96, dtype=torch.bool).tril()[None, None]
    strict = _Mod(SALEConfig(min_seq_len=32, backend="triton", on_unsupported="error", **BLOCKS))
    with pytest.raises(ValueError, match="interpreter fails with triton 3.6.0"):
        sale_attention_forward(strict, q, k, v, causal, scaling=0.25)
    reset_warnings()
    with pytest.warns(UserWarning, match="interpreter fails with triton 3.6.0"), sale_stats() as st:
        out, _ = sale_attention_forward(
            _Mod(SALEConfig(min_seq_len=32, backend="triton", **BLOCKS)), q, k, v, causal, scaling=0.25
        )
    torch.testing.assert_close(out, _sdpa(q, k, v, causal), atol=1e-5, rtol=1e-4)
    assert st.sparse_calls == 0
