"""TIE scheduler: score ordering, dynamic beta, aging (no starvation), simulator integration, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from hf_ext.generation.tie.config import TIEConfig
from hf_ext.generation.tie.distribution import cvar_length, expected_length
from hf_ext.generation.tie.scheduler import TIEScheduler, annotate_requests, order_batch
from hf_ext.simulate.types import Request


def _req(i, mu, sigma=0.5, arrival=0.0, out=10, prompt_len=8, **meta):
    return Request(
        id=i,
        arrival=arrival,
        prompt_len=prompt_len,
        output_len=out,
        meta={"pred_mu": mu, "pred_sigma": sigma, **meta},
    )


def test_score_is_expectation_plus_beta_cvar_and_orders_ascending():
    cfg = TIEConfig(max_new_tokens=1000, aging="none")
    s = TIEScheduler(cfg)
    mus = [5.0, 2.0, 3.5, 4.2]
    for i, mu in enumerate(mus):
        s.add(_req(i, mu), 0.0)
    order = [s.pop_next(0.0).id for _ in range(4)]
    assert order == list(np.argsort(mus))
    r = _req(9, 4.0, 0.8)
    got = TIEScheduler(cfg).score_of(r, queue_len=0)
    e = float(expected_length(4.0, 0.8, 3.5, 1000, "clip"))
    c = float(cvar_length(4.0, 0.8, 3.5, 0.9, 1000, "clip"))
    assert got == pytest.approx(e + 0.1 * c, rel=1e-9)


def test_tail_risk_breaks_ties_between_equal_medians():
    # same median, the wide one has a heavier tail -> larger score -> runs later
    s = TIEScheduler(TIEConfig(max_new_tokens=2000, aging="none"))
    s.add(_req(0, 4.0, sigma=1.5), 0.0)
    s.add(_req(1, 4.0, sigma=0.2), 0.0)
    assert s.pop_next(0.0).id == 1


def test_dynamic_beta_bounds():
    cfg = TIEConfig(batch_max=32)
    assert cfg.beta(0) == 0.1
    assert cfg.beta(64) == pytest.approx(0.2)
    assert cfg.beta(10_000) == 0.5


def test_ablation_config_changes_exactly_its_part_of_the_score():
    from dataclasses import asdict

    from hf_ext.generation.tie.config import ABLATION_SETTINGS, ablation_config

    base = TIEConfig(max_new_tokens=500, aging_tau=10.0)
    assert ablation_config(base, "tie") is base
    for name, settings in ABLATION_SETTINGS.items():
        cfg = ablation_config(base, name)
        changed = {k for k, v in asdict(cfg).items() if asdict(base)[k] != v}
        assert changed == set(settings), name
        assert cfg.max_new_tokens == 500 and cfg.aging_tau == 10.0
    no_tail = ablation_config(base, "tie_no_tail")
    assert no_tail.beta(queue_len=10_000) == 0.0 and no_tail.aging == base.aging
    only = ablation_config(base, "tie_expect_only")
    assert only.beta(queue_len=10_000) == 0.0 and only.aging == "none"
    with pytest.raises(ValueError, match="name must be 'tie' or one of .*tie_expect_only.*got 'tie_fast'"):
        ablation_config(base, "tie_fast")


def test_per_token_index_score_ranks_by_the_index_of_the_same_law():
    from hf_ext.generation.tie.distribution import per_token_index

    laws = [(6.5, 0.2), (6.5, 1.0), (3.0, 0.3), (5.0, 1.4)]
    reqs = [_req(i, m, sigma=sd) for i, (m, sd) in enumerate(laws)]
    cfg = TIEConfig(max_new_tokens=1000, score="per_token_index", aging="none")
    s = TIEScheduler(cfg)
    for r in reqs:
        s.add(r, 0.0)
    want = per_token_index(np.array([m for m, _ in laws]), np.array([sd for _, sd in laws]), 3.5, 1000)
    for r, w in zip(reqs, want):
        assert s.score_of(r, queue_len=10_000) == pytest.approx(w, rel=1e-12)  # beta plays no part
    assert [s.pop_next(0.0).id for _ in laws] == list(np.argsort(want))
    # the cache of E / CVaR in meta is keyed by the score mode: a TIE scheduler recomputes, not reuses
    tie = TIEScheduler(TIEConfig(max_new_tokens=1000, aging="none"))
    want_tie = expected_length(6.5, 0.2, 3.5, 1000) + 0.1 * cvar_length(6.5, 0.2, 3.5, 0.9, 1000)
    assert tie.score_of(reqs[0], queue_len=0) == pytest.approx(float(want_tie), rel=1e-12)
    with pytest.raises(ValueError, match="score must be one of \\('tie', 'per_token_index'\\), got 'sjf'"):
        TIEConfig(score="sjf")


def test_simultaneous_arrivals_share_the_queue_length_of_their_beta():
    """Requests arriving at the same instant (a burst) are scored against the queue they all join, as the
    transformers CB scheduler scores a step's new requests: not β rising with their position in the burst."""
    from hf_ext.simulate import CostModel, SimConfig, Simulator

    cfg = TIEConfig(max_new_tokens=1000, batch_max=1, aging="none")  # beta = clip(0.1 * L, 0.1, 0.5)
    burst = [_req(i, 3.0 + 0.1 * i, sigma=0.4 + 0.1 * i) for i in range(6)]
    late = _req(6, 3.0, arrival=5.0)
    Simulator(CostModel.constant(0.01), TIEScheduler(cfg), SimConfig(max_num_seqs=1)).run([*burst, late])
    ref = TIEScheduler(cfg)
    for r in burst:  # each sees the 5 others queued: beta 0.5 for all six
        want = ref.score_of(_req(0, r.meta["pred_mu"], r.meta["pred_sigma"]), queue_len=5)
        assert r.meta["tie_score"] == pytest.approx(want, rel=1e-12)
    # one at a time (add), the first of them would have had beta 0.1: the test tells the two apart
    assert ref.score_of(_req(0, 3.0, 0.4), 0) < ref.score_of(_req(0, 3.0, 0.4), 5)
    # a lone later arrival still sees the queue as it is then (nothing waiting at t=5: 10 ms steps)
    assert late.meta["tie_score"] == pytest.approx(ref.score_of(_req(0, 3.0), queue_len=0), rel=1e-12)
    s = TIEScheduler(cfg)
    s.add_many([_req(10, 4.0), _req(11, 2.0), _req(12, 3.0)], 0.0)
    assert [s.pop_next(0.0).id for _ in range(3)] == [11, 12, 10] and len(s) == 0


@pytest.mark.parametrize("mode", ["continuous", "step"])
def test_aging_prevents_starvation(mode):
    """A long job under a never-ending stream of short ones: starves without aging, runs with it."""

    def run(aging: str) -> int | None:
        s = TIEScheduler(TIEConfig(max_new_tokens=1000, aging=aging, aging_tau=1.0, aging_gamma=0.9))
        s.add(_req(-1, 6.0, 0.3), 0.0)  # long job
        for t in range(1, 400):
            s.add(_req(t, 2.0, 0.3, arrival=float(t)), float(t))  # one short arrival ...
            if s.pop_next(float(t)).id == -1:  # ... one admission per second
                return t
        return None

    assert run("none") is None
    t = run(mode)
    assert t is not None
    # continuous aging: key log(s) + (t0/tau)*|log g| -> long wins once t > tau*log(s_long/s_short)/|log g|
    s = TIEScheduler(TIEConfig(max_new_tokens=1000))
    ratio = s.score_of(_req(0, 6.0, 0.3), 1) / s.score_of(_req(1, 2.0, 0.3), 1)
    bound = math.log(ratio) / -math.log(0.9)
    assert t <= bound + 3


def test_a_preempted_request_keeps_its_arrival_score_and_aging_clock():
    """``requeue`` (the simulator's preemption path) keeps the score priced on arrival (β of that queue) and the
    wait since arrival; re-adding the request as new would price it with the crowd's β and restart its clock."""
    cfg = TIEConfig(max_new_tokens=1000, aging_tau=30.0, aging_gamma=0.9)
    s = TIEScheduler(cfg)
    old = _req(0, 4.5, 0.8)
    s.add(old, 0.0)  # alone: beta 0.1
    assert s.pop_next(0.0) is old
    first = dict(old.meta)
    crowd = [_req(i, 4.0, 0.8, arrival=300.0) for i in range(1, 200)]
    s.add_many(crowd, 300.0)  # a long queue: beta 0.5
    s.requeue(old, 300.0)
    assert (old.meta["tie_score"], old.meta["tie_t0"]) == (first["tie_score"], 0.0)
    assert s.pop_next(300.0) is old  # ten periods of aging and its arrival beta put it first
    fresh = TIEScheduler(cfg)
    fresh.add_many([_req(i, 4.0, 0.8, arrival=300.0) for i in range(1, 200)], 300.0)
    again = _req(0, 4.5, 0.8)
    fresh.add(again, 300.0)  # as new: the crowd's beta, no wait, a larger median -> last
    assert [fresh.pop_next(300.0).id for _ in range(200)][-1] == 0
    with pytest.raises(ValueError, match="never added"):
        TIEScheduler(cfg).requeue(_req(5, 3.0), 1.0)


def test_simulator_hands_preempted_requests_back_through_requeue():
    """A KV pool too small for every running request forces preemptions; TIE gets each back through ``requeue``
    (its arrival score), every request finishes with all its tokens."""
    from hf_ext.simulate import CostModel, SimConfig, Simulator

    class Spy(TIEScheduler):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.added: dict[int, float] = {}
            self.requeued: list[int] = []

        def _push(self, req, now, queue_len):  # add / add_many
            assert req.id not in self.added  # a preempted request never comes back as new
            self.added[req.id] = now
            super()._push(req, now, queue_len)

        def requeue(self, req, now):
            self.requeued.append(req.id)
            assert req.meta["sim_generated"] >= 0
            super().requeue(req, now)

    reqs = [
        Request(
            id=i,
            arrival=0.01 * i,
            prompt_len=64,
            output_len=300,
            max_new_tokens=1000,
            meta={"pred_mu": 5.0 + 0.01 * i, "pred_sigma": 0.5},
        )
        for i in range(12)
    ]
    sch = Spy(TIEConfig(max_new_tokens=1000))
    res = Simulator(CostModel.constant(0.01), sch, SimConfig(max_num_seqs=8, kv_capacity_tokens=1600)).run(
        reqs
    )
    assert res.num_finished == 12 and res.tokens_generated == 12 * 300
    assert sch.requeued and all(r.meta["tie_t0"] == sch.added[r.id] for r in reqs)


def test_simulator_tie_beats_fcfs_and_runs_everything():
    from hf_ext.simulate import FCFS, CostModel, SimConfig, Simulator

    rng = np.random.default_rng(0)
    n = 400
    mu = rng.normal(4.0, 1.0, n)
    out = np.clip(np.exp(mu + 0.3 * rng.standard_t(3.5, n)), 1, 1000).astype(int)
    arr = np.cumsum(rng.exponential(0.22, n))  # ~95% utilisation of 8 slots x 50 tok/s

    def reqs():
        return [
            Request(
                id=i,
                arrival=float(arr[i]),
                prompt_len=32,
                output_len=int(out[i]),
                max_new_tokens=1000,
                meta={"pred_mu": float(mu[i]), "pred_sigma": 0.3},
            )
            for i in range(n)
        ]

    cm = CostModel.constant(0.02)
    res = {}
    for name, sch in (("fcfs", FCFS()), ("tie", TIEScheduler(TIEConfig(max_new_tokens=1000)))):
        res[name] = Simulator(cm, sch, SimConfig(max_num_seqs=8)).run(reqs())
        assert res[name].num_finished == n
        assert res[name].tokens_generated == int(out.sum())
    ratio = res["fcfs"].summary()["per_token_mean"] / res["tie"].summary()["per_token_mean"]
    assert ratio > 2.0, ratio


def test_order_batch_shortest_first_and_fallback_warning():
    class FakePredictor:
        kind = "logt"

        def predict(self, prompts, batch_size=256):
            mu = np.array([float(len(p)) / 10 for p in prompts])
            return {"mu": mu, "sigma": np.full_like(mu, 0.4), "nu": np.full_like(mu, 3.5)}

    prompts = ["x" * 50, "x" * 10, "x" * 30]
    assert order_batch(prompts, FakePredictor(), max_new_tokens=1000) == [1, 2, 0]
    with pytest.warns(UserWarning, match="heuristic"):
        order = order_batch(["a " * 400, "b " * 20], None, max_new_tokens=1000)
    assert order == [1, 0]


@pytest.mark.parametrize("order", [("logt", "point", "ltr"), ("point", "ltr", "logt")])
def test_annotate_requests_keeps_each_predictors_outputs_apart(order):
    # the point predictor's mu must not replace the log-t law's: TIE would score (point mu, log-t sigma)
    class Fake:
        def __init__(self, kind, shift):
            self.kind, self.shift = kind, shift

        def predict(self, prompts, batch_size=256):
            mu = np.array([len(p) / 10 + self.shift for p in prompts])
            if self.kind == "logt":
                return {"mu": mu, "sigma": np.full_like(mu, 0.4), "nu": np.full_like(mu, 3.5)}
            if self.kind == "point":
                return {"mu": mu}
            return {"score": -mu}

    fakes = {"logt": Fake("logt", 0.0), "point": Fake("point", 1.0), "ltr": Fake("ltr", 2.0)}
    reqs = [
        Request(id=i, arrival=0.0, prompt_len=4, output_len=1, prompt="x" * (10 * (i + 1))) for i in range(3)
    ]
    for kind in order:
        annotate_requests(reqs, fakes[kind])
    for i, r in enumerate(reqs):
        assert r.meta["pred_mu"] == pytest.approx(i + 1.0)  # log-t's, not the point predictor's i + 2
        assert r.meta["pred_sigma"] == 0.4 and r.meta["pred_nu"] == 3.5
        assert r.meta["pred_len"] == pytest.approx(math.exp(i + 2.0))
        assert r.meta["ltr_score"] == pytest.approx(-(i + 3.0))


def test_fallback_in_scheduler_warns_once_and_uses_prompt_length():
    s = TIEScheduler(TIEConfig(max_new_tokens=1000, aging="none"))
    with pytest.warns(UserWarning, match="heuristic"):
        s.add(Request(id=0, arrival=0.0, prompt_len=400, output_len=5), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.add(Request(id=1, arrival=0.0, prompt_len=20, output_len=5), 0.0)
    assert s.pop_next(0.0).id == 1


def test_bad_input_errors():
    s = TIEScheduler()
    with pytest.raises(ValueError, match="NaN"):
        s.add(_req(0, float("nan")), 0.0)
    with pytest.raises(ValueError, match="pred_sigma"):
        s.add(_req(1, 3.0, sigma=float("inf")), 0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.add(
            Request(
                id=2,
                arrival=0.0,
                prompt_len=4,
                output_len=1,
                max_new_tokens=-3,
                meta={"pred_mu": 2.0, "pred_sigma": 0.5},
            ),
            0.0,
        )
    with pytest.raises(ValueError, match="empty"):
        order_batch(["ok", "  "])
    with pytest.raises(ValueError, match="max_new_tokens"):
        order_batch(["ok"], max_new_tokens=0)
    with pytest.raises(ValueError, match="aging"):
        TIEConfig(aging="sometimes")
    with pytest.raises(ValueError, match="alpha"):
        TIEConfig(alpha=1.0)


def test_a_bad_request_cap_fails_before_the_predictor_runs_or_the_fallback_warning_is_spent():
    """max_new_tokens <= 0 used to be checked after the request was predicted (predictor called, ``meta`` filled) or
    after the heuristic's one-time warning was given, so the next request really scored by the heuristic got none."""

    class Counting:
        kind = "logt"
        calls = 0

        def predict(self, prompts, batch_size=256):
            Counting.calls += 1
            n = len(prompts)
            return {"mu": np.full(n, 3.0), "sigma": np.ones(n), "nu": np.full(n, 3.5)}

    s = TIEScheduler(predictor=Counting())
    # the caps are set after construction: a Request refuses an output_len above its cap itself, and the scheduler's
    # own check guards requests changed later (or any object with these fields)
    bad = Request(id=0, arrival=0.0, prompt_len=4, output_len=3, prompt="hello", max_new_tokens=64)
    bad.max_new_tokens = 0
    with pytest.raises(ValueError, match="max_new_tokens must be a number >= 1"):
        s.add(bad, 0.0)
    assert Counting.calls == 0 and bad.meta == {} and len(s) == 0

    s = TIEScheduler()
    negative = Request(id=1, arrival=0.0, prompt_len=4, output_len=3, max_new_tokens=64)
    negative.max_new_tokens = -5
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.add(negative, 0.0)
    with pytest.warns(UserWarning, match="falling back to the prompt-length heuristic"):
        s.add(Request(id=2, arrival=0.0, prompt_len=4, output_len=3, max_new_tokens=64), 0.0)
    assert len(s) == 1


def test_order_batch_refuses_token_counts_or_predictions_that_are_not_one_per_prompt():
    """A single prompt-token count (or a predictor's single law) was broadcast over the whole job: every prompt got
    the same law and the order was the input order, silently."""
    prompts = ["a b c", "Write a detailed essay about Rome and its history.", "hi there"]
    with pytest.raises(ValueError, match="prompt_tokens must hold one token count per prompt"):
        order_batch(prompts, prompt_tokens=[100])

    class OneLaw:
        kind = "logt"

        def predict(self, prompts, batch_size=256):
            return {"mu": np.array([3.0]), "sigma": np.array([1.0]), "nu": np.array([3.5])}

    with pytest.raises(ValueError, match="mu of shape"):
        order_batch(prompts, OneLaw())
    with pytest.warns(UserWarning, match="prompt-length heuristic"):
        assert order_batch(prompts, prompt_tokens=[3, 900, 2], max_new_tokens=4096)[-1] == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"aging_tau": "30"}, "aging_tau must be a finite number > 0"),
        ({"alpha": "0.9"}, r"alpha must be in \(0, 1\)"),
        ({"aging_gamma": "0.9"}, r"aging_gamma must be in \(0, 1\]"),
        ({"use_request_cap": "false"}, "use_request_cap must be True or False"),
        ({"max_new_tokens": True}, "max_new_tokens must be an int >= 1"),
        ({"batch_max": True}, "batch_max must be an int >= 1"),
    ],
)
def test_tie_config_refuses_values_of_the_wrong_type_with_a_value_error(kwargs, match):
    """A ``--tie-config`` JSON file reaches TIEConfig untyped: ``"30"`` failed with a TypeError from a comparison (a
    traceback, not hf-ext serve's flag error), ``"use_request_cap": "false"`` was taken as True, ``True`` as 1."""
    with pytest.raises(ValueError, match=match):
        TIEConfig(**kwargs)
    from hf_ext.generation.tie.config import PredictorConfig

    with pytest.raises(ValueError, match="learn_nu must be True or False"):
        PredictorConfig(learn_nu="no")
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        PredictorConfig(epochs=True)
