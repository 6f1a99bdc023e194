"""``DataFlexTrainer`` and the mixin that makes any ``Trainer`` subclass (e.g. TRL's ``SFTTrainer``) dynamic.

The mixin

* reads the domains from the raw ``train_dataset`` column before the parent's ``__init__``
  (TRL may drop columns while tokenising) and builds a :class:`DataFlexCallback`;
* returns the DataFlex sampler from ``_get_train_sampler``;
* tags every training sample with its dataset index (a wrapper dataset + collator; the key is
  kept through ``remove_unused_columns`` and popped before the model sees the batch);
* when a weighter or ODM is configured, installs a ``compute_loss_func`` computing per-sample
  losses (reported to the callback) and the weighted loss
  ``sum_i w_i * loss_sum_i / num_items_in_batch`` — with all ``w_i = 1`` exactly the stock loss
  (``label_smoothing_factor`` included: it is applied per item, like Trainer's ``LabelSmoother``).

Example (see ``examples/dataflex_sft.py``)::

    trainer = DataFlexTrainer(model=model, args=TrainingArguments("out", max_steps=100), train_dataset=ds,
                              data_collator=default_collate, dataflex="examples/dataflex.yaml")
    trainer.train()
    trainer.dataflex.weights      # current domain weights (mixers)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from hf_ext.callbacks.dataflex.callback import INDEX_KEY, DataFlexCallback
from hf_ext.callbacks.dataflex.config import DataFlexConfig
from hf_ext.callbacks.dataflex.ops import default_collate, loss_shifts_labels, sequence_loss_terms, unwrap

__all__ = [
    "DataFlexMixin",
    "DataFlexTrainer",
    "IndexCollator",
    "IndexedDataset",
    "default_collate",
    "make_dataflex_trainer",
]


class IndexedDataset(torch.utils.data.Dataset):
    """Adds ``dataflex_index`` (the sample's position) to every mapping item of ``dataset``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, dict):
            raise TypeError(f"DataFlex needs dataset items that are mappings, got {type(item).__name__}")
        out = dict(item)
        out[INDEX_KEY] = int(i)
        return out


class IndexCollator:
    """Pops ``dataflex_index`` from the features, calls the wrapped collator, adds a ``[B]`` index tensor."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        idx = [f.pop(INDEX_KEY) for f in features]
        batch = self.inner(features)
        batch[INDEX_KEY] = torch.tensor(idx, dtype=torch.long)
        return batch


class DataFlexMixin:
    """Mixin for ``Trainer`` subclasses; put it first: ``class T(DataFlexMixin, SFTTrainer)``.

    Extra keyword arguments: ``dataflex`` (config / mapping / YAML-JSON path / a ready
    :class:`DataFlexCallback`), ``target_dataset``, ``reference_model``, ``reward_fn``,
    ``domains`` (labels instead of a column), ``dataflex_collate_fn`` (batches items for scoring).
    """

    def __init__(
        self,
        *args: Any,
        dataflex: DataFlexConfig | dict | str | os.PathLike | DataFlexCallback | None = None,
        target_dataset: Any = None,
        reference_model: torch.nn.Module | None = None,
        reward_fn: Any = None,
        domains: list[Any] | None = None,
        dataflex_collate_fn: Any = None,
        **kwargs: Any,
    ) -> None:
        if dataflex is None:
            raise ValueError(
                "DataFlexTrainer needs dataflex=... (a DataFlexConfig, a mapping or a YAML/JSON path)"
            )
        if isinstance(dataflex, DataFlexCallback):
            given = {
                "target_dataset": target_dataset,
                "reference_model": reference_model,
                "reward_fn": reward_fn,
                "dataflex_collate_fn": dataflex_collate_fn,
            }
            clash = [k for k, v in given.items() if v is not None]
            if clash:
                raise ValueError(
                    f"{clash} would be ignored: dataflex= is a ready DataFlexCallback, which has its own; pass them "
                    "to DataFlexCallback(...) (collate_fn= for dataflex_collate_fn) or pass a config as dataflex="
                )
            cb = dataflex
        else:
            cb = DataFlexCallback(
                dataflex,
                target_dataset=target_dataset,
                reference_model=reference_model,
                reward_fn=reward_fn,
                collate_fn=dataflex_collate_fn,
            )
        raw = kwargs.get("train_dataset")
        if raw is None and len(args) > 3:
            raw = args[3]
        if raw is None:
            raise ValueError("DataFlexTrainer needs a train_dataset")
        cb.set_domains(raw, domains)  # clear error (missing column) before any work
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        strategy = getattr(targs, "train_sampling_strategy", "random")
        if strategy != "random" or getattr(targs, "group_by_length", False):
            raise ValueError(
                f"train_sampling_strategy={strategy!r} / group_by_length would be ignored: DataFlex replaces the "
                "training sampler with its own; leave train_sampling_strategy='random' (and group_by_length=False)"
            )
        if cb.needs_loss_hook and getattr(targs, "padding_free", False):  # TRL's SFTConfig
            raise ValueError(
                f"padding_free=True packs a batch's samples into one row, so there are no per-sample losses for "
                f"weighter={cb.config.weighter!r} / mixer={cb.config.mixer!r}; set padding_free=False"
            )
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if any(isinstance(c, DataFlexCallback) for c in callbacks):
            raise ValueError(
                "callbacks= holds a DataFlexCallback, but DataFlexTrainer already runs the one given as dataflex= (two "
                "would both update, and a plain one would swap its own sampler in); pass a ready callback as dataflex="
            )
        super().__init__(*args, callbacks=[*callbacks, cb], **kwargs)  # type: ignore[call-arg]
        cb.trainer_mode = True
        cb.bind_dataset(self.train_dataset)  # type: ignore[attr-defined]
        self.dataflex = cb
        self._dataflex_batch_index: torch.Tensor | None = None
        if cb.needs_loss_hook:
            if self.compute_loss_func is not None:  # type: ignore[has-type]
                raise ValueError(
                    "a DataFlex weighter/ODM needs its own per-sample loss; do not pass compute_loss_func together "
                    f"with weighter={cb.config.weighter!r} / mixer={cb.config.mixer!r}"
                )
            self.compute_loss_func = self._dataflex_loss

    # ------------------------------------------------------------------------------ data
    def _dataflex_active(self) -> bool:
        """Whether the DataFlex callback is still in this trainer: ``trainer.remove_callback(trainer.dataflex)``
        switches DataFlex off (the stock sampler, no observations or weights) until it is added back."""
        handler = getattr(self, "callback_handler", None)
        return handler is None or any(cb is self.dataflex for cb in handler.callbacks)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        if not self._dataflex_active():
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        return self.dataflex.sampler

    def get_train_dataloader(self) -> Any:
        ds, coll = self.train_dataset, self.data_collator  # type: ignore[has-type]
        if ds is not self.dataflex.dataset:
            raise ValueError(
                "train_dataset was replaced after the DataFlexTrainer was built, but DataFlex read the domains and "
                "built its sampler (indices, length) from the original one; build a new DataFlexTrainer with the new "
                "train_dataset"
            )
        self.train_dataset, self.data_collator = IndexedDataset(ds), IndexCollator(coll)
        try:
            return super().get_train_dataloader()  # type: ignore[misc]
        finally:
            self.train_dataset, self.data_collator = ds, coll

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        cols = self._signature_columns  # type: ignore[has-type]
        if cols is not None and INDEX_KEY not in cols:
            self._signature_columns = [*cols, INDEX_KEY]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
        if self._dataflex_active():
            self.dataflex.resume_from(path if isinstance(path, str) else None)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------------------ loss
    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._dataflex_batch_index = inputs.pop(INDEX_KEY, None)
        return super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]

    def _dataflex_loss(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Per-sample losses -> observations + weights -> weighted loss normalised like the stock loss."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        # label_smoothing_factor: the Trainer's LabelSmoother is bypassed when compute_loss_func is set, so the
        # smoothing is applied here per item (None when the Trainer disabled it, e.g. multi-label classification)
        smoother = getattr(self, "label_smoother", None)
        eps = float(smoother.epsilon) if smoother is not None else 0.0
        # shift labels only for causal LMs: the rule Trainer counts num_items_in_batch with
        shift = getattr(self, "_loss_shifts_labels", None)
        if shift is None:
            shift = loss_shifts_labels(self.model)  # type: ignore[attr-defined]
        problem = getattr(getattr(unwrap(self.model), "config", None), "problem_type", None)  # type: ignore[attr-defined]
        loss_sum, count = sequence_loss_terms(  # [B], [B]
            logits, labels, label_smoothing=eps, shift=shift, problem_type=problem
        )
        idx = self._dataflex_batch_index
        if idx is not None and idx.numel() != loss_sum.shape[0]:
            raise ValueError(
                f"DataFlex needs one batch row per training sample for per-sample losses (weighter/ODM), but the batch "
                f"has {loss_sum.shape[0]} row(s) for {idx.numel()} samples: a padding-free or packing collator (e.g. "
                "TRL's padding_free=True) merges samples into rows; use a collator that pads each sample to its own row"
            )
        w = None
        if idx is not None and self.model.training and self._dataflex_active():  # type: ignore[attr-defined]
            per = (loss_sum / count.clamp(min=1)).detach()
            # a row without a target token (labels all -100: e.g. a completion cut off by truncation) has no loss:
            # it is neither an observation (ODM / adapt would record a loss of 0) nor weighed (the loss weighter
            # gave it a share of the batch's weights, inflating the others' by up to B / (B - empty rows))
            has = (count > 0).to(idx.device)
            if bool(has.all()):
                self.dataflex.observe(idx, per)
                w = self.dataflex.weigh(per, idx, self.state.global_step)  # type: ignore[attr-defined]
            elif bool(has.any()):
                rows = has.nonzero().squeeze(1)
                self.dataflex.observe(idx[rows], per[rows.to(per.device)])
                wk = self.dataflex.weigh(per[rows.to(per.device)], idx[rows], self.state.global_step)  # type: ignore[attr-defined]
                if wk is not None:
                    w = torch.zeros_like(per).index_copy(0, rows.to(per.device), wk.to(per.dtype))
        total = (loss_sum * w).sum() if w is not None else loss_sum.sum()
        if num_items_in_batch is not None:
            denom = torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
        else:  # the Trainer will not divide a training loss by the accumulation steps when compute_loss_func is set;
            # an evaluation loss (TRL's prediction_step passes no num_items_in_batch) is never divided
            steps = getattr(self, "current_gradient_accumulation_steps", 1) if self.model.training else 1  # type: ignore[attr-defined]
            denom = count.sum().clamp(min=1) * steps
        return total / denom


class DataFlexTrainer(DataFlexMixin, Trainer):
    """``transformers.Trainer`` with DataFlex: ``DataFlexTrainer(model, args, train_dataset=..., dataflex=cfg)``."""


def make_dataflex_trainer(base: type) -> type:
    """A DataFlex version of any ``Trainer`` subclass (``make_dataflex_trainer(SFTTrainer)``)."""
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise ValueError(f"base must be a transformers.Trainer subclass, got {base!r}")
    return type(
        f"DataFlex{base.__name__}", (DataFlexMixin, base), {"__doc__": f"{base.__name__} with DataFlex."}
    )


def __getattr__(name: str) -> Any:
    if name == "DataFlexSFTTrainer":
        from hf_ext.utils.imports import require

        trl = require("trl", "DataFlexSFTTrainer")
        cls = make_dataflex_trainer(trl.SFTTrainer)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
