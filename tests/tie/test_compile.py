"""TIE under transformers continuous batching with its compile options on (CPU, aot_eager backend)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.tie.test_cb import PROMPTS


@pytest.fixture(scope="module")
def setup():
    from transformers import GenerationConfig

    from hf_ext.testing import tiny_llama, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    ids = [tok(p).input_ids for p in PROMPTS]
    gc = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
    return tiny_llama(), ids, gc


def _cb(scheduler_type: str, compiled: bool):
    from transformers import ContinuousBatchingConfig
    from transformers.generation.configuration_utils import CompileConfig

    kw = {}
    if compiled:  # CB compiles its varlen (prefill) path; its fast decode path is not available on CPU
        kw["varlen_compile_config"] = CompileConfig(backend="aot_eager", mode=None, dynamic=True)
    return ContinuousBatchingConfig(
        num_blocks=16,
        page_size=16,
        max_batch_tokens=64,
        max_requests_per_batch=2,
        scheduler_type=scheduler_type,
        **kw,
    )


def test_tie_with_cb_compile_config_gives_fifo_tokens_in_tie_order(setup):
    """``varlen_compile_config`` set: the forward runs compiled, TIE admits in its order and the tokens equal those of
    the eager FIFO engine."""
    from hf_ext.generation.tie.cb import (
        CONTEXT,
        TIECBScheduler,
        clear_length_hints,
        enable_tie_scheduler,
        set_length_hints,
    )

    model, ids, gc = setup
    fifo = model.generate_batch(ids, generation_config=gc, continuous_batching_config=_cb("fifo", False))
    enable_tie_scheduler()
    mu = [6.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    set_length_hints(ids, mu, [0.5] * len(ids))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CB's own notes on compiling on CPU
            out = model.generate_batch(ids, generation_config=gc, continuous_batching_config=_cb("tie", True))
    finally:
        clear_length_hints()
        torch._dynamo.reset()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward was compiled
    assert CONTEXT.last_scheduler_type is TIECBScheduler
    assert [r.error for r in out.values()] == [None] * len(ids)
    assert {k: v.generated_tokens for k, v in out.items()} == {k: v.generated_tokens for k, v in fifo.items()}
    # shortest predicted first (request i is req_i)
    assert CONTEXT.admission_order == [f"req_{i}" for i in np.argsort(mu)]
