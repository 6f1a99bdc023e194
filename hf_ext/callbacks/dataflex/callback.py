"""``DataFlexCallback``: schedules DataFlex updates inside a transformers ``Trainer``.

The callback owns the methods (selector / mixer / weighter), the :class:`DataFlexSampler` and
the schedule. At ``on_step_end`` of an update step (``warmup_step``, then every ``update_step``
steps, at most ``update_times`` times) it builds an :class:`UpdateContext`, asks the selector
for a subset or the mixer for domain weights, agrees on the result across ranks (rank 0's
plan is broadcast) and hands the new plan to the sampler. ``on_save`` writes
``dataflex_state.json`` into the checkpoint folder; ``on_train_begin`` of a resumed run reads it
back, so a resumed run continues with the same data state. A plain ``Trainer`` does not tell callbacks which
checkpoint it resumes from: the callback reads it from the running Trainer on the call stack, and where that
fails it raises and asks for :meth:`DataFlexCallback.resume_from`.

Two ways to switch it on:

* ``DataFlexTrainer(..., dataflex=cfg)`` (recommended): the trainer's ``_get_train_sampler``
  returns the sampler and its loss hook reports per-sample losses (weighters, ODM).
* ``Trainer(..., callbacks=[DataFlexCallback(cfg, train_dataset=raw_ds)])``: the callback swaps
  the sampler into the prepared DataLoader at train begin. Selectors and mixers work (ODM then
  probes losses itself); weighters need ``DataFlexTrainer``.

Example:
    >>> cb = DataFlexCallback({"selector": "random", "update_step": 5}, train_dataset=[{"input_ids": [1, 2]}] * 4)
    >>> len(cb.sampler)
    4
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from hf_ext.callbacks.dataflex.base import UpdateContext, normalize_weights
from hf_ext.callbacks.dataflex.config import DataFlexConfig
from hf_ext.callbacks.dataflex.ops import dist_info
from hf_ext.callbacks.dataflex.registry import build
from hf_ext.callbacks.dataflex.sampler import DataFlexSampler

logger = logging.getLogger("hf_ext.dataflex")

STATE_FILE = "dataflex_state.json"
TARGET_SELECTORS = ("less", "nice", "near", "cluster_less")
DEFAULT_DOMAIN_COLUMN = "domain"
INDEX_KEY = "dataflex_index"
DEFAULT_SEED = 42  # config seed None outside a Trainer (TrainingArguments' own default seed)


def require_map_style(dataset: Any) -> None:
    """``ValueError`` unless ``dataset`` is map-style (``__len__`` and ``__getitem__``; not an ``IterableDataset``)."""
    if (
        isinstance(dataset, torch.utils.data.IterableDataset)
        or not hasattr(dataset, "__len__")
        or not hasattr(dataset, "__getitem__")
    ):
        raise ValueError(
            f"DataFlex needs a map-style training dataset with __len__ and __getitem__ (not an IterableDataset), got "
            f"{type(dataset).__name__}: its sampler picks samples by index"
        )


def read_domains(dataset: Any, column: str) -> tuple[np.ndarray, list[str]]:
    """Domain id per sample and the sorted domain names, from a dataset column.

    Works for ``datasets.Dataset`` (column access) and any indexable dataset of mappings.
    Raises ``ValueError`` naming the column and the available ones when it is missing.
    """
    cols = getattr(dataset, "column_names", None)
    if cols is not None:
        if column not in cols:
            raise ValueError(
                f"domain_column={column!r} is not a column of the training dataset; available columns: {list(cols)}. "
                "Set domain_column in the DataFlex config or pass domains=[...]"
            )
        values = list(dataset[column])
    else:
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        first = dataset[0]
        if not isinstance(first, dict) or column not in first:
            keys = list(first) if isinstance(first, dict) else type(first).__name__
            raise ValueError(
                f"domain_column={column!r} is not a key of the training samples; sample keys: {keys}. "
                "Set domain_column in the DataFlex config or pass domains=[...]"
            )
        values = [dataset[i][column] for i in range(len(dataset))]
    return encode_domains(values)


def encode_domains(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    names = sorted({str(v) for v in values})
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[str(v)] for v in values], dtype=np.int64), names


class DataFlexCallback(TrainerCallback):
    """Dynamic data selection / mixing / reweighting for a ``Trainer`` (see the module docstring).

    Args:
        config: a :class:`DataFlexConfig`, a mapping, or a YAML/JSON path.
        train_dataset: the dataset whose domain column is read (callback-only mode: the raw one,
            before the Trainer drops unused columns).
        domains: domain label per training sample (instead of a column).
        target_dataset: target/validation set for less, nice, near, cluster_less.
        reference_model: DoReMi's reference model.
        reward_fn: NICE's ``reward_fn(prompt_ids, completion_ids) -> float``.
        collate_fn: batches dataset items for the scoring passes (default: pad ``input_ids``).
    """

    def __init__(
        self,
        config: DataFlexConfig | dict | str | os.PathLike,
        *,
        train_dataset: Any = None,
        domains: list[Any] | None = None,
        target_dataset: Any = None,
        reference_model: torch.nn.Module | None = None,
        reward_fn: Any = None,
        collate_fn: Any = None,
    ) -> None:
        self.config = DataFlexConfig.coerce(config)
        c = self.config
        self.selector = build("selector", c.selector, **c.selector_args) if c.selector else None
        self.mixer = build("mixer", c.mixer, **c.mixer_args) if c.mixer else None
        self.weighter = build("weighter", c.weighter, **c.weighter_args) if c.weighter else None
        self.target_dataset = target_dataset
        self.reference_model = reference_model
        self.reward_fn = reward_fn
        self.collate_fn = collate_fn
        self.seed = c.seed if c.seed is not None else DEFAULT_SEED  # None: the Trainer's seed at train begin
        self.dataset: Any = None
        self.domain_ids: np.ndarray | None = None
        self.domain_names: list[str] = []
        self.sampler: DataFlexSampler | None = None
        self.weights: np.ndarray | None = None
        self.updates_done = 0
        self.log_history: list[dict[str, Any]] = []
        self.trainer_mode = False
        self.resumed_from: str | None = None
        self._resume_path: str | None = None
        self._model: torch.nn.Module | None = None
        self._optimizer: Any = None
        self._obs_loss: np.ndarray | None = None
        self._obs_count: np.ndarray | None = None
        self._push_observed: tuple[Any, Any] | None = None  # rank-summed observations for on_push_begin (DDP)
        self._written: tuple[str, int] | None = None  # (folder, step) on_push_begin wrote the state to
        self._check_static_needs()
        self._warn_unused_inputs()
        self._warn_off_schedule_points()
        if train_dataset is not None or domains is not None:
            self.set_domains(train_dataset, domains)
            if train_dataset is not None:
                self.bind_dataset(train_dataset)

    @classmethod
    def from_config(
        cls, config: DataFlexConfig | dict | str | os.PathLike, **kwargs: Any
    ) -> DataFlexCallback:
        """Build from a config object, mapping or YAML/JSON file (kwargs as in the constructor)."""
        return cls(config, **kwargs)

    # ----------------------------------------------------------------------------- set-up
    def _check_static_needs(self) -> None:
        name = self.config.selector
        if name in TARGET_SELECTORS and self.target_dataset is None:
            raise ValueError(f"selector {name!r} needs target_dataset=... (the target/validation set)")
        if name == "nice" and self.reward_fn is None:
            raise ValueError(
                "selector 'nice' needs reward_fn=... (reward_fn(prompt_ids, completion_ids) -> float)"
            )
        if self.config.mixer == "doremi" and self.reference_model is None:
            raise ValueError(
                "mixer 'doremi' needs reference_model=... (a model trained on the default mixture)"
            )

    def _warn_unused_inputs(self) -> None:
        c, unused = self.config, []
        if self.target_dataset is not None and c.selector not in TARGET_SELECTORS:
            unused.append(f"target_dataset (used by selectors {', '.join(TARGET_SELECTORS)})")
        if self.reference_model is not None and c.mixer != "doremi":
            unused.append("reference_model (used by mixer doremi)")
        if self.reward_fn is not None and c.selector != "nice":
            unused.append("reward_fn (used by selector nice)")
        if unused:
            warnings.warn(
                f"DataFlex: {'; '.join(unused)} given but not used with selector={c.selector!r}, "
                f"mixer={c.mixer!r}, weighter={c.weighter!r}",
                UserWarning,
                stacklevel=3,
            )

    def _check_layer(self, model: Any) -> None:
        """``layer`` of near / cluster_less must index the model's hidden states (checked at train begin, before the
        first update would fail on it)."""
        layer = getattr(self.selector, "layer", None)
        if layer is None or model is None:
            return
        from hf_ext.callbacks.dataflex.ops import unwrap

        cfg = getattr(unwrap(model), "config", None)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n_layers = getattr(cfg, "num_hidden_layers", None)
        if isinstance(n_layers, int) and not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(
                f"selector {self.config.selector!r} field 'layer'={layer} does not index the model's hidden states: "
                f"the model has {n_layers} layers, so layer must be in [{-(n_layers + 1)}, {n_layers}] "
                "(0: the embeddings, -1: the last layer)"
            )

    def _warn_off_schedule_points(self) -> None:
        """The ``dynamic`` mixer's weights change only at update steps: warn about schedule points that a
        ``step`` schedule would apply late (not on the update grid) or never (after the last update)."""
        c = self.config
        if c.mixer != "dynamic":
            return
        late, never = [], []
        last = None if c.update_times is None else c.warmup_step + (c.update_times - 1) * c.update_step
        for p in self.mixer.schedule:
            step = int(p["step"])
            if step == 0:  # the starting weights
                continue
            if last is not None and step > last:
                never.append(step)
            elif self.mixer.interpolation == "step" and not c.is_update_step(step, 0):
                late.append(step)
        if late or never:
            grid = f"warmup_step + k * update_step = {c.warmup_step} + k * {c.update_step}"
            parts = []
            if late:
                parts.append(
                    f"point(s) at step(s) {late} take effect at the next update step ({grid}), not at their step"
                )
            if never:
                parts.append(
                    f"point(s) at step(s) {never} come after the last update (update_times={c.update_times})"
                )
            warnings.warn(
                f"DataFlex mixer 'dynamic' sets its weights at update steps only: schedule {'; '.join(parts)}. Put the "
                "schedule points on the update grid (or set update_step / warmup_step / update_times to match)",
                UserWarning,
                stacklevel=3,
            )

    def set_domains(self, dataset: Any = None, domains: list[Any] | None = None) -> None:
        """Read the domains (from ``domains`` or the dataset's ``domain_column``); mixers require them."""
        if dataset is not None:
            require_map_style(dataset)
        if domains is not None:
            self.domain_ids, self.domain_names = encode_domains(list(domains))
        elif dataset is not None:
            try:
                self.domain_ids, self.domain_names = read_domains(dataset, self.config.domain_column)
            except ValueError:
                # a mixer needs domains; a domain_column set to something else than the default is not
                # optional either (a misspelt column must not silently turn off the domains)
                if self.mixer is not None or self.config.domain_column != DEFAULT_DOMAIN_COLUMN:
                    raise
                self.domain_ids, self.domain_names = None, []
        if self.mixer is not None and self.domain_ids is None:
            raise ValueError(
                f"mixer {self.config.mixer!r} needs domains: the training dataset needs the column "
                f"domain_column={self.config.domain_column!r} (or pass domains=[...])"
            )
        if self.mixer is not None:
            self.weights = self.mixer.init_weights(self.domain_names)  # validates initial weights/schedule

    def bind_dataset(self, dataset: Any) -> None:
        """Use ``dataset`` (indexable, items with ``input_ids``) for scoring and build the sampler."""
        require_map_style(dataset)
        n = len(dataset)
        if self.domain_ids is not None and len(self.domain_ids) != n:
            raise ValueError(
                f"{len(self.domain_ids)} domain labels for {n} training samples: the dataset changed length after the "
                "domains were read (packing is not supported with DataFlex domains)"
            )
        self.dataset = dataset
        if self.sampler is None:
            self.sampler = DataFlexSampler(
                self.config.num_samples or n,
                seed=self.seed,
                domain_ids=self.domain_ids,
                dataset_size=n,
            )
        else:
            self.sampler.set_domains(self.domain_ids)

    @property
    def needs_loss_hook(self) -> bool:
        """Whether per-sample training losses must be reported (weighters, ODM)."""
        return self.weighter is not None or bool(self.mixer is not None and self.mixer.needs_observations)

    def resume_from(self, checkpoint: str | os.PathLike | None) -> None:
        """Tell the callback which checkpoint folder the next ``train()`` resumes from.

        ``DataFlexTrainer`` does this itself. With a plain ``Trainer`` call it with the folder given to
        ``trainer.train(resume_from_checkpoint=...)`` where the callback cannot find that folder on its own
        (see :func:`_resume_checkpoint`); ``None`` lets it look.
        """
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise ValueError(
                f"resume_from: checkpoint must be a checkpoint folder (str or os.PathLike) or None, got "
                f"{type(checkpoint).__name__}"
            )
        self._resume_path = None if checkpoint is None else os.fspath(checkpoint)

    # ---------------------------------------------------------------------------- hooks
    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs
    ):
        # options DataFlex would silently override are refused before anything changes
        strategy = getattr(args, "train_sampling_strategy", "random")
        if strategy != "random":
            raise ValueError(
                f"train_sampling_strategy={strategy!r} would be ignored: DataFlex replaces the training sampler with "
                "its own (callback-only mode swaps it into the DataLoader); allowed: train_sampling_strategy='random'"
            )
        self._check_layer(model)
        running = _running_trainer_callbacks(self)
        if running is not None:
            mine = sum(cb is self for cb in running)
            others = [cb for cb in running if isinstance(cb, DataFlexCallback) and cb is not self]
            if mine > 1 or others:
                raise ValueError(
                    "the Trainer holds "
                    + (
                        f"this DataFlexCallback {mine} times"
                        if mine > 1
                        else f"{len(others) + 1} DataFlexCallbacks"
                    )
                    + ": each would run every update (and install its own sampler), so a Trainer takes one "
                    "DataFlexCallback, once (DataFlexTrainer adds the one given as dataflex=; do not also pass it "
                    "in callbacks=)"
                )
        if not self.trainer_mode and self.weighter is not None:
            raise ValueError(
                f"weighter {self.config.weighter!r} needs per-sample losses: use DataFlexTrainer (or the SFT mixin) "
                "instead of a plain Trainer with DataFlexCallback"
            )
        # where a resumed run's data state is, settled first: a resume that cannot find it stops here
        path, self._resume_path = self._resume_path, None
        located = path is not None
        if path is None and state.global_step > 0:  # a stock Trainer resuming: find its checkpoint
            path, located = _resume_checkpoint(args, state.global_step, self)
        has_state = path is not None and os.path.exists(os.path.join(path, STATE_FILE))
        if state.global_step > 0 and not has_state and not located:
            raise RuntimeError(
                f"DataFlexCallback: training resumes at step {state.global_step}, but the checkpoint it resumes "
                "from is unknown (transformers does not pass it to callbacks, and no running Trainer holding this "
                "callback was found on the call stack) and neither args.resume_from_checkpoint nor "
                f"{os.path.join(args.output_dir, 'checkpoint-' + str(state.global_step))} holds {STATE_FILE}. "
                "Call callback.resume_from(<checkpoint folder>) before trainer.train(resume_from_checkpoint=...), "
                "or use DataFlexTrainer"
            )
        self._model, self._optimizer = model, optimizer
        self._written, self._push_observed = None, None
        if self.sampler is None:
            if train_dataloader is None:
                raise ValueError(
                    "DataFlexCallback could not find the training dataset; pass train_dataset=..."
                )
            if self.mixer is not None and self.domain_ids is None:
                self.set_domains(train_dataloader.dataset)
            self.bind_dataset(train_dataloader.dataset)
        if not self.trainer_mode and train_dataloader is not None:
            install_sampler(train_dataloader, self.sampler)
        if self._obs_loss is None:
            d = max(1, len(self.domain_names))
            self._obs_loss, self._obs_count = np.zeros(d), np.zeros(d)
        # config seed None: the Trainer's data seed, as its own sampler would use (a checkpoint's seed wins below)
        if self.config.seed is None:
            data_seed = getattr(args, "data_seed", None)
            self.seed = int(data_seed if data_seed is not None else getattr(args, "seed", DEFAULT_SEED))
            self.sampler.seed = self.seed  # its cache is cleared by the reset / load below
        if has_state:
            self.load_state(path)
            return
        if path is not None and state.global_step > 0:
            logger.warning("DataFlex: no %s in %s; the data state restarts from scratch", STATE_FILE, path)
        self.reset_state()
        if self.mixer is not None:
            self.weights = self.mixer.init_weights(self.domain_names)
            self.sampler.set_plan({"kind": "mixture", "weights": self.weights.tolist()})
        if self.selector is not None and hasattr(self.selector, "on_train_begin"):
            self.selector.on_train_begin(self._context(state.global_step), len(self.dataset))
        if self.config.is_update_step(state.global_step, self.updates_done) and state.global_step == 0:
            self.update(0)

    def reset_state(self) -> None:
        """Forget the data state of earlier runs: schedule counters, sampler plans and position, method
        memories, observations (``on_train_begin`` of a run that does not resume from a checkpoint)."""
        self.updates_done = 0
        self.log_history = []
        self.resumed_from = None
        if self.sampler is not None:
            self.sampler.reset()
        c = self.config
        for kind in ("selector", "mixer", "weighter"):
            obj = getattr(self, kind)
            if obj is not None:  # a fresh method's (empty) memory
                obj.load_state_dict(build(kind, getattr(c, kind), **getattr(c, f"{kind}_args")).state_dict())
        if self._obs_loss is not None:
            self._obs_loss[:] = 0
            self._obs_count[:] = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.sampler is not None:
            self.sampler.set_epoch(int(math.floor(state.epoch + 1e-9)) if state.epoch else 0)

    def on_step_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is not None:
            self._model = model
        if optimizer is not None:
            self._optimizer = optimizer
        # plans of drawn-ahead (prefetched) positions stay until they are trained
        if self.sampler is not None:
            trained = _trained_positions(args, state, train_dataloader, self.sampler.num_samples)
            if trained is not None:
                self.sampler.set_trained(trained)
        if self.config.is_update_step(state.global_step, self.updates_done) and (
            self.selector is not None or self.mixer is not None
        ):
            self.update(state.global_step)
        if dist_info()[1] > 1 and _pushes_checkpoints(args):
            # on_push_begin runs on world rank 0 only and cannot sum the observations over ranks: it takes these
            # (no training step runs between this step's end and the checkpoint it may save)
            self._push_observed = self._reduced_observations()

    def on_push_begin(self, args, state, control, **kwargs):
        """Write ``dataflex_state.json`` into the checkpoint folder the Trainer is about to push.

        ``Trainer._save_checkpoint`` calls ``_push_from_checkpoint`` (``push_to_hub=True``), which starts the
        upload of the checkpoint folder (``hub_strategy`` ``checkpoint`` / ``all_checkpoints``) in the background
        *before* ``on_save`` runs; this hook runs right before that upload (world rank 0), so the pushed folder holds
        the DataFlex state. ``on_save`` then leaves the file as it is.
        """
        if self.sampler is None or not _pushes_checkpoints(args):
            return
        _, local = _running_trainer_frame(self, "checkpoint_folder")
        pushed = local.get("checkpoint_folder") if local is not None else None
        folder = _checkpoint_folder(args, state.global_step, self)
        if not isinstance(pushed, (str, os.PathLike)) or os.path.abspath(pushed) != os.path.abspath(folder):
            return  # not the push of this step's checkpoint (e.g. Trainer.push_to_hub): on_save writes it
        if not os.path.isdir(folder):
            return
        observed = self._push_observed if dist_info()[1] > 1 else self._reduced_observations()
        if observed is None:
            return
        self.save_state(folder, observed=observed)
        self._written = (os.path.abspath(folder), int(state.global_step))

    def on_save(self, args, state, control, **kwargs):
        loss, count = self._reduced_observations()  # collective: every rank takes part
        # the processes the Trainer writes checkpoints with: world rank 0, or each node's local rank 0 with
        # save_on_each_node (a node without shared storage resumes from its own copy of the checkpoint)
        should_save = getattr(args, "should_save", None)
        if not (state.is_world_process_zero if should_save is None else should_save):
            return
        folder = _checkpoint_folder(args, state.global_step, self)
        if self._written == (os.path.abspath(folder), int(state.global_step)):
            return  # written before the push began (on_push_begin); the upload may be reading it now
        if os.path.isdir(folder):
            self.save_state(folder, observed=(loss, count))

    # --------------------------------------------------------------------------- update
    def _context(self, step: int) -> UpdateContext:
        return UpdateContext(
            model=self._model,
            dataset=self.dataset,
            step=step,
            seed=self.seed,
            domain_ids=self.domain_ids,
            domain_names=self.domain_names,
            target_dataset=self.target_dataset,
            reference_model=self.reference_model,
            reward_fn=self.reward_fn,
            optimizer=self._optimizer,
            collate_fn=self.collate_fn,
            batch_size=self.config.ops_batch_size,
            weights=self.weights,
        )

    def update(self, step: int) -> dict[str, Any]:
        """Run one selection / mixing update now (normally called by the schedule)."""
        t0 = time.perf_counter()
        ctx = self._context(step)
        loss, count = self._reduced_observations()
        ctx.observed_loss, ctx.observed_count = loss, count
        plan: dict[str, Any]
        entry: dict[str, Any] = {"step": step}
        if self.selector is not None and not self.selector.ready(ctx):
            # e.g. delta_loss at the step of its first scoring: no loss change to rank by yet
            entry["skipped"] = (
                f"selector {self.config.selector!r} is not ready (no scores from an earlier step)"
            )
            logger.info(  # expected with warmup_step=0 (the default) for selectors that rank changes
                "DataFlex: update at step %d skipped: %s; training continues on the current selection and it does "
                "not count toward update_times",
                step,
                entry["skipped"],
            )
            self.log_history.append(entry)
            return entry
        if self.selector is not None:
            chosen = self.selector.run(ctx, len(self.dataset))
            plan = {"kind": "subset", "indices": chosen.tolist()}
            entry["selected"] = len(chosen)
            if self.domain_ids is not None:
                entry["selected_per_domain"] = np.bincount(
                    self.domain_ids[chosen], minlength=len(self.domain_names)
                ).tolist()
        elif self.mixer is not None:
            w = normalize_weights(self.mixer.update(ctx, self.weights))
            plan = {"kind": "mixture", "weights": w.tolist()}
        else:
            return {}
        plan = _broadcast(plan)
        self.sampler.set_plan(plan)
        if plan["kind"] == "mixture":
            self.weights = np.asarray(plan["weights"])
            entry["weights"] = dict(zip(self.domain_names, [round(x, 6) for x in plan["weights"]]))
        self.updates_done += 1
        if self._obs_loss is not None:
            self._obs_loss[:] = 0
            self._obs_count[:] = 0
        entry["seconds"] = time.perf_counter() - t0
        self.log_history.append(entry)
        logger.info("DataFlex update: %s", entry)
        return entry

    def _reduced_observations(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self._obs_loss is None or not self.domain_names:
            return None, None
        rank, world = dist_info()
        if world > 1:
            import torch.distributed as dist

            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor(
                np.concatenate([self._obs_loss, self._obs_count]), dtype=torch.float64, device=dev
            )
            dist.all_reduce(t)
            t = t.cpu().numpy()
            d = len(self._obs_loss)
            return t[:d], t[d:]
        return self._obs_loss.copy(), self._obs_count.copy()

    # ---------------------------------------------------------------- per-batch (trainer mode)
    def observe(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample training losses ``[B]`` of samples ``indices`` ``[B]`` (ODM rewards)."""
        if self.domain_ids is None or self._obs_loss is None:
            return
        d = self.domain_ids[indices.detach().cpu().numpy()]
        np.add.at(self._obs_loss, d, losses.detach().float().cpu().numpy())
        np.add.at(self._obs_count, d, 1)

    def weigh(self, losses: torch.Tensor, indices: torch.Tensor, step: int) -> torch.Tensor | None:
        """Per-sample loss weights ``[B]`` (mean 1) or None before ``warmup_step`` / without a weighter."""
        if self.weighter is None or step < self.config.warmup_step:
            return None
        dom = None
        if self.domain_ids is not None:
            dom = torch.as_tensor(self.domain_ids[indices.detach().cpu().numpy()])
        return self.weighter.weights(losses.detach(), indices, dom, step).to(losses.device, losses.dtype)

    # ---------------------------------------------------------------------------- state
    def state_dict(self, observed: tuple[Any, Any] | None = None) -> dict[str, Any]:
        obs_loss, obs_count = observed if observed is not None else (self._obs_loss, self._obs_count)
        return {
            "format": 1,
            "config": self.config.to_dict(),
            "updates_done": self.updates_done,
            "seed": self.seed,
            "weights": None if self.weights is None else list(map(float, self.weights)),
            "domain_names": self.domain_names,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "mixer": self.mixer.state_dict() if self.mixer is not None else None,
            "weighter": self.weighter.state_dict() if self.weighter is not None else None,
            "log_history": self.log_history[-100:],
            "observed_loss": None if obs_loss is None else list(map(float, obs_loss)),
            "observed_count": None if obs_count is None else list(map(float, obs_count)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cfg = state.get("config", {})
        for k in ("selector", "mixer", "weighter"):
            if cfg.get(k) != getattr(self.config, k):
                raise ValueError(
                    f"checkpoint DataFlex state was written with {k}={cfg.get(k)!r} but this run uses "
                    f"{k}={getattr(self.config, k)!r}"
                )
        if state.get("domain_names") and self.domain_names and state["domain_names"] != self.domain_names:
            raise ValueError(
                f"checkpoint domains {state['domain_names']} differ from this run's {self.domain_names}"
            )
        saved = state.get("sampler")
        if saved is not None and self.sampler is not None:
            # the sampler indexes the dataset it was built for, and the Trainer counted its steps from len(sampler)
            was = (int(saved.get("dataset_size", saved["num_samples"])), int(saved["num_samples"]))
            now = (self.sampler.dataset_size, self.sampler.num_samples)
            if was != now:
                raise ValueError(
                    f"checkpoint DataFlex state was written for a training dataset of {was[0]} samples ({was[1]} "
                    f"sampler positions per epoch), but this run has {now[0]} ({now[1]}): resume with the same "
                    "train_dataset and num_samples"
                )
        self.updates_done = int(state.get("updates_done", 0))
        if state.get("seed") is not None:  # the seed the checkpointed run used (also for the sampler, below)
            self.seed = int(state["seed"])
        w = state.get("weights")
        self.weights = None if w is None else np.asarray(w, dtype=np.float64)
        if state.get("sampler") is not None and self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        for k in ("selector", "mixer", "weighter"):
            obj = getattr(self, k)
            if obj is not None and state.get(k) is not None:
                obj.load_state_dict(state[k])
        self.log_history = list(state.get("log_history", []))
        if state.get("observed_loss") is not None:
            # the saved observations are summed over ranks: rank 0 carries them, the others restart at zero
            keep = dist_info()[0] == 0
            self._obs_loss = np.asarray(state["observed_loss"], dtype=np.float64) * keep
            self._obs_count = np.asarray(state["observed_count"], dtype=np.float64) * keep

    def save_state(self, folder: str, observed: tuple[Any, Any] | None = None) -> str:
        """Write ``dataflex_state.json`` into ``folder``: numpy scalars (e.g. in a custom method's state) as
        numbers; the text is made first and the file replaced whole, so a state JSON cannot hold raises
        ``TypeError`` and leaves the previous file."""
        from hf_ext.utils.atomic import atomic_write_text
        from hf_ext.utils.jsonable import to_jsonable

        path = os.path.join(folder, STATE_FILE)
        atomic_write_text(path, json.dumps(to_jsonable(self.state_dict(observed))))
        return path

    def load_state(self, folder_or_file: str) -> None:
        path = folder_or_file
        if os.path.isdir(path):
            path = os.path.join(path, STATE_FILE)
        with open(path) as f:
            self.load_state_dict(json.load(f))
        self.resumed_from = path


def _running_trainer_callbacks(callback: Any) -> list[Any] | None:
    """The callback list of the ``Trainer`` running ``callback`` (innermost frame on the call stack whose ``self`` is
    a transformers ``Trainer`` holding it), or None when no such Trainer is running."""
    trainer, _ = _running_trainer_frame(callback)
    if trainer is None:
        return None
    return list(getattr(getattr(trainer, "callback_handler", None), "callbacks", ()))


def _pushes_checkpoints(args: Any) -> bool:
    """Whether the Trainer uploads its checkpoint folders (``push_to_hub`` with ``hub_strategy`` ``checkpoint`` or
    ``all_checkpoints``; ``every_save`` uploads only the model files copied to ``output_dir``)."""
    strategy = getattr(getattr(args, "hub_strategy", None), "value", getattr(args, "hub_strategy", None))
    return bool(getattr(args, "push_to_hub", False)) and strategy in ("checkpoint", "all_checkpoints")


def _checkpoint_folder(args: Any, global_step: int, callback: Any = None) -> str:
    """The folder the running ``Trainer`` writes this step's checkpoint to, computed as ``Trainer._save_checkpoint``
    does: ``Trainer._get_output_dir(trial)/checkpoint-<global_step>``.

    Under ``Trainer.hyperparameter_search`` that is ``output_dir/run-<trial id>`` (or ``hp_name(trial)``), not
    ``output_dir``. The ``trial`` is the one the Trainer passes to ``_save_checkpoint``: the ``trial`` of the innermost
    frame on the call stack whose ``self`` is the Trainer running ``callback`` (``_maybe_log_save_evaluate``), else
    that Trainer's ``_trial``. Without a running Trainer (or one lacking ``_get_output_dir``): ``args.output_dir``.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    name = f"{PREFIX_CHECKPOINT_DIR}-{global_step}"
    trainer, local = _running_trainer_frame(callback, "trial")
    if trainer is None:
        trainer, _ = _running_trainer_frame(callback)
        trial = getattr(trainer, "_trial", None)
    else:
        trial = local["trial"]
    get_output_dir = getattr(trainer, "_get_output_dir", None)
    run_dir = get_output_dir(trial=trial) if callable(get_output_dir) else args.output_dir
    return os.path.join(run_dir, name)


def _running_trainer_frame(callback: Any, local: str | None = None) -> tuple[Any, dict[str, Any] | None]:
    """``(trainer, frame locals)`` of the innermost frame on the call stack whose ``self`` is a transformers
    ``Trainer`` holding ``callback`` (and, when ``local`` is given, that has that local variable); ``(None, None)``
    when there is none."""
    import inspect

    trainer_cls = getattr(sys.modules.get("transformers.trainer"), "Trainer", None)
    if trainer_cls is None or callback is None:
        return None, None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            found = frame.f_locals
            owner = found.get("self")
            if isinstance(owner, trainer_cls) and (local is None or local in found):
                handler = getattr(owner, "callback_handler", None)
                if any(cb is callback for cb in getattr(handler, "callbacks", ())):
                    return owner, dict(found)
            frame = frame.f_back
    finally:
        del frame
    return None, None


def _running_trainer_resume(callback: Any) -> tuple[bool, str | None]:
    """``(found, folder)``: the ``resume_from_checkpoint`` of the ``Trainer`` that is running ``callback``.

    The innermost frame on the call stack whose ``self`` is a transformers ``Trainer`` holding ``callback`` and
    that has a ``resume_from_checkpoint`` local (``Trainer._inner_training_loop``, where ``True`` is already
    resolved to a folder; ``Trainer.train`` resolves it too) gives it. The function name is not relied on, and
    another Trainer on the stack (one that does not hold the callback) is not mistaken for it. ``found`` is
    False when no such frame exists (e.g. ``on_train_begin`` called outside a ``Trainer``) or its
    ``resume_from_checkpoint`` is not a folder.
    """
    _, local = _running_trainer_frame(callback, "resume_from_checkpoint")
    found = local.get("resume_from_checkpoint") if local is not None else None
    if isinstance(found, (str, os.PathLike)):
        return True, os.fspath(found)
    # no such frame, or not a folder (None): the Trainer itself does not resume from a path
    return False, None


def _resume_checkpoint(args: Any, global_step: int, callback: Any = None) -> tuple[str | None, bool]:
    """The checkpoint folder a stock ``Trainer`` is resuming from (callback-only mode), and whether it is known.

    transformers gives callbacks ``args``, ``state``, ``control`` and objects such as ``model`` and
    ``train_dataloader``, but not the ``resume_from_checkpoint`` passed to ``train()``; neither ``TrainerState``
    (loaded from the checkpoint, without its path) nor ``TrainingArguments`` records it, and ``ExportableState``
    rebuilds a callback from JSON arguments, which cannot carry datasets or reward functions. So, in order: the
    running Trainer's own ``resume_from_checkpoint`` (:func:`_running_trainer_resume`; a checkpoint outside
    ``output_dir`` works), ``args.resume_from_checkpoint``, then the Trainer's own checkpoint folder for ``global_step``
    (:func:`_checkpoint_folder`: ``<output_dir>/run-<trial>/...`` under a hyperparameter search), then
    ``<output_dir>/checkpoint-<global_step>``: the
    first that holds ``dataflex_state.json``. Without one, the folder is the Trainer's (``known`` True: that
    checkpoint has no DataFlex state) or, when the Trainer was not found, ``None`` with ``known`` False.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    candidates: list[str] = []
    found, folder = _running_trainer_resume(callback)
    if folder is not None:
        candidates.append(folder)
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(args.resume_from_checkpoint)
    # the Trainer's checkpoint folder: a trial's output_dir/run-<id>/checkpoint-N under a hyperparameter search
    candidates.append(_checkpoint_folder(args, global_step, callback))
    candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}"))
    for c in candidates:
        if os.path.exists(os.path.join(c, STATE_FILE)):
            return c, True
    return (folder, True) if found else (None, False)


def _trained_positions(args: Any, state: Any, train_dataloader: Any, num_samples: int) -> int | None:
    """Global sampler positions a Trainer resuming from ``state.global_step`` skips (None when unknown).

    The Trainer's own rule: ``epochs = global_step // steps_per_epoch`` whole epochs, then
    ``(global_step % steps_per_epoch) * gradient_accumulation_steps`` batches of the next one, each of the DataLoader's
    total batch size (all ranks; accelerate's ``total_batch_size``). Positions from there on may still be trained by a
    resumed run, drawn ahead by the uninterrupted one.
    """
    if train_dataloader is None:
        return None
    try:
        n_batches = len(train_dataloader)
    except TypeError:
        return None
    batch = getattr(train_dataloader, "total_batch_size", None) or getattr(
        train_dataloader, "batch_size", None
    )
    if not n_batches or not batch:
        return None
    ga = max(1, int(getattr(args, "gradient_accumulation_steps", 1)))
    per_epoch = max(n_batches // ga + int(n_batches % ga > 0), 1)
    epochs, steps = divmod(int(state.global_step), per_epoch)
    return epochs * num_samples + min(steps * ga * int(batch), num_samples)


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (identity without torch.distributed)."""
    _, world = dist_info()
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def install_sampler(dataloader: Any, sampler: DataFlexSampler) -> None:
    """Swap ``sampler`` into a (prepared) DataLoader's innermost batch sampler (callback-only mode)."""
    obj = getattr(dataloader, "batch_sampler", None)
    for _ in range(6):
        inner = getattr(obj, "batch_sampler", None)
        if inner is None or inner is obj:
            break
        obj = inner
    if obj is None or not hasattr(obj, "sampler") or isinstance(obj.sampler, torch.utils.data.BatchSampler):
        raise ValueError(
            "DataFlexCallback could not find the training DataLoader's sampler; use DataFlexTrainer instead"
        )
    if len(obj.sampler) != len(sampler):
        raise ValueError(
            f"the Trainer's sampler yields {len(obj.sampler)} samples per epoch but DataFlex's yields {len(sampler)}; "
            "with a plain Trainer leave num_samples unset"
        )
    obj.sampler = sampler
