"""``near`` selector: nearest neighbours of the target set in embedding space (and k-means)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hf_ext.callbacks.dataflex.base import Selector, UpdateContext, top_k
from hf_ext.callbacks.dataflex.registry import register


def check_target_size(target_size: int | None) -> None:
    """``target_size`` must be None or positive (an empty target set scores every candidate NaN)."""
    if target_size is not None and target_size <= 0:
        raise ValueError(f"target_size must be None (the whole target set) or > 0, got {target_size!r}")


def target_indices(ctx: UpdateContext, target_size: int | None) -> np.ndarray:
    """Indices of the target set used for scoring (all, or a seeded subset of ``target_size``)."""
    n = len(ctx._target("this selector"))
    if target_size is not None and target_size < n:
        return np.sort(ctx.rng(3).choice(n, size=target_size, replace=False))
    return np.arange(n)


@register("selector", "near")
@dataclass
class NearSelector(Selector):
    """Score = mean of the ``knn`` largest cosine similarities between a candidate's embedding
    (mean-pooled hidden state of ``layer``) and the target embeddings."""

    knn: int = field(default=5, metadata={"help": "Target neighbours averaged per candidate."})
    layer: int = field(default=-1, metadata={"help": "Hidden-state layer used as the embedding."})
    target_size: int | None = field(default=None, metadata={"help": "Target samples used (None: all)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knn <= 0:
            raise ValueError(f"knn must be > 0, got {self.knn}")
        check_target_size(self.target_size)

    def scores(self, ctx: UpdateContext, candidates: np.ndarray) -> np.ndarray:
        e = ctx.embeddings(candidates, layer=self.layer)  # [n, H]
        t = ctx.embeddings(target_indices(ctx, self.target_size), target=True, layer=self.layer)  # [m, H]
        sim = e @ t.T
        kk = min(self.knn, sim.shape[1])
        return np.sort(sim, axis=1)[:, -kk:].mean(1)

    def select(self, ctx: UpdateContext, candidates: np.ndarray, k: int) -> np.ndarray:
        return top_k(candidates, self.scores(ctx, candidates), k)


def kmeans(x: np.ndarray, k: int, *, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Cluster rows of ``x`` ``[n, d]`` into ``k`` groups (k-means++ init); returns labels ``[n]``."""
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centers.append(x[rng.choice(n, p=p)])
    c = np.asarray(centers)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if (new == labels).all() and _ > 0:
            break
        labels = new
        for j in range(k):
            m = labels == j
            if m.any():
                c[j] = x[m].mean(0)
    return labels
