"""SALE under ``torch.compile`` (CPU): a model loaded with ``attn_implementation="sale"`` and compiled, on prompts
long enough for the sparse path (torch reference kernels on CPU), against the same model run eagerly.

Most tests use dynamo's ``"eager"`` / ``"aot_eager"`` backends (the graph capture, guards and graph breaks are those
of inductor; a first inductor compile of the sparse path takes minutes on a 2-core CPU); one slow test runs
inductor."""

from __future__ import annotations

import pytest
import torch

from hf_ext.attention.sale.attention import sale_stats
from hf_ext.attention.sale.config import SALEConfig
from hf_ext.testing import tiny_llama_config

CFG = SALEConfig(min_seq_len=64, block_q=16, block_k=16, local_window=16, tau=1e-3)


def _model(layers: int = 2, family: str = "llama"):
    from transformers import AutoModelForCausalLM

    if family == "llama":
        cfg = tiny_llama_config(num_hidden_layers=layers)
    else:
        from transformers import Qwen2Config

        from hf_ext.testing import TINY_LM_KWARGS

        cfg = Qwen2Config(**{**TINY_LM_KWARGS, "num_hidden_layers": layers})
    cfg.sale_config = CFG.to_dict()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sale").eval()


def _ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _eager_and_compiled(model, compiled, x: torch.Tensor, **kw):
    """``(ref, ref_stats, out, stats)``: the logits and ``sale_stats`` records of ``model`` and of ``compiled`` on
    ``x`` (no grad)."""
    with torch.no_grad():
        with sale_stats() as ref_st:
            ref = model(x, **kw).logits
        with sale_stats() as st:
            out = compiled(x, **kw).logits
    return ref, ref_st, out, st


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # ~45 s on the 2-core CPU (dynamo traces the sparse path with symbolic shapes)
def test_dynamic_shape_compile_keeps_sale_stats_records_whole():
    """With ``dynamic=True`` the records ``sale_stats`` collected on the sparse path lost their ``path`` and
    ``q_len`` keys (the record dict was built before ``int(mask.sum())``, a graph break, and came back without
    them), so ``st.sparse_calls`` raised ``KeyError: 'path'``."""
    model = _model(layers=1)
    compiled = torch.compile(model, backend="eager", dynamic=True)
    ref, ref_st, out, st = _eager_and_compiled(model, compiled, _ids(100))  # 100 >= min_seq_len: sparse
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert st.calls == ref_st.calls
    assert st.sparse_calls == 1


@pytest.mark.slow  # ~30 s on the 2-core CPU
def test_compiled_forward_matches_eager_on_the_sparse_path_and_follows_config_changes():
    """``torch.compile(model)`` (aot_eager) on a sparse-path prompt equals the eager model; the sparse path graph-breaks
    (importlib / Tensor.item in the kernels' checks) but runs. A new ``sale_config`` assigned after compiling (as
    ``calibrate`` does) is honoured: no stale thresholds from the first graph."""
    model = _model(layers=1)
    compiled = torch.compile(model, backend="aot_eager")
    x = _ids(160)
    ref, ref_st, out, st = _eager_and_compiled(model, compiled, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert st.calls == ref_st.calls and st.sparse_calls == 1
    model.config.sale_config = {**CFG.to_dict(), "tau": 0.5}
    ref2, ref_st2, out2, st2 = _eager_and_compiled(model, compiled, x)
    # the new tau keeps fewer blocks and changes the result
    assert ref_st2.density < ref_st.density and (ref2 - ref).abs().max() > 1e-3
    torch.testing.assert_close(out2, ref2, rtol=1e-5, atol=1e-5)
    assert st2.calls == ref_st2.calls


def test_static_cache_generate_with_transformers_compile_config_matches_eager():
    """``generate(cache_implementation="static", compile_config=...)``: transformers compiles the decode steps (dense
    for SALE; even with ``fullgraph=True``); the prefill takes the sparse path. The tokens equal those of the eager
    static-cache generate."""
    from transformers.generation.configuration_utils import CompileConfig

    model = _model(layers=1)
    x = _ids(100)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    with sale_stats() as ref_st:
        ref = model.generate(x, **kw)
    # fullgraph=True holds for the decode steps (dense); the sparse prefill runs uncompiled in transformers' generate
    cc = CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
    cc._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless this is set
    torch._dynamo.utils.counters.clear()
    with sale_stats() as st:
        out = model.generate(x, compile_config=cc, **kw)
    assert torch.equal(out, ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step did compile
    assert st.sparse_calls == ref_st.sparse_calls == 1


@pytest.mark.slow  # the first inductor compile of the sparse path takes minutes on a 2-core CPU
def test_inductor_compiled_forward_matches_eager():
    """The default backend (inductor, C++ on CPU) on a sparse-path prompt: equal to eager within float32 rounding."""
    model = _model(layers=1, family="qwen2")
    ref, ref_st, out, st = _eager_and_compiled(model, torch.compile(model), _ids(100))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert st.calls == ref_st.calls and st.sparse_calls == 1


@pytest.mark.slow  # ~21 s on the 2-core CPU
def test_compiled_forward_of_a_left_padded_batch_matches_eager():
    """A left-padded batch whose rows' real lengths are whole blocks (80 and 64 tokens, 16-token blocks): each row runs
    the sparse path on its own slice of q / k / v. Under aot_eager the second row recompiled with dynamic shapes and
    the graph failed with ``RuntimeError: view size is not compatible with input tensor's size and stride`` (the
    reference kernels reshape the non-contiguous row slices; eager and the first graph take them as views)."""
    model = _model(layers=1)
    x = _ids(80, batch=2)
    am = torch.ones_like(x)
    am[1, :16] = 0
    ref, ref_st, out, st = _eager_and_compiled(
        model, torch.compile(model, backend="aot_eager"), x, attention_mask=am
    )
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    assert st.calls == ref_st.calls and st.sparse_calls == 2  # each row's run took the sparse path


@pytest.mark.slow  # ~25 s on the 2-core CPU
def test_compiled_forward_in_static_cache_generate_of_a_left_padded_batch_matches_eager():
    """``model.forward = torch.compile(model.forward)`` and a static-cache ``generate`` of a left-padded batch: the
    prefill (sparse, the padding mask decoded and the empty cache slots dropped) and the dense decode steps run
    compiled and give the eager tokens."""
    model = _model(layers=1)
    x = _ids(96, batch=2)
    am = torch.ones_like(x)
    am[1, :16] = 0
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    with sale_stats() as ref_st:
        ref = model.generate(x, attention_mask=am, **kw)
    torch._dynamo.utils.counters.clear()
    model.forward = torch.compile(model.forward, backend="aot_eager")
    with sale_stats() as st:
        out = model.generate(x, attention_mask=am, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(out, ref)
    assert st.calls == ref_st.calls and st.sparse_calls == 2  # both rows' prefill took the sparse path
