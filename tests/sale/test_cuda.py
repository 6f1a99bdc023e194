"""SALE behind ``attn_implementation="sale"`` on a real GPU: the compiled Triton path inside transformers models.

Marked ``gpu`` (skipped by default; ``python -m pytest -m gpu tests`` on the device machine). The CPU suite runs
the same model paths with the torch reference (and the Triton interpreter once); here ``backend="auto"`` picks the
compiled kernels, with head dim 128, bf16 weights, padded batches, a chunked prefill and ``generate``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs CUDA with compiled Triton (TRITON_INTERPRET unset)", allow_module_level=True)

from hf_ext.attention.sale import SALEConfig, disable_sale, enable_sale, sale_stats  # noqa: E402
from hf_ext.testing import tiny_llama, tiny_qwen3  # noqa: E402
from tests.sale._models import rand_ids  # noqa: E402

# head_dim 128 (one of the Triton head dims), GQA 4:1, two layers
SHAPE = dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=1, intermediate_size=1024)
BLOCKS = dict(block_q=64, block_k=64, local_window=64)


def _model(family: str, dtype: torch.dtype):
    build = {"llama": tiny_llama, "qwen3": tiny_qwen3}[family]
    return build(**SHAPE, head_dim=128).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_tau_equals_sdpa_through_the_triton_kernels(family, dtype):
    model = _model(family, dtype)
    ids = rand_ids(1500).cuda()
    with torch.no_grad():
        ref = model(ids).logits.float()
    enable_sale(model, SALEConfig(min_seq_len=256, tau=1e-9, **BLOCKS))
    with torch.no_grad(), sale_stats() as st:
        out = model(ids).logits.float()
    assert [c["path"] for c in st.calls] == ["sparse", "sparse"]
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    disable_sale(model)
    assert model.config._attn_implementation == "sdpa"


def test_sparse_logits_within_error_and_kernels_match_torch_reference():
    """tau > 0: the Triton path keeps the blocks the torch reference keeps and gives its logits."""
    model = _model("llama", torch.bfloat16)
    ids = rand_ids(3000).cuda()
    with torch.no_grad():
        dense = model(ids).logits.float()
    cfg = dict(min_seq_len=256, tau=0.02, **BLOCKS)
    enable_sale(model, SALEConfig(backend="torch", **cfg))
    with torch.no_grad(), sale_stats() as st_ref:
        ref = model(ids).logits.float()
    enable_sale(model, SALEConfig(backend="auto", **cfg))
    with torch.no_grad(), sale_stats() as st:
        out = model(ids).logits.float()
    assert st.sparse_calls == 2 and st.density < 0.9, st.density
    assert abs(st.density - st_ref.density) < 0.01, (st.density, st_ref.density)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    # and the blocks were really dropped: a random-weight model's attention is near uniform, so this is far
    # from dense (a cosine of 0.58 on an H100); the error on trained attention is the benchmark's business
    assert (out - dense).abs().max() > 0.1


def test_left_padded_batch_and_chunked_prefill_generate_on_gpu():
    """A left-padded batch gives each row the tokens of its own unpadded run; a cached second chunk works."""
    from transformers import DynamicCache

    model = _model("llama", torch.float32)
    enable_sale(model, SALEConfig(min_seq_len=256, tau=1e-9, **BLOCKS))
    lens = [1100, 777, 200]  # the last one stays dense (below min_seq_len)
    prompts = [rand_ids(n, seed=10 + i)[0].cuda() for i, n in enumerate(lens)]
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long, device="cuda")
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        am[i, width - len(p) :] = 1
    with sale_stats() as st:
        batched = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False)
    assert st.sparse_calls >= 2
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[i, width:], single[0, len(p) :]), i

    full = rand_ids(1600).cuda()
    with torch.no_grad():
        disable_sale(model)
        ref = model(full).logits
        enable_sale(model, SALEConfig(min_seq_len=256, tau=1e-9, **BLOCKS))
        cache = DynamicCache(config=model.config)
        with sale_stats() as st:
            a = model(full[:, :900], past_key_values=cache, use_cache=True).logits
            b = model(full[:, 900:], past_key_values=cache, use_cache=True).logits
    assert [c["q_len"] for c in st.calls if c["path"] == "sparse"] == [900, 900, 700, 700]
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=2e-3, rtol=2e-3)
