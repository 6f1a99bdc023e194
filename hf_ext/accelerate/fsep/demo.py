"""FSEP demo: a tiny Mixtral trained for 3 steps under FSEP in 2 gloo processes on CPU.

Checks that the FSEP model's logits equal the single-process model's and that the planner
re-lays out experts (replicas of the busiest experts) from the observed routing. The demo's 16 tokens per
rank would not pay for a replica's weight gather, so it plans as if each rank routed 4,096
(``planner_tokens_per_rank``); by default the planner costs the token counts it observes.
"""

from __future__ import annotations

import copy
from typing import Any

from hf_ext.utils.demo import DemoResult


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    import torch

    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep
    from hf_ext.accelerate.fsep.plugin import average_dense_gradients, fsep_layers
    from hf_ext.testing import tiny_moe

    base = tiny_moe("mixtral", seed=0)
    model = prepare_fsep(copy.deepcopy(base).train(), FSEPConfig(history=2, planner_tokens_per_rank=4096))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2 * world_size, 8), generator=g)
    mine = ids[2 * rank : 2 * rank + 2]
    with torch.no_grad():
        diff = float((model(mine).logits - base(mine).logits).abs().max())
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(mine, labels=mine).loss
        loss.backward()
        average_dense_gradients(model)
        opt.step()
        losses.append(loss.item())
    replicas = [layer.layout.replicas().tolist() for layer in fsep_layers(model)]
    return {"diff": diff, "losses": losses, "replicas": replicas}


def run_demo() -> DemoResult:
    """Run the 2-process demo and check its own result."""
    from hf_ext.testing import run_distributed

    res = run_distributed(_worker, 2)
    diff = max(r["diff"] for r in res)
    reps = res[0]["replicas"]
    same_layout = res[0]["replicas"] == res[1]["replicas"]
    passed = diff < 1e-5 and same_layout and all(len(r) == 4 and min(r) >= 1 for r in reps)
    return DemoResult(
        what="tiny Mixtral, FSEP over 2 gloo ranks, 3 AdamW steps",
        key_figure=f"max|logits - single| {diff:.1e}, replicas/layer {reps}, loss {res[0]['losses'][-1]:.3f}",
        passed=passed,
    )
