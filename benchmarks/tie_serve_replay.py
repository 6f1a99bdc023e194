"""TIE end to end through ``transformers serve``: the Azure-trace replay sent over HTTP to the OpenAI-compatible server.

``tie_real_cb.py`` drives transformers' continuous-batching manager directly. This script measures what a user of
``hf-ext serve`` / :func:`~hf_ext.generation.tie.serve.serve_tie` gets: for each policy a fresh ``transformers
serve`` (continuous batching, the policy's scheduler through :func:`tie_generation_state`) preloads a random-weight
model saved to disk, and every request is a streamed ``/v1/completions`` call posted at its (scaled) trace arrival
time, with ``max_tokens`` = its trace output length (the model has no EOS, so the length is exact) and its request
id in ``X-Request-ID``, under which the TIE hints / baseline keys of the exported replay are set. Per-token latency
and TTFT are the client's (submit, first streamed text, end of stream). Prompts are random text of about the
trace's prompt length in the served tokenizer.

GPU (8B shape, ~16 GB written to ``--model-dir`` once)::

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/tie_serve_replay.py --shape llama3.1-8b --n 200 --speed 2 \\
        --policies fcfs,tie --max-requests-per-batch 32 --cuda-graph

CPU smoke run (tiny model, ~1 minute)::

    python benchmarks/tie_serve_replay.py --shape tiny --device cpu --n 16 --speed 8 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKLOAD = ROOT / "benchmarks" / "data" / "tie_azure_replay_n40k.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="JSON from bench tie --export-replay")
    p.add_argument(
        "--shape", default="llama3.1-8b", help="random-weight model shape (hf_ext.simulate.calibrate)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--model-dir", default=None, help="where the random model is saved (default: a temp dir)")
    p.add_argument("--n", type=int, default=200, help="requests replayed per policy (first n of the window)")
    p.add_argument(
        "--speed", type=float, default=2.0, help="trace time-compression factor (x2 = twice its rate)"
    )
    p.add_argument("--policies", default="fcfs,tie", help="comma list of: fcfs, tie, ssjf, ltr, sjf_oracle")
    p.add_argument("--max-requests-per-batch", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=1000, help="output lengths are clipped to this")
    p.add_argument("--max-prompt", type=int, default=4096, help="prompt lengths are clipped to this")
    p.add_argument("--cuda-graph", action="store_true", help="let transformers use CUDA graphs")
    p.add_argument(
        "--predictor",
        default=None,
        help="saved logt predictor: TIE predicts in the server's loop from the prompt texts (--prompts) instead of "
        "taking the replay's predictions by request id",
    )
    p.add_argument("--prompts", default=None, help="with --predictor: JSON of tie_export_prompts.py")
    p.add_argument(
        "--length-log",
        default=None,
        metavar="FILE",
        help="TIE's server records a LengthLog there (JSONL; a TIE run's log replaces the file); its rows are checked "
        "against the replay and summarised in the details JSON",
    )
    p.add_argument(
        "--refit-every",
        type=int,
        default=None,
        metavar="N",
        help="after the policies, run TIE once more with a PredictorRefresher retraining a predictor on the server's "
        "length log every N finished requests, in the server's process (rows: case _refit<N>, against TIE without)",
    )
    p.add_argument(
        "--scrape-every",
        type=float,
        default=None,
        metavar="S",
        help="GET /tie/metrics every S seconds during each replay (a Prometheus scrape): the waiting and running "
        "requests over time go to the details JSON and tie_serve_queues_<case>.png, with each scrape's latency",
    )
    p.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    return p


def prompt_texts(tok: Any, lengths: list[int], seed: int) -> tuple[list[str], list[int]]:
    """Random text whose encoding by ``tok`` has about each length (no special tokens); returns texts and lengths.

    Random token ids, decoded: distinct prompts, so no request reuses another's KV blocks."""
    rng = np.random.default_rng(seed)
    special = set(tok.all_special_ids)
    pool = np.array([i for i in range(len(tok)) if i not in special])
    texts, got = [], []
    for n in lengths:
        ids = rng.choice(pool, size=n).tolist()
        text = tok.decode(ids)
        for _ in range(4):  # decode/encode does not round-trip exactly: trim or extend towards n
            k = len(tok(text, add_special_tokens=False).input_ids)
            if k == n:
                break
            ids = ids[: max(1, len(ids) - (k - n))] if k > n else ids + rng.choice(pool, size=n - k).tolist()
            text = tok.decode(ids)
        texts.append(text)
        got.append(len(tok(text, add_special_tokens=False).input_ids))
    return texts, got


SEPARATOR = "\n\n### attached\n"  # what follows it is filler to the trace's prompt length


class InLoopPredictor:
    """The saved predictor as the server's scheduler calls it, timed, with what it was asked and answered."""

    kind = "logt"

    def __init__(self, path: str, tok: Any) -> None:
        from hf_ext.generation.tie.predictor import LengthPredictor

        self.inner = LengthPredictor.from_pretrained(path)
        self.tok = tok
        self.calls: list[tuple[int, float]] = []  # (prompts, seconds) per call
        self.text_seconds = 0.0
        self.mu: dict[str, float] = {}

    def prompt_text(self, ids: list[int]) -> str:
        """The request's own prompt: the served ids decoded, the filler after :data:`SEPARATOR` cut off."""
        t = time.perf_counter()
        text = self.tok.decode(ids, skip_special_tokens=True).split(SEPARATOR, 1)[0]
        self.text_seconds += time.perf_counter() - t
        return text

    def predict(self, prompts: list[str], batch_size: int = 256) -> dict[str, Any]:
        t = time.perf_counter()
        out = self.inner.predict(prompts, batch_size=batch_size)
        self.calls.append((len(prompts), time.perf_counter() - t))
        self.mu.update(zip(prompts, (float(m) for m in out["mu"])))
        return out

    def report(self, reqs: list[Any], texts: dict[str, str]) -> dict[str, Any]:
        """Call counts and seconds; the in-loop ``mu`` against this predictor run offline on each request's own
        prompt (the text path: should agree to float precision) and against the replay JSON's ``mu``."""
        from scipy.stats import spearmanr

        seen = [r for r in reqs if texts[r.request_id] in self.mu]
        in_loop = np.array([self.mu[texts[r.request_id]] for r in seen])
        offline = np.asarray(self.inner.predict([texts[r.request_id] for r in seen])["mu"], dtype=np.float64)
        replay = np.array([r.mu for r in seen])
        return {
            "predict_calls": len(self.calls),
            "prompts_predicted": int(sum(n for n, _ in self.calls)),
            "predict_seconds": float(sum(s for _, s in self.calls)),
            "prompt_text_seconds": self.text_seconds,
            "max_batch": int(max((n for n, _ in self.calls), default=0)),
            "requests_compared": len(seen),
            "max_abs_mu_diff_vs_offline": float(np.max(np.abs(in_loop - offline))) if seen else float("nan"),
            "median_abs_mu_diff_vs_replay": float(np.median(np.abs(in_loop - replay)))
            if seen
            else float("nan"),
            "spearman_mu_vs_replay": float(spearmanr(in_loop, replay).statistic)
            if len(seen) > 2
            else float("nan"),
        }


def texts_with_filler(tok: Any, own: list[str], lengths: list[int], seed: int) -> tuple[list[str], list[int]]:
    """Each request's own prompt, then :data:`SEPARATOR` and random filler up to about its trace prompt length."""
    head = [len(tok(t + SEPARATOR, add_special_tokens=False).input_ids) for t in own]
    filler, _ = prompt_texts(tok, [max(1, n - h) for n, h in zip(lengths, head)], seed)
    texts = [t + SEPARATOR + f for t, f in zip(own, filler)]
    return texts, [len(tok(t, add_special_tokens=False).input_ids) for t in texts]


def save_model(shape: str, device: str, out: Path, seed: int) -> Any:
    """The random-weight model of ``shape`` with the tiny tokenizer, saved for the server; EOS off."""
    import torch

    from hf_ext.simulate.calibrate import model_for_shape
    from hf_ext.testing import save_for_serving, tiny_tokenizer

    tok = tiny_tokenizer()
    if not (out / "config.json").exists():
        model = model_for_shape(shape, device, seed=seed)
        save_for_serving(model, tok, out)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return tok


class Scraper:
    """Scrapes ``url``/tie/metrics every ``every`` seconds in a thread while a replay runs, as Prometheus would.

    Attributes:
        samples: one per scrape: ``t`` (seconds since start), ``waiting`` / ``running`` (summed over the live
            schedulers; ``None`` when the server reports no queue: transformers' own FIFO scheduler), ``ms`` (the
            scrape's latency), ``ok``.
    """

    def __init__(self, url: str, every: float) -> None:
        import threading

        self.url, self.every = url + "/tie/metrics", every
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tie-metrics-scraper", daemon=True)

    @staticmethod
    def queues(text: str) -> tuple[int | None, int | None, float | None]:
        """Waiting and running requests summed over the ``scheduler`` labels of a scrape, and the longest wait of
        the requests waiting (the max over them)."""
        got: dict[str, float] = {}
        for line in text.splitlines():
            for fam in ("waiting_requests", "running_requests", "oldest_waiting_seconds"):
                if line.startswith(f"hf_ext_tie_{fam}{{"):
                    v = float(line.rsplit(" ", 1)[1])
                    # queue sizes add up over the schedulers; the longest wait is the largest of theirs
                    got[fam] = max(got.get(fam, v), v) if fam.startswith("oldest") else got.get(fam, 0) + v
        w, r = got.get("waiting_requests"), got.get("running_requests")
        return (
            (None if w is None else int(w)),
            (None if r is None else int(r)),
            got.get("oldest_waiting_seconds"),
        )

    def _run(self) -> None:
        import urllib.request

        t0 = time.perf_counter()
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as resp:
                    waiting, running, oldest = self.queues(resp.read().decode())
                ok = True
            except OSError:
                waiting = running = oldest = None
                ok = False
            ms = (time.perf_counter() - t) * 1e3
            self.samples.append(
                {"t": t - t0, "waiting": waiting, "running": running, "oldest_s": oldest, "ms": ms, "ok": ok}
            )
            self._stop.wait(max(0.0, self.every - (time.perf_counter() - t)))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Scrape count, failures, latency (median, p99) and the waiting queue (max, mean) of ``samples``."""
        ms = np.array([s["ms"] for s in samples if s["ok"]])
        waiting = [s["waiting"] for s in samples if s["waiting"] is not None]
        return {
            "scrapes": len(samples),
            "failed": sum(not s["ok"] for s in samples),
            "ms_median": float(np.median(ms)) if len(ms) else None,
            "ms_p99": float(np.percentile(ms, 99)) if len(ms) else None,
            "waiting_max": max(waiting) if waiting else None,
            "waiting_mean": float(np.mean(waiting)) if waiting else None,
            "oldest_waiting_max_s": max(
                (s["oldest_s"] for s in samples if s.get("oldest_s") is not None), default=None
            ),
        }


def plot_queues(path: Path, case: str, series: dict[str, list[dict[str, Any]]]) -> None:
    """Waiting requests and the longest wait over the replay, one line per policy that reports its queue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for policy, samples in series.items():
        for ax, key in zip(axes, ("waiting", "oldest_s")):
            pts = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=policy)
    axes[0].set_ylabel("waiting requests")
    axes[1].set_ylabel("longest wait of those waiting (s)")
    for ax in axes:
        ax.set_xlabel("seconds into the replay (GET /tie/metrics)")
        ax.legend()
    fig.suptitle(case, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_policy(
    args: argparse.Namespace,
    model_dir: str,
    reqs: list[Any],
    prompts: dict[str, str],
    policy: str,
    in_loop: InLoopPredictor | None = None,
    log: Any = None,
    tok: Any = None,
    refit_every: int | None = None,
    refits: list | None = None,
    scrapes: dict | None = None,
):
    """One fresh server with ``policy``'s scheduler; a warm-up request, then the timed replay. Returns records.

    With ``in_loop``, TIE predicts each request in the server's scheduling loop from its text instead of taking the
    replay's prediction by request id. With ``log`` (a ``LengthLog``), TIE's scheduler records every request there
    (text from ``in_loop``'s ``prompt_text``, else decoded with ``tok``). With ``refit_every`` (needs ``log``), a
    :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` retrains on that log while the replay runs; its reports
    are appended to ``refits``. With ``args.scrape_every``, a :class:`Scraper` reads ``GET /tie/metrics`` during the
    replay; ``scrapes`` gets its samples and the text of one more scrape after the replay (``"final"``: the
    admission-wait histogram of the whole run)."""
    from transformers import ContinuousBatchingConfig
    from transformers.cli.serve import Serve

    from hf_ext.generation.tie.cb import preserved_context
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.replay import ReplayRequest, _install
    from hf_ext.generation.tie.serve import replay_over_http, tie_generation_state, wait_until_serving
    from hf_ext.testing import free_port

    cb_kw: dict[str, Any] = {"max_requests_per_batch": args.max_requests_per_batch}
    if args.device == "cpu":
        cb_kw.update(num_blocks=256, page_size=16, max_batch_tokens=256)
    else:
        cb_kw.update(max_memory_percent=0.75, use_cuda_graph=bool(args.cuda_graph))
    port = args.port or free_port()
    url = f"http://localhost:{port}"
    warm = ReplayRequest("warmup", 0.0, [5] * 8, 8, mu=2.0, sigma=0.5, pred_len=8.0, ltr_score=0.0)
    # each request's max_tokens is its true length here: TIE must not truncate its law there
    tie_cfg = TIEConfig(max_new_tokens=args.max_new_tokens, use_request_cap=False)
    with preserved_context():
        from hf_ext.generation.tie.cb import enable_tie_scheduler

        if in_loop is not None and policy == "tie":
            enable_tie_scheduler(in_loop, None, tie_cfg, prompt_text=in_loop.prompt_text, length_log=log)
            scheduler = "tie"
        else:
            scheduler = _install(policy, [warm, *reqs], tie_cfg)
            if log is not None and policy == "tie":  # the hints stay; the scheduler also gets the log
                enable_tie_scheduler(None, tok, tie_cfg, length_log=log)
        with tie_generation_state(ContinuousBatchingConfig(**cb_kw), scheduler_type=scheduler):
            server = Serve(
                force_model=model_dir,
                continuous_batching=True,
                device=args.device,
                non_blocking=True,
                port=port,
                log_level="warning",
            )
        refresher = None
        try:
            wait_until_serving(url)
            replay_over_http(url, model_dir, [warm], {"warmup": "hello world"})
            if refit_every is not None:
                from hf_ext.generation.tie.refresh import PredictorRefresher

                served = in_loop.inner if in_loop is not None else None
                # the random model has no EOS (every length is cut at max_tokens): the exact-length guard is off
                refresher = PredictorRefresher(
                    log, served, every=refit_every, min_records=refit_every, min_exact=0.0
                ).start()
            scraper = Scraper(url, args.scrape_every) if args.scrape_every else contextlib.nullcontext()
            with scraper:
                out = replay_over_http(
                    url, model_dir, reqs, prompts, time_scale=1.0 / args.speed, progress=sys.stderr.isatty()
                )
            if scrapes is not None and isinstance(scraper, Scraper):
                import urllib.request

                scrapes["samples"] = scraper.samples
                with urllib.request.urlopen(scraper.url, timeout=30) as resp:
                    scrapes["final"] = resp.read().decode()
            return out
        finally:
            if refresher is not None:
                refresher.stop()  # waits for a refit under way: its cost falls inside the replay it overlapped
                refits.extend(refresher.history)  # type: ignore[union-attr]
            server.kill_server()


def length_log_report(log: Any, reqs: list[Any]) -> dict[str, Any]:
    """What TIE's server logged against what the replay sent: one row per request (and the warm-up), each row's
    length equal to the request's, the reasons, the recording errors, and the censoring-aware calibration."""
    from hf_ext.generation.tie.lengthlog import REASONS

    rows = {r["request_id"]: r for r in log.records}
    want = {r.request_id: r.output_len for r in reqs}
    cal = log.calibration(levels=(0.9,))
    return {
        "rows": len(log),
        "errors": log.errors,
        "every_request_once": set(want) <= set(rows) and len(rows) == len(log),
        "lengths_match": all(rows[k]["output_len"] == n for k, n in want.items() if k in rows),
        "reasons": {k: sum(r["reason"] == k for r in rows.values()) for k in REASONS},
        "sources": cal["by_source"],
        "calibration": {k: cal[k] for k in ("nll", "above_q0.9", "below_q0.9") if k in cal},
    }


def refit_run(
    args: argparse.Namespace,
    model_dir: str,
    reqs: list[Any],
    prompts: dict[str, str],
    in_loop: Any,
    tok: Any,
    case: str,
    res: dict[str, dict],
    details: dict[str, Any],
    cmd: str,
) -> list[Any]:
    """TIE once more with a PredictorRefresher on its length log: rows against TIE without it and the baselines."""
    from hf_ext.generation.tie.bench import COMPONENT
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.replay import summarize_replay
    from hf_ext.utils.bench import Row, device_name

    refits: list[dict] = []
    t = time.perf_counter()
    recs = run_policy(
        args, model_dir, reqs, prompts, "tie", in_loop, LengthLog(), tok, args.refit_every, refits
    )
    s = {**summarize_replay(recs), "wall_s": time.perf_counter() - t}
    done = [r for r in refits if "accepted" in r]
    print(
        f"  TIE with refits every {args.refit_every}: {s['per_token_mean'] * 1e3:.1f} ms/token mean (TIE without: "
        f"{res['tie']['per_token_mean'] * 1e3:.1f}); {len(done)} refits, {sum(r['accepted'] for r in done)} "
        f"installed, fit seconds {[round(r['fit_s'], 1) for r in done]}"
    )
    details["refit"] = {"every": args.refit_every, "summary": s, "reports": refits}
    rows = []
    for metric, key in (
        ("per_token_latency_mean", "per_token_mean"),
        ("per_token_latency_p99", "per_token_p99"),
    ):
        for b, summ in (("tie_no_refit", res["tie"]), *((p, v) for p, v in res.items() if p != "tie")):
            rows.append(
                Row.make(
                    COMPONENT,
                    f"{case}_refit{args.refit_every}",
                    metric,
                    s[key],
                    b,
                    summ[key],
                    device=device_name(),
                    quality_name="refits_done/installed;fit_s",
                    quality_value=f"{len(done)}/{sum(r['accepted'] for r in done)};"
                    + ",".join(f"{r['fit_s']:.1f}" for r in done),
                    command=cmd,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import importlib.util

    from hf_ext.generation.tie.bench import COMPONENT, real_cb_rows
    from hf_ext.generation.tie.replay import POLICIES, summarize_replay
    from hf_ext.utils.bench import append_rows, device_name, plot_results, print_rows

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or "tie" not in policies or (len(policies) < 2 and args.refit_every is None):
        raise SystemExit(
            f"--policies: 'tie' and at least one of {POLICIES} ('tie' alone with --refit-every) (got {args.policies!r})"
        )
    if args.scrape_every is not None and not (math.isfinite(args.scrape_every) and args.scrape_every > 0):
        raise SystemExit(f"--scrape-every must be > 0 seconds, got {args.scrape_every}")
    if not (math.isfinite(args.speed) and args.speed > 0):
        raise SystemExit(f"--speed must be > 0, got {args.speed}")
    spec = importlib.util.spec_from_file_location("tie_real_cb", ROOT / "benchmarks" / "tie_real_cb.py")
    real_cb = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(real_cb)  # type: ignore[union-attr]
    from hf_ext.generation.tie.serve import require_serving

    require_serving()
    cmd = "python benchmarks/tie_serve_replay.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tie_serve_")
        args.model_dir = tmp.name
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tok = save_model(args.shape, args.device, model_dir, args.seed)
    print(f"model {args.shape} saved to {model_dir} in {time.perf_counter() - t:.0f}s")
    vocab = len(tok)
    reqs = real_cb.load_requests(
        args.workload, args.n, args.max_new_tokens, args.max_prompt, vocab, args.seed
    )
    in_loop = None
    if args.predictor:
        if not args.prompts:
            raise SystemExit("--predictor needs --prompts (benchmarks/tie_export_prompts.py)")
        own = json.loads(Path(args.prompts).read_text())["prompts"][: len(reqs)]
        texts, got = texts_with_filler(tok, own, [len(r.prompt_ids) for r in reqs], args.seed)
        in_loop = InLoopPredictor(args.predictor, tok)
        own_text = {r.request_id: t for r, t in zip(reqs, own)}
    else:
        texts, got = prompt_texts(tok, [len(r.prompt_ids) for r in reqs], args.seed)
    prompts = {r.request_id: s for r, s in zip(reqs, texts)}
    want = np.array([len(r.prompt_ids) for r in reqs])
    print(f"{len(reqs)} requests; prompt tokens: wanted {want.sum()}, text has {int(np.sum(got))}")

    case = f"serve_http_{args.shape}_{real_cb._workload_name(args.workload)}_n{args.n}_x{args.speed:g}"
    case += f"_maxseqs{args.max_requests_per_batch}{real_cb._workload_tag(args.workload)}"
    case += "_predictor-in-loop" if in_loop is not None else ""
    res: dict[str, dict] = {}
    details: dict[str, Any] = {"command": cmd, "device": device_name(), "case": case, "policies": {}}
    for policy in policies:
        t = time.perf_counter()
        log = None
        if args.length_log and policy == "tie":
            from hf_ext.generation.tie.lengthlog import LengthLog

            Path(args.length_log).unlink(missing_ok=True)
            log = LengthLog(args.length_log)
        scrapes: dict[str, Any] = {}
        recs = run_policy(args, str(model_dir), reqs, prompts, policy, in_loop, log, tok, scrapes=scrapes)
        if log is not None:
            log.close()
            details["length_log"] = length_log_report(log, reqs)
            print(f"  length log: {json.dumps(details['length_log'])}")
        s = res[policy] = {**summarize_replay(recs), "wall_s": time.perf_counter() - t}
        real_cb._report(case, policy, s)  # the engine replay's line
        details["policies"][policy] = {"summary": s, "seconds": s["wall_s"]}
        if args.scrape_every:
            summary = Scraper.summarize(scrapes["samples"])
            details["policies"][policy]["metrics_scrapes"] = {"summary": summary, **scrapes}
            print(f"  GET /tie/metrics every {args.scrape_every:g}s: {json.dumps(summary)}")
        if in_loop is not None and policy == "tie":
            details["in_loop_predictor"] = in_loop.report(reqs, own_text)
            print(f"  in-loop predictor: {json.dumps(details['in_loop_predictor'])}")
    rows = real_cb_rows({case: res}, device_name(), cmd)
    if args.refit_every is not None:
        rows += refit_run(args, str(model_dir), reqs, prompts, in_loop, tok, case, res, details, cmd)
    print_rows(rows, title="TIE through transformers serve (HTTP) — ratio > 1: TIE better")
    if not args.no_write:
        path = append_rows(COMPONENT, rows)
        plot_results(COMPONENT, path)
        out = path.parent / "tie_serve_details.json"
        old = json.loads(out.read_text()) if out.exists() else {"runs": []}
        old["runs"].append(details)
        out.write_text(json.dumps(old, indent=1))
        if args.scrape_every:
            series = {p: v["metrics_scrapes"]["samples"] for p, v in details["policies"].items()}
            plot_queues(path.parent / f"tie_serve_queues_{case}.png", case, series)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
