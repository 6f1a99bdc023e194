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
