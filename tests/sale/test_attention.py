"""The "sale" attention function: exactness as tau -> 0, dense fallbacks, sparsity error, padding."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_ext.attention.sale import SALEConfig, enable_sale, sale_stats
from hf_ext.attention.sale.attention import decode_mask, reset_warnings, sale_attention_forward
from tests.sale._models import rand_ids, tiny_family

BLOCKS = dict(block_q=16, block_k=16, local_window=32)


class _Mod(torch.nn.Module):
    """The attributes transformers' attention modules carry that the attention function reads."""

    def __init__(self, h: int, hkv: int, cfg: SALEConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.num_key_value_groups = h // hkv
        self.is_causal = True
        self.layer_idx = layer_idx
        self.config = type("C", (), {"sale_config": cfg.to_dict()})()
        self.eval()  # as after from_pretrained: a module in training mode takes dense attention


def _qkv(b=2, h=4, hkv=2, s=160, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, s, d, generator=g),
        torch.randn(b, hkv, s, d, generator=g),
        torch.randn(b, hkv, s, d, generator=g),
    )


def _sdpa(q, k, v, mask=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _pad_mask(kpm: torch.Tensor) -> torch.Tensor:
    s = kpm.shape[1]
    return torch.ones(s, s, dtype=torch.bool).tril()[None, None] & kpm[:, None, None, :]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_tau_equals_sdpa_on_models(family):
    model = tiny_family(family)
    ids = rand_ids(320)
    with torch.no_grad():
        ref = model(ids).logits
    enable_sale(model, SALEConfig(min_seq_len=64, tau=1e-9, **BLOCKS))
    with torch.no_grad(), sale_stats() as st:
        out = model(ids).logits
    assert st.sparse_calls == 2
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_function_gqa_and_padding_holes_match_sdpa():
    """Key padding with holes goes to the kernel as key_padding_mask; tiny tau = dense attention."""
    q, k, v = _qkv()
    mod = _Mod(4, 2, SALEConfig(min_seq_len=32, tau=1e-9, **BLOCKS))
    kpm = torch.ones(2, 160, dtype=torch.bool)
    kpm[0, 40:57] = False  # a hole: not a contiguous run
    kpm[1, :23] = False  # left padding
    mask = _pad_mask(kpm)
    out, w = sale_attention_forward(mod, q, k, v, mask, scaling=16**-0.5)
    assert w is None and out.shape == (2, 160, 4, 16)
    ref = _sdpa(q, k, v, mask)
    real = kpm[:, :, None, None].expand_as(out)  # compare at real query rows
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)
    # an additive float mask is decoded the same way
    fmask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    out_f, _ = sale_attention_forward(mod, q, k, v, fmask, scaling=16**-0.5)
    torch.testing.assert_close(out_f, out)


def test_decode_mask_recognises_structures():
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1, :7] = False
    got, why = decode_mask(_pad_mask(kpm), 2, 40, 40, causal=True)
    assert why is None and torch.equal(got, kpm)
    assert decode_mask(_pad_mask(torch.ones(2, 40, dtype=torch.bool)), 2, 40, 40, causal=True) == (None, None)
    packed = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    packed[..., :20, :20] = torch.ones(20, 20, dtype=torch.bool).tril()
    packed[..., 20:, 20:] = torch.ones(20, 20, dtype=torch.bool).tril()
    assert decode_mask(packed, 1, 40, 40, causal=True)[1] is not None
    bias = torch.randn(1, 1, 40, 40)
    assert "bias" in decode_mask(bias, 1, 40, 40, causal=True)[1]


def test_packed_sequence_mask_falls_back_to_dense_with_one_warning():
    q, k, v = _qkv(b=1, s=128)
    packed = torch.zeros(1, 1, 128, 128, dtype=torch.bool)
    for a, b in ((0, 70), (70, 128)):
        packed[..., a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    mod = _Mod(4, 2, SALEConfig(min_seq_len=32, tau=0.5, **BLOCKS))
    reset_warnings()
    with pytest.warns(UserWarning, match="packed sequences or a custom mask"):
        out, _ = sale_attention_forward(mod, q, k, v, packed, scaling=16**-0.5)
    torch.testing.assert_close(out, _sdpa(q, k, v, packed), atol=1e-5, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once only
        sale_attention_forward(mod, q, k, v, packed, scaling=16**-0.5)
    strict = _Mod(4, 2, SALEConfig(min_seq_len=32, on_unsupported="error", **BLOCKS))
    with pytest.raises(ValueError, match="packed sequences"):
        sale_attention_forward(strict, q, k, v, packed, scaling=16**-0.5)


def test_unsupported_dtype_falls_back_or_raises():
    q, k, v = (t.double() for t in _qkv(b=1, s=96))
    mod = _Mod(4, 2, SALEConfig(min_seq_len=32, tau=0.5, **BLOCKS))
    reset_warnings()
    with (
        sale_stats() as st,
        pytest.warns(UserWarning, match=r"dtype torch.float64 is not supported.*supported"),
    ):
        out, _ = sale_attention_forward(mod, q, k, v, None, scaling=16**-0.5)
    assert st.calls[0]["path"] == "fallback:dtype"
    torch.testing.assert_close(out, _sdpa(q, k, v))
    strict = _Mod(4, 2, SALEConfig(min_seq_len=32, on_unsupported="error", **BLOCKS))
    with pytest.raises(ValueError, match="float64"):
        sale_attention_forward(strict, q, k, v, None, scaling=16**-0.5)


def test_sparsity_changes_output_only_where_blocks_are_dropped():
    """A large tau really drops blocks (density < 1) and the result equals attention over the kept blocks."""
    from hf_ext_kernels.sparse_attn import naive

    q, k, v = _qkv(b=1, s=256)
    q = q * 0.3  # flatter scores: many blocks fall under tau
    cfg = SALEConfig(min_seq_len=32, tau=0.02, **BLOCKS)
    with sale_stats() as st:
        out, _ = sale_attention_forward(_Mod(4, 2, cfg), q, k, v, None, scaling=16**-0.5)
    assert st.sparse_calls == 1 and st.density < 0.9
    mask = naive.sale_block_mask_ref(q, k, tau=0.02, block_q=16, block_k=16, local_window=32)
    ref = naive.block_sparse_attention_ref(q, k, v, mask, block_q=16, block_k=16).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert (out - _sdpa(q, k, v)).abs().max() > 1e-3  # and it is not dense attention


@pytest.mark.parametrize("family, tau", [("llama", 5e-3), ("qwen2", 5e-3), ("qwen3", 3e-2)])
def test_long_prompt_sparse_logits_within_error(family, tau):
    """Stated error on 384-token prompts with 16x16 blocks: cosine >= 0.995, relative L2 <= 0.08 vs sdpa."""
    model = tiny_family(family)
    ids = rand_ids(384)
    with torch.no_grad():
        ref = model(ids).logits
    enable_sale(model, SALEConfig(min_seq_len=128, tau=tau, **BLOCKS))
    with torch.no_grad(), sale_stats() as st:
        out = model(ids).logits
    assert st.sparse_calls == 2 and st.density < 0.95, st.density
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    rel = (out - ref).norm() / ref.norm()
    assert cos >= 0.995 and rel <= 0.08, (float(cos), float(rel), st.density)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_short_prompt_generate_matches_sdpa(family):
    model = tiny_family(family)
    ids = rand_ids(40)
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    enable_sale(
        model, SALEConfig(min_seq_len=64, tau=0.5, **BLOCKS)
    )  # tau huge: would be visible if sparse ran
    with sale_stats() as st:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert st.sparse_calls == 0 and {c["path"] for c in st.calls} == {"dense"}
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_left_padded_batch_generate_matches_unpadded_single_runs(family):
    model = tiny_family(family)
    enable_sale(model, SALEConfig(min_seq_len=128, tau=1e-2, **BLOCKS))
    lens = [300, 211, 90]  # the last one stays below min_seq_len -> dense, like its single run
    prompts = [rand_ids(n, seed=10 + i)[0] for i, n in enumerate(lens)]
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    am = torch.zeros(len(lens), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        am[i, width - len(p) :] = 1
    with sale_stats() as st:
        batched = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False)
    assert st.sparse_calls == 4 and st.density < 0.9  # sparsity active on the two long rows
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[i, width:], single[0, len(p) :]), (
            i,
            batched[i, width:],
            single[0, len(p) :],
        )


def test_chunked_prefill_with_cache_and_static_cache_match_sdpa():
    """Bottom-right causal alignment after cached tokens, and the static-cache prefill (no mask, padded keys)."""
    from transformers import DynamicCache

    model = tiny_family("llama")
    ids = rand_ids(320)
    with torch.no_grad():
        ref = model(ids).logits
        ref_static = model.generate(ids[:, :200], max_new_tokens=4, do_sample=False)
    enable_sale(model, SALEConfig(min_seq_len=64, tau=1e-9, **BLOCKS))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), sale_stats() as st:
        first = model(ids[:, :150], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 150:], past_key_values=cache, use_cache=True).logits
    assert [c["q_len"] for c in st.calls if c["path"] == "sparse"] == [150, 150, 170, 170]
    torch.testing.assert_close(torch.cat([first, second], 1), ref, atol=2e-5, rtol=1e-4)
    with sale_stats() as st:
        out = model.generate(ids[:, :200], max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert st.sparse_calls == 2
    assert torch.equal(out, ref_static)


_TRITON_SCRIPT = """
import torch
import hf_ext
from hf_ext.attention.sale import SALEConfig, enable_sale, sale_stats
from hf_ext.testing import tiny_llama

torch.set_num_threads(1)
model = tiny_llama(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)  # d=64
ids = torch.randint(3, 500, (1, 160), generator=torch.Generator().manual_seed(1))
cfg = dict(min_seq_len=64, block_q=32, block_k=32, local_window=16, tau=0.03)
enable_sale(model, SALEConfig(backend="torch", **cfg))
with torch.no_grad(), sale_stats() as st_ref:
    ref = model(ids).logits
enable_sale(model, SALEConfig(backend="triton", **cfg))
with torch.no_grad(), sale_stats() as st:
    out = model(ids).logits
assert st.calls[0]["path"] == "sparse", st.calls
assert st.density == st_ref.density < 0.9, (st.density, st_ref.density)
torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
print("ok", st.density)
"""


def test_triton_backend_through_the_model_matches_torch_reference():
    """The Triton kernels (interpreter on CPU) behind attn_implementation="sale": same result as the reference.

    Runs in a fresh process with TRITON_INTERPRET=1 set from the start: Triton's interpreter mode must be on
    before the process first touches Triton (a model forward earlier in the same process breaks it).
    """
    import os
    import subprocess
    import sys

    from hf_ext_kernels.sparse_attn.ops import interpreter_problem

    if (problem := interpreter_problem()) is not None:
        pytest.skip(problem)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_output_attentions_on_the_sparse_path_warns_once():
    """SALE computes no attention weights; asking for them is said once, not silently answered with None."""
    model = tiny_family("llama")
    enable_sale(model, SALEConfig(min_seq_len=64, tau=1e-9, **BLOCKS))
    reset_warnings()
    with torch.no_grad(), sale_stats() as st, warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model(rand_ids(160), output_attentions=True)
    assert st.sparse_calls == 2
    msgs = [str(r.message) for r in rec if "output_attentions" in str(r.message) and "SALE" in str(r.message)]
    assert len(msgs) == 1, msgs
    assert out.attentions is None or all(a is None for a in out.attentions)


def _loss_and_grads(model, ids, names):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    params = dict(model.named_parameters())
    return float(loss), {n: params[n].grad.clone() for n in names}


@pytest.mark.parametrize("case", ["kv_only_grad", "checkpoint_reentrant"])
def test_training_paths_take_dense_attention_and_give_dense_gradients(case):
    """Only key/value in the graph (LoRA on k_proj/v_proj: the query needs no grad), and reentrant gradient
    checkpointing (its first forward runs without grad, in training mode): both were sent to the no-grad sparse
    kernel, cutting the gradient or mixing sparse forward with dense recompute."""
    from hf_ext.testing import tiny_llama

    ids = torch.randint(3, 500, (1, 160), generator=torch.Generator().manual_seed(0))
    cfg = SALEConfig(min_seq_len=64, tau=0.05, **BLOCKS)
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]

    def build(sale: bool):
        torch.manual_seed(0)
        m = tiny_llama()
        if sale:
            enable_sale(m, cfg)
        if case == "kv_only_grad":
            for n, p in m.named_parameters():
                p.requires_grad_(n in names)  # eval mode: only the grad of k/v routes to dense
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            m.train()
        return m

    ref_loss, ref_grads = _loss_and_grads(build(False), ids, names)
    reset_warnings()
    with warnings.catch_warnings(), sale_stats() as st:
        warnings.simplefilter("ignore")
        loss, grads = _loss_and_grads(build(True), ids, names)
    assert {c["path"] for c in st.calls} == {"fallback:training"}
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n in names:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5)


def test_is_causal_must_be_a_bool():
    # is_causal="no" (or a module whose is_causal is "no") used to take the causal path
    q, k, v = _qkv()
    mod = _Mod(4, 2, SALEConfig(min_seq_len=32, tau=1e-9, **BLOCKS))
    with pytest.raises(ValueError, match="is_causal must be a bool"):
        sale_attention_forward(mod, q, k, v, None, scaling=16**-0.5, is_causal="no")
    mod.is_causal = "no"
    with pytest.raises(ValueError, match=r"_Mod.is_causal must be a bool"):
        sale_attention_forward(mod, q, k, v, None, scaling=16**-0.5)
    mod.is_causal = 1  # 0 / 1 are accepted
    out, _ = sale_attention_forward(mod, q, k, v, None, scaling=16**-0.5)
    torch.testing.assert_close(out, _sdpa(q, k, v), atol=2e-5, rtol=1e-4)
