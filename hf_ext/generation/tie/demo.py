"""TIE demo (CPU, seconds): train a tiny log-t predictor, schedule a trace in the simulator, run real CB and serve.

Checks its own result: the predictor beats a constant log-t in held-out NLL, TIE beats FCFS in mean
per-token latency on an overloaded synthetic stream, ``scheduler_type="tie"`` generates the same
tokens as FIFO with transformers continuous batching on a tiny Llama, and (with transformers' serving extras)
``transformers serve`` with TIE and the predictor in the loop answers every prompt over HTTP.
"""

from __future__ import annotations

import warnings

import numpy as np

from hf_ext.utils.demo import DemoResult


def run_demo() -> DemoResult:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and repeatable; restored for the caller
    try:
        return _run_demo()
    finally:
        torch.set_num_threads(threads)


def _run_demo() -> DemoResult:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie.cb import clear_length_hints, enable_tie_scheduler, set_length_hints
    from hf_ext.generation.tie.config import PredictorConfig, TIEConfig
    from hf_ext.generation.tie.data import generate_workload, length_pairs
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.predictor import LengthPredictor, constant_logt_baseline, logt_scores
    from hf_ext.generation.tie.scheduler import TIEScheduler, annotate_requests
    from hf_ext.simulate import FCFS, CostModel, Request, SimConfig, Simulator
    from hf_ext.testing import tiny_llama, tiny_tokenizer

    train, test = generate_workload(640, seed=1), generate_workload(300, seed=2)
    pred = LengthPredictor(PredictorConfig.tiny())
    pred.fit(length_pairs(train))
    nll = pred.evaluate(length_pairs(test))["nll"]
    mu0, s0, nu0 = constant_logt_baseline([r["output_len"] for r in train])
    nll0 = logt_scores([r["output_len"] for r in test], mu0, s0, nu0)["nll"]

    # overloaded stream in the shared simulator (8 slots, 50 tokens/s each)
    rng = np.random.default_rng(0)
    arr = np.cumsum(rng.exponential(0.3, len(test)))

    def reqs() -> list:
        return [
            Request(
                id=i,
                arrival=float(arr[i]),
                prompt_len=64,
                output_len=r["output_len"],
                prompt=r["prompt"],
                max_new_tokens=1000,
            )
            for i, r in enumerate(test)
        ]

    base = reqs()
    annotate_requests(base, pred)
    res = {}
    for name, sch in (("fcfs", FCFS()), ("tie", TIEScheduler(TIEConfig(max_new_tokens=1000)))):
        rs = reqs()
        for r, b in zip(rs, base):
            r.meta.update(b.meta)
        res[name] = Simulator(CostModel.constant(0.02), sch, SimConfig(max_num_seqs=8)).run(rs).summary()
    speedup = res["fcfs"]["per_token_mean"] / res["tie"]["per_token_mean"]

    # real continuous batching with scheduler_type="tie" on a tiny Llama
    tok, model = tiny_tokenizer(), tiny_llama()
    prompts = [r["prompt"] for r in test[:6]]
    ids = [tok(p).input_ids for p in prompts]
    gc = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)

    def cb(kind: str) -> ContinuousBatchingConfig:
        return ContinuousBatchingConfig(
            num_blocks=16, page_size=16, max_batch_tokens=64, max_requests_per_batch=2, scheduler_type=kind
        )

    fifo = model.generate_batch(ids, generation_config=gc, continuous_batching_config=cb("fifo"))
    log = LengthLog()  # what a server would train its next predictor on
    enable_tie_scheduler(None, tok, length_log=log)
    p = pred.predict(prompts)
    set_length_hints(ids, p["mu"], p["sigma"], p["nu"], source="predictor")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tie = model.generate_batch(ids, generation_config=gc, continuous_batching_config=cb("tie"))
    finally:
        clear_length_hints()
        enable_tie_scheduler()  # the log stops here
    logged = len(log) == len(prompts) and sorted(r["request_id"] for r in log.records) == sorted(tie)
    same = list(tie) == list(fifo) and all(tie[k].generated_tokens == fifo[k].generated_tokens for k in fifo)
    served = _serve_over_http(model, tok, pred, prompts)
    http = (
        "HTTP: skipped (pip install 'hf-ext[serve]')"
        if served is None
        else f"HTTP served {served}/{len(prompts)}"
    )
    passed = bool(nll < nll0 and speedup > 1.2 and same and logged and served in (None, len(prompts)))
    return DemoResult(
        what="tiny log-t predictor -> TIE in simulator + transformers CB and transformers serve (tiny Llama)",
        key_figure=f"NLL {nll:.2f} vs const {nll0:.2f}; per-token latency {speedup:.2f}x vs FCFS; "
        f"CB tokens == FIFO: {same}; length log {len(log)}/{len(prompts)}; {http}",
        passed=passed,
    )


def _serve_over_http(model: object, tok: object, pred: object, prompts: list[str]) -> int | None:
    """``serve_tie`` on the tiny model with the predictor in the loop; the prompts sent at once over HTTP. Returns
    how many came back with exactly the tokens asked for (``None``: transformers' serving extras are missing)."""
    import logging
    import tempfile

    from hf_ext.generation.tie.cb import preserved_context
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.replay import ReplayRequest
    from hf_ext.generation.tie.serve import replay_over_http, require_serving, serve_tie, wait_until_serving
    from hf_ext.testing import free_port, save_for_serving

    try:
        require_serving()
    except ImportError:
        return None
    n_new = 6
    with tempfile.TemporaryDirectory(prefix="tie_demo_") as path, preserved_context():
        save_for_serving(model, tok, path)
        port = free_port()
        server = serve_tie(
            path,
            pred,
            config=TIEConfig(max_new_tokens=n_new),
            port=port,
            device="cpu",
            non_blocking=True,
            log_level="warning",
            cb_num_blocks=64,
            cb_max_batch_tokens=256,
        )
        quiet = {
            n: logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "uvicorn.error", "transformers")
        }
        levels = {n: lg.level for n, lg in quiet.items()}
        for lg in quiet.values():  # the demo prints a table, not the server's request log
            lg.setLevel(logging.ERROR)
        try:
            wait_until_serving(f"http://localhost:{port}", timeout=120)
            reqs = [ReplayRequest(f"demo{i}", 0.0, [1], n_new) for i in range(len(prompts))]
            texts = {r.request_id: p for r, p in zip(reqs, prompts)}
            recs = replay_over_http(f"http://localhost:{port}", path, reqs, texts, time_scale=0)
        finally:
            server.kill_server()
            for n, lg in quiet.items():
                lg.setLevel(levels[n])
    return sum(r["n_tokens"] == n_new for r in recs)
