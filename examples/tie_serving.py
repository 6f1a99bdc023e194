"""TIE serving example: train a length predictor, then serve a burst with transformers continuous batching.

CPU as-is (tiny random Llama + local tokenizer, ~30 s):

    python examples/tie_serving.py

Real model (GPU; the predictor is still trained on the synthetic workload unless you pass your own
(prompt, output_len) JSONL with --train-jsonl):

    python examples/tie_serving.py --model meta-llama/Llama-3.1-8B-Instruct --n-prompts 256 --max-new-tokens 512

The script compares FIFO with ``scheduler_type="tie"`` on the same burst and prints the mean per-token
latency of each (end-to-end latency / generated tokens). Then it runs the prompts as an offline job of
``generate`` calls on padded batches (``--offline-batch`` rows, or ``--offline-kv-tokens``: each batch as wide as
that KV budget allows), in the given order, cut from the TIE order (``tie_batched_generate``) and planned from the
predicted laws (``plan="expected"``: prompts grouped by length, batches cut where the expected decode steps are
least), and prints tokens/s of each. The tiny random model meets EOS by chance, so there
its lengths carry no signal for the predictor; with a real model the TIE order wastes fewer padded steps.

With ``--length-log FILE`` the TIE run records every request's prompt and output length (exact, or cut at
``--max-new-tokens``) to a JSONL length log, and prints how well the predictor's laws matched; train on such a log
with ``--train-jsonl FILE``: its cut rows are lower bounds (``fit(..., censored_column="censored")``).

With ``--http`` it finally serves the model with ``transformers serve`` and the TIE scheduler (``serve_tie``; from
the shell: ``hf-ext serve MODEL --tie-predictor DIR``) and sends the prompts with the OpenAI client. Adding
``--refit-every N`` keeps a length log in the server and a ``PredictorRefresher`` retraining the predictor on it
every N requests (``hf-ext serve ... --tie-length-log FILE --tie-refit-every N``); the prompts are sent in rounds
until it has refitted once, and its report is printed, then a few lines of the server's ``GET /tie/metrics``
(Prometheus text format).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model id/path (default: tiny random Llama, CPU)")
    ap.add_argument("--n-train", type=int, default=1500, help="synthetic training prompts for the predictor")
    ap.add_argument(
        "--train-jsonl",
        default=None,
        help="JSONL with {prompt, output_len} pairs to train on; a --length-log file (its cut rows are censored)",
    )
    ap.add_argument(
        "--length-log", default=None, help="record the TIE run's lengths to this JSONL length log"
    )
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--save", default=None, help="directory to save the trained predictor")
    ap.add_argument("--offline-batch", type=int, default=8, help="rows per generate call in the offline job")
    ap.add_argument(
        "--offline-kv-tokens",
        type=int,
        default=0,
        help="size every offline batch from this KV budget in tokens instead of --offline-batch (0 = off)",
    )
    ap.add_argument(
        "--http",
        action="store_true",
        help="also serve the model with transformers serve + TIE (serve_tie) and send the prompts over HTTP "
        "(needs pip install 'hf-ext[serve]')",
    )
    ap.add_argument(
        "--refit-every",
        type=int,
        default=None,
        metavar="N",
        help="with --http: retrain the predictor on the server's length log every N requests (N >= 10)",
    )
    args = ap.parse_args()
    if args.refit_every is not None and (not args.http or args.refit_every < 10):
        ap.error("--refit-every N needs --http and N >= 10")

    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie import (
        LengthLog,
        LengthPredictor,
        PredictorConfig,
        TIEConfig,
        generate_workload,
        memory_batches,
        static_batches,
        tie_batched_generate,
    )
    from hf_ext.generation.tie.cb import tie_generate_batch

    torch.set_num_threads(2)
    # 1. the length predictor: (prompt, observed output length) pairs -> log-t (mu, sigma)
    if args.train_jsonl:
        with open(args.train_jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = generate_workload(args.n_train, seed=0)
    train = {"prompt": [r["prompt"] for r in rows], "output_len": [int(r["output_len"]) for r in rows]}
    censored = all("censored" in r for r in rows)  # a length log: cut rows are lower bounds
    if censored:
        train["censored"] = [bool(r["censored"]) for r in rows]
    pred = LengthPredictor(PredictorConfig(epochs=args.epochs))
    t0 = time.perf_counter()
    pred.fit(train, censored_column="censored" if censored else None)
    cut = f" ({sum(train['censored'])} cut rows as lower bounds)" if censored else ""
    print(f"predictor trained on {len(rows)} pairs{cut} in {time.perf_counter() - t0:.1f}s")
    if args.save:
        pred.save_pretrained(args.save)

    # 2. the served model
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="auto")
        eos = tok.eos_token_id
    else:
        from hf_ext.testing import tiny_llama, tiny_tokenizer

        tok, model = tiny_tokenizer(), tiny_llama()
        eos = -1  # random weights: generate exactly max_new_tokens

    prompts = [r["prompt"] for r in generate_workload(args.n_prompts, seed=1)]
    gc = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id or 0,
    )
    cb = ContinuousBatchingConfig(max_requests_per_batch=4) if not args.model else ContinuousBatchingConfig()
    if not args.model:
        cb.num_blocks, cb.page_size, cb.max_batch_tokens = 64, 16, 256

    # 3. FIFO vs TIE on the same burst (the TIE run optionally recording a length log)
    log = LengthLog(args.length_log) if args.length_log else None
    for name in ("fifo", "tie"):
        t0 = time.perf_counter()
        if name == "fifo":
            ids = [tok(p).input_ids for p in prompts]
            out = model.generate_batch(ids, generation_config=gc, continuous_batching_config=cb)
        else:
            out = tie_generate_batch(
                model,
                prompts,
                tok,
                pred,
                generation_config=gc,
                continuous_batching_config=cb,
                config=TIEConfig(max_new_tokens=args.max_new_tokens),
                length_log=log,
            )
        wall = time.perf_counter() - t0
        ptl = [(o.lifespan[1] - o.created_time) / max(1, len(o.generated_tokens)) for o in out.values()]
        print(
            f"{name:>4}: {len(out)} requests in {wall:.1f}s, mean per-token latency {np.mean(ptl) * 1e3:.2f} ms"
        )

    if log is not None:
        log.close()
        cal = log.calibration()
        cut = sum(r["censored"] for r in log.records)
        print(
            f"length log: {len(log)} requests -> {args.length_log} ({cut} cut at max_new_tokens); predicted laws: "
            f"NLL {cal['nll']:.2f}, {cal['above_q0.9']:.0%} above their 95th percentile (calibrated: 5%)"
        )

    # 4. the same prompts as an offline job: generate on padded batches, given order vs TIE order
    from transformers import GenerationConfig as _GC  # noqa: N814

    from hf_ext.generation.tie.offline import trim_at_eos

    gc_off = _GC(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    stop = {tok.eos_token_id}  # generate stops at the model's EOS (random models sample it by chance)
    kv = args.offline_kv_tokens
    sizing = {"kv_tokens": kv} if kv else {"batch_size": args.offline_batch}  # the same for both orders
    given = list(range(len(prompts)))
    if kv:
        plen = [len(ids) for ids in tok(prompts)["input_ids"]]
        given_batches = memory_batches(given, plen, kv, args.max_new_tokens)
    else:
        given_batches = static_batches(given, args.offline_batch)
    for name in ("given order", "TIE order", "TIE planned"):
        t0 = time.perf_counter()
        if name != "given order":
            plan = "expected" if name == "TIE planned" else "order"
            outs = tie_batched_generate(
                model, tok, prompts, pred, generation_config=gc_off, plan=plan, **sizing
            )
        else:
            outs, tok.padding_side = [], "left"
            for b in given_batches:
                enc = tok([prompts[i] for i in b], return_tensors="pt", padding=True).to(model.device)
                seq = model.generate(**enc, generation_config=gc_off)
                outs += [trim_at_eos(row, stop) for row in seq[:, enc["input_ids"].shape[1] :].tolist()]
        wall = time.perf_counter() - t0
        n_tok = sum(len(o) for o in outs)
        print(f"offline, {name:>11}: {n_tok} tokens in {wall:.1f}s ({n_tok / wall:.0f} tokens/s)")

    # 5. over HTTP: transformers serve with the TIE scheduler, the burst sent with the OpenAI client
    if args.http:
        serve_over_http(args, model, tok, pred, prompts)


def serve_over_http(args: argparse.Namespace, model, tok, pred, prompts: list[str]) -> None:
    """``serve_tie`` runs ``transformers serve`` (continuous batching, TIE admission); the OpenAI client sends the
    prompts at once. The shell equivalent: ``hf-ext serve MODEL --tie-predictor DIR --port 8000``."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    from transformers import GenerationConfig

    from hf_ext.generation.tie import LengthLog, TIEConfig, serve_tie
    from hf_ext.generation.tie.serve import wait_until_serving
    from hf_ext.testing import free_port

    with tempfile.TemporaryDirectory() as tmp:
        served, flags = args.model, {}
        if not served:  # the tiny random model, saved for the server; no EOS, so each answer has max_tokens
            model.generation_config = GenerationConfig(do_sample=False, pad_token_id=0)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            served, flags = tmp, {"device": "cpu", "cb_num_blocks": 64, "cb_max_batch_tokens": 256}
        port = free_port()
        config = TIEConfig(max_new_tokens=args.max_new_tokens)
        if args.refit_every is not None:  # a length log in memory, a refresher retraining on it
            refit = {"every": args.refit_every, "min_records": args.refit_every}
            if not args.model:  # the tiny model has no EOS: every length is cut at max_tokens (see min_exact)
                refit["min_exact"] = 0.0
            flags.update(length_log=LengthLog(), refit=refit)
        server = serve_tie(
            served, pred, config=config, port=port, non_blocking=True, log_level="warning", **flags
        )
        try:
            wait_until_serving(f"http://localhost:{port}")  # the server preloads the model first
            client = OpenAI(base_url=f"http://localhost:{port}/v1", api_key="unused")

            def one(prompt: str) -> tuple[float, int]:
                t = time.perf_counter()
                r = client.completions.create(model=served, prompt=prompt, max_tokens=args.max_new_tokens)
                return time.perf_counter() - t, r.usage.completion_tokens

            refresher = server.tie_refresher
            with ThreadPoolExecutor(len(prompts)) as pool:
                done = list(pool.map(one, prompts))
                for _ in range(30):  # with a refresher: more rounds until it has refitted once
                    if refresher is None or refresher.history:
                        break
                    done += list(pool.map(one, prompts))
                    time.sleep(1.0)
            # what a Prometheus scrape job reads (GET /tie/stats has the same as JSON)
            with urllib.request.urlopen(f"http://localhost:{port}/tie/metrics", timeout=30) as resp:
                scrape = resp.read().decode()
        finally:
            if refresher is not None:
                refresher.stop()
            server.kill_server()
        for rep in refresher.history if refresher is not None else []:
            print(
                f"http tie: refresher after {rep['count']} requests: "
                + (
                    f"held-out NLL {rep['nll_new']:.3f} new vs {rep['nll_served']:.3f} served, "
                    + (f"installed v{rep['version']}" if rep["accepted"] else "kept the served predictor")
                    if "nll_new" in rep
                    else str(rep.get("skipped") or rep.get("error"))
                )
            )
    print("http tie: GET /tie/metrics (Prometheus text format):")
    for line in scrape.splitlines():
        if line.startswith(("hf_ext_tie_info", "hf_ext_tie_length_log_requests", "hf_ext_tie_refresher_")):
            print(f"    {line}")
    ptl = [wall / max(1, n) for wall, n in done]
    print(
        f"http tie: {len(done)} requests over HTTP, {sum(n for _, n in done)} tokens, "
        f"mean per-token latency {np.mean(ptl) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
