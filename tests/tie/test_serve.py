"""TIE in ``transformers serve``: a real OpenAI-compatible server on a tiny Llama, over HTTP."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="transformers' serving extras: pip install 'hf-ext[serve]'")


class StubPredictor:
    """log-t predictor stand-in: ``mu`` by the prompt text (a table; unknown prompts get 3.0); records its calls."""

    kind = "logt"

    def __init__(self, mu_by_text: dict[str, float] | None = None) -> None:
        self.mu_by_text = mu_by_text or {}
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def predict(self, prompts, batch_size=256):
        with self.lock:
            self.seen.extend(prompts)
        mu = np.array([self.mu_by_text.get(p, 3.0) for p in prompts], dtype=np.float64)
        return {"mu": mu, "sigma": np.full_like(mu, 0.5), "nu": np.full_like(mu, 3.5)}


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hf_ext.testing import save_for_serving, tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_serve")
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHAT_TEMPLATE  # for /v1/chat/completions
    # no EOS: every request generates exactly its max_tokens, so the blocker below really blocks
    save_for_serving(tiny_llama(), tok, d, max_new_tokens=16)
    return str(d)


@pytest.fixture(autouse=True)
def _restore_context():
    from hf_ext.generation.tie.cb import preserved_context

    with preserved_context():
        yield


def _wait_healthy(port: int, timeout: float = 30.0) -> None:
    from hf_ext.generation.tie.serve import wait_until_serving

    wait_until_serving(f"http://localhost:{port}", timeout=timeout, poll=0.1)


def _complete(port: int, model: str, prompt: str, max_tokens: int, rid: str | None = None) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if rid is not None:
        headers["X-Request-ID"] = rid
    req = urllib.request.Request(f"http://localhost:{port}/v1/completions", data=body, headers=headers)
    return json.loads(urllib.request.urlopen(req, timeout=120).read())


def _complete_all(port: int, model: str, jobs: list[tuple[str, int, str]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    errors: list[BaseException] = []

    def one(prompt: str, n: int, rid: str) -> None:
        try:
            out[rid] = _complete(port, model, prompt, n, rid)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@contextlib.contextmanager
def _server(start, **kwargs):
    from hf_ext.testing import free_port

    port = free_port()
    server = start(port=port, device="cpu", non_blocking=True, log_level="warning", **kwargs)
    try:
        _wait_healthy(port)
        yield port, server
    finally:
        server.kill_server()


PROMPTS = ["Write a short poem about the sea.", "What is 12 times 7?", "hello world", "Explain the proof."]
SMALL_CB = {"cb_num_blocks": 32, "cb_max_batch_tokens": 64}  # transformers serve flags: a small CPU cache


def test_serve_tie_runs_tie_and_matches_fifo_tokens(model_dir):
    """A real server: every request goes through TIECBScheduler, predicted from its decoded prompt text, and
    greedy outputs equal those of plain ``transformers serve`` (FIFO)."""
    import transformers.cli.serving.utils as su
    from transformers.cli.serve import Serve

    from hf_ext.generation.tie.cb import CONTEXT, TIECBScheduler
    from hf_ext.generation.tie.serve import serve_tie

    jobs = [(p, 6 + i, f"r{i}") for i, p in enumerate(PROMPTS)]
    base = su.GenerationState
    pred = StubPredictor()
    with _server(lambda **kw: serve_tie(model_dir, pred, **SMALL_CB, **kw)) as (port, server):
        assert su.GenerationState is base  # the patch is undone once the server is built
        assert server._generation_state._cb_config.scheduler_type == "tie"
        tie_out = _complete_all(port, model_dir, jobs)
        assert CONTEXT.last_scheduler_type is TIECBScheduler
        assert sorted(CONTEXT.admission_order) == sorted(r for *_, r in jobs)
    assert sorted(pred.seen) == sorted(PROMPTS)  # ids decoded back to the prompt text, each predicted once

    plain = lambda **kw: Serve(force_model=model_dir, continuous_batching=True, **SMALL_CB, **kw)  # noqa: E731
    with _server(plain) as (port, server):
        assert (
            server._generation_state._cb_config.scheduler_type == "fifo"
        )  # plain serve: transformers' default
        fifo_out = _complete_all(port, model_dir, jobs)
    for _, n, rid in jobs:
        assert tie_out[rid]["usage"]["completion_tokens"] == n
        assert tie_out[rid]["choices"][0]["text"] == fifo_out[rid]["choices"][0]["text"]


def test_serve_tie_admits_waiting_requests_by_score(model_dir):
    """One request at a time: while a long request runs, three arrive; they are admitted shortest score first,
    the reverse of their arrival order."""
    from transformers import ContinuousBatchingConfig

    from hf_ext.generation.tie.cb import CONTEXT
    from hf_ext.generation.tie.serve import serve_tie

    waiting = {"c long answer": 6.0, "b medium answer": 4.0, "a short answer": 1.0}  # sent in this order
    pred = StubPredictor({"blocker": 0.0, **waiting})
    cbc = ContinuousBatchingConfig(max_requests_per_batch=1, num_blocks=32, page_size=16, max_batch_tokens=64)
    with _server(lambda **kw: serve_tie(model_dir, pred, continuous_batching_config=cbc, **kw)) as (port, _):
        done: dict[str, float] = {}

        def blocker() -> None:
            _complete(port, model_dir, "blocker", 400, "blocker")
            done["blocker"] = time.perf_counter()

        t = threading.Thread(target=blocker)
        t.start()
        t_end = time.time() + 30
        while "blocker" not in CONTEXT.admission_order and time.time() < t_end:
            time.sleep(0.01)
        out: dict[str, dict] = {}
        threads = []
        for prompt in waiting:
            threads.append(
                threading.Thread(
                    target=lambda p=prompt: out.setdefault(p, _complete(port, model_dir, p, 4, p))
                )
            )
            threads[-1].start()
            time.sleep(0.05)  # arrival order = dict order
        sent = time.perf_counter()
        for th in [t, *threads]:
            th.join()
    assert done["blocker"] > sent, "the blocker finished before the others arrived; make it longer"
    assert CONTEXT.admission_order == ["blocker", "a short answer", "b medium answer", "c long answer"]


def test_tie_generation_state_patch_is_revertible_and_refuses_conflicts():
    import transformers.cli.serving.server as ss
    import transformers.cli.serving.utils as su
    from transformers import ContinuousBatchingConfig

    from hf_ext.generation.tie.serve import tie_generation_state

    base, build = su.GenerationState, ss.build_server
    user = ContinuousBatchingConfig(max_requests_per_batch=3)
    with tie_generation_state(user) as cls:
        assert su.GenerationState is cls and issubclass(cls, base) and ss.build_server is not build
        state = su.GenerationState(continuous_batching=True)
        assert state._cb_config.scheduler_type == "tie" and state._cb_config.max_requests_per_batch == 3
        assert user.scheduler_type != "tie"  # the caller's config is copied, not changed
        with pytest.raises(ValueError, match="--cb-"):
            su.GenerationState(continuous_batching=True, cb_config=ContinuousBatchingConfig(num_blocks=8))
        with pytest.raises(RuntimeError, match="does not nest"), tie_generation_state():
            pass
    assert su.GenerationState is base and ss.build_server is build
    with tie_generation_state():  # no config of ours: the server's flags' config, scheduler set to tie
        flags = su.GenerationState(continuous_batching=True, cb_config=ContinuousBatchingConfig(num_blocks=8))
        assert (flags._cb_config.scheduler_type, flags._cb_config.num_blocks) == ("tie", 8)
        assert su.GenerationState(continuous_batching=True)._cb_config.scheduler_type == "tie"
    assert su.GenerationState is base


def test_tie_cb_config_checks():
    from transformers import ContinuousBatchingConfig

    from hf_ext.generation.tie.serve import tie_cb_config

    assert tie_cb_config(None).scheduler_type == "tie"
    assert tie_cb_config(ContinuousBatchingConfig(scheduler_type="tie")).scheduler_type == "tie"
    with pytest.raises(ValueError, match="scheduler_type must be 'tie' or the default"):
        tie_cb_config(ContinuousBatchingConfig(scheduler_type="prefill_first"))
    with pytest.raises(ValueError, match="continuous_batching_config must be a transformers"):
        tie_cb_config({"scheduler_type": "tie"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"continuous_batching": False}, "continuous_batching must be True"),
        ({"force_model": "x"}, "first argument"),
        ({"portt": 1}, "unknown transformers serve argument"),
        ({"config": {"beta_max": 0.2}}, "config must be a TIEConfig"),
        ({"continuous_batching_config": "fifo"}, "continuous_batching_config must be"),
        ({"predictor": StubPredictor(), "prompt_text": "last turn"}, "prompt_text must be a callable"),
    ],
)
def test_serve_tie_bad_input_fails_before_any_change(kwargs, match):
    import transformers.cli.serving.utils as su

    from hf_ext.generation.tie.cb import CONTEXT
    from hf_ext.generation.tie.serve import serve_tie

    before = (CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.config)
    base = su.GenerationState
    with pytest.raises(ValueError, match=match):
        serve_tie("some/model", non_blocking=True, **kwargs)
    assert (CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.config) == before
    assert su.GenerationState is base


def test_serve_tie_refuses_cb_config_with_cb_flags_and_point_predictors():
    from transformers import ContinuousBatchingConfig

    from hf_ext.generation.tie.serve import serve_tie

    with pytest.raises(ValueError, match="cb_num_blocks both set"):
        serve_tie("m", continuous_batching_config=ContinuousBatchingConfig(), cb_num_blocks=8)
    point = StubPredictor()
    point.kind = "point"
    with pytest.raises(ValueError, match="'logt' LengthPredictor"):
        serve_tie("m", point, prompt_text=lambda ids: "x")
    # refused before the served model's tokenizer is loaded (there is no model "no/such-model" to load it from)
    with pytest.raises(ValueError, match="'logt' LengthPredictor"):
        serve_tie("no/such-model", point)
    with pytest.raises(ValueError, match="model must be a non-empty"):
        serve_tie("")


def test_prompt_text_hook_feeds_the_predictor(model_dir):
    """``prompt_text`` replaces decoding: the predictor sees what it returns (here, the prompt's token count)."""
    from hf_ext.generation.tie.serve import serve_tie

    pred = StubPredictor()
    start = lambda **kw: serve_tie(model_dir, pred, prompt_text=lambda ids: f"n={len(ids)}", **SMALL_CB, **kw)  # noqa: E731
    with _server(start) as (port, _):
        _complete_all(port, model_dir, [("hello world", 3, "h")])
    assert len(pred.seen) == 1 and pred.seen[0].startswith("n=")


def test_cli_builds_config_and_forwards_transformers_flags(monkeypatch, tmp_path, capsys):
    import transformers.cli.serving.utils as su
    import transformers.cli.transformers as tcli

    from hf_ext.cli import main
    from hf_ext.generation.tie.cb import CONTEXT
    from hf_ext.generation.tie.config import TIEConfig

    calls: list[tuple[list[str], bool]] = []
    configs: list = []

    def fake_app(args, prog_name=None):
        calls.append((list(args), getattr(su.GenerationState, "_hf_ext_tie", False)))
        configs.append(CONTEXT.config)  # what the server scores with (put back once it has ended)
        raise SystemExit(0)

    monkeypatch.setattr(tcli, "app", fake_app)
    cfg = tmp_path / "tie.json"
    cfg.write_text(json.dumps({"beta_max": 0.3, "aging": "none"}))
    rc = main(["serve", "my/model", "--tie-config", str(cfg), "--tie-beta-max", "0.2", "--port", "9001"])
    assert rc == 0
    assert calls == [(["serve", "my/model", "--continuous-batching", "--port", "9001"], True)]
    assert configs[-1] == TIEConfig(beta_max=0.2, aging="none")
    assert main(["serve", "my/model", "--tie-score", "per_token_index"]) == 0
    assert configs[-1] == TIEConfig(score="per_token_index")
    assert not getattr(su.GenerationState, "_hf_ext_tie", False)

    cfg.write_text(json.dumps({"beta_maxx": 0.3}))
    with pytest.raises(SystemExit):
        main(["serve", "my/model", "--tie-config", str(cfg)])
    assert "--tie-config: unknown TIEConfig field(s) ['beta_maxx']" in capsys.readouterr().err
    calls.clear()
    log = tmp_path / "typo.jsonl"
    for argv, said in (
        (
            ["--tie-length-log", str(log), "--tie-alfa", "0.5"],
            "unknown flag(s) --tie-alfa",
        ),  # not for transformers
        (["--tie-alpha", "2"], "--tie-alpha: alpha must be in (0, 1)"),
        (["--tie-config", str(tmp_path / "missing.json")], "--tie-config: cannot read"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["serve", "my/model", *argv])
        assert exc.value.code == 2 and said in capsys.readouterr().err
    assert not log.exists() and calls == []  # refused before anything was opened or started
    for flag, bad in (("--tie-aging", "sometimes"), ("--tie-score", "sjf")):
        with pytest.raises(SystemExit):  # argparse names the allowed choices
            main(["serve", "my/model", flag, bad])
    with pytest.raises(SystemExit, match="always on"):
        main(["serve", "my/model", "--no-continuous-batching"])
    with pytest.raises(SystemExit, match="--tie-length-log-report N needs --tie-length-log FILE"):
        main(["serve", "my/model", "--tie-length-log-report", "5"])


def test_cli_length_log_with_reports(monkeypatch, tmp_path, model_dir):
    """``--tie-length-log FILE --tie-length-log-report N``: the scheduler's log writes FILE and reports every N; the
    file is closed when the server ends."""
    import transformers.cli.transformers as tcli

    from hf_ext.cli import main
    from hf_ext.generation.tie.cb import CONTEXT

    seen = {}

    def fake_app(args, prog_name=None):
        seen["log"] = CONTEXT.length_log
        raise SystemExit(0)

    monkeypatch.setattr(tcli, "app", fake_app)
    path = tmp_path / "lengths.jsonl"
    argv = ["serve", model_dir, "--tie-length-log", str(path), "--tie-length-log-report", "50"]
    assert main(argv) == 0
    log = seen["log"]
    assert log.path == str(path) and log.report_every == 50 and log._fh is None  # closed after the server


def test_replay_over_http_times_and_lengths(model_dir):
    """Timed streamed requests against a real server: exact lengths, ordered times, the client's submit times
    follow the scaled arrivals; priority keys set by request id reach the server through X-Request-ID."""
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serve import Serve

    from hf_ext.generation.tie.cb import CONTEXT, PriorityCBScheduler, set_priority_keys
    from hf_ext.generation.tie.replay import ReplayRequest, summarize_replay
    from hf_ext.generation.tie.serve import replay_over_http, tie_generation_state
    from hf_ext.testing import free_port

    reqs = [ReplayRequest(f"q{i}", 0.1 * i, [5] * 4, n) for i, n in enumerate([5, 3, 7, 2])]
    prompts = {r.request_id: PROMPTS[i] for i, r in enumerate(reqs)}
    set_priority_keys([4.0, 3.0, 2.0, 1.0], request_ids=[r.request_id for r in reqs])
    port = free_port()
    cbc = ContinuousBatchingConfig(num_blocks=32, page_size=16, max_batch_tokens=64)
    with tie_generation_state(cbc, scheduler_type="hf_ext_priority"):
        server = Serve(
            force_model=model_dir,
            continuous_batching=True,
            device="cpu",
            non_blocking=True,
            port=port,
            log_level="warning",
        )
    try:
        _wait_healthy(port)
        recs = replay_over_http(f"http://localhost:{port}", model_dir, reqs, prompts, time_scale=1.0)
    finally:
        server.kill_server()
    assert CONTEXT.last_scheduler_type is PriorityCBScheduler
    assert [r["request_id"] for r in recs] == ["q0", "q1", "q2", "q3"]
    for r, req in zip(recs, reqs):
        assert r["n_tokens"] == r["output_len"] == req.output_len
        assert r["submit"] <= r["first_token"] <= r["finish"]
        assert r["submit"] == pytest.approx(req.arrival, abs=0.08)
    assert summarize_replay(recs)["lengths_ok"] == 1.0
    with pytest.raises(ValueError, match="no non-empty text"):
        replay_over_http(f"http://localhost:{port}", model_dir, reqs, {"q0": "x"})
    with pytest.raises(ValueError, match="unique"):  # records are keyed by request id
        replay_over_http(f"http://localhost:{port}", model_dir, [reqs[0], reqs[0]], prompts)
    with pytest.raises(RuntimeError, match="requests failed over HTTP"):  # the server is gone
        replay_over_http(f"http://localhost:{port}", model_dir, reqs[:1], prompts, time_scale=0)


def test_serve_replay_benchmark_smoke(capsys, tmp_path):
    """benchmarks/tie_serve_replay.py end to end on the tiny model (two fresh servers, HTTP); TIE's server keeps a
    length log whose rows match the replay."""
    from tests.tie._scripts import load_script

    bench = load_script("tie_serve_replay")
    log = tmp_path / "lengths.jsonl"
    argv = [
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--n",
        "12",
        "--speed",
        "20",
        "--no-write",
        "--length-log",
        str(log),
        "--refit-every",
        "10",
        "--scrape-every",
        "0.05",
    ]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("lengths exact True") == 2 and "serve_http_tiny_" in out
    # GET /tie/metrics was scraped during both replays: TIE's scheduler reports its queues, transformers' FIFO none
    fcfs, tie = (json.loads(x.splitlines()[0]) for x in out.split("GET /tie/metrics every 0.05s: ")[1:])
    assert fcfs["scrapes"] >= 1 and tie["scrapes"] >= 1 and fcfs["failed"] == tie["failed"] == 0
    assert fcfs["waiting_max"] is None and tie["waiting_max"] is not None and tie["oldest_waiting_max_s"] >= 0
    text = 'hf_ext_tie_waiting_requests{scheduler="A"} 3\nhf_ext_tie_waiting_requests{scheduler="B"} 2\n'
    text += 'hf_ext_tie_oldest_waiting_seconds{scheduler="A"} 4.5\nhf_ext_tie_oldest_waiting_seconds{scheduler="B"} 9\n'
    assert bench.Scraper.queues(text + 'hf_ext_tie_running_requests{scheduler="A"} 7') == (5, 7, 9.0)
    assert bench.Scraper.queues("hf_ext_tie_info 1") == (None, None, None)
    with pytest.raises(SystemExit, match="--scrape-every must be > 0"):
        bench.main(["--scrape-every", "0", "--no-write"])
    report = json.loads(out.split("  length log: ")[1].splitlines()[0])
    assert report["rows"] == 13 and report["errors"] == 0  # the 12 and the warm-up
    assert report["every_request_once"] and report["lengths_match"]
    assert report["reasons"]["max_new_tokens"] == 13 and report["sources"]["hint"] == 13
    assert len(log.read_text().splitlines()) == 13
    # a third TIE server retrained a predictor on its own log while serving (a refit the shutdown overtook is dropped)
    assert "TIE with refits every 10:" in out and "(TIE without:" in out
    with pytest.raises(SystemExit, match="'tie' and at least one"):
        bench.main(["--policies", "fcfs", "--no-write"])


def test_prompt_texts_match_lengths():
    from hf_ext.testing import tiny_tokenizer
    from tests.tie._scripts import load_script

    bench = load_script("tie_serve_replay")
    tok = tiny_tokenizer()
    want = [1, 17, 300, 1200]
    texts, got = bench.prompt_texts(tok, want, seed=0)
    assert len(set(texts)) == len(texts)
    assert got == [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    assert all(abs(g - w) <= max(2, 0.05 * w) for g, w in zip(got, want))


def test_hf_ext_serve_cli_runs_a_real_server(model_dir, tmp_path):
    """``python -m hf_ext serve MODEL --tie-... --<transformers serve flags>``: the real CLI, until killed; its
    ``--tie-length-log`` file holds the served request."""
    import os
    import signal
    import subprocess
    import sys

    from hf_ext.generation.tie.lengthlog import load_length_log
    from hf_ext.testing import free_port

    port = free_port()
    lengths = tmp_path / "lengths.jsonl"
    cmd = [sys.executable, "-m", "hf_ext", "serve", model_dir, "--tie-beta-max", "0.3", "--tie-aging", "none"]
    cmd += ["--tie-length-log", str(lengths)]
    cmd += ["--device", "cpu", "--port", str(port), "--cb-num-blocks", "64", "--cb-max-batch-tokens", "256"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    exited = False
    try:
        _wait_healthy(port, timeout=120)
        out = _complete(port, model_dir, "hello world", 5, "cli-1")
        assert out["usage"]["completion_tokens"] == 5
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            log = proc.communicate(timeout=30)[0]
            exited = True
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log = proc.communicate()[0]
    # plain `transformers serve --continuous-batching` hangs here: its CB generation thread outlives the server
    assert exited, "hf-ext serve did not exit after Ctrl-C"
    # the prompt-length heuristic (no --tie-predictor) warns that it is in use: the TIE scheduler ran
    assert "falling back to the prompt-length heuristic" in log, log[-2000:]
    rec = load_length_log(lengths).to_list()
    assert len(rec) == 1, rec
    assert rec[0]["request_id"] == "cli-1" and rec[0]["prompt"] == "hello world"
    assert (rec[0]["output_len"], rec[0]["reason"], rec[0]["censored"]) == (5, "max_new_tokens", True)
    assert rec[0]["source"] == "heuristic" and rec[0]["pred_mu"] is not None


def test_serve_tie_logs_served_lengths(model_dir):
    """``serve_tie(length_log=...)``: every served request is recorded with the predictor's text, its length,
    its cap and the law it was scored with; a bad ``length_log`` fails before the server starts."""
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.serve import serve_tie

    jobs = [(p, 3 + i, f"L{i}") for i, p in enumerate(PROMPTS)]
    pred = StubPredictor({PROMPTS[0]: 4.0})
    log = LengthLog()
    with _server(lambda **kw: serve_tie(model_dir, pred, length_log=log, **SMALL_CB, **kw)) as (port, _):
        _complete_all(port, model_dir, jobs)
    recs = {r["request_id"]: r for r in log.records}
    assert sorted(recs) == sorted(r for *_, r in jobs)
    for prompt, n, rid in jobs:
        r = recs[rid]
        assert (r["prompt"], r["output_len"], r["max_new_tokens"], r["censored"]) == (prompt, n, n, True)
        assert r["source"] == "predictor" and r["pred_mu"] == (4.0 if prompt == PROMPTS[0] else 3.0)
    assert sorted(pred.seen) == sorted(PROMPTS)  # predicted once each; the log reused the text
    with pytest.raises(ValueError, match="length_log must be a LengthLog"):
        serve_tie(model_dir, length_log=42, port=1, non_blocking=True)


def test_blocking_serve_tie_stops_the_cb_thread_when_the_server_ends(monkeypatch):
    """Blocking mode: once ``Serve`` returns (the server stopped), ``serve_tie`` stops its CB thread and model
    (``kill_server``); with ``non_blocking=True`` the running server is left to the caller."""
    import inspect

    import transformers.cli.serve as serve_mod

    from hf_ext.generation.tie.serve import serve_tie

    real = serve_mod.Serve
    made: list = []

    class FakeServe:
        def __init__(self, **kwargs):
            self.kwargs, self.killed = kwargs, False
            made.append(self)

        def kill_server(self):
            self.killed = True

    FakeServe.__init__.__signature__ = inspect.signature(real.__init__)  # serve_tie checks argument names
    monkeypatch.setattr(serve_mod, "Serve", FakeServe)
    serve_tie("m", port=1)
    serve_tie("m", port=1, non_blocking=True)
    assert [(s.kwargs["force_model"], s.kwargs["continuous_batching"], s.killed) for s in made] == [
        ("m", True, True),
        ("m", True, False),
    ]


def test_a_bad_prediction_does_not_take_the_server_down(model_dir, caplog):
    """A NaN prediction for one request: it is served (heuristic score, logged), and so is every later request.
    (Raising in the scheduler would kill transformers' CB worker: every later request would get 503.)"""
    import logging

    from hf_ext.generation.tie.serve import serve_tie

    pred = StubPredictor({"bad prompt": float("nan")})
    start = lambda **kw: serve_tie(model_dir, pred, **SMALL_CB, **kw)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="hf_ext"), _server(start) as (port, _):
        outs = [_complete(port, model_dir, p, 3, f"b{i}") for i, p in enumerate(["ok", "bad prompt", "ok 2"])]
    assert [o["usage"]["completion_tokens"] for o in outs] == [3, 3, 3]
    assert "length prediction failed for 1 request(s) ['b1']" in caplog.text


def test_chat_completions_go_through_tie_with_the_users_prompt_text(model_dir):
    """/v1/chat/completions: the scheduler gets the chat-templated ids; the predictor sees the decoded template, or
    what ``prompt_text`` makes of it (here the last user turn, as a predictor trained on raw user text needs)."""
    from hf_ext.generation.tie.serve import serve_tie

    def last_user_turn(ids):
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(model_dir).decode(ids)
        return text.rsplit("<|user|>", 1)[-1].split("\n", 1)[0]

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 times 7?"},
    ]
    for prompt_text, seen in ((None, "<|system|>Be brief."), (last_user_turn, "What is 12 times 7?")):
        pred = StubPredictor()
        start = functools.partial(serve_tie, model_dir, pred, prompt_text=prompt_text, **SMALL_CB)
        with _server(start) as (port, _):
            body = json.dumps({"model": model_dir, "messages": messages, "max_tokens": 4}).encode()
            req = urllib.request.Request(
                f"http://localhost:{port}/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            out = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert out["usage"]["completion_tokens"] == 4
        assert len(pred.seen) == 1
        assert pred.seen[0].startswith(seen) if prompt_text is None else pred.seen[0] == seen


def test_demo_includes_the_http_server():
    """``hf-ext demo tie``: its last step serves the tiny model with TIE (predictor in the loop) over HTTP."""
    import torch

    from hf_ext.generation.tie.demo import run_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = run_demo()
        assert torch.get_num_threads() == 2  # the demo runs on one thread and gives the caller's setting back
    finally:
        torch.set_num_threads(threads)
    assert res.passed and "HTTP served 6/6" in res.key_figure, res.key_figure
    assert "length log 6/6" in res.key_figure


def test_blocking_serve_tie_stops_the_cb_thread_on_ctrl_c(monkeypatch):
    """Ctrl-C in a blocking server comes back as KeyboardInterrupt from ``Serve``: the CB state is still stopped."""
    import inspect

    import transformers.cli.serve as serve_mod
    import transformers.cli.serving.utils as su

    from hf_ext.generation.tie.serve import serve_tie

    real = serve_mod.Serve
    stopped: list = []
    monkeypatch.setattr(su.GenerationState, "shutdown", lambda self: stopped.append(self))

    class InterruptedServe:
        def __init__(self, **kwargs):
            self.state = su.GenerationState(continuous_batching=True)  # what Serve builds, then it serves
            raise KeyboardInterrupt

    InterruptedServe.__init__.__signature__ = inspect.signature(real.__init__)
    monkeypatch.setattr(serve_mod, "Serve", InterruptedServe)
    with pytest.raises(KeyboardInterrupt):
        serve_tie("m", port=1)
    assert len(stopped) == 1 and stopped[0]._cb_config.scheduler_type == "tie"


def test_serve_replay_with_the_predictor_in_the_loop(tmp_path, capsys):
    """benchmarks/tie_serve_replay.py --predictor --prompts: TIE predicts in the server's loop from each request's
    own prompt (the filler after the separator cut off), once per request; FCFS is unchanged."""
    from hf_ext.generation.tie import LengthPredictor, PredictorConfig, generate_workload
    from hf_ext.generation.tie.data import length_pairs
    from tests.tie._scripts import load_script

    pred = LengthPredictor(PredictorConfig.tiny(epochs=1))
    pred.fit(length_pairs(generate_workload(200, seed=0)))
    pred.save_pretrained(tmp_path / "pred")
    own = [r["prompt"] for r in generate_workload(6, seed=5)]
    (tmp_path / "prompts.json").write_text(json.dumps({"meta": {}, "prompts": own}))
    bench = load_script("tie_serve_replay")
    argv = ["--shape", "tiny", "--device", "cpu", "--n", "6", "--speed", "20", "--no-write"]
    argv += ["--predictor", str(tmp_path / "pred"), "--prompts", str(tmp_path / "prompts.json")]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("lengths exact True") == 2 and "_predictor-in-loop" in out
    report = json.loads(out.split("in-loop predictor: ")[1].splitlines()[0])
    assert report["prompts_predicted"] == 6 + 1  # every request once, and the warm-up
    assert report["requests_compared"] == 6
    assert report["max_abs_mu_diff_vs_offline"] < 1e-5  # the server's predictor saw each request's own prompt
    assert np.isclose(
        report["median_abs_mu_diff_vs_replay"],
        np.median([abs(m - r.mu) for m, r in zip(pred.predict(own)["mu"], bench_requests(bench))]),
    )


def bench_requests(bench):
    """The six replay requests the smoke run above used (their replay-JSON predictions)."""
    from tests.tie._scripts import load_script

    return load_script("tie_real_cb").load_requests(str(bench.DEFAULT_WORKLOAD), 6, 1000, 4096, 512, 0)


def test_committed_predictor_and_prompts_match_the_replay():
    """benchmarks/data: the replay's prompt texts (one per request) and the retrained log-t predictor that the
    serve benchmark runs in the loop rank these prompts like the replay's own predictions."""
    from pathlib import Path

    from scipy.stats import spearmanr

    from hf_ext.generation.tie.predictor import LengthPredictor

    data = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
    rows = json.loads((data / "tie_azure_replay_n40k.json").read_text())["requests"]
    prompts = json.loads((data / "tie_azure_replay_prompts.json").read_text())["prompts"]
    assert len(prompts) == len(rows) and all(isinstance(p, str) and p for p in prompts)
    got = LengthPredictor.from_pretrained(str(data / "tie_predictor_logt_n40k")).predict(prompts[:300])
    assert spearmanr(got["mu"], [r["mu"] for r in rows[:300]])[0] > 0.95


def test_serve_tie_retrains_the_predictor_while_serving(model_dir, tmp_path):
    """``serve_tie(length_log=..., refit={...})``: after enough served requests the refresher trains on the log,
    installs the new predictor in the running server, and the next requests are scored by it."""
    from hf_ext.generation.tie.cb import CONTEXT
    from hf_ext.generation.tie.config import PredictorConfig
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.predictor import LengthPredictor
    from hf_ext.generation.tie.serve import serve_tie

    texts = [f"{p} ({i})" for i, p in enumerate(PROMPTS * 3)]
    stale = LengthPredictor(PredictorConfig.tiny(epochs=20))
    # it learned answers of 1-2 tokens; the server's are 2-8
    stale.fit({"prompt": texts, "output_len": [1, 2] * (len(texts) // 2)})
    log = LengthLog()
    # the tiny model has no EOS: every length is cut at max_tokens, so the exact-length guard is switched off
    refit = {"every": 12, "min_records": 12, "save_dir": tmp_path / "p", "min_exact": 0.0}
    start = lambda **kw: serve_tie(model_dir, stale, length_log=log, refit=refit, **SMALL_CB, **kw)  # noqa: E731
    with _server(start) as (port, server):
        ref = server.tie_refresher
        assert ref.running and CONTEXT.predictor is stale
        _complete_all(port, model_dir, [(t, 2 + i % 7, f"a{i}") for i, t in enumerate(texts)])
        t_end = time.time() + 60
        while not ref.history and time.time() < t_end:
            time.sleep(0.1)
        rep = ref.history[0]
        assert rep["count"] == 12 and rep["accepted"], {k: rep[k] for k in ("nll_new", "nll_served")}
        assert CONTEXT.predictor is ref.predictor is not stale
        _complete_all(port, model_dir, [(PROMPTS[1], 3, "b0")])
        stats = json.loads(urllib.request.urlopen(f"http://localhost:{port}/tie/stats", timeout=30).read())
        with urllib.request.urlopen(f"http://localhost:{port}/tie/metrics", timeout=30) as resp:
            content_type, scrape = resp.headers["Content-Type"], resp.read().decode()
        ref.stop()
    # GET /tie/stats: the log's rows and calibration, the refresher's reports (NaN as null)
    assert stats["predictor"] == "LengthPredictor" and stats["config"]["alpha"] == 0.9
    assert stats["length_log"]["count"] == len(log.records) == 13 and stats["length_log"]["errors"] == 0
    assert stats["length_log"]["reasons"]["max_new_tokens"] == stats["length_log"]["window"]
    assert stats["refresher"]["running"] and stats["refresher"]["version"] >= 1
    first = stats["refresher"]["history"][0]
    assert first["accepted"] and first["nll_new"] == pytest.approx(rep["nll_new"])
    # GET /tie/metrics: the same for Prometheus, plus the queues
    from prometheus_client.parser import text_string_to_metric_families

    assert content_type.startswith("text/plain; version=0.0.4")
    got = {
        (s.name, tuple(s.labels.items())): s.value
        for f in text_string_to_metric_families(scrape)
        for s in f.samples
    }
    assert got[("hf_ext_tie_info", (("predictor", "LengthPredictor"),))] == 1
    assert got[("hf_ext_tie_length_log_requests_total", ())] == 13
    assert got[("hf_ext_tie_refresher_version", ())] == stats["refresher"]["version"]
    assert got[("hf_ext_tie_refresher_refits_total", (("outcome", "installed"),))] >= 1
    assert ("hf_ext_tie_waiting_requests", (("scheduler", "TIECBScheduler"),)) in got
    assert ("hf_ext_tie_oldest_waiting_seconds", (("scheduler", "TIECBScheduler"),)) in got
    assert got[("hf_ext_tie_admission_wait_seconds_count", (("scheduler", "TIECBScheduler"),))] >= 13
    after = [r for r in log.records if r["request_id"] == "b0"][0]
    assert after["source"] == "predictor"
    assert after["pred_mu"] == pytest.approx(ref.predictor.predict([PROMPTS[1]])["mu"][0])
    assert after["pred_mu"] > stale.predict([PROMPTS[1]])["mu"][0] + 0.2  # it learned longer answers
    assert (tmp_path / "p" / "v1" / "tie_predictor.json").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"refit": {"every": 5}}, "refit needs length_log"),
        ({"refit": {"every": 0}, "length_log": "x.jsonl"}, "every must be an int >= 1"),
        ({"refit": {"log": None}, "length_log": "x.jsonl"}, "log are set by serve_tie"),
        ({"refit": [5], "length_log": "x.jsonl"}, "refit must be a dict"),
    ],
)
def test_serve_tie_checks_refit_before_any_change(kwargs, match, tmp_path, monkeypatch):
    import transformers.cli.serving.utils as su

    from hf_ext.generation.tie.cb import CONTEXT
    from hf_ext.generation.tie.serve import serve_tie

    monkeypatch.chdir(tmp_path)
    before = (CONTEXT.predictor, CONTEXT.length_log)
    base = su.GenerationState
    with pytest.raises(ValueError, match=match):
        serve_tie("no/such-model", non_blocking=True, **kwargs)
    assert (CONTEXT.predictor, CONTEXT.length_log) == before and su.GenerationState is base
    assert not (tmp_path / "x.jsonl").exists()  # the log was not opened


def test_cli_refit_flags_start_and_stop_a_refresher(monkeypatch, tmp_path, model_dir):
    import transformers.cli.transformers as tcli

    from hf_ext.cli import main
    from hf_ext.generation.tie.cb import CONTEXT

    seen = {}

    def fake_app(args, prog_name=None):
        log = CONTEXT.length_log
        seen["log"], seen["refresher"] = log, log._listeners[0].__self__
        raise SystemExit(0)

    monkeypatch.setattr(tcli, "app", fake_app)
    path = tmp_path / "lengths.jsonl"
    argv = ["serve", model_dir, "--tie-length-log", str(path), "--tie-refit-every", "300"]
    assert main([*argv, "--tie-refit-min", "200", "--tie-refit-dir", str(tmp_path / "p")]) == 0
    ref = seen["refresher"]
    assert (ref.every, ref.min_records, ref.window, ref.save_dir) == (300, 200, None, str(tmp_path / "p"))
    assert not ref.running and seen["log"]._listeners == []  # stopped with the server
    with pytest.raises(SystemExit, match="--tie-refit-every N needs --tie-length-log FILE"):
        main(["serve", model_dir, "--tie-refit-every", "5"])
    with pytest.raises(SystemExit, match="window must be None or an int >= 500"):
        main([*argv, "--tie-refit-window", "10"])


@pytest.mark.parametrize("non_blocking", [True, False])
def test_a_server_that_fails_to_start_leaves_the_tie_context_as_it_was(monkeypatch, tmp_path, non_blocking):
    """``Serve`` raising (e.g. a model that cannot be loaded) used to leave the failed server's predictor, config,
    ``prompt_text`` and its length log, already closed, as the process-wide TIE settings: every later
    ``scheduler_type="tie"`` run scored with them and logged into a closed file."""
    import inspect

    import transformers.cli.serve as serve_mod

    from hf_ext.generation.tie.cb import CONTEXT
    from hf_ext.generation.tie.config import PredictorConfig, TIEConfig
    from hf_ext.generation.tie.serve import _ACTIVE, serve_tie

    real = serve_mod.Serve

    class FailingServe:
        def __init__(self, **kwargs):
            raise OSError("cannot load the model")

    FailingServe.__init__.__signature__ = inspect.signature(real.__init__)
    monkeypatch.setattr(serve_mod, "Serve", FailingServe)
    before = (CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.length_log, CONTEXT.config)
    with pytest.raises(OSError, match="cannot load the model"):
        serve_tie(
            "m",
            StubPredictor(),
            config=TIEConfig(beta_max=0.2),
            prompt_text=lambda ids: "x",
            length_log=tmp_path / "lengths.jsonl",
            refit={"every": 1000, "config": PredictorConfig.tiny()},
            non_blocking=non_blocking,
        )
    after = (CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.length_log, CONTEXT.config)
    assert all(a is b for a, b in zip(after, before))
    assert _ACTIVE["refresher"] is None


@pytest.mark.parametrize("how", ["serve_tie", "hf-ext serve"])
def test_a_server_that_ends_normally_leaves_the_tie_context_as_it_was(monkeypatch, tmp_path, model_dir, how):
    """A blocking ``serve_tie`` / ``hf-ext serve`` that ended without error used to leave its predictor, config,
    ``prompt_text`` and its closed length log as the process-wide TIE settings: a later ``scheduler_type="tie"``
    run in the process scored with them and logged into a closed file. The caller's settings now come back."""
    import inspect

    import transformers.cli.serve as serve_mod
    import transformers.cli.transformers as tcli

    from hf_ext.cli import main
    from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.serve import _ACTIVE, serve_tie

    def settings():
        return (CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.prompt_text, CONTEXT.length_log, CONTEXT.config)

    mine = LengthLog()
    enable_tie_scheduler(
        StubPredictor(), prompt_text=lambda ids: "mine", config=TIEConfig(alpha=0.8), length_log=mine
    )
    before = settings()
    seen = {}

    class FakeServe:  # a server that serves, then stops normally
        def __init__(self, **kwargs):
            seen["during"] = settings()

        def kill_server(self):
            pass

    def fake_app(args, prog_name=None):
        seen["during"] = settings()
        raise SystemExit(0)

    path = tmp_path / "lengths.jsonl"
    if how == "serve_tie":
        FakeServe.__init__.__signature__ = inspect.signature(serve_mod.Serve.__init__)
        monkeypatch.setattr(serve_mod, "Serve", FakeServe)
        pred = StubPredictor()
        serve_tie("m", pred, config=TIEConfig(beta_max=0.2), prompt_text=lambda ids: "x", length_log=path)
    else:
        monkeypatch.setattr(tcli, "app", fake_app)
        assert main(["serve", model_dir, "--tie-beta-max", "0.2", "--tie-length-log", str(path)]) == 0
    during = seen["during"]
    assert during[4] == TIEConfig(beta_max=0.2) and during[3] is not mine and during[3].path == str(path)
    assert during[3]._fh is None  # the server's log was closed when it ended
    assert all(a is b for a, b in zip(settings(), before))  # not the server's (closed) log and config
    assert _ACTIVE["refresher"] is None
