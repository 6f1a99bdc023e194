"""DataFlex demo: dynamic selection drops a noisy-label domain during Trainer training (CPU, seconds)."""

from __future__ import annotations

import contextlib
import io
import tempfile

from hf_ext.utils.demo import DemoResult


def run_demo() -> DemoResult:
    """Train a tiny model with ``DataFlexTrainer`` + the ``delta_loss`` selector on a clean/hard/noisy
    mixture; after warm-up the selection must keep (almost) no noisy-label samples."""
    import numpy as np
    import torch

    from hf_ext.callbacks.dataflex.ops import default_collate
    from hf_ext.callbacks.dataflex.synthetic import cpu_training_args, make_mixture, tiny_model
    from hf_ext.callbacks.dataflex.trainer import DataFlexTrainer

    torch.manual_seed(0)
    data = make_mixture({"clean": 64, "hard": 64, "noisy": 64}, seed=0)
    cfg = {"selector": "delta_loss", "selector_args": {"budget": 0.5}, "warmup_step": 30, "update_step": 100}
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        args = cpu_training_args(out, max_steps=40, per_device_train_batch_size=16)
        trainer = DataFlexTrainer(
            model=tiny_model(), args=args, train_dataset=data, data_collator=default_collate, dataflex=cfg
        )
        trainer.train()
    entry = trainer.dataflex.log_history[0]
    per_dom = dict(zip(trainer.dataflex.domain_names, entry["selected_per_domain"]))
    noisy_share = per_dom["noisy"] / entry["selected"]
    chosen = np.array(trainer.dataflex.sampler.plan["indices"])
    ok = noisy_share <= 0.1 and len(chosen) == 96
    return DemoResult(
        what="DataFlexTrainer + delta_loss on clean/hard/noisy mixture (tiny Llama, 40 steps)",
        key_figure=f"selected per domain {per_dom}; noisy share {noisy_share:.0%} (pool 33%)",
        passed=bool(ok),
    )
