"""Cost model, search, plan JSON, CLI and bad-input tests (CPU, fast)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from hf_ext.accelerate.autoparallel.cost_model import CostModel, LayerStrategy, ParallelConfig, TrainingSpec
from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile
from hf_ext.accelerate.autoparallel.search import (
    NoFeasiblePlanError,
    SearchConfig,
    candidate_partitions,
    dp_over_layers,
    predict,
    search,
)
from hf_ext.accelerate.autoparallel.shapes import BUILTIN_SHAPES, ModelShape, get_shape

SMALL = ModelShape("small", 4, 1024, 4096, 8, 8, 8000)


def test_builtin_shapes_param_counts():
    # Published sizes: Llama-3-8B 8.03B, Llama-3-70B 70.6B, Llama-3.2-1B 1.24B.
    assert get_shape("llama3-8b").num_params() == pytest.approx(8.03e9, rel=0.005)
    assert get_shape("llama3-70b").num_params() == pytest.approx(70.55e9, rel=0.005)
    assert get_shape("llama3.2-1b").num_params() == pytest.approx(1.236e9, rel=0.005)


def test_shape_from_transformers_config(tiny_llama):
    s = get_shape(tiny_llama.config)
    assert s.layer_params() * s.num_layers + s.embedding_params() == sum(
        p.numel() for p in tiny_llama.parameters()
    )


def test_unknown_shape_errors():
    with pytest.raises(ValueError, match="built-in shapes: .*llama3-8b"):
        get_shape("llama9-1t")
    with pytest.raises(ValueError, match="built-in shapes"):
        search("not-a-model", SearchConfig(gpus=8))


def test_dp_over_layers_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n_l, n_s = rng.integers(1, 5), rng.integers(1, 4)
        costs = rng.uniform(0, 10, (n_l, n_s))
        mems = rng.integers(0, 6, (n_l, n_s))
        budget = int(rng.integers(0, 15))
        best = math.inf
        for a in itertools.product(range(n_s), repeat=n_l):
            if sum(mems[i, s] for i, s in enumerate(a)) <= budget:
                best = min(best, sum(costs[i, s] for i, s in enumerate(a)))
        sol = dp_over_layers(costs, mems, budget)
        if not math.isfinite(best):
            assert sol is None
        else:
            assert sol is not None and sol[0] == pytest.approx(best)
            assert sum(mems[i, s] for i, s in enumerate(sol[1])) <= budget
            assert sum(costs[i, s] for i, s in enumerate(sol[1])) == pytest.approx(best)


def _brute_force(shape: ModelShape, sc: SearchConfig, hw: HardwareProfile) -> float:
    """Min step time over every (tp, pp, dp type, micro-batch, stage split, per-layer strategy)."""
    spec = TrainingSpec(sc.global_batch, sc.seq_len)
    cm = CostModel(shape, hw, spec)
    gran = max(1.0, shape.num_params() * 16 / 65536)
    usable = cm.usable_bytes(sc.memory_gb)
    best, n_l = math.inf, shape.num_layers
    for tp, pp in itertools.product(sc.tp_sizes, range(1, n_l + 1)):
        if sc.gpus % (tp * pp):
            continue
        dp = sc.gpus // (tp * pp)
        for dt, b in itertools.product(("ddp", "fsdp"), sc.micro_batch_sizes):
            if sc.global_batch % (dp * b) or (pp > 1 and sc.global_batch // (dp * b) < pp):
                continue
            cfg = ParallelConfig(sc.gpus, pp, tp, tp > 1, b, sc.global_batch // (dp * b), dt)
            strats = cfg.layer_strategies()
            for sizes in candidate_partitions(n_l, pp, exhaustive=True):
                for assign in itertools.product(strats, repeat=n_l):
                    stages, pos, ok = [], 0, True
                    for i, n in enumerate(sizes):
                        idx = list(range(pos, pos + n))
                        stages.append(list(assign[pos : pos + n]))
                        pos += n
                        const, k = cm.stage_constant(cfg, i, idx), cm.inflight(cfg, i)
                        buckets = 0
                        for li, s in zip(idx, stages[-1]):
                            lt = cm.layer_terms(cfg, s, li)
                            buckets += math.ceil((lt.static_bytes + k * lt.act_bytes) / gran)
                        ok &= buckets <= math.floor((usable - const.static_bytes) / gran)
                    if ok:
                        best = min(best, cm.evaluate(cfg, stages, sc.memory_gb).step_ms)
    return best


@pytest.mark.parametrize("memory_gb", [1.7, 1.8, 2.5, 4.0])
def test_search_finds_brute_force_optimum(memory_gb):
    # 1.7 / 1.8 GB force pipeline + tensor parallel plans, 2.5 GB mixes zero2/zero3/ckpt per layer.
    hw = HardwareProfile.h100()
    sc = SearchConfig(
        gpus=4,
        memory_gb=memory_gb,
        global_batch=8,
        seq_len=2048,
        micro_batch_sizes=(1, 2),
        tp_sizes=(1, 2),
        exhaustive_partitions=True,
        top_k=3,
    )
    best = search(SMALL, sc, hardware=hw).best
    assert best.predicted["step_ms"] == pytest.approx(_brute_force(SMALL, sc, hw), rel=1e-9)
    assert max(best.predicted["memory_gb"]) <= memory_gb


def test_more_memory_never_slower():
    prev = math.inf
    feasible_seen = False
    for mem in (12, 16, 24, 32, 48, 64, 80, 120):
        try:
            t = search("llama3-8b", SearchConfig(gpus=8, memory_gb=mem, global_batch=64, seq_len=4096)).best
        except NoFeasiblePlanError:
            assert not feasible_seen, "a larger budget lost feasibility"
            continue
        feasible_seen = True
        assert t.predicted["step_ms"] <= prev * (1 + 1e-12)
        prev = t.predicted["step_ms"]
    assert feasible_seen


def test_more_gpus_never_lower_throughput():
    prev = 0.0
    for gpus in (8, 16, 32, 64, 128, 256):
        best = search("llama3-8b", SearchConfig(gpus=gpus, memory_gb=80, global_batch=256, seq_len=4096)).best
        thr = best.predicted["tokens_per_s"]
        assert thr >= prev * (1 - 1e-12), (gpus, thr, prev)
        prev = thr


def test_cost_model_basic_directions():
    cm = CostModel(get_shape("llama3-8b"), HardwareProfile.h100(), TrainingSpec(64, 4096))
    cfg = ParallelConfig(8, 1, 1, False, 1, 8, "fsdp")
    plain = cm.evaluate(cfg, [[LayerStrategy(3, False)] * 32])
    ckpt = cm.evaluate(cfg, [[LayerStrategy(3, True)] * 32])
    z2 = cm.evaluate(cfg, [[LayerStrategy(2, False)] * 32])
    assert ckpt.step_ms > plain.step_ms and ckpt.max_memory_gb < plain.max_memory_gb
    assert z2.max_memory_gb > plain.max_memory_gb and z2.step_ms <= plain.step_ms
    # 1F1B bubble: (pp - 1) / m of the stage time for balanced stages.
    pcfg = ParallelConfig(8, 4, 1, False, 1, 32, "fsdp")
    pc = cm.evaluate(pcfg, [[LayerStrategy(3, False)] * 8] * 4)
    assert pc.bubble_ms > 0
    assert cm.pipeline_ms([1.0, 1.0], [0.0, 0.0], 4) == (5.0, 1.0)


def test_replicated_vocab_under_tp_costs_what_one_gpu_pays():
    """vocab_parallel=False (apply_plan's TP: embedding / head whole on each tp rank): the head's time,
    its optimizer shard and its logits stay at their tp=1 size; with Megatron's vocab-parallel head they
    shrink with tp."""
    shape, spec = get_shape("llama3.2-1b"), TrainingSpec(8, 2048)
    split = CostModel(shape, HardwareProfile.h100(), spec)
    whole = CostModel(shape, HardwareProfile.h100(), spec, vocab_parallel=False)
    tp1, tp2 = ParallelConfig(2, 1, 1, False, 4, 2, "ddp"), ParallelConfig(2, 1, 2, False, 8, 1, "ddp")
    last = shape.num_layers - 1
    c_tp1 = whole.stage_constant(tp1, 0, [last])
    c_whole, c_split = whole.stage_constant(tp2, 0, [last]), split.stage_constant(tp2, 0, [last])
    assert c_whole.mb_ms > c_split.mb_ms and c_whole.static_bytes > c_split.static_bytes
    # tp=2 without vocab parallelism: the head of a micro-batch twice as large costs about twice as much
    assert c_whole.mb_ms == pytest.approx(2 * c_tp1.mb_ms, rel=0.35)
    assert whole.optimizer_ms(tp2, [], [], 0) == pytest.approx(2 * split.optimizer_ms(tp2, [], [], 0))
    # a tp=2 plan gets slower, a tp=1 plan is unchanged
    strat = [[LayerStrategy(0, False)] * shape.num_layers]
    assert whole.evaluate(tp2, strat).step_ms > split.evaluate(tp2, strat).step_ms
    assert whole.evaluate(tp1, strat).step_ms == split.evaluate(tp1, strat).step_ms


def test_70b_on_1024_gpus_is_fast():
    res = search("llama3-70b", SearchConfig(gpus=1024, memory_gb=80, global_batch=2048, seq_len=8192))
    assert res.seconds < 60
    assert len(res.ranked) == 10
    steps = [p.predicted["step_ms"] for p in res.ranked]
    assert steps == sorted(steps)
    assert 0.05 < res.best.predicted["mfu"] < 0.7


def test_no_feasible_plan_reports_minimum_memory():
    sc = dict(gpus=8, global_batch=64, seq_len=4096)
    with pytest.raises(NoFeasiblePlanError, match="no feasible plan") as ei:
        search("llama3-70b", SearchConfig(memory_gb=8, **sc))
    need = ei.value.min_memory_gb
    assert need > 8
    # The reported minimum is tight: just above it a plan exists, just below it none.
    ok = search("llama3-70b", SearchConfig(memory_gb=need * 1.02, **sc)).best
    assert max(ok.predicted["memory_gb"]) <= need * 1.02
    with pytest.raises(NoFeasiblePlanError):
        search("llama3-70b", SearchConfig(memory_gb=need * 0.97, **sc))


def test_bad_search_config():
    with pytest.raises(ValueError, match="gpus"):
        SearchConfig(gpus=0)
    with pytest.raises(ValueError, match="dp_types"):
        SearchConfig(gpus=8, dp_types=("zero9",))
    with pytest.raises(ValueError, match="sequence_parallel"):
        SearchConfig(gpus=8, sequence_parallel="maybe")
    with pytest.raises(ValueError, match="global_batch"):
        search("llama3-8b", SearchConfig(gpus=8, global_batch=3, micro_batch_sizes=(2,)))


def test_plan_json_round_trip(tmp_path):
    res = search("llama3-70b", SearchConfig(gpus=64, memory_gb=80, global_batch=128, seq_len=4096))
    for plan in res.ranked[:3]:
        back = Plan.from_json(plan.to_json())
        assert back == plan
        assert predict(back).step_ms == pytest.approx(plan.predicted["step_ms"])
        path = plan.save(str(tmp_path / "p.json"))
        assert Plan.load(path) == plan
        with open(path) as f:
            assert json.load(f)["gpus"] == 64
    bad = res.best.to_dict()
    bad["stages"] = [[0, 10]]
    with pytest.raises(ValueError, match="stages"):
        Plan.from_dict(bad)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda d: [x.update(ckpt="false") for x in d["layers"]],
            "Plan.layers entries",
        ),  # bool("false") was True
        (lambda d: d.update(sp="false"), "Plan.sp must be true or false"),
        (lambda d: d.update(tp_size=2), r"unknown key\(s\) \['tp_size'\]"),  # was dropped silently
        (lambda d: d.pop("layers"), r"missing key\(s\) \['layers'\]"),
        (lambda d: d.update(micro_batch="2"), "Plan.micro_batch must be an int"),
        (lambda d: d.update(tp=2.0), "Plan.tp must be an int"),
        (lambda d: [x.update(zero=1) for x in d["layers"]], "Plan.layers entries"),
    ],
)
def test_a_hand_edited_plan_is_refused_not_coerced(edit, match):
    d = Plan.uniform("tiny", gpus=2, dp_type="fsdp", zero=3, global_batch=4, seq_len=8).to_dict()
    edit(d)
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(json.loads(json.dumps(d)))


def test_parallelism_config_export():
    p = Plan.uniform("llama3-8b", gpus=8, dp_type="fsdp", tp=2, global_batch=16, seq_len=1024)
    pc = p.to_parallelism_config()
    assert (pc.dp_shard_size, pc.tp_size, pc.dp_replicate_size) == (4, 2, 1)
    with pytest.raises(ValueError, match="pipeline"):
        Plan.uniform("llama3-8b", gpus=8, pp=2, global_batch=16, seq_len=1024).to_parallelism_config()


def test_cli_plan_writes_json(tmp_path, capsys):
    from hf_ext.accelerate.autoparallel.cli import main, parse_memory

    out = tmp_path / "plan.json"
    assert main(["--model", "llama3-8b", "--gpus", "16", "--gpu-memory", "80GB", "--out", str(out)]) == 0
    plan = Plan.load(str(out))
    assert plan.gpus == 16 and plan.shape.name == "llama3-8b"
    assert "tokens/s" in capsys.readouterr().out
    assert main(["--model", "nope", "--gpus", "8"]) == 2
    assert "built-in shapes" in capsys.readouterr().err
    assert main(["--model", "llama3-70b", "--gpus", "8", "--gpu-memory", "8GB"]) == 2
    assert "smallest per-GPU memory" in capsys.readouterr().err
    assert parse_memory("80GB") == 80 and parse_memory("512MB") == 0.5
    with pytest.raises(ValueError, match="gpu-memory"):
        parse_memory("lots")


def test_config_json_path(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    s = get_shape(str(tmp_path))
    assert s.num_layers == 2 and s.hidden_size == 64
    assert set(BUILTIN_SHAPES) >= {"llama3-8b", "llama3-70b", "llama3.2-1b"}


def test_plan_whose_logits_do_not_fit_is_rejected():
    # A 262k vocabulary on a tiny trunk: the LM head + loss peak (bf16 logits, fp32 upcast, fp32
    # log-softmax and its gradients: 12 bytes per logit) dominates, so only small micro-batches fit.
    shape = ModelShape("bigvocab", 2, 256, 512, 4, 4, 262144)
    spec = TrainingSpec(global_batch=8, seq_len=1024)
    cm = CostModel(shape, HardwareProfile.h100(), spec)
    mem = {}
    for b in (1, 2, 4, 8):
        cfg = ParallelConfig(
            gpus=1, pp=1, tp=1, sp=False, micro_batch=b, num_micro_batches=8 // b, dp_type="ddp"
        )
        c = cm.evaluate(cfg, [[LayerStrategy(0, True)] * 2], memory_gb=12)
        mem[b] = c.max_memory_gb
        assert c.max_memory_gb * 2**30 >= 12 * b * 1024 * 262144  # the logits peak is counted
    assert mem[8] > mem[4] > mem[2] > mem[1]
    assert not predict(
        Plan.uniform(shape, gpus=1, dp_type="ddp", ckpt=True, global_batch=8, seq_len=1024, micro_batch=8),
        memory_gb=12,
    ).feasible
    res = search(shape, SearchConfig(gpus=1, memory_gb=12, global_batch=8, seq_len=1024))
    assert res.best.micro_batch <= 2 and res.best.predicted["memory_gb"][0] <= 12
    with pytest.raises(NoFeasiblePlanError):
        search(
            shape, SearchConfig(gpus=1, memory_gb=4, global_batch=8, seq_len=1024, micro_batch_sizes=(4, 8))
        )


def test_memory_buckets_lose_at_most_one_percent_of_the_budget():
    """405B (126 layers): with buckets of params*16/65536 (~99 MB) rounded up per layer, this one-config search
    found nothing and said 72.66 GB were needed of an 80 GB card; the bucket is now capped at 1% of the
    budget per layer, and the plan (within the budget) is found."""
    cfg = SearchConfig(
        gpus=1024,
        memory_gb=80,
        global_batch=1024,
        seq_len=8192,
        tp_sizes=(4,),
        pp_sizes=(1,),
        dp_types=("fsdp",),
        micro_batch_sizes=(4,),
    )
    best = search("llama3-405b", cfg).best
    assert best.describe().startswith("pp1 tp4+sp dp256 fsdp b4x1")
    assert max(best.predicted["memory_gb"]) <= best.predicted["usable_memory_gb"]
    coarse = dataclasses.replace(cfg, granularity_bytes=get_shape("llama3-405b").num_params() * 16.0 / 65536)
    with pytest.raises(NoFeasiblePlanError):
        search("llama3-405b", coarse)


def test_unusable_tp_sizes_name_the_cause():
    # tiny has 4 attention heads: tp=3 divides the 6 GPUs but not the heads. The error once said
    # "tp_sizes=[]" and suggested changing global_batch.
    with pytest.raises(ValueError, match=r"tp=3 does not divide the 4 attention heads") as ei:
        search("tiny", SearchConfig(gpus=6, tp_sizes=(3,), global_batch=12, seq_len=64))
    assert "global_batch" not in str(ei.value)
    with pytest.raises(ValueError, match=r"tp=4 does not divide gpus=6"):
        search("tiny", SearchConfig(gpus=6, tp_sizes=(4,), global_batch=12, seq_len=64))
    # a usable degree beside an unusable one still searches
    assert search("tiny", SearchConfig(gpus=6, tp_sizes=(2, 3), global_batch=12, seq_len=64)).best.tp == 2


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1, 2], r"Plan.from_dict expects a dict .* got list"),  # was AttributeError: 'list' has no 'get'
        ("plan.json", r"Plan.from_dict expects a dict .* got str"),
        (None, r"Plan.from_dict expects a dict .* got NoneType"),
        ({"version": "one"}, r"Plan.version must be an int >= 1 .* got 'one'"),  # was int()'s invalid literal
        ({"version": None}, r"Plan.version must be an int >= 1 .* got None"),  # was a TypeError
        ({"version": 1.5}, r"Plan.version must be an int >= 1 .* got 1.5"),  # was truncated to 1 and accepted
        ({"version": "1"}, r"Plan.version must be an int >= 1 .* got '1'"),  # was accepted, kept as a string
        ({"version": 0}, r"Plan.version must be an int >= 1"),
        ({"version": 99}, r"plan version 99 is newer than supported \(1\)"),
        ({"stages": 5}, r"Plan.stages must be \[start, end\) pairs of ints, got 5"),  # was a TypeError
        ({"model": "tiny"}, r"Plan.model must be a dict"),
    ],
)
def test_from_dict_names_what_is_wrong_with_its_input(value, match):
    good = Plan.uniform("tiny", gpus=2, dp_type="fsdp", zero=3, global_batch=4, seq_len=8).to_dict()
    d = {**good, **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(d)
    if isinstance(value, list):
        with pytest.raises(ValueError, match="expects a dict"):
            Plan.from_json("[1, 2]")
