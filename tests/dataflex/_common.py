"""Shared helpers of the DataFlex tests."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainingArguments

from hf_ext.callbacks.dataflex.synthetic import cpu_training_args, make_mixture, tiny_model  # noqa: F401


def args(out: str, **kw: Any) -> TrainingArguments:
    base = dict(max_steps=12, per_device_train_batch_size=4, seed=0, dataloader_num_workers=0)
    return cpu_training_args(out, **{**base, **kw})


class Recorder(TrainerCallback):
    """Records the dataset indices of every training batch (DataFlexTrainer only)."""

    def __init__(self) -> None:
        self.trainer = None
        self.batches: dict[int, list[int]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        idx = self.trainer._dataflex_batch_index
        self.batches[state.global_step] = idx.tolist()
