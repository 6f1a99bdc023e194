"""Static-batch offline jobs: planning, the simulator's timing, forced-length ``generate`` and the user API."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hf_ext.generation.tie.offline import (
    batch_size_for_memory,
    forced_lengths_processor,
    memory_batches,
    policy_order,
    run_static_generate,
    simulate_chunked_batches,
    simulate_static_batches,
    static_batches,
    tie_batched_generate,
)
from hf_ext.simulate import CostModel, Request
from tests.tie._scripts import spy_cudnn_flag


def _req(i, out, *, arrival=0.0, **meta):
    return Request(id=i, arrival=arrival, prompt_len=8, output_len=out, max_new_tokens=1000, meta=meta)


def test_static_batches_cut_in_order_and_refuse_bad_input():
    assert static_batches([4, 0, 3, 1, 2], 2) == [[4, 0], [3, 1], [2]]
    assert static_batches([], 3) == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            static_batches([0, 1], bad)
    with pytest.raises(ValueError, match="must not repeat"):
        static_batches([0, 0], 2)


def test_batch_size_for_memory_is_the_worst_case_fit():
    assert batch_size_for_memory(120_000, 2048, 1000) == 39  # 120000 // 3048
    assert batch_size_for_memory(3048, 2048, 1000) == 1
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        batch_size_for_memory(3000, 2048, 1000)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        batch_size_for_memory(1000, 10, 0)


def test_memory_batches_fill_the_kv_budget_per_batch_and_never_exceed_it():
    rng = np.random.default_rng(3)
    plen = rng.integers(1, 300, size=200)
    order = list(rng.permutation(200))
    kv, m = 4000, 100
    batches = memory_batches(order, plen, kv, m)
    assert [i for b in batches for i in b] == order  # consecutive cuts of the order
    for k, b in enumerate(batches):
        assert len(b) * (int(plen[b].max()) + m) <= kv  # fits whatever the rows generate
        if k + 1 < len(batches):  # and is as wide as it can be: the next row would not fit
            nxt = batches[k + 1][0]
            assert (len(b) + 1) * (max(int(plen[b].max()), int(plen[nxt])) + m) > kv
    # short prompts get wider batches than the worst-case size for the longest prompt
    assert max(len(b) for b in batches) > batch_size_for_memory(kv, int(plen.max()), m)
    assert memory_batches([], [], 10, 1) == []
    with pytest.raises(ValueError, match="cannot hold request 1 alone"):
        memory_batches([0, 1], [5, 50], 40, 10)
    with pytest.raises(ValueError, match="must not repeat"):
        memory_batches([0, 0], [5, 5], 40, 10)
    with pytest.raises(ValueError, match="permutation"):
        memory_batches([0, 2], [5, 5], 40, 10)
    with pytest.raises(ValueError, match="kv_tokens must be an int >= 1"):
        memory_batches([0], [5], 0, 10)


def test_policy_orders():
    reqs = [
        _req(0, 50, arrival=2.0, pred_len=40.0, ltr_score=3.0, pred_mu=math.log(40), pred_sigma=0.5),
        _req(1, 5, arrival=0.0, pred_len=9.0, ltr_score=1.0, pred_mu=math.log(9), pred_sigma=0.5),
        _req(2, 20, arrival=1.0, pred_len=8.0, ltr_score=2.0, pred_mu=math.log(8), pred_sigma=0.5),
    ]
    assert policy_order("fcfs", reqs) == [1, 2, 0]
    assert policy_order("sjf_oracle", reqs) == [1, 2, 0]
    assert policy_order("ssjf", reqs) == [2, 1, 0]
    assert policy_order("ltr", reqs) == [1, 2, 0]
    assert policy_order("tie", reqs) == [2, 1, 0]  # same σ: TIE follows the location
    # same location, wider spread: the tail term puts the riskier request later
    risky = [
        _req(0, 10, pred_mu=math.log(30), pred_sigma=1.2),
        _req(1, 10, pred_mu=math.log(30), pred_sigma=0.2),
    ]
    assert policy_order("tie", risky) == [1, 0]
    with pytest.raises(ValueError, match="policy must be one of"):
        policy_order("lifo", reqs)
    with pytest.raises(ValueError, match=r"needs meta\['pred_len'\]"):
        policy_order("ssjf", [_req(0, 3)])
    with pytest.raises(ValueError, match="non-finite"):
        policy_order("ltr", [_req(0, 3, ltr_score=float("nan"))])


def test_simulated_time_is_prefill_plus_the_longest_rows_steps():
    cm = CostModel.constant(0.01)
    res = simulate_static_batches(cm, [4, 6, 5, 3], [10, 2, 7, 1], [0, 1, 2, 3], 2, policy="x")
    # batch [0, 1]: prefill + 9 steps; batch [2, 3]: prefill + 6 steps; every step 10 ms
    assert res.makespan_s == pytest.approx(0.01 * (1 + 9 + 1 + 6))
    assert res.decode_steps == 10 + 7 and res.tokens == 20 and res.n_requests == 4
    assert res.finish == pytest.approx([0.1, 0.1, 0.17, 0.17])
    assert res.padding_share == pytest.approx(1 - 20 / (17 * 2))
    with pytest.raises(ValueError, match="permutation"):
        simulate_static_batches(cm, [4, 6], [1, 2], [0, 5], 2)
    with pytest.raises(ValueError, match="output_lens must hold ints >= 1"):
        simulate_static_batches(cm, [4, 6], [0, 2], [0, 1], 2)


def test_chunked_job_with_full_reservations_is_the_plain_memory_sized_job():
    cm = CostModel.load("gpu_md-h100-llama3.1-8b")
    rng = np.random.default_rng(0)
    plen, out = rng.integers(1, 300, 60), rng.integers(1, 200, 60)
    order = list(rng.permutation(60))
    plain = simulate_static_batches(cm, plen, out, order, kv_tokens=9000, max_new_tokens=200)
    got = simulate_chunked_batches(cm, plen, out, order, 9000, lambda i, g: 200 - g)
    assert got.makespan_s == pytest.approx(plain.makespan_s)
    assert (got.rounds, got.carried, got.reprefill_tokens, got.tokens) == (1, 0, 0, int(out.sum()))
    assert got.throughput_tok_s == pytest.approx(plain.summary()["throughput_tok_s"])
    assert got.summary()["padding_share"] == pytest.approx(plain.padding_share)


def test_chunked_job_carries_unfinished_rows_and_reprefills_them():
    cm = CostModel.constant(0.01)
    # two rows, horizon 4: pass 1 runs both 4 steps (row 1 done at 3), row 0 (10 tokens) goes on from 4 then 8
    got = simulate_chunked_batches(cm, [5, 5], [10, 3], [0, 1], 100, lambda i, g: 4)
    assert (got.rounds, got.batches, got.carried) == (3, 3, 2)
    assert got.reprefill_tokens == (5 + 4) + (5 + 8)
    # each batch: one prefill (yields a token) + steps - 1 decode steps; steps 4, 4, 2
    assert got.makespan_s == pytest.approx(0.01 * (4 + 4 + 2))
    assert got.row_steps == 2 * 4 + 4 + 2 and got.summary()["padding_share"] == pytest.approx(1 - 13 / 14)
    with pytest.raises(ValueError, match=r"reserve\(0, 0\) must be >= 1"):
        simulate_chunked_batches(cm, [5], [3], [0], 100, lambda i, g: 0)
    with pytest.raises(ValueError, match="cannot hold request 0 alone"):
        simulate_chunked_batches(cm, [95], [3], [0], 100, lambda i, g: 10)
    # a short row after a wide one starts a batch of its own instead of being refused
    got = simulate_chunked_batches(cm, [80, 5], [3, 3], [0, 1], 100, lambda i, g: 10)
    assert got.batches == 2 and got.carried == 0
    with pytest.raises(ValueError, match="must not repeat"):
        simulate_chunked_batches(cm, [5, 5], [3, 3], [0, 0], 100, lambda i, g: 4)


def test_simulated_memory_sized_batches():
    cm = CostModel.constant(0.01)
    plen, out = [10, 10, 50, 10], [3, 5, 2, 4]
    res = simulate_static_batches(cm, plen, out, [0, 1, 2, 3], kv_tokens=100, max_new_tokens=10)
    # batches [0, 1], [2], [3] (memory_batches): prefill + 4, prefill + 1, prefill + 3 steps
    assert res.makespan_s == pytest.approx(0.01 * (1 + 4 + 1 + 1 + 1 + 3))
    assert res.batch_size == 2 and res.decode_steps == 5 + 2 + 4
    assert res.padding_share == pytest.approx(1 - 14 / (2 * 5 + 2 + 4))
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        simulate_static_batches(cm, plen, out, [0, 1, 2, 3], 2, kv_tokens=100, max_new_tokens=10)
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        simulate_static_batches(cm, plen, out, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="max_new_tokens >= every output length"):
        simulate_static_batches(cm, plen, out, [0, 1, 2, 3], kv_tokens=100, max_new_tokens=4)


def test_true_length_order_minimises_padding_against_random_orders():
    rng = np.random.default_rng(0)
    cm = CostModel.constant(0.01)
    out = np.maximum(1, np.round(np.exp(rng.normal(4, 1.0, size=64)))).astype(int)
    plen = rng.integers(4, 64, size=64)
    best = simulate_static_batches(cm, plen, out, list(np.argsort(out, kind="stable")), 8)
    for _ in range(20):
        other = simulate_static_batches(cm, plen, out, list(rng.permutation(64)), 8)
        assert best.decode_steps <= other.decode_steps
    # one row per batch: no padding, and the order does not matter
    a = simulate_static_batches(cm, plen, out, list(range(64)), 1)
    b = simulate_static_batches(cm, plen, out, list(rng.permutation(64)), 1)
    assert a.padding_share == 0.0 and a.makespan_s == pytest.approx(b.makespan_s)


def test_tie_order_cuts_padding_on_a_heavy_tailed_job():
    """Predictions that carry signal (noisy location, per-request spread): TIE's batches waste far fewer
    steps than FCFS's; with the order reversed it would be worse than FCFS."""
    rng = np.random.default_rng(1)
    n = 400
    mu = rng.normal(4.5, 1.0, size=n)
    sigma = rng.uniform(0.2, 0.9, size=n)
    out = np.clip(np.round(np.exp(mu + sigma * rng.standard_t(4, size=n))), 1, 1000).astype(int)
    reqs = [
        _req(
            i,
            int(out[i]),
            arrival=float(i),
            pred_mu=float(mu[i] + rng.normal(0, 0.3)),
            pred_sigma=float(sigma[i]),
        )
        for i in range(n)
    ]
    cm = CostModel.constant(0.01)
    steps = {
        p: simulate_static_batches(cm, [8] * n, out, policy_order(p, reqs), 16).decode_steps
        for p in ("fcfs", "tie", "sjf_oracle")
    }
    assert steps["sjf_oracle"] < steps["tie"] < 0.75 * steps["fcfs"]


@pytest.fixture(scope="module")
def model():
    from hf_ext.testing import tiny_llama

    torch.set_num_threads(1)
    return tiny_llama()


def test_forced_lengths_on_real_generate(model):
    lens = [30, 2, 3, 28, 2, 4, 25, 3]
    prompts = [[5 + i] * (3 + i) for i in range(len(lens))]
    kw = dict(eos_token_id=2, pad_token_id=0)
    fcfs = run_static_generate(model, prompts, lens, list(range(8)), 4, policy="fcfs", **kw)
    oracle = run_static_generate(model, prompts, lens, list(np.argsort(lens, kind="stable")), 4, **kw)
    # every row produced exactly its length (checked inside); steps are the batches' longest rows
    assert fcfs.decode_steps == 30 + 25 and oracle.decode_steps == 3 + 30
    assert fcfs.tokens == oracle.tokens == sum(lens) and len(fcfs.batch_times) == 2
    assert all(t > 0 for t in fcfs.batch_times) and fcfs.finish[0] == fcfs.batch_times[0]
    with pytest.raises(ValueError, match="at least one token"):
        run_static_generate(model, [[], [3]], [1, 1], [0, 1], 2, **kw)
    with pytest.raises(ValueError, match="targets must be ints >= 1"):
        forced_lengths_processor([0, 2], 4, 2)


def test_real_static_job_under_a_kv_budget_runs_the_memory_batches(model):
    lens = [30, 2, 3, 28, 2, 4, 25, 3]
    prompts = [[5 + i] * (3 + i) for i in range(len(lens))]  # prompt lengths 3..10
    kw = dict(eos_token_id=2, pad_token_id=0)
    order = list(np.argsort(lens, kind="stable"))
    plen = [len(p) for p in prompts]
    want = memory_batches(order, plen, kv_tokens=120, max_new_tokens=32)
    assert 1 < len(want) < len(lens)  # the budget binds and the batches differ in width
    r = run_static_generate(
        model, prompts, lens, order, kv_tokens=120, max_new_tokens=32, policy="oracle", **kw
    )
    assert len(r.batch_times) == len(want) and r.batch_size == max(len(b) for b in want)
    assert r.decode_steps == sum(max(lens[i] for i in b) for b in want) and r.tokens == sum(lens)
    # the reservation must cover every forced length, and exactly one sizing is given; nothing runs before
    with pytest.raises(ValueError, match="max_new_tokens >= every output length"):
        run_static_generate(model, prompts, lens, order, kv_tokens=120, max_new_tokens=16, **kw)
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        run_static_generate(model, prompts, lens, order, 4, kv_tokens=120, max_new_tokens=32, **kw)
    with pytest.raises(ValueError, match="cannot hold request"):
        run_static_generate(model, prompts, lens, order, kv_tokens=40, max_new_tokens=32, **kw)


def test_tie_batched_generate_returns_plain_generate_outputs_in_input_order(model):
    from hf_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = ["hello world this is a test", "hi", "write a long essay about rome and its history please"]
    with pytest.warns(UserWarning, match="falling back"):
        out = tie_batched_generate(model, tok, prompts, batch_size=1, max_new_tokens=5, do_sample=False)
    for p, got in zip(prompts, out):
        ids = tok(p, return_tensors="pt")
        want = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got == want[0, ids["input_ids"].shape[1] :].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two = tie_batched_generate(model, tok, prompts, batch_size=2, max_new_tokens=5, do_sample=False)
    assert [len(x) for x in two] == [5, 5, 5]
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was


def _one_row_calls_then_spy(model, tok, prompts, m, monkeypatch):
    """The outputs of one prompt per ``generate`` call (the reference), then ``model.generate`` spied on: the list
    it returns collects the ``(rows, width)`` of every later call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = tie_batched_generate(model, tok, prompts, batch_size=1, max_new_tokens=m, do_sample=False)
    shapes = []
    real = model.generate

    def spy(*args, **kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return real(*args, **kw)

    monkeypatch.setattr(model, "generate", spy)
    return want, shapes


def test_tie_batched_generate_sizes_batches_from_a_kv_budget(model, monkeypatch):
    from hf_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = ["hi", "hello world", "a b c d e f g h i j k l m n o p", "ok", "yes", "one two three"]
    kv, m = 60, 5
    want, shapes = _one_row_calls_then_spy(model, tok, prompts, m, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = tie_batched_generate(model, tok, prompts, kv_tokens=kv, max_new_tokens=m, do_sample=False)
    assert got == want  # same outputs as one prompt per call, in the order given
    assert all(b * (w + m) <= kv for b, w in shapes) and max(b for b, _ in shapes) > 1
    assert sum(b for b, _ in shapes) == len(prompts)
    shapes.clear()
    with pytest.raises(ValueError, match=r"kv_tokens=12 cannot hold request \d+ alone"):
        tie_batched_generate(model, tok, prompts, kv_tokens=12, max_new_tokens=m)
    assert shapes == []  # refused before any generate call
    for kw in ({}, {"batch_size": 2, "kv_tokens": 60}):
        with pytest.raises(ValueError, match="exactly one of batch_size"):
            tie_batched_generate(model, tok, prompts, max_new_tokens=m, **kw)
    with pytest.raises(ValueError, match="kv_tokens must be an int >= 1"):
        tie_batched_generate(model, tok, prompts, kv_tokens=0, max_new_tokens=m)


def test_tie_batched_generate_refuses_bad_input(model):
    from hf_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="non-empty list"):
        tie_batched_generate(model, tok, [], batch_size=2)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        tie_batched_generate(model, tok, ["a", " "], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        tie_batched_generate(model, tok, ["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        tie_batched_generate(model, tok, ["a"], batch_size=1, max_new_tokens=0)
    from transformers import GenerationConfig

    # max_length alone was overridden by an injected max_new_tokens=1024 (15 total tokens asked, 1024 new made)
    gc = GenerationConfig(max_length=15, do_sample=False, pad_token_id=0, eos_token_id=2)
    for kw in (dict(generation_config=gc), dict(max_length=15)):
        with pytest.raises(ValueError, match="max_length=15 is set without max_new_tokens"):
            tie_batched_generate(model, tok, ["hello world"], batch_size=1, **kw)


def test_trim_at_eos_keeps_the_first_eos_and_drops_the_padding():
    from hf_ext.generation.tie.offline import _eos_ids, trim_at_eos

    assert trim_at_eos([5, 6, 2, 0, 0], {2}) == [5, 6, 2]
    assert trim_at_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert trim_at_eos([5, 9, 2], {9, 2}) == [5, 9]
    assert _eos_ids(None) is None and _eos_ids(2) == {2} and _eos_ids([2, 7]) == {2, 7}
    assert _eos_ids(torch.tensor([-1])) == set()  # "never stop" markers are not token ids


def test_a_complete_plan_times_like_the_same_cut_and_is_checked():
    cm = CostModel.constant(0.01)
    plen, out = [10, 10, 50, 10], [3, 5, 2, 4]
    cut = memory_batches([0, 1, 2, 3], plen, kv_tokens=100, max_new_tokens=10)
    a = simulate_static_batches(cm, plen, out, [0, 1, 2, 3], kv_tokens=100, max_new_tokens=10)
    b = simulate_static_batches(cm, plen, out, None, batches=cut)
    assert b.makespan_s == pytest.approx(a.makespan_s) and b.finish == a.finish and b.batch_size == 2
    with pytest.raises(ValueError, match="complete plan"):
        simulate_static_batches(cm, plen, out, [0, 1, 2, 3], batches=cut)
    with pytest.raises(ValueError, match="complete plan"):
        simulate_static_batches(cm, plen, out, None, 2, batches=cut)
    for bad in ([[0, 1], [2]], [[0, 1], [1, 2, 3]], [[0, 1, 2, 3], []]):
        with pytest.raises(ValueError, match=r"partitioning range\(4\)"):
            simulate_static_batches(cm, plen, out, None, batches=bad)
    with pytest.raises(ValueError, match="give order"):
        simulate_static_batches(cm, plen, out, None)


def test_tie_batched_generate_expected_plan_keeps_outputs_and_the_kv_budget(model, monkeypatch):
    from hf_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = ["hi", "hello world", "a b c d e f g h i j k l m n o p", "ok", "yes", "one two three", "x y"]
    kv, m = 60, 5
    want, shapes = _one_row_calls_then_spy(model, tok, prompts, m, monkeypatch)
    with pytest.warns(UserWarning, match="falling back"):  # no predictor: the heuristic laws, warned once
        got = tie_batched_generate(
            model, tok, prompts, kv_tokens=kv, max_new_tokens=m, do_sample=False, plan="expected"
        )
    assert got == want
    assert all(b * (w + m) <= kv for b, w in shapes) and sum(b for b, _ in shapes) == len(prompts)
    assert max(b for b, _ in shapes) > 1
    shapes.clear()
    for kw, msg in (
        ({"plan": "best"}, "plan must be one of"),
        ({"plan": "order", "prompt_buckets": 2}, "needs plan='expected'"),
        ({"plan": "expected", "prompt_buckets": 0}, "prompt_buckets must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=msg):
            tie_batched_generate(model, tok, prompts, kv_tokens=kv, max_new_tokens=m, **kw)
    assert shapes == []  # refused before any generate call


def test_generate_runs_off_cudnn_sdpa_unless_asked_and_the_outputs_agree(model, monkeypatch):
    from hf_ext.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = ["hi", "hello world", "a b c d e f g", "ok"]
    seen = spy_cudnn_flag(monkeypatch, model, "generate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = tie_batched_generate(model, tok, prompts, batch_size=2, max_new_tokens=4, do_sample=False)
        assert seen == [False, False] and torch.backends.cuda.cudnn_sdp_enabled()
        on = tie_batched_generate(
            model, tok, prompts, batch_size=2, max_new_tokens=4, do_sample=False, sdpa_cudnn=True
        )
    assert seen[2:] == [True, True] and on == off
    with pytest.raises(ValueError, match="sdpa_cudnn must be True or False"):
        tie_batched_generate(model, tok, prompts, batch_size=2, max_new_tokens=4, sdpa_cudnn="no")
    lens, ids = [3, 2, 4], [[5, 6], [7], [8, 9, 10]]
    kw = dict(eos_token_id=2, pad_token_id=0)
    run_static_generate(model, ids, lens, [0, 1, 2], 3, **kw)
    run_static_generate(model, ids, lens, [0, 1, 2], 3, sdpa_cudnn=True, **kw)
    assert seen[4:] == [False, True]
    with pytest.raises(ValueError, match="sdpa_cudnn must be True or False"):
        run_static_generate(model, ids, lens, [0, 1, 2], 3, sdpa_cudnn=0, **kw)
    assert len(seen) == 6  # refused before any generate call
