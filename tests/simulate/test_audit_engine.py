"""Simulator fixes found by an audit: a reused FCFS, the mean KV memory over decode jumps, the cache hit rate
after preemptions, and input checks (config numbers, prefix segments, watermark, branches, CPU tier)."""

from __future__ import annotations

import math

import pytest

from hf_ext.simulate import FCFS, CostModel, Request, SimConfig, Simulator


def test_a_reused_fcfs_serves_each_run_in_arrival_order():
    sched = FCFS()
    for _ in range(3):  # new request objects each run: their ids may recycle the last run's
        reqs = [Request(id=i, arrival=0.0, prompt_len=4, output_len=1) for i in range(300)]
        res = Simulator(CostModel.constant(0.001), sched, max_num_seqs=1, max_num_batched_tokens=None).run(
            reqs
        )
        order = res.cols["id"][res.cols["finish"].argsort(kind="stable")].tolist()
        assert order == list(range(300))
        del reqs, res


def test_fcfs_requeue_of_a_request_it_never_added_is_refused():
    with pytest.raises(ValueError, match="never added"):
        FCFS().requeue(Request(id=7, arrival=0.0, prompt_len=4, output_len=1), 0.0)


def test_mean_kv_tokens_integrates_the_growth_over_decode_jumps():
    # prompt 10, 1,000 tokens at 0.01 s a step: memory grows from 11 to 1,010 tokens over 10 s
    res = Simulator(CostModel.constant(0.01), FCFS()).run(
        [Request(id=0, arrival=0.0, prompt_len=10, output_len=1000)]
    )
    assert res.summary()["mean_kv_tokens"] == pytest.approx(510.5, abs=1.0)  # was 11: held flat over the jump
    tl = res.timeline["kv_tokens"].tolist()
    assert tl[-2:] == [1010.0, 0.0]  # the end of the last step, then after the finish freed it
    assert max(tl) == res.counters["peak_kv_tokens"]
    # the same without a timeline
    res2 = Simulator(CostModel.constant(0.01), FCFS(), record_timeline=False).run(
        [Request(id=0, arrival=0.0, prompt_len=10, output_len=1000)]
    )
    assert res2.summary()["mean_kv_tokens"] == pytest.approx(510.5, abs=1.0)


def test_mean_kv_tokens_of_two_overlapping_requests():
    # request 0 runs 0-10 s (11 -> 1,010 tokens), request 1 runs 5-15 s: integral 10,200 token-seconds over 15 s
    reqs = [
        Request(id=0, arrival=0.0, prompt_len=10, output_len=1000),
        Request(id=1, arrival=5.0, prompt_len=10, output_len=1000),
    ]
    res = Simulator(CostModel.constant(0.01), FCFS()).run(reqs)
    assert res.summary()["mean_kv_tokens"] == pytest.approx(680.0, rel=0.01)


def test_cache_hit_rate_stays_a_rate_with_preemptions():
    seg = [("sys", 100)]  # the whole prompt is a shared system prompt
    reqs = [Request(id=0, arrival=0.0, prompt_len=100, output_len=1, meta={"prefix_segments": seg})]
    reqs += [
        Request(id=i, arrival=1.0 + 0.03 * i, prompt_len=100, output_len=20, meta={"prefix_segments": seg})
        for i in range(1, 7)
    ]
    res = Simulator(CostModel.constant(0.01), FCFS(), kv_capacity_tokens=120).run(reqs)
    s = res.summary()
    assert s["preemptions"] > 0  # hits are counted again on every re-admission
    assert s["cache_hit_rate"] == pytest.approx(
        s["hit_tokens"] / (s["hit_tokens"] + s["prefill_computed_tokens"])
    )
    assert 0.0 < s["cache_hit_rate"] <= 1.0  # was 2.375


def test_prefix_segments_longer_than_the_prompt_are_refused():
    r = Request(id=3, arrival=0.0, prompt_len=10, output_len=5, meta={"prefix_segments": [("sys", 50)]})
    with pytest.raises(
        ValueError, match=r"request 3: meta\['prefix_segments'\] cover 50 tokens > prompt_len 10"
    ):
        Simulator(CostModel.constant(0.01), FCFS(), kv_capacity_tokens=30).run([r])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_num_seqs", True),
        ("max_num_seqs", 2.0),
        ("max_num_batched_tokens", math.nan),
        ("kv_capacity_tokens", math.nan),
        ("kv_capacity_tokens", 100.5),
        ("kv_capacity_bytes", math.nan),
        ("kv_capacity_bytes", math.inf),
        ("admission_watermark", math.nan),
        ("cpu_capacity_tokens", math.nan),
        ("transfer_bandwidth", math.nan),
        ("prefetch_window_s", -1.0),
        ("stop_after", 0),
        ("check_every", 1.5),
        ("timeline_min_dt", math.nan),
        ("record_timeline", 1),
    ],
)
def test_bad_config_numbers_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimConfig(**{field: value})


def test_a_prompt_the_watermark_never_admits_is_refused_before_running():
    reqs = [Request(id=i, arrival=0.1 * i, prompt_len=100, output_len=200) for i in range(5)]
    reqs.append(Request(id=99, arrival=0.0, prompt_len=600, output_len=10))
    sim = Simulator(CostModel.constant(0.01), FCFS(), kv_capacity_tokens=1000, admission_watermark=0.5)
    with pytest.raises(ValueError, match="request 99 can never be admitted"):
        sim.run(reqs)


@pytest.mark.parametrize(
    ("meta", "match"), [({"branch_lens": []}, "branch_lens"), ({"stop_after": 0}, "stop_after")]
)
def test_bad_branch_meta_is_refused(meta, match):
    r = Request(id=0, arrival=0.0, prompt_len=8, output_len=50, meta=meta)
    with pytest.raises(ValueError, match=match):
        Simulator(CostModel.constant(0.01), FCFS()).run([r])


def test_a_cpu_tier_needs_kv_bytes_to_price_transfers():
    with pytest.raises(ValueError, match="cpu_capacity_tokens=1000 needs CostModel.kv_bytes_per_token > 0"):
        Simulator(CostModel.constant(0.01), FCFS(), cpu_capacity_tokens=1000)


def test_rollout_summary_of_an_empty_run_is_nan():
    out = Simulator(CostModel.constant(0.01), FCFS()).run([]).rollout_summary()
    assert math.isnan(out["makespan_s"]) and math.isnan(out["tail_share"])
    assert out["tokens_generated"] == 0.0


def test_readmission_after_a_preemption_restores_only_the_branches_still_running():
    """Hand-computed: capacity 20, constant 0.01 s steps. Request 0 (prompt 4, 12 tokens) and the two-branch request
    1 (prompt 4, branches of 2 and 12 tokens) start together (KV 11); branch 0 finishes at 0.02 s and frees its 2
    tokens; at 0.06 s memory is full (20) and request 1, admitted last, is preempted with its running branch at 6
    tokens. After request 0 finishes (0.12 s) request 1 prefills prompt 4 + that branch's 6 tokens = 10 (its
    finished branch's tokens were freed and are not restored) and holds 4 + 7 = 11 tokens; it finishes at 0.18 s
    holding 4 + 12 = 16. Before, the finished branch was prefilled and held again: 12 recomputed, 13 and 18 KV."""
    reqs = [
        Request(id=0, arrival=0.0, prompt_len=4, output_len=12),
        Request(id=1, arrival=0.0, prompt_len=4, output_len=12, meta={"branch_lens": [2, 12]}),
    ]
    res = Simulator(CostModel.constant(0.01), FCFS(), kv_capacity_tokens=20, max_num_batched_tokens=None).run(
        reqs
    )
    c = res.cols
    assert c["preemptions"].tolist() == [0, 1]
    assert c["recomputed"].tolist() == [0, 10]
    assert c["prefill_computed"].tolist() == [4, 4 + 10]
    assert c["finish"].tolist() == pytest.approx([0.12, 0.18])
    assert c["generated"].tolist() == [12, 14] and res.tokens_generated == 26
    points = list(zip(res.timeline["time"].round(6).tolist(), res.timeline["kv_tokens"].tolist()))
    assert (0.13, 11.0) in points and (0.18, 16.0) in points
    assert res.counters["peak_kv_tokens"] == 20.0


def test_a_request_preempted_mid_prefill_counts_only_its_computed_chunks_as_recomputed():
    """Hand-computed: capacity 26, 8 tokens per iteration, constant 0.01 s steps. Request 0 (prompt 4, 20 tokens)
    and request 1 (prompt 20, 2 tokens) are admitted together (KV 5 + 21 = 26); the first iteration prefills
    request 0 and the first 4 prompt tokens of request 1. The next step's growth does not fit, so request 1
    (admitted last) is preempted with 4 of its 20 prompt tokens computed; it is re-admitted when request 0 finishes
    (0.20 s) and prefills all 20 again: 4 of them recomputed (before: all 20, as if it had been decoding)."""
    reqs = [
        Request(id=0, arrival=0.0, prompt_len=4, output_len=20),
        Request(id=1, arrival=0.0, prompt_len=20, output_len=2),
    ]
    res = Simulator(
        CostModel.constant(0.01), FCFS(), kv_capacity_tokens=26, max_num_seqs=4, max_num_batched_tokens=8
    ).run(reqs)
    c = res.cols
    assert c["preemptions"].tolist() == [0, 1]
    assert c["prefill_computed"].tolist() == [4, 4 + 20]
    assert c["recomputed"].tolist() == [0, 4]
    # 20 prompt tokens at 8 a step after 0.20 s: chunks 8, 8, 4, the last yields the first token; one decode step
    assert c["first_token"].tolist() == pytest.approx([0.01, 0.23])
    assert c["finish"].tolist() == pytest.approx([0.20, 0.24])
    assert res.summary()["recomputed_tokens"] == 4.0
