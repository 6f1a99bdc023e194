"""Synthetic token tasks where the right data decision is known (tests, demo, benchmark).

Vocabulary of 64 ids (0 pad, 1 bos, 2 eos). Each domain owns a token range:

* ``clean``  (ids 4-23):  counting sequences ``s, s+1, s+2, ...`` (wrapping) – learnable to ~0 loss.
* ``noisy``  (ids 24-43): a counting prefix of 3 tokens, then random tokens (noisy labels) –
  irreducible loss, nothing to learn beyond the unigram.
* ``hard``   (ids 44-63): counting with a stride 1..4 set by the first two tokens – learnable,
  but slower: its loss stays higher than ``clean``'s for longer.

No ``datasets`` package is needed: datasets are lists of dicts ``{"input_ids", "domain"}``.

Example:
    >>> data = make_mixture({"clean": 2, "noisy": 1}, seed=0)
    >>> [d["domain"] for d in data]
    ['clean', 'clean', 'noisy']
"""

from __future__ import annotations

from typing import Any

import numpy as np

VOCAB = 64
RANGES = {"clean": (4, 24), "noisy": (24, 44), "hard": (44, 64)}


def sample(domain: str, rng: np.random.Generator, length: int = 12) -> list[int]:
    """One sequence (with BOS) of ``domain``."""
    lo, hi = RANGES[domain]
    n = hi - lo
    s = int(rng.integers(n))
    if domain == "clean":
        toks = [(s + i) % n for i in range(length)]
    elif domain == "noisy":
        toks = [(s + i) % n for i in range(3)] + rng.integers(0, n, size=length - 3).tolist()
    elif domain == "hard":
        stride = int(rng.integers(1, 5))
        toks = [s, (s + stride) % n] + [(s + stride * (i + 1)) % n for i in range(1, length - 1)]
    else:
        raise ValueError(f"domain={domain!r} is not a synthetic domain; choose one of {sorted(RANGES)}")
    return [1] + [lo + t for t in toks]


def make_mixture(counts: dict[str, int], seed: int = 0, length: int = 12) -> list[dict[str, Any]]:
    """``counts[domain]`` samples per domain, grouped by domain in the given order."""
    rng = np.random.default_rng(seed)
    out = []
    for dom, n in counts.items():
        out += [{"input_ids": sample(dom, rng, length), "domain": dom} for _ in range(n)]
    return out


def tiny_model(seed: int = 0, **overrides: Any) -> Any:
    """A 1-layer, hidden-32 Llama over the 64-id vocabulary (trains in milliseconds per step on CPU)."""
    from hf_ext.testing import tiny_llama

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return tiny_llama(seed, **kw).train()


def cpu_training_args(output_dir: str, **overrides: Any) -> Any:
    """Quiet CPU ``TrainingArguments`` for the tiny runs (demo, tests): no saving, logging, reporting or bars."""
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(output_dir=output_dir, learning_rate=3e-3, report_to=[], use_cpu=True)
    kw.update(save_strategy="no", logging_strategy="no", disable_tqdm=True)
    return TrainingArguments(**{**kw, **overrides})


def train_steps(
    model: Any,
    data: list[dict[str, Any]],
    steps: int,
    *,
    lr: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
    indices: list[int] | None = None,
    optimizer: Any = None,
) -> Any:
    """Plain AdamW training on uniformly drawn batches (a reference/proxy model for tests).

    Pass ``optimizer`` to keep its Adam moments (LESS preconditioning)."""
    import torch

    from hf_ext.callbacks.dataflex.ops import default_collate, lm_loss

    rng = np.random.default_rng(seed)
    pool = np.arange(len(data)) if indices is None else np.asarray(indices)
    opt = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    dev = next(model.parameters()).device
    for _ in range(steps):
        idx = rng.choice(pool, size=batch_size)
        batch = {k: v.to(dev) for k, v in default_collate([data[i] for i in idx]).items()}
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def heldout_loss(model: Any, data: list[dict[str, Any]]) -> float:
    """Mean per-sample token loss on ``data``."""
    from hf_ext.callbacks.dataflex.ops import per_sample_loss

    return float(per_sample_loss(model, data, list(range(len(data))), batch_size=32).mean())
