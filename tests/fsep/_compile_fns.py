"""Distributed helper of ``test_compile.py`` (module level: run_distributed spawns processes)."""

from __future__ import annotations

from typing import Any


def compiled_fsep_model(rank: int, world_size: int, mode: str) -> dict[str, Any]:
    """A tiny Qwen2-MoE after ``prepare_fsep`` run eagerly and through ``torch.compile`` (aot_eager): the eval logits
    and, in training mode, the loss and every gradient. Returns the differences and dynamo's graph count."""
    import torch

    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.testing import tiny_moe

    torch.set_num_threads(1)
    model = tiny_moe("qwen2_moe", seed=0).eval()
    prepare_fsep(model, FSEPConfig(mode=mode))
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(rank))
    compiled = torch.compile(model, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        logits_diff = (compiled(ids).logits - model(ids).logits).abs().max().item()
    model.train()

    def step(m: Any) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step(model)
    loss, grads = step(compiled)
    return {
        "logits_diff": logits_diff,
        "loss": (ref_loss, loss),
        "grad_names_equal": set(grads) == set(ref_grads),
        "grad_diff": max((grads[n] - g).abs().max().item() for n, g in ref_grads.items() if n in grads),
        "expert_grads": sum(1 for n in grads if "expert" in n),
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
    }
