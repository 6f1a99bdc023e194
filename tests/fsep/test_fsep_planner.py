"""Planner, layouts, cost model and config validation (single process, fast)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hf_ext.accelerate.fsep.config import FSEPConfig
from hf_ext.accelerate.fsep.cost_model import PRESETS, MoEShape, layer_cost, routing_trace, zipf_probs
from hf_ext.accelerate.fsep.planner import Layout, LoadPlanner, allocate_replicas, greedy_placement


@pytest.mark.parametrize("e,n,cap,alpha", [(64, 8, 9, 1.2), (8, 2, 5, 1.5), (8, 32, 1, 1.0), (16, 4, 4, 0.0)])
def test_planned_layout_covers_every_expert_and_respects_capacity(e, n, cap, alpha):
    trace = routing_trace(e, n, 2048, 2, alpha, 5, drift=0.2, seed=1)
    planner = LoadPlanner(e, n, cap, history=5)
    for c in trace:
        planner.observe(c)
    lay = planner.plan()
    lay.validate(cap)  # every expert held, <= cap per rank, no duplicates, routing rows sum to 1
    assert set(e_ for s in lay.slots for e_ in s) == set(range(e))
    assert max(len(s) for s in lay.slots) <= cap
    shares = lay.token_shares(trace[-1])
    assert (shares.sum(axis=2) == trace[-1]).all()  # the integer split keeps every token
    held = lay.slot_index() >= 0
    assert (shares.sum(axis=0)[~held.T] == 0).all()  # nothing goes to a rank without the expert


def test_planner_with_a_single_expert_replicates_it_on_every_rank():
    planner = LoadPlanner(1, 2, capacity=1)
    planner.observe(np.array([[5], [3]]))
    lay = planner.plan()  # no perturbation of the replica counts is possible (it needs two experts)
    lay.validate(1)
    assert [list(s) for s in lay.slots] == [[0], [0]]


def test_replicas_follow_load_and_placement_balances():
    loads = np.array([800.0, 100, 50, 50, 0, 0, 0, 0])
    reps = allocate_replicas(loads, total_slots=10, max_replicas=2)
    assert reps.sum() == 10 and reps[0] == 2 and reps[1] == 2
    reps = allocate_replicas(loads, total_slots=12, max_replicas=4)
    assert reps[0] == 4  # the hot expert gets the spare slots
    slots = greedy_placement(reps, loads, 4, 3)
    per_rank = [sum(loads[x] / reps[x] for x in s) for s in slots]
    assert max(per_rank) <= 1.01 * (loads.sum() / 4) + 1e-9
    assert greedy_placement(np.array([4, 1]), np.array([1.0, 1.0]), 2, 3) is None  # 4 replicas on 2 ranks


def test_planner_beats_static_ep_under_skew_and_matches_when_balanced():
    shape = MoEShape(hidden=4096, intermediate=14336, num_experts=8, top_k=2, tokens_per_rank=8192)
    hw = PRESETS["h100"]
    for alpha, lo, hi in [(1.2, 1.3, 10.0), (0.0, 0.85, 1.2)]:
        trace = routing_trace(8, 8, 8192, 2, alpha, 8, seed=3)
        planner = LoadPlanner(8, 8, 2, shape=shape, hardware=hw)
        ratios = []
        for step, counts in enumerate(trace):
            if step >= 5:
                lay = planner.plan()
                fsep = layer_cost(lay, counts, shape, hw, mode="fsep").total
                ep = layer_cost(Layout.identity(8, 8), counts, shape, hw, mode="static_ep").total
                ratios.append(ep / fsep)
            planner.observe(counts)
        assert lo <= float(np.mean(ratios)) <= hi, (alpha, ratios)


def test_planner_is_fast_and_deterministic():
    trace = routing_trace(64, 8, 8192, 8, 1.0, 5, seed=0)
    a, b = LoadPlanner(64, 8, 9), LoadPlanner(64, 8, 9)
    for c in trace:
        a.observe(c)
        b.observe(c)
    a.plan()
    t0 = time.perf_counter()
    la = a.plan()
    dt = time.perf_counter() - t0
    assert la.slots == b.plan().slots  # every rank computes the same layout from the same counts
    assert dt < 0.05  # the benchmark records the real figure (< 5 ms target); loose here for shared CPUs


def test_layouts_and_costs():
    ident = Layout.identity(8, 2)
    assert ident.slots == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert Layout.identity(4, 8).replicas().tolist() == [2, 2, 2, 2]
    fs = Layout.fsdp(4, 2)
    shares = fs.token_shares(np.array([[3, 0, 1, 5], [2, 2, 2, 2]]))
    assert shares[0, :, 1].sum() == 0 and shares[1, :, 0].sum() == 0  # FSDP keeps tokens local
    with pytest.raises(ValueError, match="does not cover experts"):
        Layout.from_slots([[0, 1], [1, 2]], 4)
    with pytest.raises(ValueError, match="capacity"):
        Layout.from_slots([[0, 1, 2], [3]], 4).validate(2)
    p = zipf_probs(8, 1.0)
    assert abs(p.sum() - 1) < 1e-12 and p[0] > p[-1]
    shape = MoEShape(hidden=64, intermediate=128, num_experts=4, top_k=2, tokens_per_rank=32)
    c_ep = layer_cost(Layout.identity(4, 2), np.full((2, 4), 16), shape, PRESETS["cpu"], mode="static_ep")
    c_fs = layer_cost(Layout.identity(4, 2), np.full((2, 4), 16), shape, PRESETS["cpu"], mode="fsep")
    assert c_ep.weight == 0 and c_fs.weight > 0 and c_fs.total >= c_ep.total


def test_config_validation_and_single_process_errors():
    with pytest.raises(ValueError, match="mode"):
        FSEPConfig(mode="ep")
    with pytest.raises(ValueError, match="layout_policy"):
        FSEPConfig(layout_policy="random")
    with pytest.raises(ValueError, match="capacity"):
        FSEPConfig(capacity=0)
    with pytest.raises(ValueError, match="capacity=1 is too small"):
        FSEPConfig(capacity=1).resolved_capacity(8, 2)
    assert FSEPConfig().resolved_capacity(8, 2) == 5
    assert FSEPConfig(mode="static_ep").resolved_capacity(8, 2) == 4
    with pytest.raises(ValueError, match="capacity"):
        LoadPlanner(8, 2, 3)


def test_world_size_one_and_uninitialised_errors(tmp_path):
    import torch.distributed as dist

    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.testing import tiny_moe

    model = tiny_moe("mixtral")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed"):
            prepare_fsep(model, FSEPConfig())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="world_size=1"):
            prepare_fsep(model, FSEPConfig())
    finally:
        dist.destroy_process_group()


def _two_gpu_ratio(hw, alpha: float, colocated: bool) -> float:
    """Cost-model static-EP / FSEP time of the measured 2-GPU Mixtral stack (8,192 tokens per rank)."""
    from hf_ext.accelerate.fsep.cost_model import inclusion_probs

    e, k = 8, 2
    shape = MoEShape(4096, 14336, e, k, 8192)
    p = (
        zipf_probs(e, alpha, perm=np.arange(e))
        if colocated
        else zipf_probs(e, alpha, np.random.default_rng(1))
    )
    pi, rng = inclusion_probs(p, k), np.random.default_rng(0)
    planner = LoadPlanner(e, 2, 5, shape=shape, hardware=hw, history=5)
    fsep = static = 0.0
    for _ in range(10):
        counts = np.stack([rng.binomial(8192, pi) for _ in range(2)]).astype(float)
        planner.observe(counts)
        fsep += layer_cost(planner.plan(), counts, shape, hw, mode="fsep").total
        static += layer_cost(Layout.identity(e, 2), counts, shape, hw, mode="static_ep").total
    return static / fsep


@pytest.mark.parametrize(
    ("alpha", "colocated", "measured"),
    # FSEP vs static EP measured on 2 x H100 (benchmarks/results/fsep.csv, *_mixtral8x7b_L2_T8192 rows, p2p)
    [(0.0, False, 0.785), (1.0, False, 0.817), (1.5, False, 0.867), (1.5, True, 1.202)],
)
def test_fitted_preset_reproduces_the_measured_two_gpu_ratios(alpha, colocated, measured):
    assert _two_gpu_ratio(PRESETS["h100_2gpu_fit"], alpha, colocated) == pytest.approx(measured, abs=0.1)
    # the unfitted preset hides the weight traffic completely and is optimistic by up to 0.5
    assert _two_gpu_ratio(PRESETS["h100"], alpha, colocated) > measured + 0.1


def test_cpu_model_under_nccl_is_refused_and_prepare_model_moves_to_the_accelerator(tmp_path, monkeypatch):
    """A CPU model with an NCCL process group gets an error saying what to do (it was NCCL's 'No backend type
    associated with device type cpu' from inside the sharding); FSEPPlugin.prepare_model(accelerator=...) moves
    the model to the accelerator's device first (the argument was ignored)."""
    import torch
    import torch.distributed as dist

    from hf_ext.accelerate.fsep import FSEPConfig, FSEPPlugin, prepare_fsep
    from hf_ext.accelerate.fsep import plugin as fsep_plugin
    from hf_ext.testing import tiny_moe

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        with pytest.raises(ValueError, match="model is on the CPU but the process group's backend is nccl"):
            prepare_fsep(tiny_moe("mixtral"), FSEPConfig())
        # an expert-parallel sub-group of a larger world: refused (its expert gradients would never meet)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4 if group is None else 2)
        with pytest.raises(ValueError, match="sub-group"):
            prepare_fsep(tiny_moe("mixtral"), FSEPConfig(), group=object())
    finally:
        dist.destroy_process_group()

    moved: list = []

    class Model(torch.nn.Module):
        def to(self, device):
            moved.append(device)
            return self

    monkeypatch.setattr(fsep_plugin, "prepare_fsep", lambda model, config, group=None: model)
    # prepare_model runs prepare_fsep's checks before the move (a refused model is not moved): a stand-in model here
    monkeypatch.setattr(fsep_plugin, "_check", lambda model, config, group=None, device_check=True: None)
    acc = type("Acc", (), {"device": torch.device("cuda", 1)})()
    FSEPPlugin(FSEPConfig()).prepare_model(Model(), accelerator=acc)
    assert moved == [torch.device("cuda", 1)]
