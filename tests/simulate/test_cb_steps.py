"""Recording transformers continuous-batching steps and fitting the cost model to them (hf_ext.simulate.cb_steps)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_ext.simulate.cb_steps import STEP_KEYS, fit_steps, record_cb_steps, steps_summary
from hf_ext.simulate.cost_model import CostModel


def _generate(prompts, new_tokens=6, budget=32):
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.simulate.calibrate import model_for_shape

    torch.manual_seed(0)
    model = model_for_shape("tiny", "cpu")
    gc = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=budget, max_requests_per_batch=8)
    return model.generate_batch(
        prompts, generation_config=gc, continuous_batching_config=cb, progress_bar=False
    )


def test_records_each_step_make_up_exactly():
    """Two prompts (40 and 10 tokens), budget 32, 6 new tokens each: the chunked prefill and every decode step."""
    from transformers.generation.continuous_batching import continuous_api

    before = continuous_api.ContinuousBatchProcessor.__dict__["prepare_next_batch"]
    with record_cb_steps() as log:
        out = _generate([list(range(5, 45)), list(range(7, 17))])
    assert continuous_api.ContinuousBatchProcessor.__dict__["prepare_next_batch"] is before  # put back
    assert all(len(o.generated_tokens) == 6 for o in out.values())
    got = [(s["n_decode"], s["ctx_decode"], s["prefill_tokens"], s["prefill_attn"]) for s in log.steps]
    # step 1: both prompts' first 32 tokens (10 of B at offset 0, 22 of A at offset 0)
    # step 2: B decodes (context 11) while A's last 18 prompt tokens run at offset 22
    # steps 3-6: both decode; step 7: A's last token
    assert got[0] == (0, 0, 32, 10 * 5 + 22 * 11)
    assert got[1] == (1, 11, 18, 18 * (22 + 9))
    assert got[2:] == [
        (2, 12 + 41, 0, 0),
        (2, 13 + 42, 0, 0),
        (2, 14 + 43, 0, 0),
        (2, 15 + 44, 0, 0),
        (1, 45, 0, 0),
    ]
    assert all(s["dt"] > 0 for s in log.steps)
    # every generated token comes from one step: decode tokens plus one per finished prefill
    assert sum(s["n_decode"] for s in log.steps) + 2 == 12
    assert len(log.limits) == 1
    lim = log.limits[0]
    assert lim["max_batch_tokens"] == 32 and lim["max_requests_per_batch"] == 8
    assert lim["kv_tokens"] > 0 and lim["kv_tokens"] % 64 == 0  # 64 blocks of the paged cache
    from transformers import ContinuousBatchingConfig

    page = getattr(ContinuousBatchingConfig(), "page_size", None)  # transformers >= 5.17; was block_size
    assert lim["block_size"] == (page or ContinuousBatchingConfig().block_size) and lim["block_size"] > 0
    assert set(log.arrays()) == set(STEP_KEYS)


def test_block_size_is_read_from_each_transformers_layout_and_never_zero():
    from types import SimpleNamespace as NS

    from hf_ext.simulate.cb_steps import _engine_limits

    old = NS(cache=NS(block_size=32), scheduler=None)  # transformers <= 5.16
    new = NS(cache=NS(), cb_config=NS(page_size=128), scheduler=None)  # >= 5.17: the config's page_size
    alloc = NS(cache=NS(cache_allocators={"full_attention": NS(tokens_per_page=64)}), scheduler=None)
    none = NS(cache=NS(block_size=0), cb_config=NS(page_size=None), scheduler=None)
    assert [_engine_limits(p)["block_size"] for p in (old, new, alloc, none)] == [32, 128, 64, None]


def test_two_runs_in_one_block_are_kept_apart():
    """Each processor is its own run (index, limits); no step spans from one run into the next."""
    import time

    with record_cb_steps() as log:
        _generate([list(range(5, 45))], new_tokens=4)
        time.sleep(1.0)
        _generate([list(range(7, 17))], new_tokens=3)
    assert len(log.limits) == 2
    assert [s["run"] for s in log.steps] == [0.0] * 5 + [
        1.0
    ] * 3  # 40-token prompt in 2 chunks + 3 decodes; 1 + 2
    assert max(s["dt"] for s in log.steps) < 1.0  # the pause between the runs is in no step


def test_patch_is_put_back_on_error_and_not_reentrant():
    from transformers.generation.continuous_batching import continuous_api

    before = continuous_api.ContinuousBatchProcessor.__dict__["prepare_next_batch"]
    with pytest.raises(KeyError), record_cb_steps():
        raise KeyError("boom")
    assert continuous_api.ContinuousBatchProcessor.__dict__["prepare_next_batch"] is before
    with record_cb_steps(), pytest.raises(RuntimeError, match="not re-entrant"), record_cb_steps():
        pass
    assert continuous_api.ContinuousBatchProcessor.__dict__["prepare_next_batch"] is before


def _synthetic_steps(
    cm: CostModel, n: int = 400, seed: int = 0, noise: float = 0.0
) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    steps = []
    for i in range(n):
        n_dec = int(rng.integers(0 if i % 3 == 0 else 1, 33))
        ctx = float(n_dec * rng.integers(50, 3000))
        pre = int(rng.integers(16, 2048)) if i % 3 == 0 else 0
        off = float(rng.integers(0, 2000))
        attn = pre * (off + pre / 2.0)
        dt = cm.iteration_time(pre, attn, n_dec, ctx) * (1.0 + noise * rng.standard_normal())
        steps.append(
            {"dt": dt, "n_decode": n_dec, "ctx_decode": ctx, "prefill_tokens": pre, "prefill_attn": attn}
        )
    return steps


def test_fit_recovers_a_known_cost_model():
    truth = CostModel(
        decode_floor_s=0.0,
        prefill_floor_s=0.0,
        base_s=0.03,
        prefill_base_s=0.004,
        per_seq_s=8e-4,
        per_ctx_token_s=2e-7,
        per_prefill_token_s=6e-5,
        per_prefill_attn_s=4e-10,
    )
    steps = _synthetic_steps(truth)
    cm = fit_steps(steps, name="t")  # noiseless: matching the totals changes nothing
    summ = steps_summary(cm, _synthetic_steps(truth, seed=1))
    assert summ["all"]["median_abs_rel_err"] < 0.01
    assert abs(summ["all"]["sum_ratio"] - 1.0) < 0.01
    assert cm.per_seq_s == pytest.approx(truth.per_seq_s, rel=0.05)
    assert cm.per_prefill_token_s == pytest.approx(truth.per_prefill_token_s, rel=0.05)
    assert cm.extra["n_steps"] == len(steps) and cm.name == "t"
    assert cm.extra["total_scale"]["decode"] == pytest.approx(1.0, abs=1e-3)


def test_fit_is_robust_to_a_few_outlier_steps():
    truth = CostModel(base_s=0.02, per_seq_s=5e-4, per_prefill_token_s=5e-5, prefill_base_s=0.002)
    steps = _synthetic_steps(truth, noise=0.02)
    for s in steps[::50]:  # a stalled step now and then (GC, a graph capture)
        s["dt"] *= 20
    cm = fit_steps(steps, match_total=False)
    assert steps_summary(cm, _synthetic_steps(truth, seed=2))["all"]["median_abs_rel_err"] < 0.03
    # match_total: the same shape, scaled so that each kind of step sums to its measured time (stalls included)
    cm2 = fit_steps(steps)
    summ = steps_summary(cm2, steps)
    assert summ["decode"]["sum_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert summ["prefill"]["sum_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert cm2.extra["total_scale"]["decode"] > 1.0 and cm2.per_seq_s > cm.per_seq_s


def test_fit_rejects_bad_input():
    ok = _synthetic_steps(CostModel(base_s=0.01, per_prefill_token_s=1e-5), n=30)
    with pytest.raises(ValueError, match="none"):
        fit_steps([])
    with pytest.raises(ValueError, match="missing"):
        fit_steps([{"dt": 1.0}])
    with pytest.raises(ValueError, match="dt"):
        fit_steps([{**ok[0], "dt": float("nan")}, *ok[1:]])
    with pytest.raises(ValueError, match="decode-only and prefill"):
        fit_steps([s for s in ok if s["prefill_tokens"] == 0])
