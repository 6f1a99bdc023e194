"""Base classes of DataFlex methods and the context an update sees.

* :class:`Selector` – ``select(ctx, candidates, k) -> chosen indices``; the sampler then trains
  on the chosen subset until the next update.
* :class:`Mixer` – ``update(ctx, weights) -> new domain weights``; the sampler draws domains
  with these probabilities.
* :class:`Weighter` – ``weights(losses, indices, domains) -> per-sample loss weights`` (mean 1)
  applied at every step after ``warmup_step``.

Methods are dataclasses (their fields are the config, with ``help`` metadata); state that must
survive a checkpoint goes through ``state_dict`` / ``load_state_dict`` (JSON-able values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hf_ext.callbacks.dataflex import ops


@dataclass
class UpdateContext:
    """What a method sees at an update. Model-dependent values are computed lazily and cached.

    Attributes:
        model: the training model (plain/DDP/FSDP2/PEFT).
        dataset: the training dataset (indexable; items with ``input_ids``).
        step: optimizer step of this update.
        seed: run seed.
        domain_ids: ``[N]`` int domain of each training sample, or None.
        domain_names: names of the domains (index = id).
        target_dataset: the target (validation) set for less/nice/near/cluster_less.
        reference_model: DoReMi's reference model.
        reward_fn: NICE's reward ``reward_fn(prompt_ids: list[int], completion_ids: list[int]) -> float``.
        optimizer: the training optimizer (LESS Adam preconditioning).
        collate_fn: batches items for the ops (default :func:`ops.default_collate`).
        batch_size: batch size of the inference passes.
        observed_loss: ``[D]`` sum of training losses per domain since the last update (or None).
        observed_count: ``[D]`` number of samples behind ``observed_loss``.
        weights: current domain weights ``[D]`` (mixers) or None.
    """

    model: torch.nn.Module | None
    dataset: Any
    step: int = 0
    seed: int = 0
    domain_ids: np.ndarray | None = None
    domain_names: list[str] = field(default_factory=list)
    target_dataset: Any = None
    reference_model: torch.nn.Module | None = None
    reward_fn: Any = None
    optimizer: Any = None
    collate_fn: Any = None
    batch_size: int = 8
    observed_loss: np.ndarray | None = None
    observed_count: np.ndarray | None = None
    weights: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_domains(self) -> int:
        return len(self.domain_names)

    def rng(self, salt: int = 0) -> np.random.Generator:
        """A generator seeded by (seed, step, salt): identical on every rank."""
        return np.random.default_rng([self.seed, self.step, salt])

    def domain_indices(self) -> list[np.ndarray]:
        """Sample indices of each domain."""
        if self.domain_ids is None:
            raise ValueError(
                "this method needs domains: set domain_column to a dataset column naming each domain"
            )
        return [np.flatnonzero(self.domain_ids == d) for d in range(self.n_domains)]

    def _need_model(self, what: str) -> torch.nn.Module:
        if self.model is None:
            raise ValueError(f"{what} needs the model, but the update context has none")
        return self.model

    def _target(self, what: str) -> Any:
        if self.target_dataset is None:
            raise ValueError(
                f"{what} needs a target set: pass target_dataset=... to DataFlexTrainer / DataFlexCallback"
            )
        return self.target_dataset

    def losses(
        self, indices: np.ndarray, *, model: torch.nn.Module | None = None, target: bool = False
    ) -> np.ndarray:
        """Token-mean loss per sample ``[n]`` under ``model`` (default the training model)."""
        m = model if model is not None else self._need_model("losses")
        ds = self._target("losses on the target set") if target else self.dataset
        key = ("loss", id(m), target, tuple(int(i) for i in indices))
        if key not in self._cache:
            self._cache[key] = ops.per_sample_loss(
                m, ds, list(map(int, indices)), collate_fn=self.collate_fn, batch_size=self.batch_size
            ).numpy()
        return self._cache[key]

    def excess_loss_terms(self, indices: np.ndarray) -> np.ndarray:
        """DoReMi's ``[n, 2]``: per-token clipped excess loss of the training model over the reference model,
        summed over each sample's tokens, and the token count (see :func:`ops.per_sample_excess_loss`)."""
        m = self._need_model("excess losses")
        if self.reference_model is None:
            raise ValueError("excess losses need reference_model=... (DoReMi's reference model)")
        key = ("excess", id(m), id(self.reference_model), tuple(int(i) for i in indices))
        if key not in self._cache:
            self._cache[key] = ops.per_sample_excess_loss(
                m,
                self.reference_model,
                self.dataset,
                list(map(int, indices)),
                collate_fn=self.collate_fn,
                batch_size=self.batch_size,
            ).numpy()
        return self._cache[key]

    def embeddings(self, indices: np.ndarray, *, target: bool = False, layer: int = -1) -> np.ndarray:
        """Normalised mean-pooled hidden states ``[n, H]``."""
        m = self._need_model("embeddings")
        ds = self._target("near/cluster_less") if target else self.dataset
        key = ("emb", target, layer, tuple(int(i) for i in indices))
        if key not in self._cache:
            self._cache[key] = ops.embeddings(
                m,
                ds,
                list(map(int, indices)),
                collate_fn=self.collate_fn,
                batch_size=self.batch_size,
                layer=layer,
            ).numpy()
        return self._cache[key]

    def grad_features(
        self,
        indices: np.ndarray,
        *,
        target: bool = False,
        proj_dim: int = 256,
        precondition: str = "sgd",
        projection: str = "gaussian",
        item_loss_fn: Any = None,
    ) -> np.ndarray:
        """Projected per-sample gradients ``[n, proj_dim]`` (see :func:`ops.grad_features`)."""
        m = self._need_model("gradient features")
        ds = self._target("less/nice") if target else self.dataset
        return ops.grad_features(
            m,
            ds,
            list(map(int, indices)),
            proj_dim=proj_dim,
            seed=self.seed,
            optimizer=self.optimizer,
            precondition=precondition,
            projection=projection,
            collate_fn=self.collate_fn,
            item_loss_fn=item_loss_fn,
        ).numpy()


class _Stateful:
    """JSON-able state for checkpoints (override in methods that keep memory)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@dataclass
class Selector(_Stateful):
    """Chooses the samples trained on until the next update.

    Fields shared by all selectors: ``budget`` (fraction in (0, 1] or a count of samples to keep)
    and ``pool_size`` (candidates scored per update; None = the whole dataset).
    """

    budget: float = field(
        default=0.5, metadata={"help": "Kept samples: fraction in (0, 1] of the pool, or a count > 1."}
    )
    pool_size: int | None = field(
        default=None,
        metadata={"help": "Candidates drawn (uniformly) and scored per update; None scores all."},
    )

    name = "selector"

    def __post_init__(self) -> None:
        if not (self.budget > 0):
            raise ValueError(f"budget must be > 0 (a fraction in (0, 1] or a count), got {self.budget!r}")
        if self.budget > 1 and int(self.budget) != self.budget:
            raise ValueError(f"budget > 1 is a sample count and must be an integer, got {self.budget!r}")
        if self.pool_size is not None and self.pool_size <= 0:
            raise ValueError(f"pool_size must be None or > 0, got {self.pool_size!r}")

    def run(self, ctx: UpdateContext, n_total: int) -> np.ndarray:
        """Draw the candidate pool, compute ``k`` and call :meth:`select`; returns sorted unique indices."""
        if self.pool_size is not None and self.pool_size < n_total:
            cands = np.sort(ctx.rng(1).choice(n_total, size=self.pool_size, replace=False))
        else:
            cands = np.arange(n_total)
        k = int(round(self.budget * len(cands))) if self.budget <= 1 else int(self.budget)
        k = max(1, min(k, len(cands)))
        chosen = np.asarray(self.select(ctx, cands, k), dtype=np.int64)
        if len(chosen) != k or len(np.unique(chosen)) != k:
            raise RuntimeError(f"{self.name}: select() must return {k} distinct indices, got {len(chosen)}")
        return np.sort(chosen)

    def select(self, ctx: UpdateContext, candidates: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def ready(self, ctx: UpdateContext) -> bool:
        """Whether a selection can be made at this update; the callback skips the update when False."""
        return True


def top_k(candidates: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates with the highest scores (stable: ties keep candidate order)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return candidates[order[:k]]


@dataclass
class Mixer(_Stateful):
    """Sets the domain sampling weights."""

    initial_weights: list[float] | dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "Domain weights before the first update (None: uniform): {domain: weight} (missing domains 0), "
            "or a list in the order of the sorted domain names (DataFlexCallback.domain_names)."
        },
    )

    name = "mixer"
    needs_observations = False

    def __post_init__(self) -> None:
        if self.initial_weights is not None:
            iw = self.initial_weights
            vals = list(iw.values()) if isinstance(iw, dict) else iw
            try:
                w = np.asarray(vals, dtype=np.float64)
            except (TypeError, ValueError):
                w = np.asarray([-1.0])
            if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    "initial_weights must be a {domain: weight} mapping or a list of weights, non-negative with a "
                    f"positive sum, got {iw!r}"
                )

    def init_weights(self, domain_names: list[str]) -> np.ndarray:
        """Domain weights before the first update (``[D]``, in the order of ``domain_names``)."""
        n_domains = len(domain_names)
        if self.initial_weights is None:
            return np.full(n_domains, 1.0 / n_domains)
        if isinstance(self.initial_weights, dict):
            unknown = sorted(set(map(str, self.initial_weights)) - set(domain_names))
            if unknown:
                raise ValueError(
                    f"initial_weights names unknown domain(s) {unknown}; domains: {domain_names}"
                )
            by_name = {str(k): float(v) for k, v in self.initial_weights.items()}
            w = np.array([by_name.get(n, 0.0) for n in domain_names])
            if w.sum() <= 0:
                raise ValueError(
                    f"initial_weights {self.initial_weights!r} give every domain of {domain_names} weight 0"
                )
            return w / w.sum()
        w = np.asarray(self.initial_weights, dtype=np.float64)
        if len(w) != n_domains:
            raise ValueError(
                f"initial_weights has {len(w)} entries but the dataset has {n_domains} domains {domain_names} (a list "
                "follows the sorted domain names; a {domain: weight} mapping names them)"
            )
        return w / w.sum()

    def update(self, ctx: UpdateContext, weights: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass
class Weighter(_Stateful):
    """Per-sample loss weights for the current batch (mean 1 over the batch)."""

    name = "weighter"

    def weights(
        self, losses: torch.Tensor, indices: torch.Tensor, domains: torch.Tensor | None, step: int
    ) -> torch.Tensor:
        raise NotImplementedError


def normalize_weights(w: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(w, dtype=np.float64), 0, None)
    s = w.sum()
    return w / s if s > 0 else np.full(len(w), 1.0 / len(w))
