"""Every runtime plan of ``tests/autoparallel`` on two GPUs (NCCL), launched by torchrun from
``tests/test_multi_gpu.py``: ``python -m torch.distributed.run --nproc-per-node 2 -m tests.autoparallel._nccl_plans
DIR``. Each rank prints its results as one ``@@RESULT@@`` JSON line.

Per plan (fp32, ``param_dtype=None``): the loss before and after one SGD step (mean over the ranks), the loss of the
model it saved (rank 0, loaded on the CPU), the same two losses for a left-padded batch with its attention mask
(a fresh model), and where the parameters are. For a pipeline plan only this rank's stage
may be on its GPU: the other stage's parameters must stay on the CPU and the GPU must hold less than the model."""

from __future__ import annotations

import json
import sys
from typing import Any


def _param_places(model: Any, stage: tuple[int, int] | None) -> dict[str, Any]:
    """Devices of the decoder layers' parameters inside / outside this rank's stage, and their byte count."""
    layers = model.model.layers
    inside = range(*stage) if stage is not None else range(len(layers))
    own = {str(p.device) for i in inside for p in layers[i].parameters()}
    other = {str(p.device) for i, layer in enumerate(layers) if i not in inside for p in layer.parameters()}
    return {"own_devices": sorted(own), "other_devices": sorted(other)}


def main() -> None:
    import torch
    import torch.distributed as dist

    from hf_ext.accelerate.autoparallel.apply import apply_plan
    from hf_ext.testing import tiny_llama
    from tests.autoparallel._dist_fns import _batch, _left_padded_batch, _plans, _saved_loss, _step_losses

    outdir = sys.argv[1]
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = _batch()
    padded, mask = _left_padded_batch()
    out: dict[str, Any] = {"rank": rank}
    for name, plan in _plans().items():
        model = tiny_llama(seed=0, attn_implementation="sdpa").train()
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(rank)
        runner = apply_plan(model, plan, param_dtype=None)
        with runner:
            gpu_bytes = torch.cuda.memory_allocated(rank) - base
            out[name] = {
                "losses": _step_losses(runner, ids, world),
                "gpu_param_fraction": gpu_bytes / model_bytes,
                **_param_places(model, runner.stage_layers),
            }
            runner.save_pretrained(f"{outdir}/{name}")
        del runner, model
        # the left-padded batch with its attention mask, on a fresh model
        model = tiny_llama(seed=0, attn_implementation="sdpa").train()
        with apply_plan(model, plan, param_dtype=None) as runner:
            out[name]["masked"] = _step_losses(runner, padded, world, mask)
        del runner, model
        if rank == 0:
            out[name]["saved"] = _saved_loss(f"{outdir}/{name}", ids)
        torch.cuda.empty_cache()
        dist.barrier()
    dist.destroy_process_group()
    print("@@RESULT@@" + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
