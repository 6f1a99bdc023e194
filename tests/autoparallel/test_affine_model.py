"""Affine-in-b runtime terms: the profiler's fits and the cost model's charges (CPU, synthetic, fast).

A synthetic profile stands for a GPU: plain layer / head / embedding lines, a whole-model wrapper line
``W(b)``, a runtime excess ``X_dp(b) = x0 + x1 * b`` per micro-batch, a per-step overhead ``F_dp`` and a
recompute cost of ``kappa_dp`` layer forwards. The true step is
``F + m * (plain(b) + W(b) + X(b) + n_ckpt * kappa * fwd(b)) + optimizer``; the profiler's derivations
(:func:`_fit_train_steps`, :func:`_wrapper_line`, :func:`_runtime_coefficients`) fed with measurements at
``b`` = 1 and 4 must make the cost model predict it exactly at every ``b`` and ``m``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from hf_ext.accelerate.autoparallel import profiler
from hf_ext.accelerate.autoparallel.cost_model import CostModel, LayerStrategy, ParallelConfig, TrainingSpec
from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, LayerProfile, ModelProfile
from hf_ext.accelerate.autoparallel.search import predict, predict_breakdown, search
from hf_ext.accelerate.autoparallel.shapes import ModelShape

SHAPE = ModelShape("small", 4, 1024, 4096, 8, 8, 8000)
SEQ, GB = 2048, 8
L = SHAPE.num_layers
P_LAYER = SHAPE.layer_params()
N_LAYERS = P_LAYER * L
N_TOTAL = SHAPE.num_params()
OPT_NS = 0.01
# plain lines (ms): layer fwd 0.05 + 0.4 b, bwd 0.08 + 0.9 b; head 0.1 + 0.3 b | 0.2 + 0.6 b; embed 0.01 + ...
LAYER = (0.05, 0.4, 0.08, 0.9)
HEAD = (0.1, 0.3, 0.2, 0.6)
EMBED = (0.01, 0.02, 0.03, 0.04)
# truth of the synthetic runtime
W_TRUE = (1.5, 0.25)
X_TRUE = {"ddp": (30.0, 12.0), "fsdp": (45.0, 3.0)}
F_TRUE = {"ddp": 5.0, "fsdp": 9.0}
KAPPA = {"ddp": 1.3, "fsdp": 1.1}


def _fwd(b: float) -> float:
    return LAYER[0] + LAYER[1] * b


def _plain(b: float) -> float:
    """Plain bf16 model forward + backward by hand: layers, head, embedding."""
    lay = L * (LAYER[0] + LAYER[1] * b + LAYER[2] + LAYER[3] * b)
    return (
        lay
        + HEAD[0]
        + HEAD[1] * b
        + HEAD[2]
        + HEAD[3] * b
        + EMBED[0]
        + EMBED[1] * b
        + EMBED[2]
        + EMBED[3] * b
    )


def _t_full(b: float) -> float:
    return _plain(b) + W_TRUE[0] + W_TRUE[1] * b


def _true_step(dp: str, b: int, m: int, n_ckpt: int = 0) -> float:
    x0, x1 = X_TRUE[dp]
    mb = _t_full(b) + x0 + x1 * b + n_ckpt * KAPPA[dp] * _fwd(b)
    return F_TRUE[dp] + m * mb + OPT_NS * N_TOTAL * 1e-6


def _base_profile() -> ModelProfile:
    """A profile with the plain lines only (what profile_model has before the whole-model probes)."""
    lay = [LayerProfile(f"layer{i}", P_LAYER, *LAYER, 1e6) for i in range(L)]
    head = LayerProfile("head", SHAPE.vocab_size * SHAPE.hidden_size + SHAPE.hidden_size, *HEAD, 1e6)
    embed = LayerProfile("embed", SHAPE.vocab_size * SHAPE.hidden_size, *EMBED, 0.0)
    achieved = SHAPE.layer_flops_fwd(SEQ, SEQ) / (LAYER[1] * 1e-3) / 1e12  # compute(b) = 0.4 b ms
    return ModelProfile(
        SHAPE,
        SEQ,
        [1, 2, 4, 8],
        "synthetic",
        "bfloat16",
        lay,
        head,
        achieved,
        LAYER[3] / LAYER[1],
        1.0,
        LAYER[0],
        embed,
        optimizer_ns_per_param=OPT_NS,
        bwd_overhead_ms=LAYER[2],
    )


def _derived_profile(sizes: tuple[int, ...] = (1, 4), ckpt: bool = True) -> ModelProfile:
    """The profile the profiler derives from synthetic measurements at ``sizes`` (as profile_model does)."""
    prof = _base_profile()
    prof.runtime_micro_batches = list(sizes)
    t_full = {b: _t_full(b) for b in sizes}
    prof.micro_batch_overhead_ms, prof.micro_batch_overhead_ms_per_sample = profiler._wrapper_line(
        prof, t_full
    )
    fwd = HardwareProfile.cpu()
    hw = prof.calibrate(fwd)
    notes: dict[str, str] = {}
    for dp in ("ddp", "fsdp"):
        cfgs = [(b, m) for i, b in enumerate(sizes) for m in ((1, 3) if i == 0 else (1, 2))]
        steps = {(b, m): _true_step(dp, b, m) - OPT_NS * N_TOTAL * 1e-6 for b, m in cfgs}  # train_step only
        fixed, mb_fixed, per_sample = profiler._fit_train_steps([(b, m, t) for (b, m), t in steps.items()])
        r = {"fixed_ms": fixed, "mb_fixed_ms": mb_fixed, "mb_ms_per_sample": per_sample}
        r.update({f"step_b{b}_m{m}_ms": t for (b, m), t in steps.items()})
        if ckpt:
            bc = max(sizes)
            r["ckpt_b"] = float(bc)
            r[f"ckpt_step_b{bc}_m1_ms"] = steps[(bc, 1)] + L * KAPPA[dp] * _fwd(bc)
        co = profiler._runtime_coefficients(
            r,
            dp,
            t_full,
            N_TOTAL,
            N_LAYERS,
            P_LAYER,
            L,
            lambda b: hw.layer_ms(SHAPE, b, SEQ)[0],
            notes,
        )
        if "recompute_fwd_ratio" in co:
            prof.recompute_fwd_ratio[dp] = co.pop("recompute_fwd_ratio")
        for k, v in co.items():
            setattr(prof, k, v)
        prof.step_overhead_ms[dp] = r["fixed_ms"]  # the optimizer is modelled exactly
    assert notes == {}
    return prof


def _plan(dp: str, b: int, n_ckpt: int = 0) -> Plan:
    plan = Plan.uniform(SHAPE, gpus=1, dp_type=dp, global_batch=GB, seq_len=SEQ, micro_batch=b)
    for i in range(n_ckpt):
        plan.layers[i] = {**plan.layers[i], "ckpt": True}
    return plan


def test_fit_train_steps_exact_and_single_size():
    pts = [(b, m, 7.0 + m * (3.0 + 2.0 * b)) for b, m in ((1, 1), (1, 3), (4, 1), (4, 2))]
    assert profiler._fit_train_steps(pts) == pytest.approx((7.0, 3.0, 2.0))
    # one size (the larger probe failed): a per-micro-batch constant, as before version 4
    assert profiler._fit_train_steps(pts[:2]) == pytest.approx((7.0, 5.0, 0.0))
    assert profiler._line([1, 4], [2.0, 8.0]) == pytest.approx((0.0, 2.0))
    assert profiler._line([1], [3.0]) == (3.0, 0.0)


def test_plain_model_matches_the_layer_lines():
    """The calibrated model reproduces the profiled forward AND backward lines (not bwd = ratio * fwd)."""
    prof = _base_profile()
    for b in (1, 2, 4, 8):
        assert prof.plain_step_ms(b) == pytest.approx(_plain(b), rel=1e-12)
    cm = CostModel(SHAPE, prof.calibrate(HardwareProfile.h100()), TrainingSpec(GB, SEQ), prof)
    fwd, bwd = cm.layer_ms(3, 1)
    assert fwd == pytest.approx(LAYER[0] + 3 * LAYER[1])
    assert bwd == pytest.approx(LAYER[2] + 3 * LAYER[3])


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_affine_runtime_excess_is_charged_per_sequence(dp):
    """Measured at b = 1 and 4, the prediction is exact at every (b, m), b = 2 and 8 included; charging the
    b=1 excess once per micro-batch (the old model: b=1 probes only) misses b8x1 by 7 and b2x4 by 4
    per-sequence slopes."""
    prof = _derived_profile()
    for b in (1, 2, 4, 8):
        pred = predict(_plan(dp, b), profile=prof, memory_gb=1e4).step_ms
        assert pred == pytest.approx(_true_step(dp, b, GB // b), rel=1e-9), b
    old = _derived_profile(sizes=(1,), ckpt=False)
    slope = W_TRUE[1] + X_TRUE[dp][1]
    err8 = predict(_plan(dp, 8), profile=old, memory_gb=1e4).step_ms - _true_step(dp, 8, 1)
    err2 = predict(_plan(dp, 2), profile=old, memory_gb=1e4).step_ms - _true_step(dp, 2, 4)
    assert err8 == pytest.approx(-7 * slope) and err2 == pytest.approx(-4 * slope)


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_checkpoint_recompute_uses_the_measured_runtime_cost(dp):
    prof = _derived_profile()
    assert prof.recompute_fwd_ratio[dp] == pytest.approx(KAPPA[dp])
    for b, n_ckpt in ((8, 4), (8, 2), (2, 1), (1, 3)):
        pred = predict(_plan(dp, b, n_ckpt), profile=prof, memory_gb=1e4).step_ms
        assert pred == pytest.approx(_true_step(dp, b, GB // b, n_ckpt), rel=1e-9), (b, n_ckpt)
    # without the checkpointed probe: one plain layer forward per checkpointed layer (the old formula)
    plain = _derived_profile(ckpt=False)
    assert plain.recompute_fwd_ratio == {}
    d = (
        predict(_plan(dp, 4, 4), profile=plain, memory_gb=1e4).step_ms
        - predict(_plan(dp, 4), profile=plain, memory_gb=1e4).step_ms
    )
    assert d == pytest.approx(2 * L * _fwd(4))


def test_breakdown_adds_up():
    prof = _derived_profile()
    for plan in (_plan("ddp", 8, 2), _plan("fsdp", 2, 4)):
        bd = predict_breakdown(plan, profile=prof)
        total = predict(plan, profile=prof, memory_gb=1e4).step_ms
        assert bd["total"] == pytest.approx(total)
        assert sum(v for k, v in bd.items() if k != "total") == pytest.approx(total)
        m = plan.num_micro_batches
        assert bd["layers_bwd"] == pytest.approx(m * L * (LAYER[2] + LAYER[3] * plan.micro_batch))
        assert bd["step_overhead"] == pytest.approx(F_TRUE[plan.dp_type])
    # pipeline / tensor parallel plans add up too (bubble, tp collectives)
    pp = Plan.uniform(SHAPE, gpus=4, dp_type="fsdp", pp=2, tp=2, global_batch=GB, seq_len=SEQ, micro_batch=1)
    bd = predict_breakdown(pp, profile=prof)
    assert bd["pipeline_bubble"] > 0 and bd["tp_comm"] > 0
    assert sum(v for k, v in bd.items() if k != "total") == pytest.approx(bd["total"])


def test_one_size_profile_keeps_the_constant_charge():
    """Only b=1 measured (the larger probe failed): constants per micro-batch, exact at b=1."""
    prof = _derived_profile(sizes=(1,), ckpt=False)
    assert prof.autocast_ns_per_param_per_sample == 0.0 and prof.micro_batch_overhead_ms_per_sample == 0.0
    assert predict(_plan("ddp", 1), profile=prof, memory_gb=1e4).step_ms == pytest.approx(
        _true_step("ddp", 1, GB), rel=1e-9
    )


def test_old_profile_json_loads_with_the_old_behaviour(tmp_path):
    """A version-3 profile (no per-sample coefficients, no backward line, no recompute ratio) predicts
    with the old formulas: bwd = ratio * fwd, recompute = one forward, per-micro-batch constants."""
    d = _derived_profile().to_dict()
    for k in (
        "bwd_overhead_ms",
        "autocast_ns_per_param_per_sample",
        "fsdp_layer_overhead_ms_per_sample",
        "micro_batch_overhead_ms_per_sample",
        "recompute_fwd_ratio",
        "runtime_micro_batches",
    ):
        del d[k]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    old = ModelProfile.load(str(path))
    assert old.bwd_overhead_ms is None and old.recompute_fwd_ratio == {}
    ratio = old.bwd_fwd_ratio
    for dp, b, n_ckpt in (("ddp", 8, 2), ("fsdp", 2, 4)):
        m = GB // b
        fwd = _fwd(b)
        lay = L * (fwd + ratio * fwd) + n_ckpt * fwd
        if dp == "ddp":
            extra = old.autocast_ns_per_param * N_TOTAL * 1e-6
        else:
            extra = old.fsdp_layer_overhead_ms / P_LAYER * (N_LAYERS + 2 / 3 * (N_TOTAL - N_LAYERS))
        head = (
            HEAD[0] + HEAD[1] * b + HEAD[2] + HEAD[3] * b + EMBED[0] + EMBED[1] * b + EMBED[2] + EMBED[3] * b
        )
        want = m * (lay + head + old.micro_batch_overhead_ms + extra) + OPT_NS * N_TOTAL * 1e-6
        want += old.step_overhead_ms[dp]
        assert predict(_plan(dp, b, n_ckpt), profile=old, memory_gb=1e4).step_ms == pytest.approx(
            want, rel=1e-9
        )


def test_defaults_without_profile_unchanged():
    """``hf-ext plan`` (H100 defaults, no profile): bwd = 2 x fwd, recompute = one forward."""
    hw = HardwareProfile.h100()
    assert hw.bwd_overhead_ms is None
    cm = CostModel(SHAPE, hw, TrainingSpec(GB, SEQ))
    cfg = ParallelConfig(1, 1, 1, False, 2, 4, "ddp")
    f, bwd = cm.layer_ms(2, 1)
    assert bwd == pytest.approx(2 * f)
    plain, ck = cm.layer_terms(cfg, LayerStrategy(0, False)), cm.layer_terms(cfg, LayerStrategy(0, True))
    assert ck.mb_ms - plain.mb_ms == pytest.approx(f)
    assert cm.breakdown(cfg, [[LayerStrategy(0, False)] * L])["total"] == pytest.approx(
        cm.evaluate(cfg, [[LayerStrategy(0, False)] * L]).step_ms
    )


def test_search_with_affine_profile_prefers_what_is_cheaper():
    """A large per-micro-batch constant favours few micro-batches; a large per-sequence excess does not."""
    prof = _derived_profile()
    best = search(SHAPE, _sc(), profile=prof).best
    assert best.predicted["step_ms"] == pytest.approx(predict(best, profile=prof, memory_gb=1e4).step_ms)
    heavy_mb = dataclasses.replace(prof, micro_batch_overhead_ms=500.0)
    assert search(SHAPE, _sc(), profile=heavy_mb).best.micro_batch == 8


def _sc():
    from hf_ext.accelerate.autoparallel.search import SearchConfig

    return SearchConfig(gpus=1, memory_gb=1e4, global_batch=GB, seq_len=SEQ, micro_batch_sizes=(1, 2, 4, 8))


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_a_falling_runtime_term_is_held_past_the_largest_probe(dp):
    """Exact between the probes (b = 1..4); past b = 4 a line that falls with b stays at its b = 4 value."""
    global X_TRUE
    saved = X_TRUE
    X_TRUE = {**X_TRUE, dp: (60.0, -5.0)}  # the excess falls 5 ms per sequence between b = 1 and 4
    try:
        prof = _derived_profile(ckpt=False)
        for b in (1, 2, 4):
            pred = predict(_plan(dp, b), profile=prof, memory_gb=1e4).step_ms
            assert pred == pytest.approx(_true_step(dp, b, GB // b), rel=1e-9), b
        pred8 = predict(_plan(dp, 8), profile=prof, memory_gb=1e4).step_ms
        # the b=4 excess (60 - 20) charged once, where the line would have given 60 - 40
        assert pred8 == pytest.approx(_true_step(dp, 8, 1) + 20.0, rel=1e-9)
    finally:
        X_TRUE = saved
