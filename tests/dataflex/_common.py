"""Shared helpers of the DataFlex tests."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainingArguments

from hf_ext.callbacks.dataflex.synthetic import cpu_training_args, make_mixture, tiny_model  # noqa: F401


def args(out: str, **kw: Any) -> TrainingArguments:
    base = dict(max_steps=12, per_device_train_batch_size=4, seed=0, dataloader_num_workers=0)
    return cpu_training_args(out, **{**base, **kw})


def tiny_classifier(head: str, num_labels: int, **overrides: Any) -> Any:
    """A seeded one-layer ``LlamaFor<head>Classification`` (``head``: ``"Sequence"`` or ``"Token"``) over a 64-token
    vocabulary, in eval mode; ``overrides`` go to the config (e.g. ``pad_token_id=0``)."""
    import torch
    import transformers

    from hf_ext.testing import tiny_llama_config

    torch.manual_seed(0)
    cfg = tiny_llama_config(
        vocab_size=64,
        num_labels=num_labels,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        **overrides,
    )
    return getattr(transformers, f"LlamaFor{head}Classification")(cfg).eval()


class Recorder(TrainerCallback):
    """Records the dataset indices of every training batch (DataFlexTrainer only)."""

    def __init__(self) -> None:
        self.trainer = None
        self.batches: dict[int, list[int]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        idx = self.trainer._dataflex_batch_index
        self.batches[state.global_step] = idx.tolist()
