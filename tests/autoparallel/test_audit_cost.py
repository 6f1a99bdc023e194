"""Audit tests of the cost model and search against first principles (CPU, fast)."""

from __future__ import annotations

import pytest

from hf_ext.accelerate.autoparallel.cost_model import CostModel, ParallelConfig, TrainingSpec
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile
from hf_ext.accelerate.autoparallel.search import SearchConfig, search
from hf_ext.accelerate.autoparallel.shapes import ModelShape

# One layer and a large vocabulary at seq_len 1: the root unit (embedding + final norm + head) dominates.
VOCAB = ModelShape("vocab", 1, 64, 128, 4, 4, 100_000)


@pytest.mark.parametrize("dp", [2, 8])
def test_fsdp_root_is_gathered_once_and_kept_unsharded(dp):
    """FSDP2 does not reshard the root after forward: its bf16 parameters stay gathered until the backward
    (memory: 2 B/param on top of the sharded 16 B/param states) and it all-gathers once per micro-batch, not
    twice as a zero3 layer does."""
    cm = CostModel(VOCAB, HardwareProfile.h100(), TrainingSpec(global_batch=dp, seq_len=1), overlap=0.0)
    cfg = ParallelConfig(gpus=dp, pp=1, tp=1, sp=False, micro_batch=1, num_micro_batches=1, dp_type="fsdp")
    root = VOCAB.embedding_params()
    parts: dict[str, float] = {}
    const = cm.stage_constant(cfg, 0, [], parts)
    assert const.static_bytes >= root * (16.0 / dp + 2.0)
    ag = cm.hw.collective_ms("all_gather", 2.0 * root, dp)
    rs = cm.hw.collective_ms("reduce_scatter", 4.0 * root, dp)
    assert parts["fsdp_comm"] == pytest.approx(ag + rs)


def test_dp1_searches_fsdp_too():
    """At dp=1 ddp and fsdp are different runtimes to the cost model (fsdp keeps no autocast copy of every
    weight), so allowing both may never give a slower plan than allowing fsdp alone. The search once tried
    ddp only at dp=1: at 30 GB it returned ddp with 4 of 16 layers checkpointed (336.5 ms) while fsdp
    needs 1 (322.3 ms)."""
    sc = dict(gpus=1, memory_gb=30, global_batch=8, seq_len=2048, top_k=1)
    both = search("llama3.2-1b", SearchConfig(**sc)).best
    fsdp = search("llama3.2-1b", SearchConfig(dp_types=("fsdp",), **sc)).best
    assert both.predicted["step_ms"] <= fsdp.predicted["step_ms"]
    # a tie keeps the first dp type listed (the plans at dp=1 were ddp before)
    roomy = dict(sc, memory_gb=80)
    assert search("llama3.2-1b", SearchConfig(**roomy)).best.dp_type == "ddp"
    assert search("llama3.2-1b", SearchConfig(dp_types=("fsdp", "ddp"), **roomy)).best.dp_type == "fsdp"


GQA = ModelShape("gqa", 2, 256, 512, 8, 2, 1000)


def test_explicit_tp_must_divide_the_kv_heads():
    """tp=4 splits 8 query heads but not 2 KV heads (the k/v projections would be cut mid-head); the default
    tp sizes left it out, an explicit ``tp_sizes`` let it through."""
    sc = dict(gpus=4, global_batch=8, seq_len=64)
    with pytest.raises(ValueError, match=r"tp=4 does not divide the 2 key/value heads"):
        search(GQA, SearchConfig(tp_sizes=(4,), **sc))
    assert search(GQA, SearchConfig(tp_sizes=(2, 4), top_k=50, **sc)).ranked[0].tp <= 2
    assert all(p.tp <= 2 for p in search(GQA, SearchConfig(tp_sizes=(2, 4), top_k=50, **sc)).ranked)


@pytest.mark.parametrize("field", ["tp_sizes", "pp_sizes"])
def test_non_positive_degrees_are_refused(field):
    with pytest.raises(ValueError, match=field):
        SearchConfig(gpus=4, **{field: (0,)})
    with pytest.raises(ValueError, match=field):
        SearchConfig(gpus=4, **{field: (2, -1)})


@pytest.mark.parametrize("field", ["num_local_experts", "num_experts", "n_routed_experts"])
def test_moe_configs_are_refused_not_planned_as_dense(field):
    """A Mixtral-style config was read as a dense model (one MLP instead of 8 experts: 1/8 of the MLP
    parameters and optimizer states); expert parallelism is not modelled, so it is refused by name."""
    from hf_ext.accelerate.autoparallel.shapes import get_shape

    cfg = dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=100
    )
    assert get_shape(dict(cfg, **{field: 1})).num_layers == 2  # one expert is a dense MLP
    with pytest.raises(ValueError, match=rf"{field}=8.*mixture-of-experts"):
        get_shape(dict(cfg, **{field: 8}))


def test_predict_checks_memory_against_the_plans_memory():
    """predict(plan) checked feasibility against the hardware profile's memory (80 GiB for the H100 defaults)
    even for a plan searched for a smaller GPU: a 40 GiB plan was judged against 80 GiB. It now uses the
    memory the plan records (plan.hardware["memory_gb"]), unless memory_gb is passed."""
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.accelerate.autoparallel.search import predict

    best = search(
        "llama3.2-1b", SearchConfig(gpus=1, memory_gb=40, global_batch=8, seq_len=2048, top_k=1)
    ).best
    assert best.hardware["memory_gb"] == 40
    cost = predict(best)
    assert cost.usable_bytes / 2**30 == pytest.approx(best.predicted["usable_memory_gb"])
    assert cost.step_ms == pytest.approx(best.predicted["step_ms"])
    # the same layout on a GPU it does not fit: a plan edited to claim 20 GiB is infeasible
    small = Plan.from_dict({**best.to_dict(), "hardware": {**best.hardware, "memory_gb": 20}})
    assert max(cost.stage_memory_bytes) > (0.92 * 20 - 1) * 2**30
    assert not predict(small).feasible
    assert predict(small, memory_gb=80).feasible  # an explicit memory_gb still wins
    # a hand-written plan records no memory: the hardware profile's is used
    hand = Plan.uniform("llama3.2-1b", gpus=1, dp_type="fsdp", global_batch=8, seq_len=2048, micro_batch=1)
    assert hand.hardware == {} and predict(hand).usable_bytes == pytest.approx(0.92 * 80 * 2**30 - 2**30)
    bad = Plan.from_dict({**best.to_dict(), "hardware": {"memory_gb": "40GB"}})
    with pytest.raises(ValueError, match=r'hardware\["memory_gb"\]'):
        predict(bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(pp=0), r"Plan.uniform: pp must be an int >= 1, got 0"),
        (dict(tp=0), r"Plan.uniform: tp must be an int >= 1, got 0"),
        (dict(gpus=0), r"Plan.uniform: gpus must be an int >= 1, got 0"),
        (dict(gpus=2.0), r"Plan.uniform: gpus must be an int >= 1, got 2.0"),
        (dict(pp=4), r"Plan.uniform: gpus=2 must be a multiple of pp\*tp=4"),
        (dict(tp=3), r"Plan.uniform: gpus=2 must be a multiple of pp\*tp=3"),
        (dict(micro_batch=0), r"Plan.uniform: micro_batch must be None .* or an int >= 1, got 0"),
        (dict(global_batch=0), r"Plan.uniform: global_batch must be an int >= 1, got 0"),
        (dict(seq_len=-8), r"Plan.uniform: seq_len must be an int >= 1, got -8"),
        (dict(dp_type="zero3"), r"Plan.uniform: dp_type must be one of ddp, fsdp, got 'zero3'"),
        (dict(zero=1), r"Plan.uniform: zero must be 0, 2 or 3, got 1"),
        (dict(ckpt="yes"), r"Plan.uniform: ckpt must be True or False, got 'yes'"),
        (dict(gpus=4, pp=4), r"Plan.uniform: pp=4 must be at most the model's 2 layers"),
    ],
)
def test_plan_uniform_validates_its_arguments_before_dividing(bad, match):
    """Plan.uniform computed dp = gpus // (pp * tp) and divided by it before any check: pp=0, tp=0, gpus < pp*tp
    or micro_batch=0 raised ZeroDivisionError, and a bad dp_type / zero surfaced later from another class. Each
    bad argument is now a ValueError naming it and the values it allows."""
    from hf_ext.accelerate.autoparallel.plan import Plan

    kw = dict(gpus=2, dp_type="fsdp", global_batch=4, seq_len=8) | bad
    with pytest.raises(ValueError, match=match):
        Plan.uniform("tiny", **kw)
