"""apply_plan: what a call that fails part-way leaves on the model (in-process one-rank gloo group)."""

from __future__ import annotations

import pytest
import torch

from hf_ext.accelerate.autoparallel.plan import Plan


def _checkpoint_state(model) -> list:
    return [
        (layer.gradient_checkpointing, "_gradient_checkpointing_func" in vars(layer), layer.training)
        for layer in model.model.layers
    ]


def test_a_plan_that_fails_to_apply_leaves_activation_checkpointing_as_it_was():
    """DDP refusing a model with no trainable parameter raised after apply_plan had switched activation
    checkpointing on in every layer: the model left over trained (and recomputed) checkpointed afterwards, although
    apply_plan had failed."""
    import torch.distributed as dist

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.testing import tiny_llama

    if dist.is_initialized():
        pytest.skip("needs a process group of its own")
    model = tiny_llama().train()
    for p in model.parameters():
        p.requires_grad_(False)
    before = _checkpoint_state(model)
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plan = Plan.uniform(model.config, gpus=1, dp_type="ddp", ckpt=True, global_batch=2, seq_len=8)
        with pytest.raises(RuntimeError, match="requires a gradient"):
            apply_plan(model, plan, device="cpu", param_dtype=None)
    finally:
        dist.destroy_process_group()
    assert _checkpoint_state(model) == before == [(False, False, True)] * 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
