"""TIE as a transformers continuous-batching scheduler: real generate_batch on a tiny Llama."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

PROMPTS = [
    "Write a detailed essay about the history of Rome.",
    "What is 12 times 7?",
    "hello world",
    "Translate this sentence into French.",
    "Solve for x: 3x + 5 = 20.",
    "List three reasons why the sky is blue.",
]


def _cb(scheduler_type: str, compiled: bool = False):
    from transformers import ContinuousBatchingConfig
    from transformers.generation.configuration_utils import CompileConfig

    kw = {}
    if compiled:  # CB compiles its varlen (prefill) path; its fast decode path is not available on CPU
        kw["varlen_compile_config"] = CompileConfig(backend="aot_eager", mode=None, dynamic=True)
    # CPU: a small paged cache and 2 requests per batch so that the admission order matters
    return ContinuousBatchingConfig(
        num_blocks=16,
        page_size=16,
        max_batch_tokens=64,
        max_requests_per_batch=2,
        scheduler_type=scheduler_type,
        **kw,
    )


class FakePredictor:
    """log-t predictor stand-in: longer prompt, longer expected answer."""

    kind = "logt"

    def predict(self, prompts, batch_size=256):
        mu = np.array([len(p) / 10 for p in prompts], dtype=np.float64)
        return {"mu": mu, "sigma": np.full_like(mu, 0.5), "nu": np.full_like(mu, 3.5)}


@pytest.fixture(scope="module")
def setup():
    from transformers import GenerationConfig

    from hf_ext.testing import tiny_llama, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    ids = [tok(p).input_ids for p in PROMPTS]
    gc = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
    return tiny_llama(), tok, ids, gc


def test_tie_is_registered_lazily():
    import subprocess
    import sys

    code = (
        "import sys, hf_ext; assert 'transformers.generation.continuous_batching.scheduler' not in sys.modules;"
        "from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING as M;"
        "print(M['tie'].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("TIECBScheduler")


def _run_manager(model, ids, gc, scheduler_type):
    """Queue every request before the loop starts, so the first scheduling step sees all of them."""
    mgr = model.init_continuous_batching(generation_config=gc, continuous_batching_config=_cb(scheduler_type))
    rids = mgr.add_requests(ids)
    mgr.start()
    out = {}
    try:
        while len(out) < len(ids):
            r = mgr.get_result(timeout=30)
            assert r is not None, "continuous batching stalled"
            if r.is_finished():
                assert r.error is None, r.error
                out[r.request_id] = list(r.generated_tokens)
    finally:
        mgr.stop(block=True)
    return rids, out


def test_generate_batch_same_tokens_as_fifo_and_tie_order(setup):
    from hf_ext.generation.tie.cb import (
        CONTEXT,
        TIECBScheduler,
        clear_length_hints,
        enable_tie_scheduler,
        set_length_hints,
    )

    model, tok, ids, gc = setup
    # real generate_batch with scheduler_type="tie" (prompt-length heuristic: warns) == FIFO tokens
    fifo = model.generate_batch(ids, generation_config=gc, continuous_batching_config=_cb("fifo"))
    enable_tie_scheduler()
    with pytest.warns(UserWarning, match="heuristic"):
        tie = model.generate_batch(ids, generation_config=gc, continuous_batching_config=_cb("tie"))
    assert CONTEXT.last_scheduler_type is TIECBScheduler
    assert list(tie) == list(fifo) and len(tie) == len(ids)
    for rid, out in fifo.items():
        assert tie[rid].generated_tokens == out.generated_tokens, rid
        assert len(out.generated_tokens) > 0

    # with predicted lengths, admission follows the TIE order exactly; tokens still equal FIFO's
    from hf_ext.generation.tie.metrics import ADMISSION_WAITS

    mu = [6.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # request 1 shortest ... request 0 longest
    set_length_hints(ids, mu, [0.5] * len(ids))
    waits_before = ADMISSION_WAITS.snapshot().get("TIECBScheduler", ([], 0.0, 0))
    try:
        rids, tie_out = _run_manager(model, ids, gc, "tie")
    finally:
        clear_length_hints()
    assert CONTEXT.admission_order == [rids[i] for i in np.argsort(mu)]
    # every admission was timed for GET /tie/metrics (arrival to admission, first admissions)
    waits = ADMISSION_WAITS.snapshot()["TIECBScheduler"]
    assert waits[2] - waits_before[2] == len(ids) and waits[1] > waits_before[1]
    _, fifo_out = _run_manager(model, ids, gc, "fifo")
    assert tie_out == fifo_out == {k: v.generated_tokens for k, v in fifo.items()}


def test_tie_generate_batch_with_predictor_and_bad_input(setup):
    from hf_ext.generation.tie.cb import tie_generate_batch

    model, tok, ids, gc = setup

    out = tie_generate_batch(
        model, PROMPTS, tok, FakePredictor(), generation_config=gc, continuous_batching_config=_cb("fifo")
    )
    assert len(out) == len(PROMPTS) and all(len(o.generated_tokens) > 0 for o in out.values())
    with pytest.raises(ValueError, match="empty"):
        tie_generate_batch(model, ["ok", ""], tok, FakePredictor(), generation_config=gc)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tie_generate_batch(model, ["ok"], tok, FakePredictor(), generation_config=gc, max_new_tokens=0)

    class NaNPredictor(FakePredictor):
        def predict(self, prompts, batch_size=256):
            out = super().predict(prompts)
            out["mu"][0] = np.nan
            return out

    with pytest.raises(ValueError, match="NaN"):
        tie_generate_batch(model, PROMPTS[:2], tok, NaNPredictor(), generation_config=gc)
    with pytest.warns(UserWarning, match="heuristic"):
        tie_generate_batch(
            model, PROMPTS[:2], tok, None, generation_config=gc, continuous_batching_config=_cb("fifo")
        )


def test_tie_generate_batch_leaves_the_callers_context(setup):
    from hf_ext.generation.tie.cb import (
        CONTEXT,
        clear_length_hints,
        enable_tie_scheduler,
        set_length_hints,
        tie_generate_batch,
    )

    model, tok, ids, gc = setup

    pred = FakePredictor()
    enable_tie_scheduler(pred, tok)
    set_length_hints([[7, 7]], [1.0], [0.5])
    try:
        tie_generate_batch(
            model, PROMPTS[:3], tok, pred, generation_config=gc, continuous_batching_config=_cb("fifo")
        )
        assert CONTEXT.predictor is pred and CONTEXT.tokenizer is tok
        assert CONTEXT.hints == {(7, 7): (1.0, 0.5, 3.5)}  # the batch's own hints are gone, the caller's stay
    finally:
        clear_length_hints()
        enable_tie_scheduler()


def test_tie_generate_batch_never_swaps_the_process_context(setup, tmp_path, monkeypatch):
    """A TIE server in the same process keeps its predictor, config, log and hints *during* a batch call (they
    used to be swapped out for the call's own, so the server scored by the heuristic and logged nothing); the call
    still schedules by its own predictions, logs into its own log, and leaves no scheduler name behind."""
    from transformers.generation.continuous_batching import scheduler as cb_sched

    from hf_ext.generation.tie.cb import (
        CONTEXT,
        TIECBScheduler,
        clear_length_hints,
        enable_tie_scheduler,
        set_length_hints,
        tie_generate_batch,
    )
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.lengthlog import LengthLog

    model, tok, ids, gc = setup
    server_pred, server_cfg = FakePredictor(), TIEConfig(aging="none")
    server_log, batch_log = LengthLog(tmp_path / "server.jsonl"), LengthLog(tmp_path / "batch.jsonl")
    enable_tie_scheduler(server_pred, tok, server_cfg, length_log=server_log)
    set_length_hints(None, [1.0], [0.5], request_ids=["server-req"])
    names_before = set(cb_sched.SCHEDULER_MAPPING)
    seen = {}
    real = model.generate_batch

    def spy(*args, **kwargs):
        with CONTEXT.lock:
            seen["context"] = (CONTEXT.predictor, CONTEXT.config, CONTEXT.length_log, dict(CONTEXT.rid_hints))
        seen["name"] = kwargs["continuous_batching_config"].scheduler_type
        seen["cls"] = cb_sched.SCHEDULER_MAPPING[seen["name"]]
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate_batch", spy)
    try:
        out = tie_generate_batch(
            model, PROMPTS, tok, FakePredictor(), generation_config=gc, length_log=batch_log,
            continuous_batching_config=_cb("fifo"),
        )  # fmt: skip
        assert seen["context"] == (server_pred, server_cfg, server_log, {"server-req": (1.0, 0.5, 3.5)})
        assert issubclass(seen["cls"], TIECBScheduler) and seen["name"] != "tie"
        assert set(cb_sched.SCHEDULER_MAPPING) == names_before  # the call's name is gone
        assert CONTEXT.last_scheduler_type is seen["cls"]
        # shortest predicted first (FakePredictor: mu grows with the prompt's length), the engine's 2 slots at once
        order = CONTEXT.admission_order
        first_two = sorted(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))[:2]
        assert sorted(order[:2]) == sorted(f"req_{i}" for i in first_two)
        assert len(out) == len(PROMPTS)
        assert len(batch_log.records) == len(PROMPTS) and server_log.records == []
        assert {r["source"] for r in batch_log.records} == {"predictor"}
    finally:
        clear_length_hints()
        enable_tie_scheduler()


def test_tie_generate_batch_refuses_a_manager_it_cannot_schedule(setup):
    from transformers.generation.continuous_batching import scheduler as cb_sched

    from hf_ext.generation.tie.cb import tie_generate_batch

    model, tok, ids, gc = setup
    names_before = set(cb_sched.SCHEDULER_MAPPING)
    with pytest.raises(ValueError, match="persistent_manager"):
        tie_generate_batch(
            model, PROMPTS[:2], tok, FakePredictor(), generation_config=gc, persistent_manager=True
        )

    class Cached:  # what generate_batch(persistent_manager=True) leaves on a model
        _cached_continuous_batching_manager = object()

    with pytest.raises(ValueError, match="destroy_cached_continuous_batching_manager"):
        tie_generate_batch(Cached(), PROMPTS[:2], tok, FakePredictor(), generation_config=gc)

    class Failing:
        def generate_batch(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        tie_generate_batch(Failing(), PROMPTS[:2], tok, FakePredictor(), generation_config=gc)
    assert set(cb_sched.SCHEDULER_MAPPING) == names_before


@pytest.mark.parametrize("failure", ["nan", "raises"])
def test_in_loop_prediction_failure_never_stops_the_engine(setup, caplog, failure):
    """The predictor runs inside the generation thread: a NaN / sigma <= 0 prediction or a predictor that raises is
    logged naming the requests, they are scored by the heuristic, and every request still finishes (FIFO tokens)."""
    import logging

    from hf_ext.generation.tie.cb import enable_tie_scheduler, preserved_context

    model, tok, ids, gc = setup

    class Broken(FakePredictor):
        def predict(self, prompts, batch_size=256):
            if failure == "raises":
                raise RuntimeError("checkpoint is corrupt")
            out = super().predict(prompts)
            out["mu"][0] = np.nan
            out["sigma"][-1] = 0.0
            return out

    fifo = model.generate_batch(ids, generation_config=gc, continuous_batching_config=_cb("fifo"))
    with preserved_context(), caplog.at_level(logging.WARNING, logger="hf_ext"):
        enable_tie_scheduler(Broken(), tok)
        tie = model.generate_batch(ids, generation_config=gc, continuous_batching_config=_cb("tie"))
    assert {k: v.generated_tokens for k, v in tie.items()} == {k: v.generated_tokens for k, v in fifo.items()}
    assert all(v.error is None for v in tie.values())
    msgs = [r.getMessage() for r in caplog.records if "length prediction failed" in r.getMessage()]
    assert msgs, caplog.text
    why = (
        "RuntimeError: checkpoint is corrupt"
        if failure == "raises"
        else "non-finite prediction or sigma/nu <= 0"
    )
    assert all(why in m for m in msgs)
    counts = [int(m.split("failed for ")[1].split(" ")[0]) for m in msgs]
    if failure == "raises":
        assert sum(counts) == len(ids)
    else:  # each predict call: its first prompt NaN, its last sigma = 0
        assert all(c in (1, 2) for c in counts)


def test_a_soft_reset_request_keeps_its_score_and_aging_clock_on_the_real_engine():
    """A KV pool of 10 pages for 16 requests: transformers soft-resets requests (KV evicted, re-queued under the
    same id). Each comes back with the score and clock of its first arrival (one scoring per request, though the
    queue, and so beta, has changed), every request gets all its tokens, and nothing is kept once all have ended."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie import cb as tie_cb
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.replay import ReplayRequest, run_cb_replay, summarize_replay
    from hf_ext.testing import tiny_llama

    scored: dict[str, list[tuple[float, float]]] = {}
    comebacks: list[str] = []
    live: list[tie_cb.TIECBScheduler] = []
    real_prepare = tie_cb.TIECBScheduler._prepare

    def spy(self, new):
        if self not in live:
            live.append(self)
        comebacks.extend(s.request_id for s in new if s.request_id in self._admitted)
        real_prepare(self, new)
        for s in new:
            scored.setdefault(s.request_id, []).append((self.scores[s.request_id], self._t0[s.request_id]))

    rng = np.random.default_rng(0)
    cap = 60
    reqs = [
        ReplayRequest(
            f"r{i}",
            0.0,
            rng.integers(5, 200, 24).tolist(),
            int(rng.integers(30, cap)),
            mu=float(rng.normal(3.5, 0.5)),
            sigma=0.6,
            nu=3.5,
            pred_len=1.0,
            ltr_score=0.0,
        )
        for i in range(16)
    ]
    gc = GenerationConfig(max_new_tokens=cap, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cbc = ContinuousBatchingConfig(num_blocks=10, page_size=16, max_batch_tokens=64, max_requests_per_batch=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tie_cb.TIECBScheduler, "_prepare", spy)
        recs = run_cb_replay(
            tiny_llama(),
            reqs,
            "tie",
            generation_config=gc,
            continuous_batching_config=cbc,
            tie_config=TIEConfig(max_new_tokens=cap, use_request_cap=False, batch_max=6),
            time_scale=0,
        )
    assert summarize_replay(recs)["lengths_ok"] == 1.0
    assert comebacks, "no soft reset happened: the test no longer exercises the comeback"
    for rid in comebacks:
        assert len(set(scored[rid])) == 1, (rid, scored[rid])  # the same (score, t0) every time it waited
    (sched,) = live
    assert not sched._admitted and not sched.scores


def _run_requests(model, requests, gc, cb, before_results=None, timeout=60.0):
    """Start a CB manager with ``requests`` ([(ids, request_id, max_new_tokens)]), call ``before_results()`` while
    it runs, and return request id -> (status, generated token count)."""
    import time

    mgr = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    for ids, rid, n in requests:
        mgr.add_request(ids, request_id=rid, max_new_tokens=n)
    mgr.start()
    if before_results is not None:
        before_results()
    out: dict = {}
    t_end = time.time() + timeout
    while len(out) < len(requests) and time.time() < t_end:
        r = mgr.get_result(timeout=1)
        if r is not None and r.is_finished():
            out[r.request_id] = (r.status.name, len(r.generated_tokens))
    mgr.stop(block=True, timeout=10)
    return out


def _once_admitted(enable, tok, timeout=30.0):
    """``enable(None, tok)`` once the running manager has admitted its first request (the others were prepared
    under the first config and are waiting)."""
    import time

    from hf_ext.generation.tie.cb import CONTEXT

    t_end = time.time() + timeout
    while not CONTEXT.admission_order and time.time() < t_end:
        time.sleep(0.01)
    enable(None, tok)


def test_a_running_manager_keeps_its_config_when_tie_is_enabled_again_elsewhere(setup):
    """A manager started with aging='none'; then enable_tie_scheduler with the default config (as tie_generate_batch
    does): the engine thread raised KeyError on its next key and every request in the queue failed."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie import TIEConfig
    from hf_ext.generation.tie.cb import enable_tie_scheduler

    model, tok, ids, _ = setup
    enable_tie_scheduler(None, tok, TIEConfig(score="per_token_index", aging="none"))
    gc = GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(
        num_blocks=64, page_size=16, max_batch_tokens=64, max_requests_per_batch=1, scheduler_type="tie"
    )
    reqs = [(ids[2], f"a{i}", 30) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no predictor: the heuristic's warning
        out = _run_requests(
            model, reqs, gc, cb, before_results=lambda: _once_admitted(enable_tie_scheduler, tok)
        )
    assert out == {f"a{i}": ("FINISHED", 30) for i in range(4)}


def test_heuristic_law_uses_each_requests_own_cap_and_request_id_hints_end_with_their_request(setup):
    """The prompt-length heuristic took the largest cap of the requests prepared together (a 121-token prompt with
    max_new_tokens=8 got exp(mu)=121 next to a 1000-token request, 16 alone); a hint set under a request id stayed
    after its request and scored the next request reusing the id."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler, set_length_hints
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.scheduler import heuristic_prediction

    model, tok, ids, _ = setup
    long_ids = tok(PROMPTS[0] * 8).input_ids
    gc = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(
        num_blocks=64, page_size=16, max_batch_tokens=512, max_requests_per_batch=4, scheduler_type="tie"
    )
    mus = []
    for with_other in (False, True):
        log = LengthLog()
        enable_tie_scheduler(None, tok, length_log=log)
        reqs = [(long_ids, "X", 8)] + ([(ids[2], "Y", 40)] if with_other else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run_requests(model, reqs, gc, cb)
        (rec,) = [r for r in log.records if r["request_id"] == "X"]
        assert rec["source"] == "heuristic"
        mus.append(rec["pred_mu"])
    own = float(heuristic_prediction([len(long_ids)], 8)["mu"][0])  # its own cap, whatever came with it
    assert mus == [pytest.approx(own), pytest.approx(own)]
    # a request-id hint is used for that request and removed when it ends
    enable_tie_scheduler(None, tok)
    set_length_hints(None, mu=[1.0], sigma=[0.5], request_ids=["H"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_requests(model, [(ids[1], "H", 4)], gc, cb)
    assert "H" not in CONTEXT.rid_hints and "H" not in CONTEXT.hint_sources


def test_tie_generate_batch_refuses_a_point_predictor_before_running_it(setup):
    """The predictor's kind was checked only after it had predicted every prompt (work done, then the error)."""
    from hf_ext.generation.tie.cb import tie_generate_batch

    model, tok, ids, gc = setup

    class Point:
        kind = "point"
        calls = 0

        def predict(self, prompts, batch_size=256):
            Point.calls += 1
            return {"mu": np.full(len(prompts), 3.0)}

    with pytest.raises(ValueError, match="'logt' LengthPredictor, got kind='point'"):
        tie_generate_batch(model, PROMPTS[:2], tok, Point(), generation_config=gc)
    assert Point.calls == 0


@pytest.mark.parametrize("case", ["model_generation_config_cap", "use_request_cap_false"])
def test_tie_generate_batch_heuristic_uses_the_engines_cap(case):
    """Without a predictor, ``tie_generate_batch`` made its prompt-length laws with the call's ``max_new_tokens``,
    else ``TIEConfig.max_new_tokens``, while the engine's own fallback uses each request's effective cap (the
    model's ``generation_config.max_new_tokens`` when the call sets none; ``TIEConfig.max_new_tokens`` when
    ``use_request_cap=False``): the two admitted the same requests in different orders. Now they agree."""
    from transformers import ContinuousBatchingConfig

    from hf_ext.generation.tie import TIEConfig
    from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler, preserved_context, tie_generate_batch
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.testing import tiny_llama, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_llama()
    model.generation_config.update(do_sample=False, eos_token_id=-1, pad_token_id=0)  # EOS off: full lengths
    # 1, 44, 35, 26, 17 prompt tokens, which generate_batch queues in this order (it sorts them by their ids,
    # descending): the first to arrive is first in every order below, as the engine may start before the rest
    prompts = ["you"] + [" ".join(["word"] * k) for k in (15, 12, 9, 6)]
    if case == "model_generation_config_cap":
        # each request is capped at the model's 100 (the heuristic's mu spans up to log 50): by prompt length.
        # The old call used TIEConfig's 20 (mu clipped to log 16 for all): arrival order
        model.generation_config.max_new_tokens = 100
        cfg, call = TIEConfig(max_new_tokens=20, aging="none"), {}
        want = [0, 4, 3, 2, 1]
    else:
        # M is TIEConfig's 20 for every request (mu clipped to log 16 for all): arrival order. The old call used
        # the request's 100: by prompt length
        cfg, call = TIEConfig(max_new_tokens=20, use_request_cap=False, aging="none"), {"max_new_tokens": 100}
        want = [0, 1, 2, 3, 4]
    cb = ContinuousBatchingConfig(num_blocks=32, page_size=16, max_batch_tokens=64, max_requests_per_batch=1)
    orders, laws = [], []
    with preserved_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no predictor: the heuristic's warning
        for engine in (False, True):
            log = LengthLog()
            if engine:  # the engine's own fallback: no hints, scheduler_type="tie"
                enable_tie_scheduler(None, tok, cfg, length_log=log)
                ids = [tok(p).input_ids for p in prompts]
                cb.scheduler_type = "tie"
                out = model.generate_batch(ids, continuous_batching_config=cb, **call)
            else:
                out = tie_generate_batch(
                    model, prompts, tok, config=cfg, continuous_batching_config=cb, length_log=log, **call
                )
            assert {len(o.generated_tokens) for o in out.values()} == {100}
            orders.append(list(CONTEXT.admission_order))
            recs = {r["request_id"]: r for r in log.records}
            assert {r["source"] for r in recs.values()} == {"heuristic"}
            laws.append({k: (r["pred_mu"], r["pred_sigma"], r["pred_nu"]) for k, r in recs.items()})
    assert orders[0] == orders[1] == [f"req_{i}" for i in want]
    assert laws[0] == laws[1]


def test_a_prompt_whose_text_is_empty_is_scored_by_the_heuristic_not_the_predictor(
    setup, caplog, monkeypatch
):
    """A request whose prompt decodes to no text (special tokens only, decoded with skip_special_tokens) was sent to
    the predictor as the literal string "<empty>", an input it never saw, and scored (and logged) with that law. It
    is now scored by the prompt-length heuristic, logged and kept in prediction_failures; the others as before."""
    import logging

    from hf_ext.generation.tie.cb import TIECBScheduler, enable_tie_scheduler, preserved_context
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.scheduler import heuristic_prediction

    model, tok, ids, gc = setup
    special = [tok.bos_token_id] * 3
    assert tok.decode(special, skip_special_tokens=True) == ""
    batch = [*ids[:3], special]

    class Recording(FakePredictor):
        seen: list[str] = []

        def predict(self, prompts, batch_size=256):
            Recording.seen.extend(prompts)
            return super().predict(prompts)

    live: list[TIECBScheduler] = []
    real_reset = TIECBScheduler.reset

    def spy(self):  # reset runs more than once per scheduler
        real_reset(self)
        if self not in live:
            live.append(self)

    monkeypatch.setattr(TIECBScheduler, "reset", spy)
    log = LengthLog()
    with preserved_context(), caplog.at_level(logging.WARNING, logger="hf_ext"):
        enable_tie_scheduler(Recording(), tok, length_log=log)
        out = model.generate_batch(batch, generation_config=gc, continuous_batching_config=_cb("tie"))
    assert all(v.error is None for v in out.values()) and len(out) == len(batch)
    recs = {r["request_id"]: r for r in log.records}
    assert set(recs) == {f"req_{i}" for i in range(len(batch))}
    # the empty one: the heuristic's law for its 3 tokens and its cap of 10, source "heuristic", its own (empty) text
    h = heuristic_prediction([len(special)], gc.max_new_tokens)
    rec = recs["req_3"]
    assert (rec["source"], rec["prompt"]) == ("heuristic", "")
    assert (rec["pred_mu"], rec["pred_sigma"], rec["pred_nu"]) == pytest.approx(
        (h["mu"][0], h["sigma"][0], h["nu"][0])
    )
    # the others: the predictor's law for their text; the predictor never saw an empty or made-up prompt
    for i in range(3):
        text = tok.decode(ids[i], skip_special_tokens=True)
        rec = recs[f"req_{i}"]
        assert rec["source"] == "predictor"
        assert (rec["pred_mu"], rec["pred_sigma"]) == pytest.approx((len(text) / 10, 0.5))
    assert sorted(Recording.seen) == sorted(tok.decode(x, skip_special_tokens=True) for x in ids[:3])
    (sched,) = live
    assert list(sched.prediction_failures) == ["req_3"]
    assert sched.prediction_failures["req_3"].startswith("empty prompt text")
    msgs = [r.getMessage() for r in caplog.records if "length prediction failed" in r.getMessage()]
    assert len(msgs) == 1 and "['req_3']" in msgs[0] and "empty prompt text" in msgs[0], caplog.text


# ------------------------------------------------------------------ under CB compile options
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

    model, _, ids, gc = setup
    fifo = model.generate_batch(ids, generation_config=gc, continuous_batching_config=_cb("fifo"))
    enable_tie_scheduler()
    mu = [6.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    set_length_hints(ids, mu, [0.5] * len(ids))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CB's own notes on compiling on CPU
            out = model.generate_batch(
                ids, generation_config=gc, continuous_batching_config=_cb("tie", compiled=True)
            )
    finally:
        clear_length_hints()
        torch._dynamo.reset()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward was compiled
    assert CONTEXT.last_scheduler_type is TIECBScheduler
    assert [r.error for r in out.values()] == [None] * len(ids)
    assert {k: v.generated_tokens for k, v in out.items()} == {k: v.generated_tokens for k, v in fifo.items()}
    # shortest predicted first (request i is req_i)
    assert CONTEXT.admission_order == [f"req_{i}" for i in np.argsort(mu)]
