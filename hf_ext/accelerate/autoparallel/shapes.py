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
        head_dim: width ``d`` of one attention head; ``None`` (the default) means ``h / a``. Qwen3 and the
            Gemma family set it explicitly, and then the q / o projections are ``h x a*d`` and k / v
            ``h x kv*d`` whatever ``h / a`` is. Always an int after construction.
        extra_layer_params: parameters of one layer outside the seven projection matrices and the two
            RMSNorm weights: projection biases, q / k norms, Gemma2/3's two extra norms (see
            :func:`shape_from_config`). They count as parameters (memory, optimizer, sharding) but do no
            matrix multiply.
        sliding_window: attention window ``w`` of the windowed layers (a query sees its ``w`` latest keys,
            itself included), or ``None``.
        sliding_layers: indices of the decoder layers that use ``sliding_window`` (the others attend to the
            whole causal prefix).
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    extra_layer_params: int = 0
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()

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
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelShape.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads} "
                    "(or give head_dim)"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        elif int(self.head_dim) <= 0:
            raise ValueError(f"ModelShape.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape.num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )
        if int(self.extra_layer_params) < 0:
            raise ValueError(f"ModelShape.extra_layer_params must be >= 0, got {self.extra_layer_params!r}")
        layers = tuple(int(i) for i in self.sliding_layers)
        object.__setattr__(self, "sliding_layers", layers)  # a JSON list becomes a tuple (hashable)
        if self.sliding_window is None:
            if layers:
                raise ValueError(
                    f"ModelShape.sliding_layers={list(layers)} needs a sliding_window (a positive int), got None"
                )
        elif int(self.sliding_window) <= 0:
            raise ValueError(
                f"ModelShape.sliding_window must be a positive integer or None, got {self.sliding_window!r}"
            )
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"ModelShape.sliding_layers must be distinct layer indices in [0, {self.num_layers}), got "
                f"{list(layers)}"
            )

    @property
    def q_dim(self) -> int:
        """Width of the query / attention output: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key and of the value projection: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def matmul_params(self) -> int:
        """Weights of one layer's matrix multiplies: q, k, v, o and the SwiGLU gate, up and down."""
        h, f = self.hidden_size, self.intermediate_size
        return 2 * h * self.q_dim + 2 * h * self.kv_dim + 3 * h * f

    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections + 2 norms + ``extra_layer_params``)."""
        return self.matmul_params() + 2 * self.hidden_size + self.extra_layer_params

    def embedding_params(self) -> int:
        """Input embedding + final norm + LM head (head counted once when tied)."""
        e = self.vocab_size * self.hidden_size
        return e * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def num_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params()

    def attended_keys(self, seq_len: int, layer: int | None = None) -> float:
        """Mean number of keys a query attends to in a causal sequence of ``seq_len`` tokens.

        Full causal attention: ``s / 2``. A windowed layer (``layer`` in ``sliding_layers``) with ``s > w``:
        ``w - w^2 / (2 s)`` (the first ``w`` queries see a growing prefix, the rest ``w`` keys each); with
        ``s <= w`` the window changes nothing. ``layer=None``: the mean over all layers.
        """
        s = float(seq_len)
        full = s / 2.0
        w = self.sliding_window
        if w is None or s <= w or not self.sliding_layers:
            return full
        windowed = w - w * w / (2.0 * s)
        if layer is None:
            k = len(self.sliding_layers)
            return (k * windowed + (self.num_layers - k) * full) / self.num_layers
        return windowed if layer in self.sliding_layers else full

    def layer_flops_fwd(self, tokens: int, seq_len: int, layer: int | None = None) -> float:
        """Forward FLOPs of decoder layer ``layer`` (``None``: the mean layer) for ``tokens`` tokens in
        sequences of ``seq_len``: the projections, plus ``QK^T`` and ``PV`` (``2 * 2 * q_dim`` FLOPs per
        attended key, see :meth:`attended_keys`: causal, and windowed on the sliding layers)."""
        matmul = 2 * tokens * self.matmul_params()
        attn = 4 * tokens * self.attended_keys(seq_len, layer) * self.q_dim
        return float(matmul + attn)

    def head_flops_fwd(self, tokens: int) -> float:
        """Forward FLOPs of the LM head (the embedding lookup is free)."""
        return float(2 * tokens * self.hidden_size * self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        """Inverse of :meth:`to_dict`; a dict without the newer fields (an older plan or profile) gets their
        defaults (``head_dim = h / a``, no extra parameters, no sliding window)."""
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


# Gemma2 / Gemma3 layers have four RMSNorms (pre/post attention, pre/post MLP), not two.
_FOUR_NORM_TYPES = ("gemma2", "gemma3", "gemma3_text")
# q_norm / k_norm of width head_dim inside the attention (shared by all heads).
_QK_NORM_TYPES = ("qwen3", "gemma3", "gemma3_text")


def _extra_layer_params(get: Any, model_type: str, h: int, f: int, q_dim: int, kv_dim: int, d: int) -> int:
    """Per-layer parameters besides the projection weights and two norms, as transformers builds them.

    Qwen2: q / k / v biases (always on). Mistral: none (its projections take no bias flag). Every other type
    (Llama, Qwen3, Gemma*, and unknown Llama-style ones): q / k / v / o biases when ``attention_bias`` and
    gate / up / down biases when ``mlp_bias``. Qwen3 and Gemma3: ``q_norm`` / ``k_norm`` of ``head_dim``.
    Gemma2 / Gemma3: two more norms of ``h``.
    """
    n = 0
    if model_type == "qwen2":
        n += q_dim + 2 * kv_dim
    elif model_type != "mistral":
        if get("attention_bias"):
            n += q_dim + 2 * kv_dim + h
        if get("mlp_bias"):
            n += 2 * f + h
    if model_type in _QK_NORM_TYPES:
        n += 2 * d
    if model_type in _FOUR_NORM_TYPES:
        n += 2 * h
    return n


def _sliding_layers(get: Any, model_type: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """``(window, windowed layer indices)`` as transformers decides them.

    A config whose ``use_sliding_window`` is false (Qwen2 / Qwen3) has no window whatever its
    ``sliding_window``. Otherwise, with a ``sliding_window``: the layers ``layer_types`` marks
    ``"sliding_attention"`` when the config lists them (transformers 4.53+ writes them); for an older
    config without them, the rule its class applies: Qwen2 / Qwen3 window the layers from
    ``max_window_layers`` on, Gemma2 every other layer (0, 2, ...), Gemma3 all but every
    ``sliding_window_pattern``-th (default 6), and the rest (Mistral) every layer.
    """
    window = get("sliding_window")
    use = get("use_sliding_window")
    if window is None or (use is not None and not use) or int(window) <= 0:
        return None, ()
    kinds = get("layer_types")
    if kinds:
        return int(window), tuple(i for i, k in enumerate(kinds) if k == "sliding_attention")
    if use is not None:  # Qwen2 / Qwen3 family
        start = get("max_window_layers")
        start = 28 if start is None else int(start)
        return int(window), tuple(range(start, num_layers))
    if model_type == "gemma2":
        return int(window), tuple(i for i in range(num_layers) if (i + 1) % 2)
    if model_type in ("gemma3", "gemma3_text"):
        pattern = int(get("sliding_window_pattern") or get("_sliding_window_pattern") or 6)
        return int(window), tuple(i for i in range(num_layers) if (i + 1) % pattern)
    return int(window), tuple(range(num_layers))


def shape_from_config(config: Any, name: str | None = None) -> ModelShape:
    """Build a :class:`ModelShape` from a transformers ``PretrainedConfig`` (or a dict of its fields).

    Reads ``head_dim`` when the config sets it, the per-layer extra parameters of the families transformers
    builds differently (see :func:`_extra_layer_params`; the parameter count equals the built model's for
    Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 and Gemma3 text models) and the sliding-window layers (see
    :func:`_sliding_layers`).
    """
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
    model_type = str(get("model_type", "") or "")
    heads = int(get("num_attention_heads"))
    kv = int(get("num_key_value_heads") or heads)
    h = int(get("hidden_size"))
    f = int(get("intermediate_size") or 4 * h)
    layers = int(get("num_hidden_layers"))
    d = int(get("head_dim") or h // heads)
    window, windowed = _sliding_layers(get, model_type, layers)
    return ModelShape(
        name=name or (model_type or "model"),
        num_layers=layers,
        hidden_size=h,
        intermediate_size=f,
        num_heads=heads,
        num_kv_heads=kv,
        vocab_size=int(get("vocab_size")),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        head_dim=d,
        extra_layer_params=_extra_layer_params(get, model_type, h, f, heads * d, kv * d, d),
        sliding_window=window if windowed else None,
        sliding_layers=windowed,
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
