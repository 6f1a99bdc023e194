"""Gradient-similarity selectors.

* ``less`` (LESS, Xia et al. 2024): per-sample gradients of the trainable (LoRA) parameters,
  Adam-preconditioned with the optimizer's moments, randomly projected to ``proj_dim``; score =
  mean cosine similarity to the (SGD) gradients of the target set; keep the top ``k``.
* ``nice`` (NICE): as LESS, but the target "gradient" is a policy gradient of a
  non-differentiable reward: for each target prompt, ``mc_samples`` completions are sampled and
  ``-sum (r - mean r) log p(completion)`` is differentiated (the gradient of minus the expected reward).
* ``cluster_less``: k-means on embeddings, LESS scores inside each cluster, a quota per cluster
  (diversity).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hf_ext.callbacks.dataflex import ops
from hf_ext.callbacks.dataflex.base import Selector, UpdateContext, top_k
from hf_ext.callbacks.dataflex.registry import register
from hf_ext.callbacks.dataflex.selectors.near import check_target_size, kmeans, target_indices


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@register("selector", "less")
@dataclass
class LessSelector(Selector):
    """LESS: gradient cosine similarity to the target set."""

    proj_dim: int = field(default=256, metadata={"help": "Random projection dimension (LESS uses 8192)."})
    precondition: str = field(default="adam", metadata={"help": "Training features: adam (LESS) or sgd."})
    projection: str = field(
        default="gaussian", metadata={"help": "gaussian (dense JL) or sketch (CountSketch)."}
    )
    target_size: int | None = field(default=None, metadata={"help": "Target samples used (None: all)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proj_dim <= 0:
            raise ValueError(f"proj_dim must be > 0, got {self.proj_dim}")
        if self.precondition not in ("adam", "sgd"):
            raise ValueError(f"precondition={self.precondition!r} is not supported; choose adam or sgd")
        if self.projection not in ("gaussian", "sketch"):
            raise ValueError(f"projection={self.projection!r} is not supported; choose gaussian or sketch")
        check_target_size(self.target_size)

    def target_features(self, ctx: UpdateContext) -> np.ndarray:
        t_idx = target_indices(ctx, self.target_size)
        return ctx.grad_features(
            t_idx, target=True, proj_dim=self.proj_dim, precondition="sgd", projection=self.projection
        )

    def scores(self, ctx: UpdateContext, candidates: np.ndarray) -> np.ndarray:
        g = ctx.grad_features(
            candidates, proj_dim=self.proj_dim, precondition=self.precondition, projection=self.projection
        )
        t = self.target_features(ctx)
        return (_unit(g) @ _unit(t).T).mean(1)

    def select(self, ctx: UpdateContext, candidates: np.ndarray, k: int) -> np.ndarray:
        return top_k(candidates, self.scores(ctx, candidates), k)


@register("selector", "nice")
@dataclass
class NiceSelector(LessSelector):
    """NICE: LESS with policy-gradient target features from ``reward_fn(prompt_ids, completion_ids)``.

    Target items' ``input_ids`` are the prompts.
    """

    mc_samples: int = field(default=4, metadata={"help": "Completions sampled per target prompt."})
    max_new_tokens: int = field(default=16, metadata={"help": "Length of each sampled completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mc_samples < 2:
            raise ValueError(f"mc_samples must be >= 2 (a baseline needs two samples), got {self.mc_samples}")
        if self.max_new_tokens <= 0 or self.temperature <= 0:
            raise ValueError("max_new_tokens and temperature must be > 0")

    def target_features(self, ctx: UpdateContext) -> np.ndarray:
        if ctx.reward_fn is None:
            raise ValueError(
                "selector 'nice' needs reward_fn=... (reward_fn(prompt_ids, completion_ids) -> float)"
            )
        target = ctx._target("nice")
        reward_fn = ctx.reward_fn
        mc, new, temp, seed, step = self.mc_samples, self.max_new_tokens, self.temperature, ctx.seed, ctx.step

        def item_loss(model: torch.nn.Module, i: int) -> torch.Tensor:
            prompt = [int(t) for t in target[i]["input_ids"]]
            dev = ops.model_device(model)
            x = torch.tensor([prompt] * mc, device=dev)
            gen_model = ops.unwrap(model)
            s = seed * 7919 + step * 104729 + i  # same samples on every rank
            # generate() samples from the global RNG: seed it inside fork_rng so the caller's (the training
            # run's) CPU/CUDA RNG state is restored afterwards
            cuda = (
                [dev.index if dev.index is not None else torch.cuda.current_device()]
                if dev.type == "cuda"
                else []
            )
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.default_generator.manual_seed(s)
                if cuda:
                    with torch.cuda.device(cuda[0]):
                        torch.cuda.manual_seed(s)
                out = gen_model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    do_sample=True,
                    temperature=temp,
                    top_k=0,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    pad_token_id=ops._pad_id(model),
                )
            comp = out[:, len(prompt) :]
            r = torch.tensor([float(reward_fn(prompt, c.tolist())) for c in comp], device=dev)
            adv = r - r.mean()
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
            lp = torch.log_softmax(logits[:, len(prompt) - 1 : -1].float(), -1)
            logp = lp.gather(-1, comp.unsqueeze(-1)).squeeze(-1).sum(-1)  # [mc]
            return -(adv * logp).mean()

        t_idx = target_indices(ctx, self.target_size)
        return ctx.grad_features(
            t_idx,
            target=True,
            proj_dim=self.proj_dim,
            precondition="sgd",
            projection=self.projection,
            item_loss_fn=item_loss,
        )


@register("selector", "cluster_less")
@dataclass
class ClusterLessSelector(LessSelector):
    """k-means on embeddings, then LESS's top scores inside each cluster with a per-cluster quota."""

    n_clusters: int = field(default=4, metadata={"help": "k of k-means."})
    quota: str = field(default="proportional", metadata={"help": "proportional (to cluster size) or equal."})
    layer: int = field(default=-1, metadata={"help": "Hidden-state layer used as the embedding."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_clusters <= 0:
            raise ValueError(f"n_clusters must be > 0, got {self.n_clusters}")
        if self.quota not in ("proportional", "equal"):
            raise ValueError(f"quota={self.quota!r} is not supported; choose proportional or equal")

    def select(self, ctx: UpdateContext, candidates: np.ndarray, k: int) -> np.ndarray:
        emb = ctx.embeddings(candidates, layer=self.layer)
        labels = kmeans(emb, self.n_clusters, seed=ctx.seed + ctx.step)
        scores = self.scores(ctx, candidates)
        quotas = cluster_quotas(np.bincount(labels, minlength=labels.max() + 1), k, self.quota)
        chosen = []
        for c, q in enumerate(quotas):
            m = np.flatnonzero(labels == c)
            if q:
                chosen.append(top_k(candidates[m], scores[m], int(q)))
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def cluster_quotas(sizes: np.ndarray, k: int, rule: str) -> np.ndarray:
    """Per-cluster counts summing to ``k`` (largest remainder), each at most the cluster size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    share = sizes / sizes.sum() if rule == "proportional" else (sizes > 0) / max(1, (sizes > 0).sum())
    raw = share * k
    q = np.minimum(np.floor(raw).astype(np.int64), sizes)
    rem = raw - np.floor(raw)
    while q.sum() < k:
        room = q < sizes
        if not room.any():
            break
        j = int(np.argmax(np.where(room, rem + 1e-9 * sizes, -np.inf)))
        q[j] += 1
        rem[j] = -1 if q[j] >= raw[j] else rem[j]
    return q
