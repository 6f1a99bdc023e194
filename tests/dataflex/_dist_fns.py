"""Functions run in 2 gloo processes by the distributed DataFlex test (must be importable)."""

from __future__ import annotations

import numpy as np
import torch


def _data():
    from hf_ext.callbacks.dataflex.synthetic import make_mixture

    return make_mixture({"clean": 5, "hard": 4, "noisy": 4}, seed=0)  # 13 samples: uneven shards


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )


def _ref_model():
    from hf_ext.callbacks.dataflex.synthetic import tiny_model

    return tiny_model(seed=1)  # DoReMi's reference model: replicated, seeded the same on every rank


def _ops_results(m, proj_dim: int) -> dict:
    from hf_ext.callbacks.dataflex import ops

    data = _data()
    idx = list(range(len(data)))
    return {
        "loss": ops.per_sample_loss(m, data, idx, batch_size=4).numpy(),
        "excess": ops.per_sample_excess_loss(m, _ref_model(), data, idx, batch_size=4).numpy(),
        "emb": ops.embeddings(m, data, idx, batch_size=4).numpy(),
        "grad": ops.grad_features(m, data, idx, proj_dim=proj_dim, seed=3).numpy(),
    }


def reference(proj_dim: int = 32) -> dict:
    """Single-process results (plain model and LoRA model) to compare with."""
    from hf_ext.callbacks.dataflex import ops
    from hf_ext.callbacks.dataflex.synthetic import tiny_model

    torch.manual_seed(0)
    out = {"plain": _ops_results(tiny_model(), proj_dim)}
    torch.manual_seed(0)
    lora = _lora(tiny_model())
    data = _data()
    out["lora_grad"] = ops.grad_features(
        lora, data, list(range(len(data))), proj_dim=proj_dim, seed=3
    ).numpy()
    return out


def all_checks(rank: int, world_size: int, proj_dim: int = 32) -> dict:
    """DDP, FSDP2 (fully_shard) and DDP+LoRA ops, plus a callback update, on every rank."""
    from torch.distributed.fsdp import fully_shard

    from hf_ext.callbacks.dataflex import ops
    from hf_ext.callbacks.dataflex.callback import DataFlexCallback
    from hf_ext.callbacks.dataflex.synthetic import tiny_model

    out: dict = {}
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_model())
    out["ddp"] = _ops_results(ddp, proj_dim)

    torch.manual_seed(0)
    fs = tiny_model()
    for layer in fs.model.layers:
        fully_shard(layer)
    fully_shard(fs)
    out["fsdp_sharded"] = ops.is_sharded(fs)
    out["fsdp"] = _ops_results(fs, proj_dim)

    torch.manual_seed(0)
    lora = torch.nn.parallel.DistributedDataParallel(_lora(tiny_model()))
    data = _data()
    out["lora_grad"] = ops.grad_features(
        lora, data, list(range(len(data))), proj_dim=proj_dim, seed=3
    ).numpy()

    # selector update: identical plan on both ranks (rank 0's plan is broadcast)
    cb = DataFlexCallback(
        {"selector": "loss", "selector_args": {"budget": 0.5}, "update_step": 1}, train_dataset=data
    )
    cb._model = ddp
    cb._obs_loss, cb._obs_count = np.zeros(3), np.zeros(3)
    cb.update(1)
    out["plan"] = cb.sampler.plan
    # ODM observations are summed over ranks at the update
    cb2 = DataFlexCallback({"mixer": "odm", "update_step": 1}, train_dataset=data)
    cb2._obs_loss, cb2._obs_count = np.zeros(3), np.zeros(3)
    cb2.observe(torch.tensor([rank, 5 + rank]), torch.tensor([1.0, 2.0]))
    loss, count = cb2._reduced_observations()
    out["obs"] = (loss.tolist(), count.tolist())
    return out


def ddp_trainer_runs(rank: int, world_size: int, out: str) -> dict:
    """DataFlexTrainer (ODM mixer) under DDP on ``world_size`` gloo ranks, three runs in ``out``:

    * ``plain``: 4 steps, checkpoints at steps 2 and 4 (``on_save`` writes the DataFlex state);
    * ``pushed``: the same with ``push_to_hub=True, hub_strategy="checkpoint"``; the hub client is replaced by a
      recorder that reads ``dataflex_state.json`` of the folder when its upload starts (rank 0 uploads);
    * ``resumed``: resumes ``plain`` from its step-2 checkpoint.

    Returns this rank's batch indices per step of each run, and (rank 0) the states on disk / as uploaded."""
    import json
    import os
    from concurrent.futures import Future
    from pathlib import Path
    from types import SimpleNamespace

    import transformers.trainer

    from hf_ext.callbacks.dataflex.callback import STATE_FILE
    from hf_ext.callbacks.dataflex.ops import default_collate
    from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer
    from tests.dataflex._common import Recorder, args, make_mixture, tiny_model

    uploads: list[tuple[str | None, dict | None]] = []

    class Api:  # what Trainer reads of huggingface_hub's client: no network
        def create_repo(self, name, **kw):
            return SimpleNamespace(repo_id=f"user/{name}")

        def upload_folder(self, folder_path, path_in_repo=None, **kw):
            path = os.path.join(folder_path, STATE_FILE)
            state = json.loads(Path(path).read_text()) if os.path.exists(path) else None
            uploads.append((path_in_repo, state))
            done = Future()
            done.set_result(None)
            return done

    transformers.trainer.hf_api = Api
    data = make_mixture({"clean": 16, "noisy": 16, "hard": 16}, seed=0)
    cfg = {"mixer": "odm", "warmup_step": 1, "update_step": 2, "mixer_args": {"alpha": 0.5}}

    def run(name: str, resume: str | None = None, **targs) -> dict[int, list[int]]:
        rec = Recorder()
        t = DataFlexTrainer(
            model=tiny_model(),
            args=args(os.path.join(out, name), max_steps=4, save_strategy="steps", save_steps=2, **targs),
            train_dataset=data,
            data_collator=default_collate,
            dataflex=cfg,
            callbacks=[rec],
        )
        rec.trainer = t
        t.train(resume_from_checkpoint=resume)
        return rec.batches

    res: dict = {"rank": rank}
    res["plain"] = run("plain")
    res["pushed"] = run("pushed", push_to_hub=True, hub_strategy="checkpoint")
    res["resumed"] = run("resumed", resume=os.path.join(out, "plain", "checkpoint-2"))
    if rank == 0:
        res["states"] = {
            f"{name}-{step}": json.loads(Path(out, name, f"checkpoint-{step}", STATE_FILE).read_text())
            for name in ("plain", "pushed")
            for step in (2, 4)
        }
        res["uploads"] = uploads
    return res
