"""The ``"sale"`` attention function for ``transformers.AttentionInterface``.

``sale_attention_forward(module, query, key, value, attention_mask, *, scaling, dropout, **kwargs)``
takes ``query [B, H, Sq, D]`` and ``key``/``value`` ``[B, Hkv, Sk, D]`` (GQA not repeated) and returns
``(out [B, Sq, H, D], None)``.

Routing (per call):

* decode steps and prompts shorter than ``SALEConfig.min_seq_len`` -> transformers' dense sdpa (GQA-aware);
* otherwise the SALE sparse prefill: quantised score estimate -> Relative-Attention-Score block selection
  -> block-sparse attention (``hf_ext_kernels.sparse_attn.ops.sale_attention``; Triton on CUDA, the torch
  reference on CPU). The kernels are imported on the first sparse call, never at registration.

Masks: the mask builder registered for ``"sale"`` is :func:`sale_mask` (transformers' ``sdpa_mask``), so this
function receives ``None`` (plain causal, bottom-right aligned, no padding) or a 4-D boolean/additive mask. A 4-D mask is decoded into a key-padding
mask and checked to be exactly ``causal & key_padding``; rows with one contiguous run of real tokens (left or
right padding) are computed on that run alone, so a left-padded batch gives the same result as unpadded
single runs (the SALE block grid starts at the first real token). Any other structure (packed sequences,
custom masks, sliding windows) cannot be honoured by the sparse kernel: the call falls back to dense
attention with a one-time warning (or raises, with ``on_unsupported="error"``). On the sparse path, query
positions that see no key (left padding) get zeros; positions after a row's real tokens (right padding) attend to
all of them, as the mask says.

A model's learned sparse selection passed as ``indices`` / ``block_indices`` (DeepSeek-V3.2 DSA, MiniMax-M3) is
folded into the mask first, as those models do for sdpa.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_ext.attention.sale.config import SALEConfig

__all__ = [
    "sale_attention_forward",
    "config_of",
    "sale_stats",
    "SALEStats",
    "reset_warnings",
    "decode_mask",
    "sale_mask",
    "sparse_attention",
]

_DEFAULT = SALEConfig()
_WARNED: set[str] = set()
_CFG_CACHE: dict[int, tuple[Any, Any, SALEConfig]] = {}
_STATE = threading.local()


# ------------------------------------------------------------------------------------------ helpers
def _warn_once(key: str, msg: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"hf_ext SALE: {msg}", UserWarning, stacklevel=4)


def reset_warnings() -> None:
    """Forget which one-time warnings were already shown (tests)."""
    _WARNED.clear()


def _check_causal(value: Any, name: str) -> bool:
    """``value`` as a bool (bools, numpy bools, 0 / 1), else ``ValueError`` naming ``name`` (the kernels' rule)."""
    return importlib.import_module("hf_ext_kernels.sparse_attn.naive").check_causal(value, name)


def _ops() -> Any:
    """The kernel ops module, imported on first use (imports triton on CUDA machines)."""
    try:
        return importlib.import_module("hf_ext_kernels.sparse_attn.ops")
    except ImportError as exc:  # pragma: no cover - packaging problem
        raise ImportError(
            "hf_ext SALE needs hf_ext_kernels.sparse_attn.ops (shipped with hf-ext); "
            "reinstall hf-ext or put the repo's kernels/ folder on PYTHONPATH"
        ) from exc


def config_of(module: Any) -> SALEConfig:
    """The :class:`SALEConfig` of an attention module: ``module.config.sale_config`` or the defaults.

    The parsed config is cached per dict object (re-parsed when the dict's content changes).
    """
    raw = getattr(getattr(module, "config", None), "sale_config", None)
    if raw is None:
        return _DEFAULT
    if isinstance(raw, SALEConfig):  # assigned by hand: keep it JSON-serialisable for save_pretrained
        module.config.sale_config = raw = raw.to_dict()
    hit = _CFG_CACHE.get(id(raw))
    if hit is not None and hit[0] is raw and hit[1] == raw:
        return hit[2]
    cfg = SALEConfig.from_dict(raw)
    if len(_CFG_CACHE) > 64:
        _CFG_CACHE.clear()
    _CFG_CACHE[id(raw)] = (raw, copy.deepcopy(raw), cfg)
    return cfg


@dataclass
class SALEStats:
    """Per-call records collected inside :func:`sale_stats`.

    Attributes:
        calls: one dict per attention call: ``layer_idx``, ``path`` (``"sparse"``, ``"dense"``, or
            ``"fallback:<reason>"``), ``q_len`` and, on the sparse path, ``kept``/``valid`` block counts.
    """

    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def density(self) -> float:
        """Kept / causally valid (query-block, key-block) pairs over all sparse calls (1.0 when none)."""
        kept = sum(c.get("kept", 0) for c in self.calls)
        valid = sum(c.get("valid", 0) for c in self.calls)
        return kept / valid if valid else 1.0

    @property
    def sparse_calls(self) -> int:
        """How many attention calls took the sparse path."""
        return sum(1 for c in self.calls if c["path"] == "sparse")


@contextlib.contextmanager
def sale_stats() -> Iterator[SALEStats]:
    """Collect routing and kept-block density of every ``"sale"`` attention call inside the block.

    Per thread: calls made by other threads (e.g. ``generate`` run in a thread for a ``TextIteratorStreamer``) are
    not collected; enter the block in that thread.

    Example:
        >>> from hf_ext.attention.sale.attention import sale_stats
        >>> with sale_stats() as st:
        ...     pass
        >>> st.density
        1.0
    """
    st = SALEStats()
    old = getattr(_STATE, "stats", None)
    _STATE.stats = st
    try:
        yield st
    finally:
        _STATE.stats = old


def _record(**kw: Any) -> None:
    st = getattr(_STATE, "stats", None)
    if st is not None:
        st.calls.append(kw)


# --------------------------------------------------------------------------------------- dense path
# attention arguments transformers' sdpa path ignores: a call carrying one runs the model's own eager attention
_EAGER_ONLY = ("softcap", "s_aux", "position_bias")


def _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs) -> tuple:
    """transformers' own dense attention: sdpa, or the model's eager path when sdpa would drop an argument
    (logit softcapping, attention-sink logits ``s_aux``, a ``position_bias``)."""
    needs = [k for k in _EAGER_ONLY if kwargs.get(k) is not None]
    sq, sk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if needs:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise ValueError(
                f"{type(module).__name__} passes {needs}, which neither SALE nor sdpa supports, and its modeling "
                "file has no eager_attention_forward; use attn_implementation='eager'"
            )
        # Eager paths add the mask to the scores: turn the sdpa-style mask (None = causal, bool) additive.
        if attention_mask is None and causal and sq > 1:  # what "no mask" means for "sale": see sale_mask
            attention_mask = _bottom_right(sq, sk, query.device)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            attention_mask = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not hasattr(module, "num_key_value_groups") and key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    extra = {} if is_causal is None else {"is_causal": is_causal}
    if attention_mask is None and causal and 1 < sq < sk:
        # sdpa's is_causal is top-left aligned; without a mask "sale" means bottom-right (see sale_mask)
        attention_mask = _bottom_right(sq, sk, query.device)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs
    )


def _bottom_right(sq: int, sk: int, device: Any) -> torch.Tensor:
    """``[1, 1, Sq, Sk]`` bool causal mask aligned bottom-right (the queries are the last ``Sq`` positions)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)[None, None]


def sale_mask(*args: Any, **kwargs: Any) -> Any:
    """The mask builder registered for ``"sale"``: transformers' ``sdpa_mask``, but ``None`` (no mask) only where it is
    unambiguous, i.e. query length 1 or equal to the key length.

    ``sdpa_mask`` also returns ``None`` for the first prefill into an empty static cache (more keys than queries,
    relying on sdpa's top-left ``is_causal``), while models that slice the queries after building the mask (Gemma4's
    KV-shared layers with ``logits_to_keep > 1``; they guard this only for ``"sdpa"``) hand over ``None`` with the
    queries at the *end* (bottom-right). Materialising the first case lets ``None`` always mean bottom-right causal.
    """
    from transformers.masking_utils import sdpa_mask

    names = ("batch_size", "q_length", "kv_length")
    given = dict(zip(names, args))
    q_len = kwargs.get("q_length", given.get("q_length"))
    kv_len = kwargs.get("kv_length", given.get("kv_length"))
    if q_len is not None and kv_len is not None and int(q_len) not in (1, int(kv_len)):
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _dense_slice(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool
) -> torch.Tensor:
    """Dense attention on one sequence slice, bottom-right causal, GQA without repeating K/V. [1,H,Sq,D]."""
    sq, sk = q.shape[2], k.shape[2]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if not causal or sq == 1:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, **gqa)
    if sq == sk:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, **gqa)
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


# ------------------------------------------------------------------------------- learned index selections
def _fold_index_selection(
    module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any, kwargs: dict
) -> tuple[Any, dict]:
    """Fold a model's learned sparse selection into the mask, as the model itself does for eager / sdpa.

    DeepSeek-V3.2-style models (DSA indexer: ``indices`` ``[B, Sq, topk]`` key positions) and MiniMax-M3
    (``block_indices``, turned into a mask by ``module.indexer.build_block_mask``) apply the selection to the mask
    only for ``"eager"`` / ``"sdpa"``; any other implementation gets it as a kwarg meant for flash-mla kernels.
    Dropping it would attend to every key. Returns ``(mask, kwargs without the selection)``; the folded mask is
    honoured by the dense path (the sparse path takes it only when the selection keeps every visible key).
    """
    kwargs = dict(kwargs)
    indices = kwargs.pop("indices", None)
    block_indices = kwargs.pop("block_indices", None)
    b, sq, sk = query.shape[0], query.shape[2], key.shape[2]
    if block_indices is not None:
        build = getattr(getattr(module, "indexer", None), "build_block_mask", None)
        if build is None:
            raise ValueError(
                f"{type(module).__name__} passes block_indices (a learned block selection) but has no "
                "indexer.build_block_mask to turn it into a mask; SALE cannot honour it: use "
                "attn_implementation='sdpa' or 'eager'"
            )
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(sk - sq, sk, device=query.device)
        pos = (pos if pos.dim() > 1 else pos[None]).expand(b, -1)
        attention_mask = build(block_indices, attention_mask, sk, query.dtype, query.device, pos)
    if indices is not None:
        if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.shape[:2] != (b, sq):
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(
                f"{type(module).__name__} passes indices of shape {shape}; SALE folds a top-k key selection "
                f"[batch, q_len, topk] = [{b}, {sq}, topk] into the mask and cannot honour other layouts: use "
                "attn_implementation='sdpa' or 'eager'"
            )
        idx = indices.long()
        idx = idx.masked_fill((idx < 0) | (idx >= sk), sk)  # invalid slots land in a dropped column
        sel = torch.zeros(b, sq, sk + 1, dtype=torch.bool, device=query.device).scatter_(-1, idx, True)
        sel = sel[..., :sk][:, None]  # [B, 1, Sq, Sk]
        if attention_mask is None:  # plain causal (bottom-right: Sk - Sq cached tokens before the queries)
            if getattr(module, "is_causal", True):
                attention_mask = _bottom_right(sq, sk, query.device)
            else:
                attention_mask = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask[..., :sk]
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & sel
        else:
            attention_mask = attention_mask.masked_fill(~sel, torch.finfo(attention_mask.dtype).min)
    return attention_mask, kwargs


# ------------------------------------------------------------------------------------- mask decoding
def _bool_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """4-D bool (True = attend) from a bool or additive float mask; None if the float mask carries a bias."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    allowed = mask > torch.finfo(mask.dtype).min / 2
    if bool((mask[allowed] != 0).any()):
        return None  # a real additive bias (ALiBi-like): not expressible as a key-padding mask
    return allowed


def _expected_rows(kpm: torch.Tensor, r0: int, r1: int, sq: int, sk: int, causal: bool) -> torch.Tensor:
    """``causal & key_padding`` for query rows [r0, r1): [B, r1-r0, Sk] bool (bottom-right causal)."""
    if not causal:
        return kpm[:, None, :].expand(-1, r1 - r0, -1)
    rows = torch.arange(r0, r1, device=kpm.device)[:, None] + (sk - sq)
    cols = torch.arange(sk, device=kpm.device)[None, :]
    return (cols <= rows)[None] & kpm[:, None, :]


def decode_mask(
    attention_mask: torch.Tensor | None, batch: int, sq: int, sk: int, causal: bool, chunk_rows: int = 1024
) -> tuple[torch.Tensor | None, str | None]:
    """Turn the mask transformers hands the attention function into a key-padding mask.

    Args:
        attention_mask: ``None`` or a 4-D mask ``[B, 1 or H, Sq, Sk]`` (bool True = attend, or additive float).
        batch, sq, sk: batch size, query and key lengths.
        causal: whether the layer is causal (bottom-right aligned).

    Returns:
        ``(key_padding_mask [B, Sk] bool or None, None)`` when the mask is exactly ``causal & key_padding``,
        else ``(None, reason)`` naming why the sparse kernel cannot honour it.
    """
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None, f"attention mask of type {type(attention_mask).__name__} / shape is not a 4-D tensor"
    m = _bool_mask(attention_mask)
    if m is None:
        return None, "additive attention mask carries a bias (not a padding/causal mask)"
    if m.shape[-2] != sq or m.shape[-1] < sk:
        return None, f"attention mask shape {tuple(m.shape)} does not match query/key lengths ({sq}, {sk})"
    m = m[..., :sk]
    if m.shape[0] not in (1, batch):
        return None, f"attention mask batch {m.shape[0]} does not match batch {batch}"
    m = m.expand(batch, -1, -1, -1)
    # The last query row sees every real key under a bottom-right causal mask (and in a non-causal one).
    kpm = m[:, 0, -1, :].clone()
    for r0 in range(0, sq, chunk_rows):
        r1 = min(sq, r0 + chunk_rows)
        exp = _expected_rows(kpm, r0, r1, sq, sk, causal)
        if not torch.equal(m[:, :, r0:r1, :], exp[:, None].expand(-1, m.shape[1], -1, -1)):
            return None, (
                "attention mask is not causal + key padding (packed sequences or a custom mask, e.g. a model's "
                "learned index selection)"
            )
    if bool(kpm.all()):
        return None, None
    return kpm, None


def _queries_end(attention_mask: torch.Tensor, sq: int, sk: int, chunk_rows: int = 1024) -> int:
    """``1 +`` the key position of the last query, read from a causal mask (``sk`` when it cannot be read as bool).

    A static cache passes all its slots, masked for every query after the chunk; cached tokens (chunked prefill, a
    second call appending to the cache) come before it. A query row whose own token is real may attend up to its own
    position and no further, a padding row only to the real keys before it, so the largest ``last column a row may
    attend - row`` over all rows is the position of query row 0. (Rows that all are padding give a smaller value,
    which the caller's check then accepts only where it means the same attention.)
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return sk
    m = _bool_mask(attention_mask)
    if m is None or m.shape[-2] != sq:
        return sk
    m = m[..., :sk]
    start = -1
    for r0 in range(0, sq, chunk_rows):
        part = m[..., r0 : r0 + chunk_rows, :]
        last = (sk - 1) - part.flip(-1).to(torch.uint8).argmax(-1)  # last True column per row
        rows = torch.arange(r0, r0 + part.shape[-2], device=m.device)
        cand = torch.where(part.any(-1), last - rows, -1)
        start = max(start, int(cand.max()))
    return sk if start < 0 else min(start + sq, sk)


def _spans(kpm: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per row (start, end) of the real keys when each row is one contiguous run; None otherwise."""
    counts = kpm.sum(-1).tolist()
    idx = torch.arange(kpm.shape[-1], device=kpm.device)
    first = torch.where(kpm, idx, kpm.shape[-1]).min(-1).values.tolist()
    last = torch.where(kpm, idx, -1).max(-1).values.tolist()
    spans = []
    for c, s, e in zip(counts, first, last):
        if c == 0:
            spans.append((0, 0))
        elif e - s + 1 != c:
            return None
        else:
            spans.append((s, e + 1))
    return spans


# ----------------------------------------------------------------------------------- sparse path
def attention_kind(module: Any) -> str:
    """What an attention module computes, from its own attributes: ``"causal"`` (decoder self-attention),
    ``"bidirectional"`` (non-causal self-attention: an encoder, a vision tower) or ``"cross"`` (a decoder's
    cross-attention to encoder states).

    Cross-attention: an ``is_cross_attention`` flag (BERT-like decoders), a class named ``*Cross*``, or a non-causal
    module of a decoder (``is_decoder``: BART family, Whisper, T5). Encoder-decoder models keep all three kinds on one
    config with the same ``layer_idx`` values, so thresholds are looked up per kind (``encoder_taus`` for the
    bidirectional ones); cross-attention runs dense (see :func:`_unsupported_reason`).
    """
    if getattr(module, "is_cross_attention", False) is True or "cross" in type(module).__name__.lower():
        return "cross"
    if getattr(module, "is_causal", True):
        return "causal"
    if getattr(module, "is_decoder", False) is True:
        return "cross"
    return "bidirectional"


def _is_cross(module: Any, query: torch.Tensor, key: torch.Tensor) -> bool:
    """A cross-attention call: a cross-attention module (:func:`attention_kind`), or a non-causal module whose
    queries and keys differ in length (self-attention without a cache has equal lengths; this catches
    cross-attention modules that carry no flag saying so, e.g. Moonshine's)."""
    kind = attention_kind(module)
    return kind == "cross" or (kind == "bidirectional" and query.shape[2] != key.shape[2])


def _unsupported_reason(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    kwargs: dict,
    cfg: SALEConfig,
) -> tuple[str, str] | None:
    """(kind, message) when the sparse kernel cannot take this call."""
    dev = query.device.type
    if kwargs.get("softcap") is not None:
        return (
            "softcap",
            f"attention logit softcapping (softcap={kwargs['softcap']}) is not supported by SALE",
        )
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        return "bias", (
            "attention biases / sink logits (position_bias, s_aux) are not supported by SALE (the model's eager "
            "attention takes such calls)"
        )
    if _is_cross(module, query, key):
        return "cross_attention", (
            "cross-attention (decoder queries over encoder states) is not supported by SALE: its queries and keys "
            "share no positions, so the blocks SALE always keeps (the local window around the aligned diagonal, "
            "the sink) mean nothing there, and it shares config and layer_idx with decoder self-attention (no "
            "thresholds of its own)"
        )
    sw = kwargs.get("sliding_window")
    if sw is not None and key.shape[2] > int(sw):
        return "sliding_window", (
            f"sliding-window layers (sliding_window={sw} < key length {key.shape[2]}) are not supported by SALE"
        )
    # Any of q/k/v in the autograd graph (LoRA on k_proj/v_proj only leaves the query without grad), or a module in
    # training mode: reentrant gradient checkpointing runs the first forward without grad and recomputes it with
    # grad in backward, which must see the same (dense) attention.
    grads = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if (dropout and dropout > 0.0) or grads or getattr(module, "training", False):
        return (
            "training",
            "SALE is an inference (prefill) method; training mode (call model.eval() for inference), dropout and "
            "autograd use dense attention",
        )
    if query.shape[-1] != key.shape[-1] or key.shape[-1] != value.shape[-1]:
        return "head_dim", (
            f"query/key/value head dims {query.shape[-1]}/{key.shape[-1]}/{value.shape[-1]} differ; SALE needs equal dims"
        )
    if query.shape[1] % key.shape[1]:
        return "gqa", f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads"
    if dev not in ("cuda", "cpu"):
        return "device", f"device {dev!r} is not supported by SALE (supported: cuda, cpu)"
    backend = cfg.backend
    uses_triton = backend == "triton" or (backend == "auto" and dev == "cuda")
    if backend == "triton" and dev != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "device",
            f"backend='triton' needs a CUDA tensor, got device {dev!r} (use backend='auto' or 'torch')",
        )
    ops = _ops()
    if backend == "triton" and dev != "cuda" and (problem := ops.interpreter_problem()) is not None:
        return "device", problem
    if query.dtype not in ops.SUPPORTED_DTYPES:
        return (
            "dtype",
            f"dtype {query.dtype} is not supported by the SALE kernels (supported: {ops.SUPPORTED_DTYPES})",
        )
    if uses_triton and query.shape[-1] not in ops.TRITON_HEAD_DIMS:
        return "head_dim", (
            f"head dim {query.shape[-1]} is not supported by the SALE Triton kernel "
            f"(supported: {ops.TRITON_HEAD_DIMS}; the torch reference takes any)"
        )
    return None


def _valid_blocks(sq: int, sk: int, bq: int, bk: int, causal: bool) -> int:
    """Number of (query-block, key-block) pairs holding at least one allowed (bottom-right causal) pair."""
    nqb = -(-sq // bq)
    nkb = -(-sk // bk)
    if not causal:
        return nqb * nkb
    total = 0
    for i in range(nqb):
        last = min((i + 1) * bq, sq) - 1 + (sk - sq)
        total += min(nkb, last // bk + 1) if last >= 0 else 0
    return total


def _block_sizes(cfg: SALEConfig) -> tuple[int, int]:
    if cfg.block_q is not None and cfg.block_k is not None:
        return cfg.block_q, cfg.block_k
    ops = _ops()
    return cfg.block_q or ops.DEFAULT_BLOCK_Q, cfg.block_k or ops.DEFAULT_BLOCK_K


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    taus: torch.Tensor,
    cfg: SALEConfig,
    *,
    scale: float | None,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    want_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SALE on one batch: ``q [B,H,Sq,D]``, ``k/v [B,Hkv,Sk,D]``, ``taus [H]`` -> ``(out [B,H,Sq,D], mask)``.

    A ``tau`` of 0 (a calibrated "dense" head) keeps every visible block. ``mask`` is the kept-block mask
    ``[B,H,nQb,nKb]`` when ``want_mask``.
    """
    bq, bk = _block_sizes(cfg)
    res = _ops().sale_attention(
        q,
        k,
        v,
        tau=taus.to(device=q.device, dtype=torch.float32),
        causal=causal,
        scale=scale,
        key_padding_mask=key_padding_mask,
        block_q=bq,
        block_k=bk,
        sink_blocks=cfg.sink_blocks,
        local_window=cfg.local_window,
        bits=cfg.bits,
        backend=cfg.backend,
        return_mask=want_mask,
    )
    if want_mask:
        out, mask = res
        return out, mask
    return res, None


def _run_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kpm: torch.Tensor | None,
    taus: torch.Tensor,
    cfg: SALEConfig,
    scale: float | None,
    causal: bool,
    want_mask: bool,
    force_sparse: bool = False,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Sparse attention over a batch, honouring key padding. Returns (out [B,H,Sq,D], per-part records)."""
    b, _, sq, _ = query.shape
    sk = key.shape[2]
    bq, bk = _block_sizes(cfg)
    recs: list[dict[str, Any]] = []

    def one(q, k, v, pad):
        n = q.shape[2]
        if torch.compiler.is_compiling():
            # a row's slice of a padded batch is not contiguous; graphs recompiled with dynamic shapes (the next row)
            # failed in the reference kernels' reshapes ("view size is not compatible with input tensor's size and
            # stride"), which eager takes as views. Eager calls keep the slices as they are (no copies).
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if not force_sparse and n < cfg.min_seq_len:
            recs.append({"path": "dense", "q_len": n})
            return _dense_slice(q, k, v, scale, causal)
        out, mask = sparse_attention(
            q, k, v, taus, cfg, scale=scale, causal=causal, key_padding_mask=pad, want_mask=want_mask
        )
        # one dict built at once, after int(mask.sum()) (a graph break under torch.compile): a dict built before it
        # and filled after came back from dynamic-shape graphs without its "path" / "q_len" keys
        if mask is None:
            recs.append({"path": "sparse", "q_len": n})
        else:
            kept = int(mask.sum())
            valid = _valid_blocks(n, k.shape[2], bq, bk, causal) * q.shape[0] * q.shape[1]
            recs.append({"path": "sparse", "q_len": n, "kept": kept, "valid": valid})
        return out

    spans = None if kpm is None else _spans(kpm)
    if kpm is None or spans is None:
        return one(query, key, value, kpm), recs
    out = query.new_zeros(query.shape)
    off = sk - sq  # position of query row 0
    for i, (s, e) in enumerate(spans):
        if e <= s:
            continue  # a row without real keys: zeros
        if causal:  # query rows whose own token is real: positions [max(s, off), e)
            qs, qe = max(s - off, 0), e - off
        else:  # non-causal: every query row attends to the real keys
            qs, qe = 0, sq
        k_run, v_run = key[i : i + 1, :, s:e], value[i : i + 1, :, s:e]
        if qe > qs:
            out[i : i + 1, :, qs:qe] = one(query[i : i + 1, :, qs:qe], k_run, v_run, None)
        if qe < sq:
            # rows after the run (right padding, or keys no query sees in a custom mask): the mask lets each of
            # them see the whole run, so they get exactly that (dense; zeros would be wrong for a real token)
            rest = query[i : i + 1, :, max(qe, 0) :]
            out[i : i + 1, :, max(qe, 0) :] = _dense_slice(rest, k_run, v_run, scale, False)
    return out, recs


def sale_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SALE attention with transformers' ``AttentionInterface`` signature.

    Args:
        module: the attention module (reads ``module.config.sale_config``, ``module.layer_idx``,
            ``module.is_causal``).
        query: ``[B, H, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (GQA not repeated).
        attention_mask: ``None`` (bottom-right causal) or the 4-D mask from :func:`sale_mask`.
        dropout, scaling, is_causal: as for sdpa.
        **kwargs: model extras (``sliding_window``, ``softcap``, ...), checked and passed to the dense path.

    Returns:
        ``(out [B, Sq, H, D], None)``.
    """
    if is_causal is not None:  # "no" or None-like strings must not read as causal: bools / 0 / 1 only
        is_causal = _check_causal(is_causal, "is_causal")
    sq = query.shape[2]
    layer_idx = getattr(module, "layer_idx", None)
    selection = kwargs.get("indices") is not None or kwargs.get("block_indices") is not None
    if selection:
        attention_mask, kwargs = _fold_index_selection(module, query, key, attention_mask, kwargs)
    if sq == 1:  # decode step: dense, without touching the config
        _record(layer_idx=layer_idx, path="dense", q_len=sq)
        return _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    cfg = config_of(module)
    calib = getattr(_STATE, "calibrator", None)
    if calib is not None and sq > 1:
        out = _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
        calib.observe(module, query, key, value, attention_mask, out[0], scaling, is_causal, kwargs, dropout)
        return out
    if sq < 2 or sq < cfg.min_seq_len:
        _record(layer_idx=layer_idx, path="dense", q_len=sq)
        return _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    plan = _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs, cfg, selection)
    if isinstance(plan, str):
        _record(layer_idx=layer_idx, path=f"fallback:{plan}", q_len=sq)
        return _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    key, value, kpm, causal = plan
    if kwargs.get("output_attentions"):
        _warn_once(
            "output_attentions",
            "SALE does not compute attention weights: output_attentions=True gets None for its layers "
            "(use attn_implementation='eager' to inspect them)",
        )
    encoder = attention_kind(module) == "bidirectional"  # encoder self-attention reads encoder_taus where set
    taus = torch.tensor(cfg.tau_for(layer_idx, query.shape[1], encoder=encoder), dtype=torch.float32)
    want_mask = getattr(_STATE, "stats", None) is not None
    out, recs = _run_rows(query, key, value, kpm, taus, cfg, scaling, causal, want_mask)
    for r in recs:
        _record(layer_idx=layer_idx, **r)
    return out.transpose(1, 2).contiguous(), None


def _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs, cfg, selection=False):
    """Check a call for the sparse path: ``(key, value, key_padding_mask, causal)`` or a fallback kind.

    ``selection``: the mask holds a model's learned index selection; the sparse path takes it only when it keeps
    every visible key (a selection that looks like key padding is still a selection)."""
    reason = _unsupported_reason(module, query, key, value, dropout, kwargs, cfg)
    if is_causal is not None:
        causal = _check_causal(is_causal, "is_causal")
    else:
        causal = _check_causal(getattr(module, "is_causal", True), f"{type(module).__name__}.is_causal")
    sq, sk = query.shape[2], key.shape[2]
    kpm = None
    if reason is None and attention_mask is not None:  # None: plain causal, bottom-right (see sale_mask)
        kpm, why = decode_mask(attention_mask, query.shape[0], sq, sk, causal)
        # Trailing key columns no query sees are right padding (kept: the check above passes) or static-cache slots
        # after the queries (the queries are not the last key positions: the check fails). Drop the latter, from the
        # end of the queries on (read from the mask: after cached tokens, right padding included), and try again.
        used = _queries_end(attention_mask, sq, sk) if why is not None and causal else sk
        if used < sk:
            kpm_used, why_used = decode_mask(attention_mask, query.shape[0], sq, used, causal)
            if why_used is None:
                key, value, sk, kpm, why = key[:, :, :used], value[:, :, :used], used, kpm_used, None
        if why is None and selection and kpm is not None:
            why = "the model's learned index selection keeps only part of the keys"
        if why is not None:
            reason = ("mask", why)
    if reason is None:
        return key, value, kpm, causal
    kind, msg = reason
    if cfg.on_unsupported == "error":
        raise ValueError(
            f"hf_ext SALE cannot run this attention call: {msg} (set on_unsupported='fallback' "
            "in SALEConfig for dense attention instead)"
        )
    _warn_once(kind, f"{msg}; using dense attention for such calls (this warning is shown once).")
    return kind
