"""LatentOmni under ``torch.compile`` (CPU, dynamo's aot_eager backend) against the same model run eagerly."""

from __future__ import annotations

import warnings

import pytest
import torch

from .test_model import _padded_training_batch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompt(cfg):
    return torch.tensor([[1, 30, 31, 32, cfg.latent_start_token_id]])


def test_compiled_training_forward_matches_eager(model, cfg):
    """``torch.compile(model)`` on the teacher-forced forward (all three losses): the same losses and gradients; the
    forward graph-breaks (``Tensor.item`` in the latent-block bookkeeping) but runs."""
    kw = _padded_training_batch(cfg)
    model.train()
    ref = model(**kw)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend="aot_eager")(**kw)
    for name in ("loss", "text_loss", "latent_loss", "sync_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5, msg=n)  # float32 sums in another order


def test_latent_generate_with_the_decoder_compiled_in_place_matches_eager(model, cfg):
    """The latent loop calls the thinker's decoder directly: compiling it in place (``.compile()``) compiles every
    step (prefill, latent and text steps) and gives the eager ids and latent states."""
    prompt = _prompt(cfg)
    kw = dict(max_new_tokens=cfg.num_latents + 4, return_dict_in_generate=True, output_latents=True)
    ref = model.generate(prompt, **kw)
    torch._dynamo.utils.counters.clear()
    model._text_model().compile(backend="aot_eager")
    out = model.generate(prompt, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.latent_states[0], ref.latent_states[0], rtol=1e-5, atol=1e-6)


def test_text_generate_with_static_cache_and_compile_config_matches_eager(model):
    """``latent_reasoning=False`` is transformers' generate: its static-cache compiled decoding gives the eager ids."""
    from transformers.generation.configuration_utils import CompileConfig

    prompt = torch.tensor([[1, 30, 31, 32, 33]])
    kw = dict(max_new_tokens=6, latent_reasoning=False, do_sample=False)
    ref = model.generate(prompt, **kw)
    cc = CompileConfig(backend="aot_eager", mode=None)
    cc._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless this is set
    torch._dynamo.utils.counters.clear()
    out = model.generate(prompt, cache_implementation="static", compile_config=cc, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(out, ref)


@pytest.mark.parametrize("field", ["compile_config", "cache_implementation"])
def test_latent_generate_says_it_does_not_apply_compile_config_or_a_static_cache(model, cfg, field):
    """The latent loop runs the decoder as it is, on a DynamicCache: a ``compile_config`` or
    ``cache_implementation="static"`` (as for transformers' generate) was silently ignored (nothing compiled, no
    message). It now warns, naming the field and what compiles instead; the ids are unchanged."""
    from transformers.generation.configuration_utils import CompileConfig

    value = CompileConfig(backend="aot_eager", mode=None) if field == "compile_config" else "static"
    prompt = _prompt(cfg)
    ref = model.generate(prompt, max_new_tokens=cfg.num_latents + 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model.generate(prompt, max_new_tokens=cfg.num_latents + 4, **{field: value})
    assert torch.equal(out, ref)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert any(field in m and ".compile()" in m for m in msgs), msgs
    # set on the model's generation config: the same
    setattr(model.generation_config, field, value)
    with pytest.warns(UserWarning, match=field):
        model.generate(prompt, max_new_tokens=2)
