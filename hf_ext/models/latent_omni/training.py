"""Training helpers: a Trainer that logs LatentOmni's three losses separately.

``LatentOmniLossLogger`` is a mixin for any ``transformers.Trainer`` subclass (e.g. TRL's ``SFTTrainer``):
``compute_loss`` keeps running sums of ``text_loss``, ``latent_loss`` and ``sync_loss``, apart for training and
evaluation batches, and ``log`` adds their means next to ``loss`` (training) or as ``eval_text_loss``, ... next to
``eval_loss``. It also forces ``remove_unused_columns=False`` (trajectory records are
turned into model inputs by :class:`LatentOmniDataCollator`, not by column filtering).

Example:
    >>> issubclass(LatentOmniTrainer, LatentOmniLossLogger)
    True
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

LOSS_KEYS = ("text_loss", "latent_loss", "sync_loss")


class LatentOmniLossLogger:
    """Mixin: log the text / latent / sync losses of :class:`LatentOmniCausalLMOutput`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        args_obj = kwargs.get("args")
        if args_obj is not None and getattr(args_obj, "remove_unused_columns", False):
            args_obj.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        # "train" / "eval" -> loss name -> running sum and count since the last log of that kind
        self._latent_sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self._latent_counts: dict[str, dict[str, int]] = {"train": {}, "eval": {}}

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        outputs = model(**inputs)
        mode = "train" if model.training else "eval"
        sums, counts = self._latent_sums[mode], self._latent_counts[mode]
        for key in LOSS_KEYS:
            value = getattr(outputs, key, None) if not isinstance(outputs, dict) else outputs.get(key)
            if value is not None:
                sums[key] = sums.get(key, 0.0) + float(value.detach().float().mean())
                counts[key] = counts.get(key, 0) + 1
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs.loss
        if loss is None:
            raise ValueError(
                "the model returned no loss: the batch needs `labels` (use LatentOmniDataCollator)"
            )
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for mode, marker, prefix in (("train", "loss", ""), ("eval", "eval_loss", "eval_")):
            if marker in logs:
                sums, counts = self._latent_sums[mode], self._latent_counts[mode]
                for key, total in sums.items():
                    logs[prefix + key] = round(total / max(1, counts.get(key, 1)), 6)
                sums.clear()
                counts.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class LatentOmniTrainer(LatentOmniLossLogger, Trainer):
    """``transformers.Trainer`` that logs ``text_loss`` / ``latent_loss`` / ``sync_loss``."""


def latent_omni_sft_trainer_class() -> type:
    """TRL's ``SFTTrainer`` with the loss logger (needs ``trl``; pass ``SFTConfig(dataset_kwargs=
    {"skip_prepare_dataset": True}, remove_unused_columns=False)`` and ``data_collator=LatentOmniDataCollator``)."""
    from hf_ext.utils.imports import require

    trl = require("trl", "LatentOmni SFT with TRL")
    return type("LatentOmniSFTTrainer", (LatentOmniLossLogger, trl.SFTTrainer), {})


__all__ = ["LatentOmniTrainer", "LatentOmniLossLogger", "latent_omni_sft_trainer_class"]
