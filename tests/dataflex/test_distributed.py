"""Sharded ops under 2 gloo processes (DDP, FSDP2, DDP + PEFT LoRA) and the ZeRO-3 GPU path."""

from __future__ import annotations

import numpy as np
import pytest

from tests.dataflex import _dist_fns


def test_ops_under_ddp_fsdp2_and_lora_match_single_process(run_distributed):
    pytest.importorskip("peft")
    ref = _dist_fns.reference()
    outs = run_distributed(_dist_fns.all_checks, 2)
    for r in outs:
        for mode in ("ddp", "fsdp"):
            for k in ("loss", "excess", "emb", "grad"):
                np.testing.assert_allclose(
                    r[mode][k], ref["plain"][k], rtol=1e-4, atol=1e-5, err_msg=f"{mode} {k}"
                )
        assert r["fsdp_sharded"] == "fsdp"
        np.testing.assert_allclose(r["lora_grad"], ref["lora_grad"], rtol=1e-4, atol=1e-5)
        assert r["obs"] == ([2.0, 4.0, 0.0], [2.0, 2.0, 0.0])  # domain 0 got ranks' idx 0,1; domain 1 got 5,6
    assert outs[0]["plan"] == outs[1]["plan"] and len(outs[0]["plan"]["indices"]) == 6


@pytest.mark.gpu
def test_zero3_grad_features_gpu():  # pragma: no cover - needs deepspeed + CUDA
    pytest.importorskip("deepspeed")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import os

    import deepspeed

    from hf_ext.callbacks.dataflex import ops
    from hf_ext.callbacks.dataflex.synthetic import make_mixture, tiny_model
    from hf_ext.testing import free_port

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    data = make_mixture({"clean": 4}, seed=0)
    torch.manual_seed(0)
    ref_model = tiny_model().cuda()
    ref = ops.grad_features(ref_model, data, [0, 1], proj_dim=16, seed=3).numpy()
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(
        model=tiny_model(),
        model_parameters=None,
        config={
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        },
    )
    assert ops.is_sharded(engine.module) == "zero3"
    got = ops.grad_features(engine, data, [0, 1], proj_dim=16, seed=3).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_trainer_under_ddp_pushes_the_summed_state_and_resumes_exactly(run_distributed, tmp_path):
    """DataFlexTrainer with ODM under DDP (2 gloo ranks). With hub_strategy="checkpoint", the state is written from
    on_push_begin, which runs on rank 0 only, from the observations every rank summed at the step's end: the
    uploaded state must equal the one on_save writes without pushing (every rank's observations), and resuming
    from a checkpoint must draw the batches the uninterrupted run drew on each rank."""
    outs = run_distributed(_dist_fns.ddp_trainer_runs, 2, str(tmp_path), timeout=600)
    for r in outs:
        assert sorted(r["plain"]) == [1, 2, 3, 4]
        assert r["pushed"] == r["plain"]  # pushing changes nothing about the data
        assert {s: r["resumed"][s] for s in (3, 4)} == {s: r["plain"][s] for s in (3, 4)}, r["rank"]
    assert outs[0]["plain"][1] != outs[1]["plain"][1]  # the ranks draw different samples
    states, uploads = outs[0]["states"], outs[0]["uploads"]
    pushed = [state for where, state in uploads if where == "last-checkpoint"]
    assert len(pushed) == 2 and all(
        s is not None for s in pushed
    )  # the state was in the folder at both uploads
    for step, up in zip((2, 4), pushed):
        plain = states[f"plain-{step}"]
        assert states[f"pushed-{step}"] == up  # on_save left the uploaded file as it was
        for key in ("observed_loss", "observed_count", "mixer", "weights", "sampler"):
            assert up[key] == plain[key], (step, key)  # the same computation on the same ranks: exactly equal
    # both ranks' samples are counted: 2 ranks x 4 samples per step since the last mixer update
    assert sum(pushed[0]["observed_count"]) == 8, pushed[0]["observed_count"]
