"""Distributed helper of ``test_compile.py`` (module level: run_distributed spawns processes)."""

from __future__ import annotations

from typing import Any


def compiled_runners(rank: int, world_size: int) -> dict[str, Any]:
    """One gloo process: a DDP and a checkpointed FSDP2 plan, each run eagerly and under ``torch.compile``
    (aot_eager) three ways: the model wrapped by ``torch.compile`` before ``apply_plan``, its layers compiled in
    place (``layer.compile()``) before ``apply_plan``, and ``runner.module.compile()`` after. Returns per case the
    eager and compiled losses and the largest gradient difference."""
    import copy

    import torch

    from hf_ext.accelerate.autoparallel import apply_plan
    from hf_ext.accelerate.autoparallel.plan import Plan
    from hf_ext.accelerate.autoparallel.shapes import get_shape
    from hf_ext.testing import tiny_llama

    torch.set_num_threads(1)
    base = tiny_llama()
    shape = get_shape(base.config)
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))

    def grads(module: Any) -> dict[str, torch.Tensor]:  # names without torch.compile's _orig_mod.
        return {
            n.replace("_orig_mod.", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
            .detach()
            .clone()
            for n, p in module.named_parameters()
            if p.grad is not None
        }

    out: dict[str, Any] = {}
    plans = {
        "ddp": dict(dp_type="ddp"),
        "fsdp_ckpt": dict(dp_type="fsdp", zero=3, ckpt=True),
    }
    for name, kw in plans.items():
        plan = Plan.uniform(shape, gpus=1, global_batch=2, seq_len=32, micro_batch=1, **kw)
        with apply_plan(copy.deepcopy(base), plan, param_dtype=None) as runner:
            ref_loss, ref_grads = runner.train_step(ids), grads(runner.module)
        for how in ("wrapped", "layers", "module"):
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            if how == "wrapped":
                model = torch.compile(model, backend="aot_eager")
            elif how == "layers":
                for layer in model.model.layers:
                    layer.compile(backend="aot_eager")
            with apply_plan(model, plan, param_dtype=None) as runner:
                if how == "module":
                    runner.module.compile(backend="aot_eager")
                loss, g = runner.train_step(ids), grads(runner.module)
            frames = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            diff = (
                max((g[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
                if set(g) == set(ref_grads)
                else None
            )
            out[f"{name}/{how}"] = {"ref": ref_loss, "loss": loss, "grad_diff": diff, "graphs": frames}
    return out
