"""Model shapes the planner understands: built-in Llama-family shapes or a transformers config.

A :class:`ModelShape` is everything the cost model needs about a decoder-only transformer: layer
count, hidden / FFN / head sizes and vocabulary. Parameter counts and FLOPs are derived analytically.

Example:
    >>> s = get_shape("llama3-8b")
    >>> round(s.num_params() / 1e9, 2)
    8.03
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """Shape of a Llama-style decoder (RMSNorm, GQA attention, SwiGLU MLP).

    Attributes:
        name: display name.
        num_layers: decoder layers ``L``.
        hidden_size: ``h``.
        intermediate_size: SwiGLU width ``f``.
        num_heads: query heads ``a``.
        num_kv_heads: key/value heads (GQA).
        vocab_size: ``V``.
        tie_word_embeddings: whether the LM head shares the embedding matrix.
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
        ):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"ModelShape.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelShape.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape.num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention + MLP + 2 norms)."""
        h, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        return h * h + 2 * h * kv + h * h + 3 * h * f + 2 * h

    def embedding_params(self) -> int:
        """Input embedding + final norm + LM head (head counted once when tied)."""
        e = self.vocab_size * self.hidden_size
        return e * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def num_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params()

    def layer_flops_fwd(self, tokens: int, seq_len: int) -> float:
        """Forward FLOPs of one layer for ``tokens`` tokens in sequences of ``seq_len`` (causal attention)."""
        h = self.hidden_size
        matmul = 2 * tokens * (self.layer_params() - 2 * h)
        # QK^T and PV: 2 * 2 * s * h per token, halved by the causal mask.
        attn = 2 * tokens * seq_len * h
        return float(matmul + attn)

    def head_flops_fwd(self, tokens: int) -> float:
        """Forward FLOPs of the LM head (the embedding lookup is free)."""
        return float(2 * tokens * self.hidden_size * self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


BUILTIN_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        # Llama 3 paper (Grattafiori et al., 2024), Table 3.
        ModelShape("llama3-8b", 32, 4096, 14336, 32, 8, 128256),
        ModelShape("llama3-70b", 80, 8192, 28672, 64, 8, 128256),
        ModelShape("llama3-405b", 126, 16384, 53248, 128, 8, 128256),
        # Llama-3.2-1B (tied embeddings, 1.24B params) and a ~1B untied variant with a small vocab.
        ModelShape("llama3.2-1b", 16, 2048, 8192, 32, 8, 128256, tie_word_embeddings=True),
        ModelShape("llama-1b", 22, 2048, 5632, 32, 4, 32000),  # TinyLlama-1.1B shape
        ModelShape("llama2-7b", 32, 4096, 11008, 32, 32, 32000),
        ModelShape("llama2-70b", 80, 8192, 28672, 64, 8, 32000),
        ModelShape("tiny", 2, 64, 128, 4, 2, 512),  # hf_ext.testing.tiny_llama
    )
}


def shape_from_config(config: Any, name: str | None = None) -> ModelShape:
    """Build a :class:`ModelShape` from a transformers ``PretrainedConfig`` (or a dict of its fields)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("text_config") is not None and get("hidden_size") is None:
        return shape_from_config(get("text_config"), name)
    missing = [
        k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size") if get(k) is None
    ]
    if missing:
        raise ValueError(f"config is missing {missing}: only decoder-only transformer configs are supported")
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):  # Mixtral / Qwen-MoE / DeepSeek
        if (get(k) or 0) > 1:
            raise ValueError(
                f"config has {k}={get(k)}: mixture-of-experts models are not modelled (the planner would count "
                "one dense MLP per layer, not the experts); only dense decoder-only configs are supported"
            )
    heads = int(get("num_attention_heads"))
    return ModelShape(
        name=name or str(get("model_type", "model") or "model"),
        num_layers=int(get("num_hidden_layers")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size") or 4 * int(get("hidden_size"))),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads),
        vocab_size=int(get("vocab_size")),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
    )


def get_shape(model: str | ModelShape | Any) -> ModelShape:
    """Resolve a built-in shape name, a ``config.json`` path (file or folder), a config or a shape.

    Raises:
        ValueError: unknown name (listing the built-in shapes) or a config that is not a decoder.
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        key = model.strip().lower()
        if key in BUILTIN_SHAPES:
            return BUILTIN_SHAPES[key]
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
            base = os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
            return shape_from_config(cfg, name=cfg.get("_name_or_path") or base)
        raise ValueError(
            f"model={model!r} is neither a built-in shape nor a config.json path; built-in shapes: "
            f"{', '.join(BUILTIN_SHAPES)}"
        )
    if hasattr(model, "config") and not hasattr(model, "num_hidden_layers"):
        return shape_from_config(model.config)
    return shape_from_config(model)
