"""Switching SALE on and off on a loaded transformers model.

Example:
    >>> from hf_ext.testing import tiny_llama
    >>> from hf_ext.attention.sale import SALEConfig, enable_sale, disable_sale
    >>> model = enable_sale(tiny_llama(), SALEConfig(min_seq_len=256, block_q=16, block_k=16))
    >>> model.config._attn_implementation, model.config.sale_config["block_q"]
    ('sale', 16)
    >>> disable_sale(model).config._attn_implementation
    'sdpa'
"""

from __future__ import annotations

from typing import Any

from hf_ext.attention.sale.config import SALEConfig

_PREV_ATTR = "_hf_ext_sale_previous_attn"


def _attention_configs(model: Any) -> list[Any]:
    """``model.config`` plus every distinct config object held by an attention module or a sub-model (sub-configs,
    e.g. a vision tower's, whose attention modules carry no ``layer_idx``), which is where the ``"sale"`` attention
    function of each module reads its settings."""
    out = [model.config]
    seen = {id(model.config)}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen:
            continue
        if hasattr(mod, "layer_idx") or hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            out.append(cfg)
    return out


def _impl_tree(config: Any, default: str) -> str | dict:
    """The attention implementation of ``config`` and of each sub-config, in the format
    ``set_attn_implementation`` takes (``{"": top, "text_config": ..., ...}``; a plain string without sub-configs)."""
    own = getattr(config, "_attn_implementation", None) or default
    subs = {k: getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {}}
    subs = {k: v for k, v in subs.items() if v is not None}
    if not subs:
        return own
    return {"": own, **{k: _impl_tree(v, default) for k, v in subs.items()}}


def _uses_sale(tree: str | dict) -> bool:
    """Whether the model or any sub-model of an :func:`_impl_tree` runs ``"sale"``."""
    if isinstance(tree, dict):
        return any(_uses_sale(v) for v in tree.values())
    return tree == "sale"


def _all_sale(tree: str | dict) -> bool:
    """Whether the model and every sub-model of an :func:`_impl_tree` run ``"sale"``."""
    if isinstance(tree, dict):
        return all(_all_sale(v) for v in tree.values())
    return tree == "sale"


def _without_sale(tree: str | dict, default: str) -> str | dict:
    """``tree`` with every ``"sale"`` replaced by ``default`` (the other implementations kept)."""
    if isinstance(tree, dict):
        return {k: _without_sale(v, default) for k, v in tree.items()}
    return default if tree == "sale" else tree


def _default_impl(model: Any) -> str:
    """What transformers picks for ``model`` when nothing is requested: sdpa where it can, else eager."""
    pick = getattr(model, "get_correct_attn_implementation", None)
    try:
        return pick(None) if pick is not None else "sdpa"
    except (ValueError, ImportError):
        return "eager"


def _config_names(config: Any, prefix: str = "") -> dict[int, str]:
    """``id(sub-config) -> name`` for every sub-config under ``config`` (``"vision_config"``; nested ones dotted,
    ``"vision_config.sub"``): the keys of ``SALEConfig.sub_taus``. ``config`` itself is not listed."""
    out: dict[int, str] = {}
    for k in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, k, None)
        if sub is None or sub is config or id(sub) in out:
            continue
        out[id(sub)] = prefix + k
        for i, n in _config_names(sub, f"{prefix}{k}.").items():
            out.setdefault(i, n)
    return out


def _attention_modules(model: Any) -> list[Any]:
    """The attention modules that look thresholds up per layer: an integer ``layer_idx`` and an ``is_causal`` flag
    (decoder layers and linear-attention mixers carry only the former)."""
    out = []
    for mod in model.modules():
        layer = getattr(mod, "layer_idx", None)
        if isinstance(layer, int) and not isinstance(layer, bool) and hasattr(mod, "is_causal"):
            out.append(mod)
    return out


def _query_heads(mod: Any) -> int | None:
    """The number of query heads of attention module ``mod`` (its ``num_heads``, else its config's
    ``num_attention_heads``); ``None`` where neither is a positive int."""
    heads = getattr(mod, "num_heads", None) or getattr(
        getattr(mod, "config", None), "num_attention_heads", None
    )
    return heads if isinstance(heads, int) and heads > 0 else None


def _sub_model_names(model: Any) -> dict[int, str | None]:
    """``id(config) -> sub_taus key`` for the config of every attention module of ``model``: ``None`` for the text
    model's config (``get_text_config()``, the whole model's config without sub-models) and for configs that are no
    named sub-config (they read ``taus``), else the sub-config name (``"vision_config"``)."""
    mods = _attention_modules(model)
    get = getattr(model.config, "get_text_config", None)
    try:
        text = get() if callable(get) else model.config
    except ValueError:  # several text configs (transformers cannot tell which): every one reads taus
        text = model.config
    if not any(getattr(m, "config", None) is text for m in mods):
        text = model.config
    names = _config_names(model.config)
    out: dict[int, str | None] = {}
    for m in mods:
        c = getattr(m, "config", None)
        out[id(c)] = None if c is text or c is model.config else names.get(id(c))
    return out


def _check_taus_fit(model: Any, cfg: SALEConfig) -> None:
    """``ValueError`` (naming ``taus`` / ``encoder_taus`` / ``sub_taus``) when per-layer thresholds lack a row for an
    attention layer of ``model``, hold another number of heads than it, name a sub-model it does not have, or are
    encoder thresholds for a model without encoder self-attention: the attention function would raise only at the
    first long prompt. Cross-attention layers read no thresholds (they run dense)."""
    if cfg.taus is None and cfg.encoder_taus is None and cfg.sub_taus is None:
        return
    subs = _sub_model_names(model)
    unknown = sorted(set(cfg.sub_taus or {}) - set(subs.values()))
    if unknown:
        have = sorted(n for n in subs.values() if n is not None)
        raise ValueError(
            f"sale_config.sub_taus names {unknown}, but this model has no such sub-model with attention layers of its "
            f"own (it has {have or 'none'}); re-run calibrate() for this model or set sub_taus=None"
        )
    from hf_ext.attention.sale.attention import attention_kind

    # cross-attention runs dense: it reads no thresholds
    mods = [m for m in _attention_modules(model) if attention_kind(m) != "cross"]
    if cfg.encoder_taus is not None:
        text = [attention_kind(m) for m in mods if subs.get(id(getattr(m, "config", None))) is None]
        if "bidirectional" not in text:
            raise ValueError(
                "sale_config.encoder_taus is set, but this model's text model has no non-causal (encoder) "
                "self-attention layers that would read it; re-run calibrate() for this model or set encoder_taus=None"
            )
    for mod in mods:
        heads = _query_heads(mod)
        if heads is None:
            continue
        name = subs.get(id(getattr(mod, "config", None)))
        try:
            cfg.for_sub_model(name).tau_for(
                mod.layer_idx, heads, encoder=attention_kind(mod) == "bidirectional"
            )
        except ValueError as exc:
            if name is None or name not in (cfg.sub_taus or {}):
                raise
            # name the table that does not fit: sub_taus['vision_config'], not taus
            raise ValueError(
                str(exc).replace("sale_config.taus", f"sale_config.sub_taus[{name!r}]")
            ) from None


def set_sale_config(model: Any, config: SALEConfig | dict | None) -> SALEConfig:
    """Validate ``config`` and store it as a plain dict on ``model.config.sale_config`` (and sub-configs).

    A plain dict survives ``save_pretrained`` / ``from_pretrained`` in ``config.json``. Per-layer ``taus`` /
    ``sub_taus`` that do not fit the model's attention layers (a missing layer, another head count, a sub-model the
    model does not have) are a ``ValueError``.

    ``model.config`` gets the whole config. The config of a sub-model listed in ``sub_taus`` (e.g. a vision tower
    whose attention layers number their own ``layer_idx`` from 0) gets those thresholds as its ``taus``; every other
    sub-config gets ``taus`` (the text model's). That is where each attention module looks its thresholds up.
    """
    cfg = SALEConfig.from_dict(config)
    _check_taus_fit(model, cfg)
    subs = _sub_model_names(model)
    for c in _attention_configs(model):
        c.sale_config = (cfg if c is model.config else cfg.for_sub_model(subs.get(id(c)))).to_dict()
    return cfg


def get_sale_config(model: Any) -> SALEConfig:
    """The model's :class:`SALEConfig` (defaults when none is stored)."""
    return SALEConfig.from_dict(getattr(model.config, "sale_config", None))


def enable_sale(model: Any, config: SALEConfig | dict | None = None) -> Any:
    """Switch ``model`` to the ``"sale"`` attention implementation (in place; returns ``model``).

    Args:
        model: a transformers ``PreTrainedModel`` whose attention uses ``AttentionInterface``
            (Llama, Qwen2/3, Mistral, Gemma family, ...).
        config: a :class:`SALEConfig` (or its dict); ``None`` keeps the config already stored on the model
            (e.g. calibrated thresholds loaded by ``from_pretrained``) or uses the defaults.

    The previous implementation is remembered; :func:`disable_sale` restores it.
    """
    from hf_ext.attention.sale._registration import register_now

    register_now()
    if config is None:
        config = getattr(model.config, "sale_config", None)
    cfg = SALEConfig.from_dict(config)  # validate before changing anything
    _check_taus_fit(model, cfg)
    prev = _impl_tree(model.config, _default_impl(model))  # each (sub-)model's
    if _all_sale(prev):  # already all "sale" (loaded with it, or enabled twice): keep what is remembered
        prev = None
    internal = [(c, vars(c).get(_INTERNAL, _MISSING)) for c in _config_tree(model)]
    model.set_attn_implementation("sale")
    if getattr(model.config, "_attn_implementation", None) != "sale":  # refused: leave the model as it was
        # transformers only warns for a model it cannot switch, and still switches the sub-models it can (GOT-OCR2's
        # text model): put every config's implementation back
        for c, value in internal:
            if value is _MISSING:
                vars(c).pop(_INTERNAL, None)
            else:
                vars(c)[_INTERNAL] = value
        raise ValueError(
            f"{type(model).__name__} refused attn_implementation='sale' (it does not dispatch through "
            "transformers' AttentionInterface); SALE supports models that do (Llama, Qwen2/3, Mistral, Gemma, ...)"
        )
    set_sale_config(model, cfg)
    if prev is not None:
        setattr(_owner(model), _PREV_ATTR, prev)
    return model


def disable_sale(model: Any) -> Any:
    """Restore the attention implementations that were active before :func:`enable_sale`, the model's and each
    sub-model's (e.g. a vision tower's); where unknown (the model was loaded with ``attn_implementation="sale"``),
    each (sub-)model on ``"sale"`` gets transformers' default for the model (sdpa where it can, else eager) and the
    others keep theirs. A model no (sub-)model of which runs ``"sale"`` (never enabled, already disabled, or switched
    away by hand) is left as it is.

    The stored ``sale_config`` is kept, so calibrated thresholds survive a disable/enable cycle.
    """
    owner = _owner(model)
    remembered = vars(owner).get(_PREV_ATTR)
    default = _default_impl(model)
    current = _impl_tree(model.config, default)
    if _uses_sale(current):
        model.set_attn_implementation(_without_sale(remembered or current, default))
    vars(owner).pop(_PREV_ATTR, None)  # after the switch: a refused one keeps what enable_sale remembered
    return model


# where transformers' set_attn_implementation writes, on each config
_INTERNAL = "_attn_implementation_internal"
_MISSING = object()


def _config_tree(model: Any) -> list[Any]:
    """``model.config``, the config of every module and every sub-config under those (each once)."""
    out: list[Any] = []
    seen: set[int] = set()
    stack = [model.config, *(getattr(m, "config", None) for m in model.modules())]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen or not hasattr(c, "sub_configs"):
            continue
        seen.add(id(c))
        out.append(c)
        stack.extend(getattr(c, k, None) for k in c.sub_configs or {})
    return out


def _owner(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (``get_base_model()``), which keeps the remembered implementation:
    enabling on the base model and disabling on its ``PeftModel`` (or on the model ``merge_and_unload`` returns,
    after enabling on the ``PeftModel``) then finds it."""
    get_base = getattr(type(model), "get_base_model", None)
    return get_base(model) if callable(get_base) else model
