"""Distributed helpers of ``test_fsep_convert.py`` (module level: run_distributed spawns processes)."""

from __future__ import annotations

from typing import Any


def frozen_experts(rank: int, world_size: int) -> dict[str, Any]:
    """Experts frozen (``requires_grad=False``) and the model in eval mode before ``prepare_fsep``: the FSEP
    parameters stay frozen, the layers in eval mode, and ``remove_fsep`` restores both as they are then."""
    import torch

    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep, remove_fsep
    from hf_ext.testing import tiny_moe

    out: dict[str, Any] = {}
    for mode in ("fsep", "static_ep"):
        m = tiny_moe("qwen2_moe", seed=0).eval()
        for n, p in m.named_parameters():
            if ".experts." in n:
                p.requires_grad_(False)
        prepare_fsep(m, FSEPConfig(mode=mode))
        layers = [mod for n, mod in m.named_modules() if n.endswith("mlp.experts")]
        out[f"{mode}_requires_grad"] = [layer.expert_param.requires_grad for layer in layers]
        out[f"{mode}_training"] = [layer.training for layer in layers]
        m.train()
        ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(rank))
        m(ids, labels=ids).loss.backward()
        out[f"{mode}_grads"] = [layer.expert_param.grad is not None for layer in layers]
        remove_fsep(m)
        restored = [mod for n, mod in m.named_modules() if n.endswith("mlp.experts")]
        out[f"{mode}_removed_training"] = [mod.training for mod in restored]
        out[f"{mode}_removed_requires_grad"] = [
            (mod.gate_up_proj.requires_grad, mod.down_proj.requires_grad) for mod in restored
        ]
    m = tiny_moe("qwen2_moe", seed=0)
    m.model.layers[0].mlp.experts.down_proj.requires_grad_(False)
    try:
        prepare_fsep(m, FSEPConfig())
        out["mixed"] = "no error"
    except ValueError as exc:
        out["mixed"] = str(exc)
    out["mixed_untouched"] = type(m.model.layers[0].mlp.experts).__name__
    return out
