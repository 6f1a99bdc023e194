"""The TIE benchmark end to end in its quick mode (slow: trains three small predictors)."""

from __future__ import annotations

import math

import pytest

from tests.tie._scripts import load_script, stand_in_trace


def test_azure_trace_is_found_through_hf_ext_data_dir(tmp_path, monkeypatch):
    """The simulator reads the trace from ``$HF_EXT_DATA_DIR``; the TIE loader (bench tie, tie_regime.py, ...)
    looked only at ``$HF_EXT_AZURE_TRACE`` and beside the checkout, so a user who set the former got a
    FileNotFoundError from ``python -m hf_ext bench tie``."""
    from hf_ext.generation.tie.data import load_azure_trace
    from hf_ext.simulate.workload import azure_trace

    stand_in_trace(tmp_path / "azure_llm_inference_2023_conv.csv", n=37)
    monkeypatch.delenv("HF_EXT_AZURE_TRACE", raising=False)
    monkeypatch.setenv("HF_EXT_DATA_DIR", str(tmp_path))
    assert len(azure_trace()) == 37
    assert len(load_azure_trace()["output_len"]) == 37


def test_quick_run_does_not_overwrite_the_headline_files():
    """``bench tie --quick`` (the docs' ~30 s smoke run) wrote tie_details.json, tie_policies.png and
    tie_calibration.png, replacing the headline run's files the docs cite; it now tags them ``_quick``."""
    from hf_ext.generation.tie.bench import _file_tag, _parser

    h100 = "nvidia-h100-80gb-hbm3-llama3.1-8b"
    cb = "transformers_cb-nvidia-h100-80gb-hbm3-llama3.1-8b"
    assert _file_tag(_parser().parse_args([]), h100) == ""
    assert _file_tag(_parser().parse_args(["--quick"]), h100) == "_quick"
    assert _file_tag(_parser().parse_args([]), cb) == "_transformers_cb"
    assert _file_tag(_parser().parse_args(["--quick"]), cb) == "_transformers_cb_quick"
    assert _file_tag(_parser().parse_args(["--quick", "--tag", "qa"]), h100) == "_qa"


@pytest.mark.slow
def test_bench_quick_runs_every_section(tmp_path, capsys, monkeypatch):
    from hf_ext.generation.tie.bench import OFFLINE_BUDGETS, main
    from hf_ext.generation.tie.data import load_azure_trace

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    try:
        load_azure_trace()
    except FileNotFoundError:  # a clean clone or the device machine: 5 minutes of a stand-in in its format
        trace = stand_in_trace(tmp_path / "trace.csv", n=900, seconds=330.0)
        monkeypatch.setenv("HF_EXT_AZURE_TRACE", str(trace))
    export = tmp_path / "replay.json"
    rc = main(
        ["--quick", "--loads", "4", "--cache-dir", str(tmp_path / "cache"), "--export-replay", str(export)]
        + ["--tag", "qa"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "azure2023conv_5min_x4" in out and "real CB tiny Llama" in out and "real static batches" in out
    assert out.count("budget ") >= len(OFFLINE_BUDGETS) and "tie_true_dist" in out
    assert "per_token_index_true_dist" in out  # the yardstick runs beside TIE, on both laws
    csv = (tmp_path / "tie.csv").read_text()
    needles = (
        "offline_throughput_tokens",
        "_budget0.25",
        "real_cb_tiny_llama_cpu_burst16",
        "ttft",
        "predictor_crps_tokens",
    )
    planned = ("offline_static600_kv120k_planned", "offline_static600_kv120k_planned_vs_membatch")
    for needle in (*needles, "offline_static600_b39_kvcap", "real_static_tiny_llama_cpu_n24_b8", *planned):
        assert needle in csv
    assert (tmp_path / "tie_policies_qa.png").stat().st_size > 0 and export.stat().st_size > 0
    assert (tmp_path / "tie_details_qa.json").exists() and not (tmp_path / "tie_details.json").exists()


def test_static_rows_compare_tie_with_every_baseline():
    from hf_ext.generation.tie.bench import BASELINES, static_rows

    pol = ("fcfs", "sjf_oracle", "ssjf", "ltr", "tie")
    static = {
        "offline_static10_b4_kvcap": {
            p: {"throughput_tok_s": 100.0 + i, "padding_share": 0.5} for i, p in enumerate(pol)
        },
        "real_static_tiny_llama_cpu_n10_b4": {
            p: {"throughput_tok_s": 50.0, "padding_share": 0.2} for p in pol
        },
    }
    rows = static_rows(static, "sim:x", "cpu-x", "cmd")
    assert len(rows) == 2 * len(BASELINES)
    sim = {r.baseline: r for r in rows if r.case.startswith("offline")}
    assert sim["fcfs"].ratio == pytest.approx(104 / 100) and sim["fcfs"].device == "sim:x"
    assert all(r.device == "cpu-x" for r in rows if r.case.startswith("real"))


def test_planned_offline_job_gives_each_policy_its_own_plan():
    """``offline_planned``: TIE plans from its laws, SSJF / the oracle from point lengths, FCFS / LTR get their
    fastest prompt-bucket count in hindsight; the second case holds the plain memory cuts."""
    import numpy as np

    from hf_ext.generation.tie.bench import offline_planned
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.offline import memory_batches, policy_order, simulate_static_batches
    from hf_ext.generation.tie.planner import PLAN_BUCKETS, bucket_order
    from hf_ext.generation.tie.scheduler import precompute_scores
    from hf_ext.simulate import CostModel, Request

    rng = np.random.default_rng(2)
    n, cap, kv = 150, 400, 30_000
    mu, sigma = rng.normal(4.0, 1.0, size=n), rng.uniform(0.2, 0.9, size=n)
    out = np.clip(np.ceil(np.exp(mu + sigma * rng.standard_t(3.5, size=n))), 1, cap).astype(int)
    plen = rng.integers(10, 1500, size=n)
    base = []
    for i in range(n):
        m = {"pred_mu": mu[i], "pred_sigma": sigma[i], "pred_nu": 3.5, "pred_len": float(np.exp(mu[i]))}
        m.update(ltr_score=mu[i], true_mu=mu[i], true_sigma=sigma[i], true_nu=3.5)
        base.append(Request(id=i, arrival=0.0, prompt_len=int(plen[i]), output_len=int(out[i]), meta=m))
    cfg = TIEConfig(max_new_tokens=cap)
    precompute_scores(base, cfg)
    cm = CostModel.constant(0.01)
    res = offline_planned(cm, base, cfg, kv, max_new_tokens=cap, prefix="t_")
    planned, plain = (
        res["t_offline_static150_kv30k_planned"],
        res["t_offline_static150_kv30k_planned_vs_membatch"],
    )
    assert {"tie", "fcfs", "ssjf", "ltr", "sjf_oracle", "tie_plan_1bucket", "tie_true_dist"} <= set(planned)
    fcfs = policy_order("fcfs", base, cfg)
    every_k = [
        simulate_static_batches(cm, plen, out, bucket_order(fcfs, plen, k), kv_tokens=kv, max_new_tokens=cap)
        for k in (*PLAN_BUCKETS, n)
    ]
    assert planned["fcfs"]["throughput_tok_s"] == pytest.approx(max(r.tokens / r.makespan_s for r in every_k))
    cut = simulate_static_batches(cm, plen, out, fcfs, kv_tokens=kv, max_new_tokens=cap)
    assert plain["fcfs"]["throughput_tok_s"] == pytest.approx(cut.tokens / cut.makespan_s)
    assert (
        plain["tie"] == planned["tie"]
        and len(memory_batches(fcfs, plen, kv, cap)) == plain["fcfs"]["n_batches"]
    )
    # planning from the true lengths is the best of all; TIE's plan beats its own order cut as wide as memory allows
    assert planned["sjf_oracle"]["throughput_tok_s"] > planned["tie"]["throughput_tok_s"]
    tie_cut = simulate_static_batches(
        cm, plen, out, policy_order("tie", base, cfg), kv_tokens=kv, max_new_tokens=cap
    )
    assert planned["tie"]["throughput_tok_s"] > tie_cut.tokens / tie_cut.makespan_s
    assert planned["tie"]["prompt_buckets"] in PLAN_BUCKETS


@pytest.mark.parametrize(
    "sizing",
    [
        ["--offline-batch", "4", "--length-log", "LOG"],
        ["--offline-kv-tokens", "300", "--http", "--refit-every", "10"],
    ],
)
def test_serving_example_runs_on_cpu(sizing, tmp_path):
    """examples/tie_serving.py as a user runs it (small settings): CB FIFO vs TIE, then the offline job with fixed
    batches or batches sized from a KV budget, in the given order, the TIE order and TIE's plan; with ``--http``
    the model is then served by transformers serve with TIE and the prompts sent with the OpenAI client (in rounds
    until a PredictorRefresher has retrained the predictor on the server's length log); with
    ``--length-log`` the TIE run's lengths are logged, and a second run trains its predictor on that log."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "lengths.jsonl"
    sizing = [str(log) if a == "LOG" else a for a in sizing]
    cmd = [sys.executable, str(root / "examples" / "tie_serving.py"), "--n-train", "300", "--epochs", "1"]
    cmd += ["--n-prompts", "8", "--max-new-tokens", "16", *sizing]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fifo: 8 requests" in out.stdout and " tie: 8 requests" in out.stdout
    toks = [
        line.split(": ")[1].split(" tokens")[0]
        for line in out.stdout.splitlines()
        if line.startswith("offline")
    ]
    assert len(toks) == 3 and all(0 < int(t) <= 8 * 16 for t in toks)
    assert "offline, TIE planned" in out.stdout
    if (
        "--http" in sizing
    ):  # rounds of the 8 prompts until the refresher has refitted on the server's log once
        rounds = [
            line for line in out.stdout.splitlines() if line.startswith("http tie: ") and "over HTTP" in line
        ]
        n = int(rounds[0].split()[2])
        assert n % 8 == 0 and n >= 16 and f"{n * 16} tokens" in rounds[0]
        assert "http tie: refresher after " in out.stdout and "held-out NLL" in out.stdout
        assert "hf_ext_tie_refresher_version " in out.stdout  # its GET /tie/metrics excerpt
        logged = int(out.stdout.split("hf_ext_tie_length_log_requests_total ")[1].split()[0])
        assert n - 8 <= logged <= n  # the last round's rows may land just after its answers
    else:
        assert "over HTTP" not in out.stdout
    if "--length-log" in sizing:
        assert f"length log: 8 requests -> {log} (8 cut at max_new_tokens)" in out.stdout
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(rows) == 8 and all(r["output_len"] == 16 and r["censored"] for r in rows)
        cmd = [sys.executable, str(root / "examples" / "tie_serving.py"), "--train-jsonl", str(log)]
        cmd += ["--epochs", "1", "--n-prompts", "4", "--max-new-tokens", "8"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "predictor trained on 8 pairs (8 cut rows as lower bounds)" in out.stdout


def test_per_token_index_yardstick_ranks_by_the_law_on_each_requests_cap():
    """The bench's ``per_token_index`` policy orders by E[X]/E[1/X] of the predicted law: the median order
    inside the support, a wide law that reaches the request's own cap earlier."""
    from hf_ext.generation.tie.bench import make_schedulers
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.distribution import per_token_index
    from hf_ext.simulate import Request

    cfg = TIEConfig(max_new_tokens=1000)
    laws = [(6.5, 0.2, 1000), (6.5, 1.0, 1000), (3.0, 0.3, 1000), (6.5, 1.0, None)]  # last: the config's cap
    sched = make_schedulers(cfg)["per_token_index"]
    for i, (m, sd, cap) in enumerate(laws):
        meta = {"pred_mu": m, "pred_sigma": sd, "pred_nu": 3.5}
        sched.add(Request(id=i, arrival=0.0, prompt_len=8, output_len=10, max_new_tokens=cap, meta=meta), 0.0)
    order = [sched.pop_next(0.0).id for _ in laws]
    assert order[0] == 2 and order.index(1) < order.index(0) and order.index(3) < order.index(0)
    assert per_token_index(6.5, 1.0, 3.5, 1000) < per_token_index(6.5, 0.2, 3.5, 1000)


def test_true_distribution_ceiling_feeds_every_policy_the_generator_parameters():
    """The perfect-predictor copies carry the generator's (mu, sigma, nu) for TIE, SSJF and LTR, recompute TIE's
    cached score, leave the originals alone, and make SSJF order by the true median."""
    from hf_ext.generation.tie.bench import with_true_distribution
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.offline import policy_order
    from hf_ext.generation.tie.scheduler import precompute_scores
    from hf_ext.simulate import Request

    cfg = TIEConfig(max_new_tokens=1000)
    truth = [(5.0, 0.3, 4.0), (2.0, 1.0, 3.5), (3.5, 0.5, 6.0)]
    reqs = [
        Request(
            id=i,
            arrival=0.0,
            prompt_len=8,
            output_len=10,
            prompt="p",
            meta={
                "true_mu": m,
                "true_sigma": s,
                "true_nu": n,
                "pred_mu": 0.0,
                "pred_sigma": 1.0,
                "pred_len": 1.0,
                "ltr_score": 0.0,
            },
        )
        for i, (m, s, n) in enumerate(truth)
    ]
    precompute_scores(reqs, cfg)
    before = [dict(r.meta) for r in reqs]
    ceil = with_true_distribution(reqs, cfg)
    assert [r.meta for r in reqs] == before  # originals untouched
    for r, (m, s, n) in zip(ceil, truth):
        assert (r.meta["pred_mu"], r.meta["pred_sigma"], r.meta["pred_nu"]) == (m, s, n)
        assert r.meta["pred_len"] == pytest.approx(math.exp(m)) and r.meta["ltr_score"] == m
    assert policy_order("ssjf", ceil) == [1, 2, 0] == policy_order("ltr", ceil)
    assert policy_order("tie", ceil, cfg) == [1, 2, 0]
    assert ceil[0].meta["tie_expect"] > 100 > reqs[0].meta["tie_expect"]  # re-scored from the true law


def test_served_log_script_honours_hf_ext_results_dir(tmp_path, monkeypatch):
    """tie_served_log.py (like tie_refresh.py and tie_predictor_sweep.py) wrote its CSV / PNG under the checkout's
    benchmarks/results even with $HF_EXT_RESULTS_DIR set, while its tie.csv rows went there."""
    import shutil

    from tests.tie._scripts import ROOT

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    shutil.copy(ROOT / "benchmarks" / "results" / "tie_served_log.csv", tmp_path / "tie_served_log.csv")
    assert load_script("tie_served_log").main(["--replot"]) == 0
    assert (tmp_path / "tie_served_log.png").stat().st_size > 0


def test_predictor_sweep_script_writes_csv_and_plot(tmp_path):
    """benchmarks/tie_predictor_sweep.py on tiny sizes: one row per size plus the constant and true-law references,
    the true law scoring better than the constant; bad sizes are refused before any work."""
    import csv

    mod = load_script("tie_predictor_sweep")
    with pytest.raises(SystemExit, match="--sizes"):
        mod.main(["--sizes", "10,abc"])
    stem = tmp_path / "sweep"
    assert mod.main(["--sizes", "96,128", "--epochs", "1", "--val-n", "120", "--out", str(stem)]) == 0
    rows = list(csv.DictReader(stem.with_suffix(".csv").open()))
    assert [r["predictor"] for r in rows] == ["constant_logt", "true_law", "logt", "logt"]
    assert [r["n_train"] for r in rows[2:]] == ["96", "128"]
    ref = {r["predictor"]: r for r in rows[:2]}
    for key in ("nll", "crps_log", "crps_tokens"):
        assert float(ref["true_law"][key]) < float(ref["constant_logt"][key])
    assert stem.with_suffix(".png").stat().st_size > 0


def test_regime_script_writes_rows_figure_and_json(tmp_path, monkeypatch, capsys):
    """benchmarks/tie_regime.py on a tiny grid: loads are fractions of the measured saturated rate, every case gets
    trained and true-law policies, rows go to tie.csv with the true-law comparison as quality; bad grids are
    refused before any work."""
    import csv
    import json

    import numpy as np

    mod = load_script("tie_regime")
    bads = (
        ["--loads", "1,-2"],
        ["--caps", "x"],
        ["--caps", "1000.5"],
        ["--kv-tokens", "10"],
        ["--n", "0"],
        ["--offline-n", "-1"],
    )
    for bad in (*bads, ["--export-replay", "x.json", "--true-law-only"]):
        with pytest.raises(SystemExit, match=bad[0]):
            mod.main(bad)
    # 90 % of 10 requests finished by the 0.9-quantile of their completion times
    assert mod.saturated_rate(np.arange(1.0, 11.0)) == pytest.approx(
        9 / np.quantile(np.arange(1.0, 11.0), 0.9)
    )
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    # prompt lengths come from the Azure trace, which a clean clone lacks: a small stand-in in its format
    monkeypatch.setenv("HF_EXT_AZURE_TRACE", str(stand_in_trace(tmp_path / "trace.csv")))
    argv = ["--caps", "1000", "--kv-tokens", "180000", "--loads", "1,1.3", "--n", "300", "--n-train", "96"]
    argv += ["--offline-n", "200", "--offline-kv-tokens", "120000"]
    replay = tmp_path / "replay.json"
    assert (
        mod.main(
            [*argv, "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--export-replay", str(replay)]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "tie.csv").open()))
    offline = [r for r in rows if r["metric"] == "offline_throughput_tokens"]
    assert {r["case"] for r in offline} == {
        "synthetic-cap1000_offline_static200_b39_kvcap",  # 120k / (2,048 + 1,000) rows
        "synthetic-cap1000_offline_static200_kv120k_membatch",
        "synthetic-cap1000_offline_chunk128_200_kv120k",  # the chunked what-if: same chunks for every order
        "synthetic-cap1000_offline_chunk256_200_kv120k",
    }
    rows = [r for r in rows if r not in offline]
    cases = {r["case"] for r in rows}
    assert cases == {"synthetic-cap1000_kv180k_load1", "synthetic-cap1000_kv180k_load1.3"}
    assert {r["baseline"] for r in rows} == {"fcfs", "ssjf", "ltr", "sjf_oracle"}
    assert {r["quality_name"] for r in rows} == {"true_law_ssjf_over_tie_mean"}
    assert {r["metric"] for r in rows} == {
        "per_token_latency_mean",
        "per_token_latency_p99",
        "ttft",
        "latency_mean",
    }
    saved = json.loads((tmp_path / "tie_regime.json").read_text())
    assert set(saved["offline"]) == {r["case"] for r in offline}
    sized = saved["offline_predsized"]["synthetic-cap1000_offline_predsized_200_kv120k"]
    assert set(sized) == {
        "fcfs_full",
        "tie_full",
        "fcfs_chunk256",
        "tie_chunk256",
        "ssjf_2x_pred",
        "tie_cond_median",
    }
    # with every row provisioned for the cap the what-if is the plain memory-sized job
    plain = saved["offline"]["synthetic-cap1000_offline_static200_kv120k_membatch"]
    assert sized["fcfs_full"]["throughput_tok_s"] == pytest.approx(plain["fcfs"]["throughput_tok_s"])
    assert sized["tie_full"]["throughput_tok_s"] == pytest.approx(plain["tie"]["throughput_tok_s"])
    assert (tmp_path / "tie_regime_chunked.png").stat().st_size > 0
    res = saved["cases"]
    lo, hi = (res[c] for c in sorted(cases))
    assert hi["fcfs"]["rate_req_s"] == pytest.approx(1.3 * lo["fcfs"]["rate_req_s"])
    assert {"tie", "ltr", "tie_expect_only", "tie_true_dist", "ssjf_true_dist"} <= set(lo)
    assert hi["fcfs"]["per_token_mean"] > lo["fcfs"]["per_token_mean"]  # more load, more waiting
    assert hi["fcfs"]["latency_mean"] > lo["fcfs"]["latency_mean"]
    for split in hi["tie"]["gap_vs_ssjf"].values():  # by sigma and by length: the parts add up to the gap
        total = sum(g["contribution"] for g in split.values())
        assert total == pytest.approx(hi["tie"]["per_token_mean"] - hi["ssjf"]["per_token_mean"], abs=1e-9)
        assert sum(g["n"] for g in split.values()) == 300
    assert (tmp_path / "tie_regime.png").stat().st_size > 0
    exported = json.loads(replay.read_text())["requests"]  # tie_real_cb.py's format, unit-rate arrivals
    assert len(exported) == 300 and {"arrival", "output_len", "mu", "sigma", "pred_len", "ltr_score"} <= set(
        exported[0]
    )
    assert 0.7 < exported[-1]["arrival"] / 300 < 1.3
    out = capsys.readouterr().out
    assert "true law: vs SSJF" in out and "synthetic-cap1000_kv180k_load1.3" in out  # the summary table


def test_regime_script_true_law_only_runs(tmp_path, monkeypatch, capsys):
    """``tie_regime.py --true-law-only`` (no trained predictors, so no ``tie`` policy) crashed with KeyError: 'tie'
    after the first case, where it looked up TIE's gap to SSJF."""
    import json

    mod = load_script("tie_regime")
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_EXT_AZURE_TRACE", str(stand_in_trace(tmp_path / "trace.csv")))
    argv = ["--caps", "1000", "--kv-tokens", "180000", "--loads", "1,1.3", "--n", "200", "--offline-n", "0"]
    assert mod.main([*argv, "--true-law-only"]) == 0
    cases = json.loads((tmp_path / "tie_regime.json").read_text())["cases"]
    assert len(cases) == 2
    assert all("tie_true_dist" in c and "tie" not in c for c in cases.values())
    assert "synthetic-cap1000_kv180k_load1.3" in capsys.readouterr().out


def test_offline_plan_script_writes_rows_figure_and_json(tmp_path, monkeypatch, capsys):
    """benchmarks/tie_offline_plan.py on a small job: both cases per seed become rows, TIE's plan is reported
    with the bucket counts, and bad arguments are refused before any work."""
    import csv
    import json

    mod = load_script("tie_offline_plan")
    for bad in (["--seeds", "x"], ["--seeds", ","], ["--offline-n", "0"], ["--tag", "a/b"]):
        with pytest.raises(SystemExit, match="--seeds|--offline-n|--tag"):
            mod.main(bad)
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    # prompt lengths come from the Azure trace: a stand-in in its format
    monkeypatch.setenv("HF_EXT_AZURE_TRACE", str(stand_in_trace(tmp_path / "trace.csv")))
    argv = ["--seeds", "0", "--offline-n", "150", "--n-train", "96", "--epochs", "1"]
    assert mod.main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    rows = list(csv.DictReader((tmp_path / "tie.csv").open()))
    assert {r["case"] for r in rows} == {
        "offline_static150_kv120k_planned_seed0",
        "offline_static150_kv120k_planned_vs_membatch_seed0",
    }
    assert {r["baseline"] for r in rows} == {"fcfs", "ssjf", "ltr", "sjf_oracle"}
    assert {r["metric"] for r in rows} == {"offline_throughput_tokens"}
    saved = json.loads((tmp_path / "tie_offline_plan.json").read_text())
    assert saved["simulated"]["offline_static150_kv120k_planned_seed0"]["tie"]["prompt_buckets"] >= 1
    assert (tmp_path / "tie_offline_plan.png").stat().st_size > 0
    assert "prompt buckets tie" in capsys.readouterr().out
    assert mod.main([*argv, "--cache-dir", str(tmp_path / "cache"), "--tag", "other"]) == 0
    assert (tmp_path / "tie_offline_plan_other.png").stat().st_size > 0
    assert json.loads((tmp_path / "tie_offline_plan_other.json").read_text())["command"].endswith(
        "--tag other"
    )


def test_generate_sdpa_script_times_both_modes_in_fresh_processes(tmp_path, monkeypatch):
    """benchmarks/tie_generate_sdpa.py on the tiny CPU model: a row per run (first / again), ours without cuDNN
    against ``cudnn_sdpa``; bad sizes are refused before any work."""
    import csv

    mod = load_script("tie_generate_sdpa")
    with pytest.raises(SystemExit, match="--rows must be >= 1"):
        mod.main(["--rows", "0"])
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    argv = ["--shape", "tiny", "--device", "cpu", "--rows", "3", "--max-prompt", "12", "--new", "5"]
    assert mod.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "tie.csv").open()))
    assert [r["case"] for r in rows] == [
        "generate_sdpa_tiny_3x12_new5_fresh",
        "generate_sdpa_tiny_3x12_new5_repeat",
    ]
    assert {r["baseline"] for r in rows} == {"cudnn_sdpa"} and {r["metric"] for r in rows} == {
        "generate_seconds"
    }
    assert all(float(r["ours"]) > 0 and float(r["baseline_value"]) > 0 for r in rows)
    prompts, outs = mod.job(mod._parser().parse_args(argv), vocab=50)
    assert len(prompts) == 3 and len(prompts[0]) == 12 and outs[0] == 5 and all(1 <= o <= 5 for o in outs)
    assert all(3 <= len(p) <= 12 and max(p) < 50 for p in prompts)


def test_per_token_index_with_aging_lets_a_long_wait_overtake_where_the_plain_index_does_not():
    """``per_token_index_aging`` is what ``TIEConfig(score="per_token_index")`` runs by default: the index aged by
    gamma every tau of waiting. After ten periods a request with a 2.2x larger index goes first; without aging the
    newcomer with the smaller index does."""
    from hf_ext.generation.tie.bench import make_schedulers
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.simulate import Request

    first = {}
    for name in ("per_token_index", "per_token_index_aging"):
        sched = make_schedulers(TIEConfig(max_new_tokens=1000, aging_gamma=0.9, aging_tau=30.0))[name]
        for rid, arrival, mu in ((0, 0.0, 5.0), (1, 300.0, 4.6)):
            meta = {"pred_mu": mu, "pred_sigma": 0.3, "pred_nu": 3.5}
            req = Request(id=rid, arrival=arrival, prompt_len=8, output_len=10, meta=meta)
            sched.add(req, arrival)
        first[name] = sched.pop_next(300.0).id
    assert first == {"per_token_index": 1, "per_token_index_aging": 0}
