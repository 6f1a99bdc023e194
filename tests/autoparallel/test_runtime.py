"""Profiler and runtime (apply_plan on 2 gloo processes) tests."""

from __future__ import annotations

import time

import pytest

from hf_ext.accelerate.autoparallel.profiler import HardwareProfile, ModelProfile, profile_model
from tests.autoparallel import _dist_fns


def test_profile_model_and_cache(tmp_path, tiny_llama):
    kw = dict(seq_len=32, micro_batches=(1, 2), repeats=1, max_layers=1, cache_dir=str(tmp_path))
    prof = profile_model(tiny_llama, **kw)
    assert len(prof.layers) == 2 and prof.layers[0].params == sum(
        p.numel() for p in tiny_llama.model.layers[0].parameters()
    )
    lp = prof.layers[0]
    assert lp.fwd_ms(2) > 0 and lp.bwd_ms(2) > 0
    # fp32 layer saves at least its input and the 4 SwiGLU intermediates (bytes per sample).
    h, f = 64, 128
    assert lp.act_bytes_per_sample >= 4 * 32 * (h + 4 * f)
    assert 0.3 < prof.act_calibration < 5
    # logits [32, 512] in fp32 at least once
    assert prof.head.act_bytes_per_sample >= 32 * 512 * 4
    files = list(tmp_path.glob("model_*.json"))
    assert len(files) == 1
    t0 = time.perf_counter()
    again = profile_model(tiny_llama, **kw)
    assert time.perf_counter() - t0 < 0.5 and again == ModelProfile.load(str(files[0]))
    hw = prof.calibrate(HardwareProfile.h100())
    assert hw.achieved_tflops == prof.achieved_tflops and HardwareProfile.from_dict(hw.to_dict()) == hw


def test_collective_time_model():
    hw = HardwareProfile.h100()
    n = 1 << 30
    assert hw.collective_ms("all_reduce", n, 1) == 0.0
    assert hw.collective_ms("all_reduce", n, 8) > hw.collective_ms("all_gather", n, 8)
    assert hw.collective_ms("all_gather", n, 16, crosses_nodes=True) > hw.collective_ms("all_gather", n, 16)
    with pytest.raises(ValueError, match="collective"):
        hw.collective_ms("broadcast", n, 2)


@pytest.fixture(scope="module")
def apply_all_out(tmp_path_factory):
    """One 2-rank gloo launch of ``_dist_fns.apply_all`` (every plan of ``_plans()``, unmasked and left-padded with
    an attention mask), shared by the tests that read it (a launch costs 20-60 s)."""
    from hf_ext.testing import run_distributed

    return run_distributed(_dist_fns.apply_all, 2, str(tmp_path_factory.mktemp("apply_all")))


def test_apply_plan_two_gloo_ranks_reproduce_single_process(apply_all_out):
    from hf_ext.testing import tiny_llama

    ref0, ref1 = _dist_fns.reference_losses()
    hf_names = sorted(tiny_llama().state_dict())
    out = apply_all_out
    r0 = out[0]
    for name in ("ddp_m2", "fsdp_z3", "fsdp_ckpt", "fsdp_mixed", "tp2", "tp2_ddp", "pp2", "pp2_plain"):
        l0, l1 = r0[name]
        assert l0 == pytest.approx(ref0, rel=1e-5), name
        # After one SGD step the loss matches too: gradients were averaged correctly.
        assert l1 == pytest.approx(ref1, rel=1e-4), name
        assert out[1][name] == r0[name]
        # AppliedPlan.save_pretrained writes the trained weights in HF format (one process loads them back),
        # under the model's own names; the pipeline plans assemble them from both stages (they used to be refused)
        assert r0[name + ":saved"] == pytest.approx(ref1, rel=1e-4), name
        assert r0[name + ":saved_keys"] == hf_names, name
    assert r0["fsdp_ckpt:ckpt"] == [True, True]
    assert r0["fsdp_mixed:ckpt"] == [False, True]
    assert r0["ddp_m2:ckpt"] == [False, False]
    coll = r0["collectives"]
    assert set(coll) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"}
    assert all(v["2"][1] > 0 for v in coll.values())


def test_left_padded_batch_with_attention_mask_matches_single_process(apply_all_out):
    """A left-padded batch (pads 0/5/9/14 of 16 tokens per row) trained through train_step(ids,
    attention_mask=mask) under every plan of _plans() (DDP, FSDP zero2/3, checkpointing, TP, TP+DDP, PP with and
    without FSDP) gives the losses before / after one SGD step of one process calling
    model(ids, attention_mask=mask, labels=ids with -100 at the pads). train_step used to take no attention mask:
    pads could only be dropped from the targets (-100 labels), and were still attended to."""
    ref0, ref1 = _dist_fns.masked_reference_losses()
    # the mask matters: the same -100 labels without it give other losses
    unmasked0, unmasked1 = _dist_fns.masked_reference_losses(use_mask=False)
    assert unmasked0 != pytest.approx(ref0, rel=1e-4) and unmasked1 != pytest.approx(ref1, rel=1e-4)
    r0, r1 = apply_all_out
    for name in _dist_fns._plans():
        got = r0[name + ":masked"]
        assert not isinstance(got, str), (name, got)
        l0, l1 = got
        assert l0 == pytest.approx(ref0, rel=1e-5), name
        assert l1 == pytest.approx(ref1, rel=1e-4), name
        assert r1[name + ":masked"] == got, name


def _one_process_runner(model):
    """An AppliedPlan over a plain model with a one-GPU plan, built without torch.distributed (train_step needs no
    collective when dp = 1 and there is no pipeline)."""
    import torch

    from hf_ext.accelerate.autoparallel.apply import AppliedPlan
    from hf_ext.accelerate.autoparallel.plan import Plan

    plan = Plan.uniform(model.config, gpus=1, dp_type="ddp", global_batch=2, seq_len=8, micro_batch=1)
    return AppliedPlan(model, plan, None, torch.device("cpu"), None)


# each refused attention_mask (built in the test from a [2, 8] batch) and train_step's whole error message
_BAD_MASKS = {
    "list": "attention_mask must be None or a torch.Tensor of 0 / 1 (bool or integer), got list",
    "short": "attention_mask must have the shape of input_ids (2, 8), got (2, 7)",
    "one_row": "attention_mask must have the shape of input_ids (2, 8), got (8,)",
    "float": "attention_mask must be a bool or integer tensor of 0 / 1 (1 = attend, 0 = padding), got torch.float32",
    "twos": "attention_mask must hold only 0 (padding) and 1 (attend); got 2 other value(s), e.g. [-1, 2]",
}


@pytest.mark.parametrize("case", list(_BAD_MASKS))
def test_attention_mask_is_refused_before_any_forward(tiny_llama, case):
    """train_step refuses an attention_mask that is not a [rows, seq] 0 / 1 bool or integer tensor like input_ids
    with a ValueError naming attention_mask and what it allows, before any forward (no gradient written)."""
    import torch

    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)
    bad = {
        "list": ones.tolist(),
        "short": ones[:, :7],
        "one_row": ones[0],
        "float": ones.float(),
        "twos": ones.clone().index_put_((torch.tensor([0, 1]), torch.tensor([3, 5])), torch.tensor([2, -1])),
    }[case]
    calls = []
    tiny_llama.model.register_forward_pre_hook(lambda *_: calls.append(1))
    runner = _one_process_runner(tiny_llama)
    with pytest.raises(ValueError) as err:
        runner.train_step(ids, attention_mask=bad)
    assert str(err.value) == _BAD_MASKS[case]
    assert calls == [] and all(p.grad is None for p in tiny_llama.parameters())


def test_attention_mask_without_labels_makes_the_pads_no_targets(tiny_llama):
    """train_step(ids, attention_mask=mask) on one process (int64 or bool mask) gives the loss and gradients of
    model(ids, attention_mask=mask, labels=ids with -100 where mask == 0); given labels are used as they are."""
    import torch

    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    tiny_llama.train()
    loss = tiny_llama(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    want = float(loss.detach())
    grads = [p.grad.clone() for p in tiny_llama.parameters()]
    runner = _one_process_runner(tiny_llama)
    for m in (mask, mask.bool()):
        tiny_llama.zero_grad(set_to_none=True)
        assert runner.train_step(ids, attention_mask=m) == pytest.approx(want, rel=1e-6)
        for g, p in zip(grads, tiny_llama.parameters()):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    # labels given: the mask does not change them (every token of row 0 is a target here)
    tiny_llama.zero_grad(set_to_none=True)
    with torch.no_grad():
        own = tiny_llama(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert runner.train_step(ids, ids, attention_mask=mask) == pytest.approx(float(own), rel=1e-6)


def test_pipeline_stage_names_map_onto_the_model():
    """A stage's local state-dict names become the model's (layer index offset by the stage start); an assembled
    set that is not exactly the model's is refused, naming what is missing and what is extra."""
    from hf_ext.accelerate.autoparallel.apply import (
        _check_state_names,
        _pipeline_global_names,
        _PipelineStageModule,
    )
    from hf_ext.testing import tiny_llama

    model = tiny_llama()
    expected = list(model.state_dict())
    maps = []
    for stage in (
        _PipelineStageModule(model, 0, 1, True, False),
        _PipelineStageModule(model, 1, 2, False, True),
    ):
        maps.append(_pipeline_global_names(stage, model, list(stage.state_dict()), set(expected)))
    first, last = maps
    assert first["embed_tokens.weight"] == "model.embed_tokens.weight"
    assert first["layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.up_proj.weight"
    assert last["layers.0.mlp.up_proj.weight"] == "model.layers.1.mlp.up_proj.weight"
    assert last["norm.weight"] == "model.norm.weight" and last["lm_head.weight"] == "lm_head.weight"
    names = [*first.values(), *last.values()]
    _check_state_names(names, expected)
    wrong = [n for n in names if n != "lm_head.weight"] + ["bogus.weight"]
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\], extra \['bogus.weight'\]"):
        _check_state_names(wrong, expected)


def test_probe_failures_are_recorded(tiny_llama):
    """Without a process group the FSDP and runtime probes are skipped visibly, not left silently at 0."""
    prof = profile_model(tiny_llama, seq_len=16, micro_batches=(1,), repeats=1, max_layers=1)
    assert "skipped" in prof.probe_notes["runtime"] and "skipped" in prof.probe_notes["fsdp"]
    assert prof.runtime == {} and prof.step_overhead_ms == {}
    assert ModelProfile.from_dict(prof.to_dict()).probe_notes == prof.probe_notes


def test_runtime_probe_one_rank():
    """The whole-runtime probe times DDP and FSDP2 steps; the cost model adds the per-step remainder."""
    from hf_ext.testing import run_distributed

    (r,) = run_distributed(_dist_fns.profile_runtime, 1)
    assert r["runtime_micro_batches"] == [1, 2]
    for dp in ("ddp", "fsdp"):
        rt = r["runtime"][dp]
        assert rt["mb_ms"] > 0 and rt["opt_ms"] > 0
        # b=1 with 1 and 3 micro-batches, b=2 with 1 and 2, b=2 checkpointed: fitted F + m (f + t b)
        for k in ("step_b1_m1_ms", "step_b1_m3_ms", "step_b2_m1_ms", "step_b2_m2_ms", "ckpt_step_b2_m1_ms"):
            assert rt[k] > 0, k
        assert rt["mb_ms"] == pytest.approx(rt["mb_fixed_ms"] + rt["mb_ms_per_sample"])
        assert "excess_ms_per_sample" in rt and "recompute_ms_per_layer" in rt
        assert r["step_overhead_ms"][dp] >= 0 and r["recompute_fwd_ratio"][dp] >= 0
    assert r["optimizer_ns_per_param"] == pytest.approx(r["runtime"]["ddp"]["optimizer_ns_per_param"])
    assert r["bumped_delta"] == pytest.approx(7.0)
    # the b=2 phase failing (out of memory on a GPU) is noted; b=1 still gives the per-micro-batch constants
    failed = r["failed_large"]
    assert "step_b1_m3_ms" in failed["runtime"] and "step_b2_m1_ms" not in failed["runtime"]
    assert "ckpt_b" not in failed["runtime"] and failed["runtime"]["mb_ms_per_sample"] == 0.0
    assert "failed" in failed["notes"]["runtime_ddp_b2"]

    # a b=1 x 2 DDP step vs the probe's own fit (fixed + 2 micro-batches + optimizer): two separately timed
    # estimates on a shared CPU. Medians of 5 (_dist_fns.REPEATS) gave 0.71-1.13 idle and with the cores busy;
    # medians of 2 once gave 2.1 on a clean-clone CI run, hence the repeats and a factor 2.5. A loaded machine once
    # put one pair 3.4x apart (50.4 vs 14.9 ms) in a clean-clone run: a pair outside the band is measured once more,
    # and the test fails only if the second pair is outside it too.
    def predicted_and_measured(res: dict) -> tuple[float, float]:
        rt = res["runtime"]["ddp"]
        return res["predicted_ms"], rt["fixed_ms"] + 2 * rt["mb_ms"] + rt["opt_ms"]

    predicted, measured = predicted_and_measured(r)
    if not 0.4 < predicted / measured < 2.5:
        predicted, measured = predicted_and_measured(run_distributed(_dist_fns.profile_runtime, 1)[0])
    assert 0.4 < predicted / measured < 2.5, (predicted, measured)


def test_apply_plan_padded_labels_token_mean_matches_single_process(run_distributed):
    """With -100 padding every plan trains on the global batch's token-mean loss, as one process does.

    train_step used to average per-micro-batch and per-rank means (rel. error up to 1e-2, different for each
    plan, so a search switching plans changed training); now it divides the summed token loss by the global
    target-token count (transformers' num_items_in_batch) and returns that loss on every rank."""
    ref = _dist_fns.padded_reference_losses()
    out = run_distributed(_dist_fns.apply_padded, 2)
    names = ("ddp_m1", "ddp_m4", "ddp_m4_logits_loss", "fsdp_z2_m2", "fsdp_z3_ckpt_m4", "tp2_m2", "pp2_m4")
    for name in names:
        for rank in (0, 1):
            assert out[rank][name] == pytest.approx(ref, rel=2e-6), (name, rank)
    assert out[0]["empty"] == 0.0 and out[0]["empty_grad_max"] == 0.0


def test_apply_plan_close_destroys_its_process_groups(run_distributed):
    """Each apply_plan call creates mesh process groups; they used to stay for the life of the process
    (3 calls -> 6 groups). close() / a with block / a failing apply_plan destroy them, not the world group."""
    out = run_distributed(_dist_fns.apply_close, 2)
    r = out[0]
    assert all(n > 0 for n in r["created"]), r["created"]
    assert r["after_with"] == r["after_close"] == r["after_failure"] == 0
    assert "closed" in r["closed_error"] and "sdpa" in r["failure"] and r["world_ok"] == 2.0
    # plans the runtime would train silently wrong (an audit measured each) are refused, before any group is made
    assert "tie_word_embeddings=True" in r["refused"]["tied_pp"], r["refused"]
    assert "sliding_window=3" in r["refused"]["sliding_pp"], r["refused"]
    assert "self_attn.k_norm" in r["refused"]["qk_norm_tp"] and "tp=1" in r["refused"]["qk_norm_tp"], r[
        "refused"
    ]
    assert "intermediate_size 128 in the plan, 96 in the model" in r["refused"]["other_shape"], r["refused"]
    assert r["after_refusals"] == 0
    assert out[1] == r


@pytest.mark.parametrize(
    "name",
    ["pp2_dp2", "pp2_tp2", pytest.param("pp2_dp2_tp2", marks=pytest.mark.slow, id="pp2_dp2_tp2-8ranks")],
)
def test_pipeline_save_pretrained_with_dp_or_tp_inside_the_stages(run_distributed, tmp_path, name):
    """AppliedPlan.save_pretrained of a pp=2 plan whose stages are also sharded over 2 ranks (FSDP dp=2, or
    tp=2): 4 gloo processes train one SGD step and save (``pp2_dp2_tp2``: FSDP over dp=2 with tp=2 inside each of
    two stages, 8 processes, marked slow; it also trains the left-padded batch with its attention mask); the saved model, loaded on one process, has exactly
    the model's tensor names and the loss single-process training reaches after the same step. Each stage
    gathers its DTensors over its own ranks and only its dp/tp-rank-0 leader sends them to rank 0 (this was
    checked only by hand before)."""
    from hf_ext.testing import tiny_llama

    ref0, ref1 = _dist_fns.reference_losses()
    world = 8 if name == "pp2_dp2_tp2" else 4
    out = run_distributed(_dist_fns.save_pipeline, world, str(tmp_path), name)
    r0 = out[0]
    pp, dp, tp, _ = r0[name + ":layout"]
    assert (pp, dp, tp) == {"pp2_dp2": (2, 2, 1), "pp2_tp2": (2, 1, 2), "pp2_dp2_tp2": (2, 2, 2)}[name]
    half = world // 2
    assert [r[name + ":layout"][3] for r in out] == [(0, 1)] * half + [(1, 2)] * half  # stage-major ranks
    l0, l1 = r0[name]
    assert l0 == pytest.approx(ref0, rel=1e-5) and l1 == pytest.approx(ref1, rel=1e-4)
    assert all(r[name] == r0[name] for r in out)
    assert r0[name + ":saved_keys"] == sorted(tiny_llama().state_dict())
    assert r0[name + ":saved"] == pytest.approx(ref1, rel=1e-4)
    if name == "pp2_dp2_tp2":  # FSDP with tp inside a pipeline stage and dp > 1 (slow: 8 processes)
        assert r0[name + ":masked"] == pytest.approx(_dist_fns.masked_reference_losses(), rel=1e-4)
        assert all(r[name + ":masked"] == r0[name + ":masked"] for r in out)


def test_apply_plan_refuses_unrunnable_plans_before_changing_the_model(run_distributed):
    """A pipeline plan on an eager-attention model, a pipeline plan with fewer micro-batches than stages, and a
    tensor-parallel plan whose tp does not divide the KV heads are refused with a ValueError naming the cause,
    and the model is left as it was (no checkpointing flags set, no FSDP classes, no DTensor parameters).

    The first two were refused only after apply_plan had switched checkpointing on (and, for the second, sharded
    the stage with FSDP2: Schedule1F1B's own error); the third was accepted and failed inside the first forward
    with a reshape error."""
    out = run_distributed(_dist_fns.apply_refusals_unchanged, 2)
    r = out[0]
    for name in ("pp_eager", "pp_one_micro_batch", "tp_kv_heads"):
        assert r[name][1] is True, (name, r[name])
    assert "attn_implementation" in r["pp_eager"][0] and "'eager'" in r["pp_eager"][0], r["pp_eager"]
    assert "plan.num_micro_batches=1 must be at least plan.pp=2" in r["pp_one_micro_batch"][0], r
    assert "plan.tp=2 must divide the model's num_key_value_heads=1" in r["tp_kv_heads"][0], r
    assert r["groups_left"] == 0 and out[1] == r


def test_train_step_checkpoints_a_model_given_in_eval_mode(run_distributed):
    """transformers' layers checkpoint only in training mode, and from_pretrained returns an eval-mode model:
    train_step used to run such a model as given, so a plan's checkpointed layers kept every activation (the MLP
    ran once, not forward + recompute). It now switches the module to training mode, as Trainer does."""
    (r,) = run_distributed(_dist_fns.eval_mode_checkpointing, 1)
    assert r == {"fsdp": (2, True), "ddp": (2, True)}, r


def test_batches_of_the_wrong_shape_are_refused_before_any_forward(run_distributed):
    """local_batch of a batch with a row more than plan.global_batch used to drop that row silently (each of 2
    ranks took 5 // 2 rows), and train_step with labels of fewer rows than input_ids trained on the micro-batches
    the labels covered only (zip stopped at the shorter). Both now raise a ValueError naming the shapes, as do
    labels of another length and 1-D input_ids, before any gradient is written."""
    out = run_distributed(_dist_fns.batch_shape_checks, 2)
    r = out[0]
    assert "plan.global_batch=4 rows, got a tensor of shape (5, 8)" in r["local_batch_5_rows"], r
    assert "labels must have the shape of input_ids (2, 8), got (1, 8)" in r["labels_fewer_rows"], r
    assert "got (2, 16)" in r["labels_longer"], r
    assert "input_ids must be a [rows, seq] tensor, got shape (8,)" in r["input_1d"], r
    assert r["grads"] == 0 and out[1] == r


def test_apply_plan_refuses_a_param_dtype_it_cannot_compute_in(run_distributed):
    """param_dtype='bf16' (a string) or torch.int8 used to be accepted: the model was prepared and the first
    train_step failed inside torch.autocast. apply_plan now raises a ValueError listing the allowed values before
    it changes the model."""
    (r,) = run_distributed(_dist_fns.bad_param_dtype, 1)
    for name in ("string", "int8"):
        msg, ckpt = r[name]
        assert "param_dtype must be None, torch.bfloat16, torch.float16, torch.float32" in msg, r
        assert ckpt == [False, False], r


def test_a_plan_applied_again_after_close_trains_and_saves(run_distributed, tmp_path):
    """A dp=2 x tp=2 FSDP plan on 4 gloo ranks, applied, trained, saved and closed twice in one process. The
    second runner used to get DTensor specs cached by the first (a DeviceMesh compares by layout, not by its
    groups), on the process groups close() had destroyed: its save_pretrained failed with "Could not resolve the
    process group". close() now clears DTensor's sharding-propagation caches. Both runs reproduce single-process
    training (loss before and after one SGD step, and the saved model's loss); this is also the first test of
    FSDP over tp-sharded layers with dp > 1."""
    ref0, ref1 = _dist_fns.reference_losses()
    out = run_distributed(_dist_fns.reapply_after_close_4, 4, str(tmp_path))
    r = out[0]
    assert r["layout"] == (1, 2, 2)
    for run in (0, 1):
        assert not isinstance(r[run], str), r[run]
        l0, l1 = r[run]
        assert l0 == pytest.approx(ref0, rel=1e-5) and l1 == pytest.approx(ref1, rel=1e-4), (run, r[run])
        assert r[f"{run}:saved"] == pytest.approx(ref1, rel=1e-4), run
        assert all(o[run] == r[run] for o in out)


def test_plan_refuses_zero_stages_its_dp_type_does_not_run():
    """A plan whose layers carry a zero stage the cost model never prices for its dp_type / dp: a JSON plan edited
    to fsdp with dp=2 and zero 0 loaded fine, was predicted as replicated (DDP-like) layers and run as zero 3 by
    apply_plan; a ddp plan with zero 3 loaded fine and ran replicated. Both are now refused when the plan is made,
    naming the allowed stages; the search's and Plan.uniform's plans load unchanged."""
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.testing import tiny_llama_config

    cfg = tiny_llama_config()
    for dp_type in ("fsdp", "ddp"):
        for gpus in (1, 2):
            plan = Plan.uniform(cfg, gpus=gpus, dp_type=dp_type, global_batch=4, seq_len=8)
            assert Plan.from_json(plan.to_json()) == plan
    fsdp = Plan.uniform(cfg, gpus=2, dp_type="fsdp", global_batch=4, seq_len=8).to_dict()
    fsdp["layers"] = [{"zero": 0, "ckpt": False}, {"zero": 3, "ckpt": False}]
    with pytest.raises(ValueError, match=r"zero \[0\] with dp_type='fsdp' and dp=2.*are \[2, 3\]"):
        Plan.from_dict(fsdp)
    ddp = Plan.uniform(cfg, gpus=2, dp_type="ddp", global_batch=4, seq_len=8).to_dict()
    ddp["layers"] = [{"zero": 3, "ckpt": False}] * 2
    with pytest.raises(ValueError, match=r"zero \[3\] with dp_type='ddp' and dp=2.*are \[0\]"):
        Plan.from_dict(ddp)


def test_pipeline_moves_only_this_ranks_stage_to_the_device(run_distributed, tmp_path):
    """apply_plan moved the whole model to the device on every pipeline rank (and tensor-parallelised every layer),
    so on GPUs each stage held all the stages' weights, beyond the plan's memory. Only the stage is moved now:
    with the other stage's modules on the meta device (which the old code failed to copy), a pp=2 plan still
    reproduces single-process training and saves the whole model, and the other stage is left untouched."""
    ref0, ref1 = _dist_fns.reference_losses()
    out = run_distributed(_dist_fns.pipeline_other_stages_on_meta, 2, str(tmp_path))
    r = out[0]
    assert "error" not in r, r
    l0, l1 = r["losses"]
    assert l0 == pytest.approx(ref0, rel=1e-5) and l1 == pytest.approx(ref1, rel=1e-4), r
    assert r["saved"] == pytest.approx(ref1, rel=1e-4)
    assert r["other_device"] == out[1]["other_device"] == "meta"
    assert out[1]["losses"] == r["losses"]
