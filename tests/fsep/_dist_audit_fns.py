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


def layer_edge_cases(rank: int, world_size: int) -> dict[str, float]:
    """One FSEP layer against the dense experts: a rank with no tokens, a rank that materialises no expert,
    top-k ids outside [0, E) (ignored), replicas with uneven token shares; outputs and shard gradients."""
    import torch
    import torch.nn.functional as F

    from hf_ext.accelerate.fsep import FSEPConfig, Layout
    from hf_ext.accelerate.fsep.layer import FSEPExperts

    torch.manual_seed(0)
    e, h, i = 4, 8, 6
    gu, dn = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    out: dict[str, float] = {}
    layouts = {
        "empty_rank": Layout.from_slots([[0, 1, 2, 3], []], e),
        "replicas": Layout.from_slots([[0, 1, 2], [0, 3, 1]], e, "uniform"),
    }
    for name, lay in layouts.items():
        for t in (0, 5):  # rank 1 sends no tokens in the first case
            layer = FSEPExperts(gu, dn, F.silu, FSEPConfig(layout_policy="fsdp", async_grad_reduce=False))
            layer.set_layout(lay)
            g = torch.Generator().manual_seed(rank + 10)
            rows = 5 if rank == 0 else t
            x = torch.randn(rows, h, generator=g, requires_grad=True)
            idx = torch.randint(-1, e + 2, (rows, 2), generator=g)  # ids -1, 4 and 5 are ignored
            w = torch.rand(rows, 2, generator=g)
            y = layer(x, idx, w)
            ref = torch.zeros(rows, h)
            gu_r, dn_r = gu.clone().requires_grad_(), dn.clone().requires_grad_()
            for r in range(rows):
                for k in range(2):
                    ex = int(idx[r, k])
                    if 0 <= ex < e:
                        a, b = F.linear(x[r], gu_r[ex]).chunk(2)
                        ref[r] += w[r, k] * F.linear(F.silu(a) * b, dn_r[ex])
            (y.square().sum() if rows else y.sum() + 0.0 * layer.expert_shards.sum()).backward()
            ref.square().sum().backward() if rows else None
            flat = torch.cat(
                [
                    (gu_r.grad if gu_r.grad is not None else torch.zeros_like(gu)).reshape(e, -1),
                    (dn_r.grad if dn_r.grad is not None else torch.zeros_like(dn)).reshape(e, -1),
                ],
                1,
            )
            torch.distributed.all_reduce(flat)
            full = layer.gather_flat(layer.expert_shards.grad) * world_size  # average_grads divides by N
            # relative to the largest entry (random weights of scale 1 give large values)
            out[f"{name}_t{t}_fwd"] = (
                float((y - ref).abs().max() / ref.abs().max()) if rows else float(y.numel())
            )
            out[f"{name}_t{t}_grad"] = float((full - flat).abs().max() / flat.abs().max())
    return out
