"""The dynamic sampler: yields training indices from the current *plan*, resumably.

A plan is one of

* ``{"kind": "uniform"}`` – a seeded permutation of the dataset per epoch (plain shuffling);
* ``{"kind": "subset", "indices": [...]}`` – cycle through a seeded permutation of the selected
  samples (selectors);
* ``{"kind": "mixture", "weights": [...]}`` – draw a domain with these probabilities, then a
  sample of that domain uniformly (mixers).

Every plan gets a version number. The sampler is *position addressable*: the index at global
position ``g`` (``epoch * num_samples + position``) depends only on ``(seed, version, g)``. It
records at which position each version was first used. The DataLoader and the Trainer fetch a
few batches ahead, so a plan set at step ``s`` takes effect a few batches later; the history
makes a resumed run replay exactly what the uninterrupted run drew, including batches already
drawn (prefetched) before the checkpoint was written. History entries and plans are kept while a
position at or after the trained point (:meth:`DataFlexSampler.set_trained`) uses them, however many
plan switches fall in the drawn-ahead window; only beyond ``max_pending`` such switches (a trained point
that never moves) are the oldest dropped, with a warning that resume is then inexact.

Example:
    >>> s = DataFlexSampler(6, seed=0)
    >>> sorted(list(s))
    [0, 1, 2, 3, 4, 5]
    >>> _ = s.set_plan({"kind": "subset", "indices": [1, 3]})
    >>> s.set_epoch(1)
    >>> sorted(set(s))
    [1, 3]
"""

from __future__ import annotations

import bisect
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

BLOCK = 256  # positions drawn together for mixture plans
MAX_PENDING_SWITCHES = 4096  # plan switches kept at or after the trained point before the oldest are dropped


class DataFlexSampler(torch.utils.data.Sampler[int]):
    """Sampler whose distribution the DataFlex callback changes during training.

    Args:
        num_samples: positions per epoch (``len(sampler)``; the Trainer derives its step counts from it).
        seed: base seed (same on every rank: the accelerate shard wrapper splits one index stream).
        domain_ids: ``[N]`` domain of each sample (needed by mixture plans).
        dataset_size: ``N`` (default ``num_samples``).
        max_pending: plan switches kept at or after the trained point (a memory bound: resume is exact while fewer
            fall between the trained point and the last drawn position; dropping one warns).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        domain_ids: np.ndarray | None = None,
        dataset_size: int | None = None,
        max_pending: int = MAX_PENDING_SWITCHES,
    ) -> None:
        def is_int(v: Any) -> bool:  # int() turned 2.5 into 2 and `or` a dataset_size of 0 into num_samples
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if not is_int(num_samples) or num_samples <= 0:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not is_int(max_pending) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if not is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if dataset_size is not None and (not is_int(dataset_size) or dataset_size < 1):
            raise ValueError(f"dataset_size must be None or an int >= 1, got {dataset_size!r}")
        self.max_pending = int(max_pending)
        self._warned_inexact = False
        self.num_samples = int(num_samples)
        self.dataset_size = int(num_samples if dataset_size is None else dataset_size)
        self.seed = int(seed)
        self.epoch = 0
        self.plans: dict[int, dict[str, Any]] = {0: {"kind": "uniform"}}
        self.current = 0
        self.history: list[tuple[int, int]] = [(0, 0)]  # (first global position, version)
        self.drawn = 0  # positions < drawn have been drawn (their version is in history)
        self.trained = (
            0  # positions < trained were trained (or are skipped on resume): their plans may be dropped
        )
        self._domain_pools: list[np.ndarray] | None = None
        self._cache: OrderedDict = OrderedDict()
        self.set_domains(domain_ids)

    # ---------------------------------------------------------------------------- configuration
    def set_domains(self, domain_ids: np.ndarray | None) -> None:
        self.domain_ids = None if domain_ids is None else np.asarray(domain_ids, dtype=np.int64)
        if self.domain_ids is not None:
            n_dom = int(self.domain_ids.max()) + 1 if len(self.domain_ids) else 0
            self._domain_pools = [np.flatnonzero(self.domain_ids == d) for d in range(n_dom)]

    def reset(self) -> None:
        """Back to the state of a new sampler (uniform plan, nothing drawn): a fresh ``train()``."""
        self.epoch = 0
        self.plans = {0: {"kind": "uniform"}}
        self.current = 0
        self.history = [(0, 0)]
        self.drawn = 0
        self.trained = 0
        self._warned_inexact = False
        self._cache.clear()

    def set_trained(self, position: int) -> None:
        """Positions below global position ``position`` have been trained (a resumed Trainer skips them).

        Plans are kept while a drawn position at or after it uses them: the DataLoader (workers ×
        ``prefetch_factor``), accelerate and gradient accumulation draw batches ahead, and a resumed run must replay
        those with the plan they were drawn under. :class:`DataFlexCallback` sets it at every optimizer step.
        """
        self.trained = max(0, int(position))
        self._prune()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_plan(self, plan: dict[str, Any]) -> int:
        """Register a new plan; positions drawn from now on use it. Returns its version."""
        kind = plan.get("kind")
        if kind == "subset":
            if len(plan["indices"]) == 0:
                raise ValueError("a subset plan needs at least one index")
            plan = {"kind": "subset", "indices": [int(i) for i in plan["indices"]]}
        elif kind == "mixture":
            if self._domain_pools is None:
                raise ValueError("a mixture plan needs domain ids (set_domains)")
            w = np.asarray(plan["weights"], dtype=np.float64)
            if len(w) != len(self._domain_pools) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    f"mixture weights {w.tolist()} do not match {len(self._domain_pools)} domains"
                )
            plan = {"kind": "mixture", "weights": (w / w.sum()).tolist()}
        elif kind != "uniform":
            raise ValueError(f"plan kind {kind!r} is not supported; choose uniform, subset or mixture")
        v = max(self.plans) + 1
        self.plans[v] = plan
        self.current = v
        self._prune()
        return v

    @property
    def plan(self) -> dict[str, Any]:
        return self.plans[self.current]

    def _prune(self) -> None:
        """Drop the history entries and plans no position at or after ``trained`` uses.

        The entries whose positions all lie before ``trained`` go (the entry covering ``trained`` stays), so memory
        follows the plan switches inside the drawn-ahead window, with no fixed cap on them; only past
        ``max_pending`` of them (``trained`` not moved, e.g. no :meth:`set_trained` calls) are the oldest dropped,
        with a ``UserWarning``: a resume from a checkpoint in that window would draw their positions from a later
        plan.
        """
        first = 0
        while first + 1 < len(self.history) and self.history[first + 1][0] <= self.trained:
            first += 1
        if first:
            self.history = self.history[first:]
        if len(self.history) > self.max_pending:
            if not self._warned_inexact:
                self._warned_inexact = True
                warnings.warn(
                    f"DataFlexSampler: more than max_pending={self.max_pending} plan switches fall at or after the "
                    f"trained position {self.trained}; the oldest are dropped, so a run resumed from a checkpoint in "
                    "this window would draw those positions from a later plan (resume inexact). DataFlexCallback "
                    "moves the trained position at every step (set_trained); raise max_pending if it cannot",
                    UserWarning,
                    stacklevel=3,
                )
            self.history = self.history[-self.max_pending :]
        needed = {self.current} | {v for _, v in self.history}
        for v in list(self.plans):
            if v not in needed:
                del self.plans[v]

    # -------------------------------------------------------------------------------- sampling
    def __len__(self) -> int:
        return self.num_samples

    def _version_at(self, g: int) -> int:
        if g < self.drawn:
            starts = [s for s, _ in self.history]
            v = self.history[max(0, bisect.bisect_right(starts, g) - 1)][1]
            return v if v in self.plans else self.current  # pruned: only for skipped positions
        if self.history[-1][1] != self.current:
            self.history.append((g, self.current))
            self._prune()
        self.drawn = g + 1
        return self.current

    def _start_of(self, v: int) -> int:
        for s, ver in self.history:
            if ver == v:
                return s
        return 0

    def _gen(self, *key: int) -> torch.Generator:
        g = torch.Generator()
        h = self.seed
        for k in key:
            h = (h * 1_000_003 + int(k) + 12_345) % (2**62)
        g.manual_seed(h)
        return g

    def _cached(self, key: tuple, make: Any) -> Any:
        hit = self._cache.get(key)
        if hit is None:
            hit = make()
            self._cache[key] = hit
            if len(self._cache) > 16:
                self._cache.popitem(last=False)
        return hit

    def index_at(self, g: int, v: int) -> int:
        """Dataset index at global position ``g`` under plan version ``v``."""
        plan = self.plans[v]
        kind = plan["kind"]
        if kind == "uniform":
            n = self.dataset_size
            ep, pos = divmod(g, self.num_samples)
            cycle, off = divmod(pos, n)
            perm = self._cached(
                ("u", ep, cycle, n), lambda: torch.randperm(n, generator=self._gen(0, ep, cycle))
            )
            return int(perm[off])
        if kind == "subset":
            idx = plan["indices"]
            off = g - self._start_of(v)
            cycle, pos = divmod(off, len(idx))
            perm = self._cached(
                ("s", v, cycle), lambda: torch.randperm(len(idx), generator=self._gen(1, v, cycle))
            )
            return int(idx[int(perm[pos])])
        b, off = divmod(g, BLOCK)
        return int(self._cached(("m", v, b), lambda: self._mixture_block(plan, v, b))[off])

    def _mixture_block(self, plan: dict[str, Any], v: int, b: int) -> np.ndarray:
        gen = self._gen(2, v, b)
        w = torch.tensor(plan["weights"], dtype=torch.float64)
        doms = torch.multinomial(w, BLOCK, replacement=True, generator=gen).numpy()
        u = torch.rand(BLOCK, generator=gen, dtype=torch.float64).numpy()
        out = np.empty(BLOCK, dtype=np.int64)
        for d, pool in enumerate(self._domain_pools or []):
            m = doms == d
            if m.any():
                if len(pool) == 0:
                    raise ValueError(f"domain {d} has no samples but has weight {plan['weights'][d]:.3g}")
                out[m] = pool[np.minimum((u[m] * len(pool)).astype(np.int64), len(pool) - 1)]
        return out

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.num_samples
        for pos in range(self.num_samples):
            g = base + pos
            yield self.index_at(g, self._version_at(g))

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "dataset_size": self.dataset_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "current": self.current,
            "plans": {str(k): v for k, v in self.plans.items()},
            "history": [list(h) for h in self.history],
            "drawn": self.drawn,
            "trained": self.trained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_samples = int(state["num_samples"])
        self.seed = int(state["seed"])
        self.dataset_size = int(state.get("dataset_size", self.num_samples))
        self.epoch = int(state.get("epoch", 0))
        self.plans = {int(k): dict(v) for k, v in state["plans"].items()}
        self.current = int(state["current"])
        self.history = [(int(a), int(b)) for a, b in state["history"]]
        self.drawn = int(state["drawn"])
        self.trained = int(state.get("trained", 0))
        self._cache.clear()
